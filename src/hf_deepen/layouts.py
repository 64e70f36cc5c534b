"""Layouts: where new layers go. Each builder turns a base depth and a config into a DepthPlan.

Convention for every layout but SOLAR: a new layer goes right after base layer ``p`` (its
*position*). A fusion (opt, avg) builds it from ``(p, p + 1)``, so ``p`` ranges over ``0 .. L-2``;
a copy (LLaMA Pro) copies layer ``p``, so ``p`` may also be ``L-1``. At most one new layer per
position; to grow further, upscale again (progressive growth).

The default is ``"auto"`` (:mod:`hf_deepen.auto_layout`, chosen by our quality study). The paper's ("top"): one new layer between each adjacent pair ``(i, i+1)`` for ``i`` from
``L/2 - 1`` to ``L - 2``, so 30 -> 45 and 32 -> 48.
"""

from __future__ import annotations

from typing import Callable

from .config import UpscaleConfig
from .errors import PlanError
from .plan import DepthPlan, LayerSource

FUSIONS_NEEDING_PAIR = ("opt", "avg")

LayoutFn = Callable[[int, int, int], list[int]]
_LAYOUTS: dict[str, LayoutFn] = {}


def register_layout(name: str) -> Callable[[LayoutFn], LayoutFn]:
    def deco(fn: LayoutFn) -> LayoutFn:
        _LAYOUTS[name] = fn
        return fn

    return deco


@register_layout("top")
def _top(n_new: int, n_slots: int, num_base: int) -> list[int]:
    # the top-most pairs; for fusions the last slot is (L-2, L-1)
    last = min(n_slots, num_base - 1)
    return list(range(last - n_new, last))


@register_layout("bottom")
def _bottom(n_new: int, n_slots: int, num_base: int) -> list[int]:
    return list(range(n_new))


@register_layout("middle")
def _middle(n_new: int, n_slots: int, num_base: int) -> list[int]:
    start = (n_slots - n_new) // 2
    return list(range(start, start + n_new))


@register_layout("uniform")
def _uniform(n_new: int, n_slots: int, num_base: int) -> list[int]:
    # n_new positions spread evenly over the slots; ends at the last slot (LLaMA Pro: k-1, 2k-1, ...)
    return [((i + 1) * n_slots) // n_new - 1 for i in range(n_new)]


def target_depth(num_base: int, config: UpscaleConfig) -> int:
    """The depth asked for: ``num_layers``, default ``L + L // 2`` (30 -> 45, 32 -> 48)."""
    return config.num_layers if config.num_layers is not None else num_base + num_base // 2


def build_plan(num_base: int, config: UpscaleConfig, scores: list[float] | None = None,
               reason: str | None = None, allowed: set[int] | None = None) -> DepthPlan:
    """Build the depth plan for a model with ``num_base`` decoder layers.

    ``scores`` (``layout="auto"`` only): one score per insertion slot from a calibration pass
    (:mod:`hf_deepen.auto_layout`); ``reason`` is stored in the plan; ``allowed`` (``auto`` only):
    the slots the architecture accepts (default: all).
    """
    if num_base < 1:
        raise PlanError(f"the model has {num_base} decoder layers: nothing to upscale")
    if config.layout == "solar":
        return _solar_plan(num_base, target_depth(num_base, config))

    needs_pair = config.method in FUSIONS_NEEDING_PAIR
    n_slots = num_base - 1 if needs_pair else num_base
    hint = "positions run from 0 (after the first layer) to " + (
        f"{num_base - 2} (between the last two layers) for method={config.method!r}"
        if needs_pair
        else f"{num_base - 1} (after the last layer) for method={config.method!r}"
    )

    if config.layout == "positions":
        positions = list(config.positions or [])
        if not positions:
            raise PlanError("positions=[] inserts nothing: give at least one position")
        bad = [p for p in positions if not 0 <= p < n_slots]
        if bad:
            raise PlanError(f"positions {bad} out of range for a {num_base}-layer model: {hint}")
        dup = sorted({p for p in positions if positions.count(p) > 1})
        if dup:
            raise PlanError(
                f"positions {dup} given more than once: one new layer per position; to grow further,"
                " upscale again after this stage"
            )
        positions = sorted(positions)
    else:
        if config.every_k is not None:
            n_new = n_slots // config.every_k
            if n_new == 0:
                raise PlanError(f"every_k={config.every_k} inserts nothing in {num_base} layers: choose every_k <= {n_slots}")
        else:
            target = target_depth(num_base, config)
            n_new = target - num_base
            if n_new <= 0:
                raise PlanError(
                    f"num_layers={target} does not exceed the model's {num_base} layers: choose num_layers > {num_base}"
                )
        if n_new > n_slots:
            raise PlanError(
                f"{n_new} new layers do not fit in {n_slots} positions of a {num_base}-layer model with"
                f" method={config.method!r} (one new layer per position): choose num_layers <= {num_base + n_slots}"
                " or upscale in stages"
            )
        if config.every_k is not None:
            positions = [config.every_k * (i + 1) - 1 for i in range(n_new)]
        elif config.layout == "auto":
            from .auto_layout import auto_positions

            if scores is None or len(scores) != n_slots:
                raise PlanError(
                    "layout='auto' needs a calibration pass over the model: use DepthUpscaler.plan()/upscale() or"
                    " upscale_checkpoint(), which run it, or pick a fixed layout"
                )
            positions = auto_positions(scores, n_new, allowed=allowed)
        else:
            positions = _LAYOUTS[config.layout](n_new, n_slots, num_base)

    layers: list[LayerSource] = []
    pos = set(positions)
    for i in range(num_base):
        layers.append(LayerSource("base", (i,)))
        if i in pos:
            sources = (i, i + 1) if needs_pair else (i,)
            layers.append(LayerSource("new", sources, config.method))
    return DepthPlan(base_num_layers=num_base, layers=tuple(layers), layout=config.layout, reason=reason)


def _solar_plan(num_base: int, target: int) -> DepthPlan:
    """SOLAR DUS: layers [0, a) of one copy, then [L - b, L) of another, a + b = target.

    32 -> 48 gives 0-23 then 8-31. The layers of the second copy that repeat a layer of the first
    (indices L - b .. a - 1) are recorded as new copies.
    """
    if not num_base < target <= 2 * num_base:
        raise PlanError(
            f"SOLAR makes between {num_base + 1} and {2 * num_base} layers from {num_base}: got num_layers={target}"
        )
    a = (target + 1) // 2
    b = target - a
    layers = [LayerSource("base", (i,)) for i in range(a)]
    for i in range(num_base - b, num_base):
        layers.append(LayerSource("new", (i,), "solar") if i < a else LayerSource("base", (i,)))
    return DepthPlan(base_num_layers=num_base, layers=tuple(layers), layout="solar")
