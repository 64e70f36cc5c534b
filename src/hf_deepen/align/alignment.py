r"""Aligning one decoder layer to another: attention heads and MLP neurons.

Units and their features (all from the canonical layer, see ``arch/spec.py``):

* **MLP neuron** *u*: the concatenation of ``gate[u]``, ``up[u]`` (rows, plus biases) and
  ``down[:, u]`` (column). One plan moves all three, so the MLP computes the same function.
* **Attention**, under GQA with ``G = num_heads / num_kv_heads`` query heads per KV head: the unit
  is a *KV group*, i.e. KV head *g* (its ``k`` and ``v`` rows) with its ``G`` query heads (their
  ``q`` rows and ``o`` columns). Whole heads move, never single rows, so RoPE pairs and every
  ``q . k`` product are intact. Inside matched groups the query heads may also be reordered
  (they all read the same K and V): a second, small OT problem per pair of groups, whose
  optimal cost enters the group cost matrix.

The residual stream is shared by all layers and is never permuted.

A layer without a dense MLP (a sparse MoE layer with no shared expert) has no neuron plan; its
experts are aligned in ``align/experts.py``.

Aligning lower layer A to upper layer B yields, per unit space, a plan ``P``; the aligned A is the
barycentric map ``A'_j = sum_i n P_ij A_i`` (exactly a permutation for the exact solver).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..arch.spec import HeadShape
from . import solvers
from .solvers import Plan, SqDistCost, pairwise_sq_dists, solve, solve_sinkhorn_batch, work_dtype

Tensor = torch.Tensor

#: a large Sinkhorn problem on 16-bit weights runs on the compact float16 cost, its kernel and plan in
#: 16 bits (:func:`~hf_deepen.align.solvers._sinkhorn_inplace`); False: on the float32 matrix (twice
#: the memory; ``benchmarks/sinkhorn16.py`` compares the two)
COMPACT_SINKHORN = True


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


# ---- unit views -------------------------------------------------------------------------------
def _neuron_parts(canon: Mapping[str, Tensor]) -> list[Tensor]:
    """Per-neuron feature blocks, ``[intermediate, *]`` each, in the source dtype (views)."""
    parts = [canon[r] for r in ("gate", "up") if r in canon]
    parts += [canon[r][:, None] for r in ("gate_bias", "up_bias") if r in canon]
    parts.append(canon["down"].T)
    return parts


def neuron_features(canon: Mapping[str, Tensor]) -> Tensor:
    """``[intermediate, F]``: per neuron, gate row, up row (and biases), down column (float64)."""
    return _cat([p.to(torch.float64) for p in _neuron_parts(canon)])


def _query_head_parts(canon: Mapping[str, Tensor], s: HeadShape) -> list[Tensor]:
    """Per query head (``[num_heads, *]`` each): its q rows (and bias) and its o columns."""
    hq = s.num_heads
    parts = [canon["q"].reshape(hq, -1)]
    if "q_bias" in canon:
        parts.append(canon["q_bias"].reshape(hq, -1))
    parts.append(canon["o"].T.reshape(hq, -1))
    return parts


def _kv_head_parts(canon: Mapping[str, Tensor], s: HeadShape) -> list[Tensor]:
    """Per KV head (``[kv_heads, *]`` each): its k and v rows (and biases)."""
    hkv = s.num_kv_heads
    return [canon[r].reshape(hkv, -1) for r in ("k", "k_bias", "v", "v_bias") if r in canon]


# ---- results ----------------------------------------------------------------------------------
@dataclass
class LayerAlignment:
    """How lower layer A maps onto upper layer B.

    ``heads``: plan over KV groups; ``query``: for each pair ``(i, j)`` of KV groups, the plan over
    their query heads (only pairs that carry mass are kept); ``neurons``: plan over MLP units.
    """

    shape: HeadShape
    heads: Plan
    query: dict[tuple[int, int], Plan]
    neurons: Plan | None  # None: the layer has no dense MLP (MoE, see align/experts.py)
    extra: dict = field(default_factory=dict)

    # barycentric application ----------------------------------------------------------------
    def unit_dim(self, role: str) -> int | None:
        """The dimension of canonical tensor ``role`` that :meth:`apply_role` can move a block of units
        at a time (``units=``): the MLP neurons' (rows of gate/up, columns of down), else None."""
        if role in ("gate", "up", "gate_bias", "up_bias", "down") and self.neurons is not None:
            return 1 if role == "down" else 0
        return None

    def apply_role(self, role: str, t: Tensor, units: slice | None = None) -> Tensor:
        """A's canonical tensor ``role`` moved into B's unit order (in :func:`work_dtype`: float32, or
        float64 for float64 weights); residual roles as they are.

        One role at a time, so a caller can fuse and cast each before the next (an 8B layer is
        1.75 GB in float64). Neurons move by :meth:`Plan.move` (an index gather for an exact plan);
        ``units`` (roles with a :meth:`unit_dim` only): just these of B's units, along that dim.
        """
        s = self.shape
        hq, hkv, g, hd = s.num_heads, s.num_kv_heads, s.group_size, s.head_dim
        dim = self.unit_dim(role)
        if dim is not None:
            return self.neurons.move(t, dim=dim, units=units)
        if units is not None:
            raise ValueError(f"internal: role {role!r} cannot be moved a block of units at a time")
        x = t.detach().to(work_dtype(t))
        if role in ("k", "k_bias", "v", "v_bias"):  # KV-head rows: a plain barycentric map over groups
            W = self.heads.barycentric.to(x)  # [hkv, hkv], columns sum to 1
            return (W.T @ x.reshape(hkv, -1)).reshape(t.shape)
        if role in ("q", "q_bias", "o"):  # over groups, then within the matched pair of groups
            W = self.heads.barycentric
            v = (x.T if role == "o" else x).reshape(hkv, g, -1)
            aligned = torch.zeros_like(v)
            for (i, j), qp in self.query.items():
                aligned[j] += float(W[i, j]) * torch.einsum("ab,af->bf", qp.barycentric.to(x), v[i])
            if role == "o":
                return aligned.reshape(hq * hd, -1).T.reshape(t.shape)
            return aligned.reshape(t.shape)
        return x

    def apply(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return A's canonical tensors (float64) moved into B's unit order."""
        return {k: self.apply_role(k, v) for k, v in canon.items()}

    def diagnostics(self) -> dict[str, float]:
        d = {}
        for name, p in (("heads", self.heads), ("neurons", self.neurons)):
            if p is None:
                continue
            d[f"{name}_cost"] = p.cost
            d[f"{name}_identity_cost"] = p.identity_cost
            d[f"{name}_cost_ratio"] = p.cost / p.identity_cost if p.identity_cost > 0 else 1.0
            d[f"{name}_marginal_error"] = p.marginal_error
            d[f"{name}_sharpness"] = p.sharpness
            if p.solver.startswith("sinkhorn"):
                d[f"{name}_kernel_domain"] = float(p.solver == "sinkhorn")
        d.update(self.extra)
        if self.query:
            d["query_marginal_error"] = max(p.marginal_error for p in self.query.values())
        return d


def align_layers(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    shape: HeadShape,
    solver: str = "exact",
    reg: float = 0.01,
    max_iter: int = 3000,
    device: str | torch.device | None = None,
    costs: Mapping[str, Tensor] | None = None,
    tol: float = 1e-4,
) -> LayerAlignment:
    """Align canonical layer ``a`` (lower) to ``b`` (upper): heads by groups, then neurons.

    ``costs`` may supply any of the cost matrices instead of the weight-based ones: ``"query"``
    ``[kv, G, kv, G]``, ``"kv"`` ``[kv, kv]``, ``"neurons"`` ``[I, I]`` (see ``activations.py``). ``tol``: Sinkhorn's stopping rule (relative marginal error, see
    :func:`~hf_deepen.align.solvers.solve_sinkhorn`).

    The layers stay in their own dtype; costs are built by :func:`pairwise_sq_dists` on ``device``
    (default: where the weights are), where Sinkhorn then runs too; the exact solver runs on the
    CPU. Seconds spent are returned in ``extra`` (``seconds_heads``, ``seconds_neuron_cost``,
    ``seconds_neuron_solve``).
    """
    hkv, g = shape.num_kv_heads, shape.group_size
    t0 = time.perf_counter()
    # query-head problems for every pair of KV groups; their optimal cost joins the group cost.
    # They are tiny (g x g; 64 of 4 x 4 for Llama-3.1-8B). Exact: one by one (2 ms for all 64).
    # Sinkhorn: batched, since one POT call each costs ~0.4 s at small reg (measured, see
    # solve_sinkhorn_batch).
    costs = costs or {}  # precomputed (activation-based) costs replace the weight-based ones
    if "query" in costs:
        q_cost = costs["query"].to(torch.float64)
    else:
        q_cost = pairwise_sq_dists(_query_head_parts(a, shape), _query_head_parts(b, shape), device)
    q_cost = q_cost.reshape(hkv, g, hkv, g)
    if "kv" in costs:
        group_cost = costs["kv"].to(torch.float64).clone()
    else:
        group_cost = pairwise_sq_dists(_kv_head_parts(a, shape), _kv_head_parts(b, shape), device)
    pairs = [(i, j) for i in range(hkv) for j in range(hkv)]
    if solver == "sinkhorn":
        plans = solve_sinkhorn_batch(q_cost.permute(0, 2, 1, 3).reshape(hkv * hkv, g, g), reg, max_iter, tol)
    else:
        plans = [solve(q_cost[i, :, j, :], solver, reg, max_iter, tol=tol) for i, j in pairs]
    query: dict[tuple[int, int], Plan] = dict(zip(pairs, plans))
    for (i, j), p in query.items():
        group_cost[i, j] += p.cost * g
    heads = solve(group_cost, solver, reg, max_iter, tol=tol)
    W = heads.barycentric
    query = {k: v for k, v in query.items() if W[k] > 1e-12}
    t1 = time.perf_counter()

    neurons = None
    t2 = t3 = time.perf_counter()
    if "down" in a:  # (a sparse MoE layer without a shared expert has no dense MLP: align/experts.py)
        oracle = None
        if "neurons" in costs:
            cost = costs["neurons"]
        else:  # float32 arithmetic (see SqDistCost). The exact solver gets the compact float16 form
            # (half the memory) and certifies its assignment with the exact costs. A large Sinkhorn
            # problem runs in the matrix (its plan overwrites it): the compact form too when the
            # weights are 16-bit (a bfloat16 kernel, a column-scaled float16 plan), else float32
            parts_a, parts_b = _neuron_parts(a), _neuron_parts(b)
            oracle = SqDistCost(parts_a, parts_b, device)
            n = parts_a[0].shape[0]
            narrow = all(p.dtype in (torch.float16, torch.bfloat16) for p in parts_a + parts_b)
            big = narrow and n * n > solvers.INPLACE_MIN_ENTRIES and COMPACT_SINKHORN
            cost = oracle.matrix(compact=solver == "exact" or big)
        t2 = time.perf_counter()
        # a cost built here is scratch: a large Sinkhorn problem runs in its memory
        neurons = solve(cost, solver, reg, max_iter, overwrite="neurons" not in costs, oracle=oracle, tol=tol)
        del cost
        t3 = time.perf_counter()
    extra = {"seconds_heads": t1 - t0, "seconds_neuron_cost": t2 - t1, "seconds_neuron_solve": t3 - t2}
    if neurons is not None and neurons.certified:
        extra["neurons_certificate_band"] = float(neurons.band)
        extra["neurons_float64_fallback"] = float(neurons.certified == "float64 fallback")
        extra["neurons_re_solved"] = float(neurons.certified.endswith("re-solved"))
    return LayerAlignment(shape=shape, heads=heads, query=query, neurons=neurons, extra=extra)
