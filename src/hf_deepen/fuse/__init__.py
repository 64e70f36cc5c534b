"""Fusions: how a new layer is made from its base layer(s). A small registry, one function each.

Every fusion maps canonical layers (see ``arch/spec.py``) to a canonical layer, computing in
float32 (float64 for float64 weights) one role at a time and returning each role in the requested dtype, and returns diagnostics. Zero-init (function preservation) and norm restoration are applied here,
after the method, the same way for every method that allows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import time
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..align.experts import align_layer_pair
from ..align.solvers import work_dtype
from ..arch.spec import (
    EXPERT_COLS,
    EXPERT_ROWS,
    KV_HEAD_ROWS,
    NEURON_COLS,
    NEURON_ROWS,
    OUTPUT_ROLES,
    QUERY_HEAD_COLS,
    QUERY_HEAD_ROWS,
    HeadShape,
)
from ..config import UpscaleConfig, resolve_device

if TYPE_CHECKING:
    from ..align.alignment import LayerAlignment
    from ..arch.spec import ArchSpec

Tensor = torch.Tensor
Canon = Mapping[str, Tensor]

# (MoE expert tensors are 3-D: a row is the last dimension, a column the one before)
_ROW_ROLES = tuple(r for r in QUERY_HEAD_ROWS + KV_HEAD_ROWS + NEURON_ROWS if not r.endswith("_bias")) + EXPERT_ROWS
_COL_ROLES = QUERY_HEAD_COLS + NEURON_COLS + EXPERT_COLS
_MATRICES = _ROW_ROLES + _COL_ROLES


@dataclass
class FusionResult:
    canon: dict[str, Tensor]
    diagnostics: dict[str, float] = field(default_factory=dict)


#: ``fn(sources, shape, cfg, dtype=torch.float64, **context) -> FusionResult``; ``context`` carries
#: run-time inputs that are not options, e.g. ``costs`` (activation-based cost matrices for ``opt``).
#: Fusions ignore what they do not use.
FusionFn = Callable[..., FusionResult]
_FUSIONS: dict[str, FusionFn] = {}


def register_fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    def deco(fn: FusionFn) -> FusionFn:
        _FUSIONS[name] = fn
        return fn

    return deco


#: elements per chunk when a norm is taken over float64 copies (bounds the temporaries: ~6 of 4 MB; a
#: fixed number of rows would make them 117 MB each for the 14,336-wide down projection of an 8B layer,
#: and 2^21 elements made SmolLM2's fusion stage 1.7x slower: larger temporaries cost more to allocate)
_CHUNK_ELEMS = 1 << 19


def _norms(a: Tensor, b: Tensor, w: float) -> tuple[float, float, float]:
    """``|a|, |b|, |(1 - w) a + w b|`` (Frobenius, float64), over row chunks of float64 copies."""
    sa = sb = sm = 0.0
    rows = max(1, _CHUNK_ELEMS // max(1, a[:1].numel()))
    for i in range(0, a.shape[0], rows):
        x = a[i : i + rows].detach().to(torch.float64)
        y = b[i : i + rows].detach().to(torch.float64)
        sa += float((x * x).sum())
        sb += float((y * y).sum())
        m = (1.0 - w) * x + w * y
        sm += float((m * m).sum())
    return math.sqrt(sa), math.sqrt(sb), math.sqrt(sm)


def retained_norm(fused: Canon, a: Canon, b: Canon) -> float:
    """Frobenius norm of the fused projection matrices over the mean of their parents' norms."""
    num = den = 0.0
    for r in _MATRICES:
        if r in fused:
            num += float(fused[r].norm())
            den += 0.5 * (float(a[r].norm()) + float(b[r].norm()))
    return num / den if den > 0 else 1.0


