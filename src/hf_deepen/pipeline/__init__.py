"""The one upscale pipeline, in memory and disk to disk:

    resolve()                      every option decided once -> ResolvedRun (frozen; every stage reads it)
    source.read(j)                 base layer j's tensors: ModelStateSource (a loaded model) or
                                   SafetensorsSource (a checkpoint, read lazily; the next pair's
                                   I/O runs while the current pair aligns)
    align_fuse(run, s, tensors)    a new layer's tensors (OT alignment + fusion: hf_deepen.fuse)
    sink.base(i, j) / sink.new()   SurgerySink (into the loaded model) or ShardWriterSink (sharded
                                   safetensors, written by a background thread)

:func:`execute` drives one run through these stages; ``DepthUpscaler.upscale`` and
``upscale_checkpoint`` only pick the source and the sink, so both give the same tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..arch.spec import ArchSpec, HeadShape
from ..config import UpscaleConfig
from ..errors import AlignmentWarning, PlanError, UnsupportedArchitectureError
from ..fuse import FusionResult, add_stage_seconds, build_layer_state
from ..layouts import FUSIONS_NEEDING_PAIR, build_plan, target_depth
from ..plan import DepthPlan, LayerSource
from ..report import UpscaleReport
from .sink import Sink
from .source import ReadAhead, TensorSource

logger = logging.getLogger(__name__)

#: a plan whose marginals are further off than this (relative) triggers an AlignmentWarning
MARGINAL_TOL = 1e-3
#: a plan costing more than this times the identity's triggers an AlignmentWarning (a soft plan always
#: costs a little more than the optimum, so exactly 1 would warn on every Sinkhorn plan of near-aligned layers)
COST_RATIO_TOL = 1.01


def options(config: UpscaleConfig | dict | None, kwargs: Mapping[str, Any]) -> UpscaleConfig:
    """The :class:`UpscaleConfig` of a call: ``config`` (object, dict or None) with keywords overriding it."""
    if config is None:
        return UpscaleConfig(**kwargs) if kwargs else UpscaleConfig()
    if isinstance(config, dict):
        return UpscaleConfig.from_dict({**config, **kwargs})
    if kwargs:
        return UpscaleConfig.from_dict({**config.to_dict(), **kwargs})
    return config


def make_plan(cfg: UpscaleConfig, spec: ArchSpec, config: Any, num_base: int, scores: Any = None,
              reason: str | None = None) -> DepthPlan:
    """The plan stage: the deeper layer list, checked against the family (MoE: no dense + sparse fusion).

    ``layout="auto"`` chooses among the slots the family accepts: pairs it knows it cannot fuse
    (:meth:`~hf_deepen.arch.spec.ArchSpec.fusion_refusal`) are never proposed; where enough slots fuse two layers
    built alike (:meth:`~hf_deepen.arch.spec.ArchSpec.built_alike`), a fusion of two layers built differently
    (a dense first layer before MoE ones, a layer 0 without an attention norm) is not proposed; and a
    slot the family's ``check_plan`` refuses on its own is dropped and the positions chosen again, so
    the default layout does not ask for a plan a fixed layout could avoid."""
    if cfg.layout != "auto" or scores is None:
        plan = build_plan(num_base, cfg, scores, reason)
        spec.check_plan(plan, config)
        return plan
    allowed = set(range(len(scores)))
    unfusable: dict[int, str] = {}
    if cfg.method in FUSIONS_NEEDING_PAIR:  # pairs the family already knows it cannot fuse
        unfusable = {p: why for p in allowed for why in [spec.fusion_refusal(p, p + 1, cfg.method)] if why}
        allowed -= set(unfusable)
    if cfg.method in FUSIONS_NEEDING_PAIR:
        alike = {p for p in allowed if spec.built_alike(p, p + 1)}  # (a preference: used when there are enough)
        if len(alike) >= target_depth(num_base, cfg) - num_base:  # (hybrid stacks whose kinds alternate keep every slot)
            allowed = alike
    dropped = set(range(len(scores))) - allowed
    refusal: Exception | None = None
    while True:
        try:
            plan = build_plan(num_base, cfg, scores, reason, allowed=allowed)
        except PlanError as e:
            if refusal is not None:  # too few accepted slots left: the family's own message says why
                raise refusal from None
            if unfusable:
                p, why = next(iter(sorted(unfusable.items())))
                raise PlanError(f"{spec.name}: {why} (slot {p}; {len(unfusable)} of {len(scores)} slots pair such layers"
                                f" for method={cfg.method!r}), so the new layers do not fit ({e}): use method='avg' or"
                                " 'copy', fewer new layers, or positions= of your own") from None
            raise
        try:
            spec.check_plan(plan, config)
            break
        except (PlanError, UnsupportedArchitectureError) as e:
            refusal = e
            bad = set()
            for p in (s.sources[0] for s in plan.layers if s.kind == "new"):  # which chosen slots does the family refuse on its own?
                one = build_plan(num_base, dataclasses.replace(cfg, layout="positions", positions=[p], num_layers=None))
                try:
                    spec.check_plan(one, config)
                except (PlanError, UnsupportedArchitectureError):
                    bad.add(p)
            if not bad:
                raise  # the combination, not a slot: the family's own message says what to do
            allowed -= bad
            dropped |= bad
    if dropped and plan.reason:
        plan = dataclasses.replace(plan, reason=f"{plan.reason}; slots skipped (refused by the architecture, or fusing two layers"
                                                 f" built differently): {sorted(dropped)}")
    return plan


@dataclass(frozen=True)
class ResolvedRun:
    """One upscale with every choice resolved; built once by :func:`resolve`, read by every stage."""

    cfg: UpscaleConfig  #: as asked (recorded in the report and the provenance)
    fusion_cfg: UpscaleConfig  #: what fusion reads: ``cfg`` with the zero target resolved
    spec: ArchSpec
    config: Any  #: the base model's config (the sink updates it, in place, when the run finishes)
    plan: DepthPlan
    shape: HeadShape
    zero_target: str | None  #: "outputs" / "post_norm"; None without zero-init
    function_preserving: bool
    base_model: str | None
    #: align_on="activations": base layer -> captured activations (both paths: streaming captures them layer by layer)
    activations: Mapping[int, Any] | None = None
    #: seconds spent resolving (layout calibration, activation capture), copied into the report
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.spec.layers_path + "."

    def where(self, s: LayerSource) -> str:
        """How errors name the source layers of a new layer."""
        return f"{self.config.model_type} layers {list(s.sources)}"

    def new_report(self) -> UpscaleReport:
        rep = UpscaleReport(plan=self.plan, config=self.cfg, architecture=self.spec.name,
                            function_preserving=self.function_preserving)
        rep.timings.update(self.seconds)
        return rep


def resolve(cfg: UpscaleConfig, spec: ArchSpec, config: Any, plan: DepthPlan, base_model: str | None, *,
            capture: Callable[[DepthPlan], Mapping[int, Any]] | None = None,
            seconds: Mapping[str, float] | None = None) -> ResolvedRun:
    """Resolve a run once. Refuses a zero target the family lacks before any work; ``capture`` (activation
    alignment) then runs the calibration pass over the plan's source layers."""
    zero = spec.zero_target(cfg.zero_target) if cfg.zero_init else None
    fusion_cfg = dataclasses.replace(cfg, zero_target=zero) if zero is not None else cfg
    secs = dict(seconds or {})
    acts = None
    if capture is not None:
        t = time.perf_counter()
        acts = capture(plan)
        secs["calibration"] = time.perf_counter() - t
    return ResolvedRun(cfg=cfg, fusion_cfg=fusion_cfg, spec=spec, config=config, plan=plan,
                       shape=spec.head_shape(config), zero_target=zero,
                       function_preserving=spec.preserves_function(cfg, config), base_model=base_model,
                       activations=acts, seconds=secs)


