r"""Aligning the experts of two MoE layers: experts as units, with their neurons nested inside.

This mirrors the KV groups of ``alignment.py``, one level up. A sparse layer has ``E`` experts of
``I`` neurons each (canonical roles ``router``, ``experts_gate``, ``experts_up``, ``experts_down``;
see ``arch/spec.py``). Permuting whole experts, *together with the router rows* (so every token
reaches the same expert with the same weight), is a symmetry of the block; so is permuting the
neurons inside one expert. Aligning lower layer A to upper layer B therefore takes two levels:

1. for every pair of experts ``(i, j)`` (``i`` in A, ``j`` in B), the neuron OT problem between
   their neurons (features: gate row, up row, down column), with optimal mean cost
   :math:`c_{ij}`;
2. the expert OT problem on
   :math:`C_{ij} = \lVert r^A_i - r^B_j \rVert^2 + I \, c_{ij}`,
   :math:`r` the router rows, whose plan :math:`W` says which expert of A becomes which of B.

The aligned A is the barycentric map at both levels:
:math:`\mathrm{expert}'_j = \sum_i n W_{ij}\, N_{ij}(\mathrm{expert}_i)`, with :math:`N_{ij}` the
nested neuron plan of the pair applied to expert *i*'s neurons, and the router rows moved by
:math:`W` alone. For the exact solver both levels are permutations, so the aligned layer computes
exactly what A computes. Attention and a dense or shared-expert MLP are aligned as for any layer
(:func:`~hf_deepen.align.alignment.align_layers`).

The cost is ``E**2`` neuron problems of size ``I`` per new layer (e.g. 64 problems of 14336
neurons for Mixtral-8x7B): exact assignment is cubic in ``I``, so large MoE models are slow with
``solver="exact"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..arch.spec import EXPERT_ROLES, HeadShape
from ..errors import UnsupportedArchitectureError
from .alignment import LayerAlignment, align_layers
from .solvers import Plan, solve, sq_dists

Tensor = torch.Tensor


def has_experts(canon: Mapping[str, Tensor]) -> bool:
    """Whether a canonical layer holds a sparse MoE block."""
    return any(r in canon for r in EXPERT_ROLES)


def expert_neuron_features(canon: Mapping[str, Tensor]) -> Tensor:
    """``[E, I, F]``: per expert and neuron, its gate row, up row and down column."""
    parts = [canon["experts_gate"], canon["experts_up"], canon["experts_down"].transpose(1, 2)]
    return torch.cat([p.to(torch.float64) for p in parts], dim=2)


@dataclass
class MoELayerAlignment(LayerAlignment):
    """A :class:`LayerAlignment` (attention, dense or shared-expert MLP) plus the experts.

    ``experts``: plan over experts; ``expert_neurons``: for each pair ``(i, j)`` of experts that
    carries mass under ``experts``, the plan over their neurons.
    """

    experts: Plan | None = None
    expert_neurons: dict[tuple[int, int], Plan] = field(default_factory=dict)

    def apply_role(self, role: str, t: Tensor, units: slice | None = None) -> Tensor:
        """As :meth:`LayerAlignment.apply_role`, plus the router rows and the expert tensors."""
        if role not in ("router", "experts_gate", "experts_up", "experts_down"):
            return super().apply_role(role, t, units)
        x = t.detach().to(torch.float64)
        W = self.experts.barycentric  # [E, E], columns sum to 1
        if role == "router":
            return W.T @ x
        out = torch.zeros_like(x)
        for (i, j), p in self.expert_neurons.items():
            out[j] += W[i, j] * p.move(x[i], dim=1 if role == "experts_down" else 0)
        return out

    def diagnostics(self) -> dict[str, float]:
        d = super().diagnostics()
        p = self.experts
        d["experts_cost"] = p.cost
        d["experts_identity_cost"] = p.identity_cost
        d["experts_cost_ratio"] = p.cost / p.identity_cost if p.identity_cost > 0 else 1.0
        d["experts_marginal_error"] = p.marginal_error
        d["experts_sharpness"] = p.sharpness
        if self.expert_neurons:
            d["expert_neurons_marginal_error"] = max(q.marginal_error for q in self.expert_neurons.values())
        return d


def align_experts(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], solver: str = "exact", reg: float = 0.01, max_iter: int = 3000,
    tol: float = 1e-4,
) -> tuple[Plan, dict[tuple[int, int], Plan]]:
    """The expert plan of ``a`` (lower) to ``b`` (upper) and the nested neuron plans of its pairs."""
    fa, fb = expert_neuron_features(a), expert_neuron_features(b)
    if fa.shape != fb.shape:
        raise UnsupportedArchitectureError(
            f"the two MoE layers differ in shape (experts x neurons x features {tuple(fa.shape)} vs {tuple(fb.shape)})"
        )
    e, i_size = fa.shape[:2]
    cost = sq_dists(a["router"], b["router"])
    neurons: dict[tuple[int, int], Plan] = {}
    for i in range(e):
        for j in range(e):  # one pair at a time: [I, I] costs, never [E*I, E*I]
            p = solve(sq_dists(fa[i], fb[j]), solver, reg, max_iter, overwrite=True, tol=tol)  # the cost is scratch
            neurons[(i, j)] = p
            cost[i, j] += p.cost * i_size
    experts = solve(cost, solver, reg, max_iter, tol=tol)
    W = experts.barycentric
    return experts, {k: v for k, v in neurons.items() if W[k] > 1e-12}


def align_layer_pair(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    shape: HeadShape,
    solver: str = "exact",
    reg: float = 0.01,
    max_iter: int = 3000,
    costs: Mapping[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    tol: float = 1e-4,
) -> LayerAlignment:
    """Align canonical layer ``a`` to ``b``: :func:`align_layers`, plus the experts of MoE layers.

    ``costs``: precomputed cost matrices for :func:`align_layers` (activation-based alignment; not
    available for experts). ``tol``: Sinkhorn's stopping rule (see :func:`align_layers`)."""
    if has_experts(a) != has_experts(b):
        raise UnsupportedArchitectureError(
            "cannot align a dense layer with a sparse MoE layer: their MLP tensors differ; fuse only layers of the"
            " same kind, or use method='copy'"
        )
    if costs and has_experts(a):
        raise UnsupportedArchitectureError(
            "activation-based alignment does not cover MoE experts yet: use align_on='weights' for this model"
        )
    al = align_layers(a, b, shape, solver, reg, max_iter, device=device, costs=costs, tol=tol)
    if not has_experts(a):
        return al
    experts, neurons = align_experts(a, b, solver, reg, max_iter, tol)
    return MoELayerAlignment(
        shape=al.shape, heads=al.heads, query=al.query, neurons=al.neurons, extra=al.extra,
        experts=experts, expert_neurons=neurons,
    )
