"""UpscaleReport: what an upscale did, how long each stage took, and how well OT aligned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import UpscaleConfig
from .plan import DepthPlan


@dataclass
class UpscaleReport:
    plan: DepthPlan
    config: UpscaleConfig
    architecture: str
    params_before: int = 0
    params_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: the config asks for it and the architecture allows it (post-LN OPT never is); None: unknown
    function_preserving: bool | None = None
    #: torch threads the job ran on, and why (``threads=`` of upscale; "auto": the idle CPUs)
    threads: str | None = None

    def mean(self, key: str) -> float | None:
        vals = [l["diagnostics"][key] for l in self.layers if key in l.get("diagnostics", {})]
        return sum(vals) / len(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "plan": self.plan.to_dict(),
            "config": self.config.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "timings": self.timings,
            "layers": self.layers,
            "warnings": self.warnings,
            "function_preserving": self.function_preserving,
            "threads": self.threads,
        }

    def summary(self) -> str:
        c = self.config
        lines = [
            f"architecture   {self.architecture}",
            f"method         {c.method}" + (f" (solver={c.solver})" if c.method == "opt" else ""),
            f"layers         {self.plan.base_num_layers} -> {self.plan.num_layers} (layout={self.plan.layout})",
            f"new layers     {self.plan.new_layer_indices}",
            f"parameters     {self.params_before:,} -> {self.params_after:,}",
            f"function-preserving  {c.function_preserving if self.function_preserving is None else self.function_preserving}",
            *([f"threads        {self.threads}"] if self.threads else []),
            "time (s)       " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()),
        ]
        if any(l.get("diagnostics") for l in self.layers):
            lines.append("alignment      new  from    heads cost/id  neurons cost/id  marg.err  norm kept (opt | avg)")
            for l in self.layers:
                d = l.get("diagnostics") or {}
                if "heads_cost_ratio" not in d:
                    continue
                merr = max(d.get("heads_marginal_error", 0), d.get("neurons_marginal_error", 0), d.get("query_marginal_error", 0))
                lines.append(
                    f"               {l['index']:>3}  {str(tuple(l['sources'])):<7} {d['heads_cost_ratio']:>11.3f}"
                    f"  {d['neurons_cost_ratio']:>15.3f}  {merr:>8.1e}  {d['retained_norm']:.3f} | {d['retained_norm_avg']:.3f}"
                )
            for key in ("heads_cost_ratio", "neurons_cost_ratio", "retained_norm", "retained_norm_avg"):
                m = self.mean(key)
                if m is not None:
                    lines.append(f"  mean {key:<20} {m:.4f}")
        for w in self.warnings:
            lines.append(f"warning        {w}")
        return "\n".join(lines)