# ---- stages ---------------------------------------------------------------------------------------
def read_stage(run: ResolvedRun, source: TensorSource) -> Callable[[int], dict[str, torch.Tensor]]:
    """Base layer ``j``'s tensors from ``source``; NaN/inf refused with the tensor's name before OT sees it."""
    check = run.cfg.method in ("opt", "avg")

    def read(j: int) -> dict[str, torch.Tensor]:
        state = source.read(j)
        if check:
            from ..validate import check_layers_finite

            check_layers_finite([state], [j], run.prefix)
        return state

    return read


def align_fuse(run: ResolvedRun, s: LayerSource, sources: list[dict[str, torch.Tensor]]) -> FusionResult:
    """The align and fuse stages for one new layer; ``sources`` are consumed (emptied, freed role by role)."""
    context: dict[str, Any] = {}
    if run.activations is not None:
        from ..align.activations import activation_costs

        o = [run.spec.to_canonical(st)[0]["o"] for st in sources]
        a, b = run.activations[s.sources[0]], run.activations[s.sources[1]]
        context["costs"] = activation_costs(a, b, o[0], o[1], run.shape)
    return build_layer_state(run.spec, run.fusion_cfg, run.shape, sources, run.where(s), consume=True, **context)


def check_diagnostics(d: Mapping[str, float], index: int, report: UpscaleReport) -> None:
    """Warn (and record in the report) when an OT plan is off: marginals, or a cost above leaving units in place."""
    msgs = []
    # (a plan asked to stop at a looser sinkhorn_tol, as for bfloat16 layers, is judged by that)
    limit = max(MARGINAL_TOL, float(d.get("sinkhorn_tol", 0.0)))
    for name in ("heads", "neurons", "query", "experts", "expert_neurons"):
        err = d.get(f"{name}_marginal_error")
        if err is not None and err > limit:
            msgs.append(f"{name} plan marginals off by {err:.1e} (> {limit:g}): raise sinkhorn_max_iter or sinkhorn_reg")
        ratio = d.get(f"{name}_cost_ratio")
        if ratio is not None and ratio > COST_RATIO_TOL:
            msgs.append(f"{name} plan costs {ratio:.3f}x leaving units in place: lower sinkhorn_reg or use solver='exact'")
    for m in msgs:
        text = f"new layer {index}: {m}"
        report.warnings.append(text)
        warnings.warn(text, AlignmentWarning, stacklevel=4)


