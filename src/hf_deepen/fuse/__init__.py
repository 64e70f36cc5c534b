"""Fusions: how a new layer is made from its base layer(s). A small registry, one function each.

Every fusion maps canonical layers (see ``arch/spec.py``) to a canonical layer, in float64, and
returns diagnostics. Zero-init (function preservation) and norm restoration are applied here,
after the method, the same way for every method that allows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..align.experts import align_layer_pair
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
from ..config import UpscaleConfig

if TYPE_CHECKING:
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


#: ``fn(sources, shape, cfg, **context)``; ``context`` carries run-time inputs that are not options,
#: e.g. ``costs`` (activation-based cost matrices for ``opt``). Fusions ignore what they do not use.
FusionFn = Callable[..., FusionResult]
_FUSIONS: dict[str, FusionFn] = {}


def register_fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    def deco(fn: FusionFn) -> FusionFn:
        _FUSIONS[name] = fn
        return fn

    return deco


def _f64(c: Canon) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float64) for k, v in c.items()}


def _mix(a: Canon, b: Canon, w: float) -> dict[str, Tensor]:
    return {k: (1.0 - w) * a[k] + w * b[k] for k in b}


def retained_norm(fused: Canon, a: Canon, b: Canon) -> float:
    """Frobenius norm of the fused projection matrices over the mean of their parents' norms."""
    num = den = 0.0
    for r in _MATRICES:
        if r in fused:
            num += float(fused[r].norm())
            den += 0.5 * (float(a[r].norm()) + float(b[r].norm()))
    return num / den if den > 0 else 1.0


def restore_norms(fused: dict[str, Tensor], a: Canon, b: Canon) -> None:
    """Rescale each fused row (input projections) / column (output projections) to the mean norm
    of its two (aligned) parents, undoing the shrinkage of averaging two different vectors."""
    for r in _ROW_ROLES + _COL_ROLES:
        if r not in fused:
            continue
        dim = -1 if r in _ROW_ROLES else -2
        target = 0.5 * (a[r].norm(dim=dim, keepdim=True) + b[r].norm(dim=dim, keepdim=True))
        have = fused[r].norm(dim=dim, keepdim=True)
        fused[r] = fused[r] * torch.where(have > 0, target / have.clamp_min(1e-30), torch.ones_like(have))


@register_fusion("opt")
def fuse_opt(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, costs: Mapping[str, Tensor] | None = None,
             **_: object) -> FusionResult:
    """OpT-DeUS: align the lower layer's heads and neurons (and experts) to the upper layer, then average.

    ``costs``: cost matrices that replace the weight-based ones (``align_on="activations"``)."""
    a, b = (_f64(s) for s in sources)
    al = align_layer_pair(a, b, shape, cfg.solver, cfg.sinkhorn_reg, cfg.sinkhorn_max_iter, costs=costs)
    a_al = al.apply(a)
    fused = _mix(a_al, b, cfg.fusion_weight)
    diag = al.diagnostics()
    diag["retained_norm"] = retained_norm(fused, a, b)
    diag["retained_norm_avg"] = retained_norm(_mix(a, b, cfg.fusion_weight), a, b)
    if cfg.restore_norm:
        restore_norms(fused, a_al, b)
    return FusionResult(fused, diag)


@register_fusion("avg")
def fuse_avg(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, **_: object) -> FusionResult:
    """Avg-DeUS: the plain (weighted) mean of the two neighbours, units left in place."""
    a, b = (_f64(s) for s in sources)
    fused = _mix(a, b, cfg.fusion_weight)
    diag = {"retained_norm": retained_norm(fused, a, b)}
    if cfg.restore_norm:
        restore_norms(fused, a, b)
    return FusionResult(fused, diag)


@register_fusion("copy")
def fuse_copy(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, **_: object) -> FusionResult:
    """LLaMA Pro block expansion: a copy of the layer below."""
    return FusionResult(_f64(sources[0]), {})


@register_fusion("solar")
def fuse_solar(sources: list[Canon], shape: HeadShape, cfg: UpscaleConfig, **_: object) -> FusionResult:
    """SOLAR: the repeated layer is an unchanged copy."""
    return FusionResult(_f64(sources[0]), {})


def make_layer(
    method: str,
    sources: list[Canon],
    shape: HeadShape,
    cfg: UpscaleConfig,
    zero: Mapping[str, float] | None = None,
    **context: object,
) -> FusionResult:
    """Run fusion ``method`` on canonical ``sources`` and apply zero-init if configured.

    ``zero`` maps canonical keys to the value zero-init writes (``ArchSpec.zero_values``); the
    default zeroes the output projections (``OUTPUT_ROLES``).
    """
    res = _FUSIONS[method](sources, shape, cfg, **context)
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
    the dtype and device of the first source.
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
    res = make_layer(cfg.method, canons, shape, cfg, spec.zero_values(cfg.zero_target), **context)
    ref = sources[0]
    out = spec.from_canonical(res.canon)
    res.canon = {k: v.to(dtype=ref[k].dtype, device=ref[k].device) for k, v in out.items()}
    return res


__all__ = ["FusionResult", "build_layer_state", "make_layer", "register_fusion", "restore_norms", "retained_norm"]