def _unit_norms(r: str, t: Tensor) -> Tensor:
    """Norms of ``t``'s rows (input projections) or columns (output projections), keepdim. A column's
    norm is taken as a row of the transposed copy: a reduction along contiguous memory rounds the
    same whatever the number of columns, so fusing a block of units at a time changes no bit."""
    if r in _ROW_ROLES:
        return t.norm(dim=-1, keepdim=True)
    return t.mT.contiguous().norm(dim=-1, keepdim=True).mT


def _norm_target(r: str, a: Tensor, b: Tensor) -> Tensor | None:
    if r not in _ROW_ROLES + _COL_ROLES:
        return None
    return 0.5 * (_unit_norms(r, a) + _unit_norms(r, b))


def _restore(r: str, f: Tensor, target: Tensor | None, inplace: bool = False) -> Tensor:
    if target is None:
        return f
    have = _unit_norms(r, f)
    scale = torch.where(have > 0, target / have.clamp_min(1e-30), torch.ones_like(have))
    return f.mul_(scale) if inplace else f * scale


def restore_norms(fused: dict[str, Tensor], a: Canon, b: Canon) -> None:
    """Rescale each fused row (input projections) / column (output projections) to the mean norm
    of its two (aligned) parents, undoing the shrinkage of averaging two different vectors."""
    for r in _ROW_ROLES + _COL_ROLES:
        if r in fused:
            fused[r] = _restore(r, fused[r], _norm_target(r, a[r], b[r]))


#: bytes of one widened block of a role when :func:`_fuse_roles` fuses it a block of units at a time
#: (2,048 of Llama-3.1-8B's 14,336 neurons, 32 MB in float32): the two widened parents and their mix
#: then take ~0.1 GB instead of ~0.7 GB for the whole role
_FUSE_BLOCK_BYTES = 1 << 25