def execute(run: ResolvedRun, source: TensorSource, sink: Sink, report: UpscaleReport, *,
            progress: bool | None = None) -> UpscaleReport:
    """Drive ``run`` from ``source`` to ``sink``, layer by layer of the deeper model.

    The next pair's I/O is started while the current pair aligns (``source.prefetch``), and source
    layers are read ``source.read_ahead`` layers ahead on a background thread; the sink may write in
    the background too. ``report.timings`` gets ``read`` / ``write`` (the threads' own
    seconds), ``read_wait`` / ``write_wait`` (what the pipeline waited for them), ``align+fuse`` with
    its ``cost`` / ``assign`` / ``fuse`` parts, and ``build`` (the whole loop).
    """
    from tqdm.auto import tqdm

    t = report.timings
    for k in ("align+fuse", "cost", "assign", "fuse"):
        t.setdefault(k, 0.0)
    report.params_before = source.num_params()
    plan = run.plan
    order = [j for s in plan.layers if s.kind == "new" for j in s.sources]
    t0 = time.perf_counter()
    with ReadAhead(read_stage(run, source), order, depth=source.read_ahead, prefetch=source.prefetch) as reads:
        bar = tqdm(total=plan.num_layers, desc=f"hf_deepen {run.cfg.method}", unit="layer", disable=not show(progress))
        try:
            for i, s in enumerate(plan.layers):
                if s.kind == "base":
                    sink.base(i, s.sources[0])
                    bar.update()
                    continue
                sources = [reads.next(j) for j in s.sources]
                ta = time.perf_counter()
                res = align_fuse(run, s, sources)
                del sources
                t["align+fuse"] += time.perf_counter() - ta
                report.layers.append({"index": i, "sources": list(s.sources), "method": run.cfg.method,
                                      "diagnostics": res.diagnostics})
                check_diagnostics(res.diagnostics, i, report)
                add_stage_seconds(t, res.diagnostics)  # cost / assign / fuse, inside align+fuse
                d = res.diagnostics
                logger.info("new layer %d from %s: %.1f s (align %.1f s, fuse %.1f s)", i, list(s.sources),
                            time.perf_counter() - ta, d.get("seconds_align", 0.0), d.get("seconds_fuse", 0.0))
                state, res.canon = res.canon, {}
                sink.new(i, state)
                del state
                stages = {"read": reads.seconds, **{k: t[k] for k in ("cost", "assign", "fuse")}, **sink.seconds()}
                bar.set_postfix_str(" ".join(f"{k} {v:.1f}s" for k, v in stages.items()), refresh=False)
                bar.update()
            sink.finish(report)
        finally:
            bar.close()
    t.update(read=reads.seconds, read_wait=reads.wait, **sink.seconds())
    t["build"] = time.perf_counter() - t0
    report.params_after = sink.num_params()
    return report


def show(progress: bool | None) -> bool:
    """Whether to draw the progress bar: as asked, else when stderr is a terminal."""
    if progress is not None:
        return progress
    import sys

    return sys.stderr.isatty()


__all__ = ["ResolvedRun", "align_fuse", "check_diagnostics", "execute", "make_plan", "options", "read_stage", "resolve", "show"]
