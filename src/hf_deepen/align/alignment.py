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

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..arch.spec import HeadShape
from .solvers import Plan, solve, sq_dists

Tensor = torch.Tensor


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


# ---- unit views -------------------------------------------------------------------------------
def neuron_features(canon: Mapping[str, Tensor]) -> Tensor:
    """``[intermediate, F]``: per neuron, gate row, up row (and biases), down column."""
    parts = [canon[r] for r in ("gate", "up") if r in canon]
    parts += [canon[r][:, None] for r in ("gate_bias", "up_bias") if r in canon]
    parts.append(canon["down"].T)
    return _cat([p.to(torch.float64) for p in parts])


def _query_head_features(canon: Mapping[str, Tensor], s: HeadShape) -> Tensor:
    """``[kv_heads, G, F]``: per query head, its q rows (and bias) and its o columns."""
    hq, g, hd = s.num_heads, s.group_size, s.head_dim
    parts = [canon["q"].reshape(hq, -1)]
    if "q_bias" in canon:
        parts.append(canon["q_bias"].reshape(hq, -1))
    parts.append(canon["o"].T.reshape(hq, -1))
    return torch.cat([p.to(torch.float64) for p in parts], dim=1).reshape(s.num_kv_heads, g, -1)


def _kv_head_features(canon: Mapping[str, Tensor], s: HeadShape) -> Tensor:
    """``[kv_heads, F]``: per KV head, its k and v rows (and biases)."""
    hkv = s.num_kv_heads
    parts = [canon[r].reshape(hkv, -1) for r in ("k", "k_bias", "v", "v_bias") if r in canon]
    return torch.cat([p.to(torch.float64) for p in parts], dim=1)


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
    def apply(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return A's canonical tensors (float64) moved into B's unit order."""
        s = self.shape
        out = {k: v.to(torch.float64) for k, v in canon.items()}
        hq, hkv, g, hd = s.num_heads, s.num_kv_heads, s.group_size, s.head_dim
        W = self.heads.barycentric  # [hkv, hkv], columns sum to 1

        # KV-head rows: a plain barycentric map over groups.
        for r in ("k", "k_bias", "v", "v_bias"):
            if r in out:
                t = out[r].reshape(hkv, -1)
                out[r] = (W.T @ t).reshape(canon[r].shape)

        # Query-head rows / o columns: over groups, then within the matched pair of groups.
        q_like = {"q": out["q"].reshape(hkv, g, -1), "o": out["o"].T.reshape(hkv, g, -1)}
        if "q_bias" in out:
            q_like["q_bias"] = out["q_bias"].reshape(hkv, g, -1)
        aligned = {k: torch.zeros_like(v) for k, v in q_like.items()}
        for (i, j), qp in self.query.items():
            w = W[i, j]
            Q = qp.barycentric  # [g, g]
            for k, v in q_like.items():
                aligned[k][j] += w * torch.einsum("ab,af->bf", Q, v[i])
        out["q"] = aligned["q"].reshape(canon["q"].shape)
        out["o"] = aligned["o"].reshape(hq * hd, -1).T.reshape(canon["o"].shape)
        if "q_bias" in aligned:
            out["q_bias"] = aligned["q_bias"].reshape(canon["q_bias"].shape)

        # MLP neurons.
        if self.neurons is not None:
            N = self.neurons.barycentric
            for r in ("gate", "up", "gate_bias", "up_bias"):
                if r in out:
                    out[r] = N.T @ out[r]
            out["down"] = out["down"] @ N
        return out

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
    costs: Mapping[str, Tensor] | None = None,
) -> LayerAlignment:
    """Align canonical layer ``a`` (lower) to ``b`` (upper): heads by groups, then neurons.

    ``costs`` may supply any of the cost matrices instead of the weight-based ones: ``"query"``
    ``[kv, G, kv, G]``, ``"kv"`` ``[kv, kv]``, ``"neurons"`` ``[I, I]`` (see ``activations.py``).
    """
    hkv, g = shape.num_kv_heads, shape.group_size
    costs = costs or {}

    # query-head problems for every pair of KV groups; their optimal cost joins the group cost
    if "query" in costs:
        q_cost = costs["query"].to(torch.float64)
    else:
        qa, qb = _query_head_features(a, shape), _query_head_features(b, shape)
        q_cost = sq_dists(qa.reshape(hkv * g, -1), qb.reshape(hkv * g, -1)).reshape(hkv, g, hkv, g)
    query: dict[tuple[int, int], Plan] = {}
    if "kv" in costs:
        group_cost = costs["kv"].to(torch.float64).clone()
    else:
        group_cost = sq_dists(_kv_head_features(a, shape), _kv_head_features(b, shape))
    for i in range(hkv):
        for j in range(hkv):
            p = solve(q_cost[i, :, j, :], solver, reg, max_iter)
            query[(i, j)] = p
            group_cost[i, j] += p.cost * g
    heads = solve(group_cost, solver, reg, max_iter)
    W = heads.barycentric
    query = {k: v for k, v in query.items() if W[k] > 1e-12}

    neurons = None
    if "down" in a:
        n_cost = costs["neurons"] if "neurons" in costs else sq_dists(neuron_features(a), neuron_features(b))
        neurons = solve(n_cost, solver, reg, max_iter)
    return LayerAlignment(shape=shape, heads=heads, query=query, neurons=neurons)