def _unit_blocks(t: Tensor, dim: int | None) -> list[slice | None]:
    """Blocks of units along ``dim`` of ``t`` (one block, ``None``, when it cannot be split)."""
    if dim is None or t.dim() < 2:
        return [None]
    n = t.shape[dim]
    per = max(1, _FUSE_BLOCK_BYTES // (4 * max(1, t.numel() // n)))
    return [slice(i, min(n, i + per)) for i in range(0, n, per)] if per < n else [None]


def _shares(x: Tensor, y: Tensor) -> bool:
    """``x`` is (a view of) ``y``'s memory."""
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


def _fuse_roles(
    a: Canon, b: Canon, cfg: UpscaleConfig, dtype: torch.dtype, align: "LayerAlignment | None" = None,
    consume: bool = False,
) -> FusionResult:
    """``(1 - w) * align(a) + w * b`` role by role, each cast to ``dtype`` before the next.

    Arithmetic is float32 per role (:func:`~hf_deepen.align.solvers.work_dtype`: exact for the
    inputs of bf16/fp16 weights, float64 only for float64 weights), and only one role is ever held
    widened: an 8B layer is 0.87 GB in float32, its largest role 0.23 GB. Roles whose units the
    alignment can move a block at a time (``align.unit_dim``: the MLP neurons) are fused a block of
    units at a time into the output, and only a block is ever widened (:data:`_FUSE_BLOCK_BYTES`).
    Every step is per unit, so the result is the same (a dense plan's float32 products up to their
    summation order, which the block's shape may change).
    ``align`` (a :class:`~hf_deepen.align.alignment.LayerAlignment`) moves A's units into B's order
    (default: leave them). ``consume``: ``a`` and ``b`` are the caller's to drop, role by role
    (streaming: less memory at the peak).
    """
    w = cfg.fusion_weight
    fused: dict[str, Tensor] = {}
    num = den = num_avg = 0.0
    for r in list(b):
        if r in _MATRICES:
            na, nb, nm = _norms(a[r], b[r], w)
            den += 0.5 * (na + nb)
            num_avg += nm
        dim = align.unit_dim(r) if align is not None else None
        blocks = _unit_blocks(b[r], dim)
        out = None if blocks == [None] else torch.empty(b[r].shape, dtype=dtype, device=b[r].device)
        sq = 0.0
        for sl in blocks:
            if sl is None:
                a_r = align.apply_role(r, a[r]) if align is not None else a[r].detach().to(work_dtype(a[r], b[r]))
                b_r = b[r].detach()
            else:
                a_r = align.apply_role(r, a[r], units=sl)
                b_r = b[r].detach().narrow(dim, sl.start, sl.stop - sl.start)
            # one memory layout for both parents (the aligned ``o`` comes back transposed): a norm's
            # rounding depends on the reduction order, and restore_norm must leave a self-fusion exact
            a_r = a_r.contiguous()
            b_r = b_r.to(a_r.dtype).contiguous()
            # the mix below works in place (the same roundings as (1 - w) * a + w * b, without two
            # temporaries): never on a caller's tensor
            if _shares(a_r, a[r]):
                a_r = a_r.clone()
            if _shares(b_r, b[r]):
                b_r = b_r.clone()
            target = _norm_target(r, a_r, b_r) if cfg.restore_norm else None
            f = a_r.mul_(1.0 - w).add_(b_r.mul_(w))
            del a_r, b_r
            if r in _MATRICES:
                sq += float(f.norm()) ** 2
            f = _restore(r, f, target, inplace=True)  # f is ours: no second float64 copy
            if sl is None:
                out = f.to(dtype)
            else:
                out.narrow(dim, sl.start, sl.stop - sl.start).copy_(f)
            del f
        fused[r] = out
        num += math.sqrt(sq)
        if consume:  # the caller gave the sources up: each role is freed as soon as it is fused
            a.pop(r, None)
            b.pop(r, None)
    diag = {"retained_norm": num / den if den > 0 else 1.0}
    if align is not None:
        diag["retained_norm_avg"] = num_avg / den if den > 0 else 1.0
    return FusionResult(fused, diag)


@register_fusion("opt")
def fuse_opt(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, dtype: torch.dtype = torch.float64,
             costs: Mapping[str, Tensor] | None = None, consume: bool = False, **_: object) -> FusionResult:
    """OpT-DeUS: align the lower layer's heads and neurons (and experts) to the upper layer, then average.

    ``costs``: cost matrices that replace the weight-based ones (``align_on="activations"``)."""
    a, b = sources
    t0 = time.perf_counter()
    tol = cfg.sinkhorn_tol_for(dtype)  # (dtype: the new layer's, float64 when its sources mix dtypes)
    al = align_layer_pair(a, b, shape, cfg.solver, cfg.sinkhorn_reg, cfg.sinkhorn_max_iter, costs=costs,
                          device=resolve_device(cfg.device), tol=tol)
    t1 = time.perf_counter()
    res = _fuse_roles(a, b, cfg, dtype, al, consume=consume)
    diag = al.diagnostics()
    diag.update(res.diagnostics)
    if cfg.solver == "sinkhorn":
        diag["sinkhorn_tol"] = tol
    diag["seconds_fuse"] = time.perf_counter() - t1
    diag["seconds_align"] = t1 - t0
    return FusionResult(res.canon, diag)


@register_fusion("avg")
def fuse_avg(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, dtype: torch.dtype = torch.float64,
             **_: object) -> FusionResult:
    """Avg-DeUS: the plain (weighted) mean of the two neighbours, units left in place."""
    a, b = sources
    return _fuse_roles(a, b, cfg, dtype, consume=bool(_.get("consume")))


@register_fusion("copy")
def fuse_copy(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, dtype: torch.dtype = torch.float64,
             **_: object) -> FusionResult:
    """LLaMA Pro block expansion: a copy of the layer below."""
    return FusionResult({k: v.detach().to(dtype) for k, v in sources[0].items()}, {})


@register_fusion("solar")
def fuse_solar(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, dtype: torch.dtype = torch.float64,
             **_: object) -> FusionResult:
    """SOLAR: the repeated layer is an unchanged copy."""
    return FusionResult({k: v.detach().to(dtype) for k, v in sources[0].items()}, {})


def make_layer(
    method: str,
    sources: list[Canon],
    shape: HeadShape,
    cfg: UpscaleConfig,
    zero: Mapping[str, float] | None = None,
    dtype: torch.dtype = torch.float64,
    **context: object,
) -> FusionResult:
    """Run fusion ``method`` on canonical ``sources`` and apply zero-init if configured.

    The fusion computes in float32 (float64 for float64 weights) and returns its tensors in
    ``dtype`` (cast role by role).
    ``zero`` maps canonical keys to the value zero-init writes (``ArchSpec.zero_values``); the
    default zeroes the output projections (``OUTPUT_ROLES``).
    """
    res = _FUSIONS[method](sources, shape, cfg, dtype=dtype, **context)
    if cfg.zero_init:
        for key, value in (zero if zero is not None else {r: 0.0 for r in OUTPUT_ROLES}).items():
            if key in res.canon:
                res.canon[key] = torch.full_like(res.canon[key], value)
    return res


def build_layer_state(
    spec: "ArchSpec",
    cfg: UpscaleConfig,
    shape: HeadShape,
    sources: list[Mapping[str, Tensor]],
    where: str,
    **context: object,
) -> FusionResult:
    """One new layer's state dict from its source layers' state dicts (shared by the in-memory and
    the streaming paths, so both give the same tensors). ``where`` names the model in errors.

    The result's ``canon`` holds the layer's *state dict* (named as the family names it), cast to
    the dtype and device of the first source. ``consume=True`` (in ``context``): the caller hands the
    source dicts over; they are emptied and each role is freed once fused.
    """
    from ..errors import UnsupportedArchitectureError

    spec = spec.for_state(sources[0])  # the layout the sources are stored in (MoE: model or checkpoint)
    canons = []
    for j, state in enumerate(sources):
        canon, unknown = spec.to_canonical(state)
        if cfg.method == "opt":
            if unknown:
                raise UnsupportedArchitectureError(
                    f"{where}: OT fusion does not know how tensor(s) {', '.join(sorted(unknown))} relate to heads or"
                    " neurons; list them in the spec's residual= if they live on the residual stream, or use"
                    " method='avg'/'copy'"
                )
            spec.check_shapes(canon, shape, where)
        canons.append(canon)
    ref = {k: (t.dtype, t.device) for k, t in sources[0].items()}
    if context.get("consume"):  # the canonical views hold the tensors now; fused roles are freed one by one
        for state in sources:
            state.clear()
    dtypes = {d for d, _ in ref.values()}
    # one dtype for the whole layer (the usual case): fuse straight into it, role by role, so a
    # float64 copy of the whole layer never exists; the cast is the same either way
    fuse = getattr(spec, "make_layer", make_layer)  # a discovered spec fuses its own proven units (opt)
    res = fuse(cfg.method, canons, shape, cfg, spec.zero_values(cfg.zero_target),
                     dtype=dtypes.pop() if len(dtypes) == 1 else torch.float64, **context)
    del canons
    out = spec.from_canonical(res.canon)
    res.canon = {k: v.to(dtype=ref[k][0], device=ref[k][1]) for k, v in out.items()}
    return res


def add_stage_seconds(timings: dict[str, float], diagnostics: Mapping[str, float]) -> None:
    """Accumulate one new layer's OT stages into a report's ``timings``: ``cost`` (cost matrices),
    ``assign`` (the plans: assignment and certificate, or Sinkhorn) and ``fuse`` seconds."""
    d = diagnostics
    for key, parts in (("cost", ("seconds_heads", "seconds_neuron_cost")), ("assign", ("seconds_neuron_solve",)),
                       ("fuse", ("seconds_fuse",))):
        timings[key] = timings.get(key, 0.0) + sum(float(d.get(p, 0.0)) for p in parts)


__all__ = ["FusionResult", "add_stage_seconds", "build_layer_state", "make_layer", "register_fusion", "restore_norms", "retained_norm"]
