"""UpscaleConfig: the whole vocabulary of an upscale, validated and serialisable.

One dataclass holds every choice (method, solver, layout, fusion options), in the spirit of
torchao's ``quantize_(model, config)``: it is validated on construction, round-trips through
``to_dict`` / ``from_dict`` (so it can be stored in the model's config as provenance) and carries a
``version`` so later releases can read old records.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError

CONFIG_VERSION = 1

METHODS = ("opt", "avg", "copy", "solar")
SOLVERS = ("exact", "sinkhorn")
LAYOUTS = ("top", "middle", "bottom", "uniform", "auto", "positions", "solar")
#: the layout when none is asked for: ``"auto"``, the leader of our quality study (benchmarks/README.md,
#: "Quality study": new layers only, both real models); the paper's ``"top"`` measured worst there
DEFAULT_LAYOUT = "auto"
ZERO_TARGETS = ("auto", "outputs", "post_norm")
ALIGN_ON = ("weights", "activations")


@dataclass
class UpscaleConfig:
    """How to make a model deeper.

    Parameters
    ----------
    method:
        How each new layer is made. ``"opt"``: OpT-DeUS, align the lower neighbour's heads and MLP
        neurons to the upper neighbour's with optimal transport, then average (default).
        ``"avg"``: Avg-DeUS, the plain mean of the two neighbours. ``"copy"``: LLaMA Pro block
        expansion, a copy of the layer below. ``"solar"``: SOLAR depth up-scaling, two truncated
        copies of the whole stack concatenated (never function preserving).
    solver:
        OT solver for ``method="opt"``: ``"exact"`` (an assignment problem, solved exactly; from
        4,096 units on a sparse candidate graph, certified optimal by LP duality) or
        ``"sinkhorn"`` (entropic OT, kernel domain when the cost's range allows, after reducing it by
        its row and column minima where it does not, else log domain; applied as a barycentric
        map; in place for large problems, where an underflowing kernel is kept only when what it
        lost is certified negligible, else re-formed with the scalings absorbed).
    align_on:
        What OT compares for ``method="opt"``: ``"weights"`` (the units' parameters, the paper's
        choice; default) or ``"activations"`` (what the units compute on calibration text passed to
        ``upscale(calibration=...)``: neuron activations by correlation, each head's contribution
        to the residual stream by cosine; see ``align/activations.py``). In-memory path only.
    calibration_tokens:
        For ``align_on="activations"`` and ``layout="auto"``: at most this many calibration tokens are used.
    sinkhorn_reg:
        Entropic regularisation, relative to the mean of the cost matrix (the cost is divided by its
        mean before solving, so the value means the same on any model and dtype).
    sinkhorn_max_iter:
        Most Sinkhorn iterations per problem (default 3,000); the cost is linear in this number.
    sinkhorn_tol:
        Sinkhorn stops when the marginals are this close to uniform (L2 norm of the relative gap,
        checked every 10 iterations) or after ``sinkhorn_max_iter``. Default ``None``: the machine
        epsilon of the dtype the new layer is written in, at least 1e-4: 1e-4 for float32 (real
        weights at the default ``sinkhorn_reg`` do not reach it and run all ``sinkhorn_max_iter``),
        9.8e-4 for float16, 7.8e-3 for bfloat16. A tighter plan changes the layer by less than its
        own rounding: on SmolLM2 and Gemma-3 (every new layer of a ``layout="top"`` upscale, weights
        cast to bf16, ``benchmarks/sinkhorn_tol.py``) the bfloat16 rule moves the fused weights from
        the 3,000-iteration result by at most 0.28x of what rounding them to bfloat16 does, and makes
        align + fuse 3.2-4.9x faster.
    layout:
        Where new layers go. ``"auto"`` (default, the leader of our quality study: a calibration pass on
        ``calibration`` text, default CPython's pydoc topics, spreads the new layers along how much each
        base layer changes the hidden state, see ``auto_layout.py``; without a tokenizer for the
        default text it warns (:class:`~hf_deepen.LayoutWarning`) and uses ``"uniform"``, its result
        on a flat profile), ``"top"`` (the paper's: one new layer between each adjacent pair of the
        top half), ``"middle"``, ``"bottom"``, ``"uniform"`` (after every ``every_k``-th layer, or
        spread evenly when ``num_layers`` is given), ``"positions"`` (the explicit list
        ``positions``) and ``"solar"`` (forced by ``method="solar"``). ``every_k`` alone implies
        ``"uniform"``.
    num_layers:
        Target depth. Default: ``L + L // 2`` (30 -> 45, 32 -> 48), as in the paper.
    positions:
        Explicit insertion points: a new layer goes after base layer ``p`` (and, for fusions,
        is built from layers ``p`` and ``p + 1``). Implies ``layout="positions"``.
    every_k:
        For ``layout="uniform"``: a new layer after every k-th base layer (LLaMA Pro).
    zero_init:
        Zero the new layer's output projections (attention ``o_proj``, MLP ``down_proj`` and their
        biases) so the deeper model computes exactly what the base model did. ``None`` means on for
        opt, avg and copy; SOLAR cannot be function preserving and refuses ``True``.
    zero_target:
        What zero-init zeroes. ``"outputs"``: the output projections (above). ``"post_norm"``: the
        gains of the norms a family applies to each block's *output* (Gemma-2/3 sandwich norms,
        OLMo-2's post-norms) are set to the value that makes them output zero (``-1`` for Gemma's
        ``1 + w`` gains, ``0`` for OLMo-2), and the fused projections are kept. Both are exact;
        the difference is training: with zeroed projections the post-norm sees a zero input, whose
        gradient is scaled by ``1 / sqrt(eps)``, so the first update switches the layer fully on,
        while zeroed gains open it smoothly. ``"auto"`` (default): ``"post_norm"`` for families
        with block post-norms, ``"outputs"`` otherwise. Measured in training on Gemma-3-270M (every
        parameter, 50 AdamW steps at lr 1e-4, ``benchmarks/README.md``): ``"outputs"`` ends ~2.8
        nats worse on held-out text; ``"post_norm"``'s new layers open only slowly (a gain moves by
        about the learning rate per step), yet training those gains at 1000x the learning rate (0.12
        nats worse) or inserting the layers without zero-init (0.75 worse) is worse still.
    fusion_weight:
        Weight of the upper neighbour in the fused layer: ``(1 - w) * aligned_lower + w * upper``.
    restore_norm:
        After fusing, rescale each row (input projections) and column (output projections) of a
        fused matrix to the mean norm of its two parents' rows: averaging two different rows
        shrinks them, and this undoes it. ``None`` (default) means on for ``method="opt"`` and off
        otherwise: in our quality benchmark (benchmarks/README.md) it is what puts OT fusion ahead
        of plain copies at the same positions (on every seed); Avg-DeUS stays the paper's plain mean
        unless asked.
    device:
        Where OT runs (cost matrices and Sinkhorn): ``"auto"`` (default: ``"cuda"`` when
        ``torch.cuda.is_available()``, else ``"cpu"``), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The
        exact solver's assignment always runs on the CPU (SciPy); the fused layer is computed where
        the weights are. A GPU computes costs in a different order than a CPU, so the two can
        differ in the last bits of a cost and, on exact ties, in the plan.
    seed:
        Not used by the deterministic solvers; stored for reproducibility of downstream runs.
    """

    method: str = "opt"
    solver: str = "exact"
    align_on: str = "weights"
    calibration_tokens: int = 2048
    sinkhorn_reg: float = 0.01
    sinkhorn_max_iter: int = 3000
    sinkhorn_tol: float | None = None
    layout: str | None = None
    num_layers: int | None = None
    positions: Sequence[int] | None = None
    every_k: int | None = None
    zero_init: bool | None = None
    zero_target: str = "auto"
    fusion_weight: float = 0.5
    restore_norm: bool | None = None
    device: str = "auto"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.align_on not in ALIGN_ON:
            raise ConfigError(f"unknown align_on {self.align_on!r}: choose one of {', '.join(ALIGN_ON)}")
        if self.align_on == "activations" and self.method != "opt":
            raise ConfigError(f"align_on='activations' only applies to method='opt', not {self.method!r}: drop one")
        self.calibration_tokens = _as_int(self.calibration_tokens, "calibration_tokens")
        if self.calibration_tokens <= 0:
            raise ConfigError(f"calibration_tokens must be a positive integer, got {self.calibration_tokens}")
        if self.positions is not None:
            self.positions = [_as_int(p, "positions") for p in self.positions]
            if self.layout not in (None, "positions"):
                raise ConfigError(
                    f"positions= implies layout='positions', but layout={self.layout!r} was given: drop one"
                )
            self.layout = "positions"
        if self.method == "solar":
            if self.layout not in (None, "solar"):
                raise ConfigError("method='solar' fixes its own layout: drop layout=/positions=/every_k=")
            self.layout = "solar"
        elif self.layout == "solar":
            raise ConfigError("layout='solar' only goes with method='solar'")
        if self.layout is None:
            self.layout = "uniform" if self.every_k is not None else DEFAULT_LAYOUT
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.layout == "positions" and self.positions is None:
            raise ConfigError("layout='positions' needs positions=[...]")
        if self.every_k is not None:
            self.every_k = _as_int(self.every_k, "every_k")
            if self.every_k <= 0:
                raise ConfigError(f"every_k must be a positive integer, got {self.every_k}")
            if self.layout != "uniform":
                raise ConfigError("every_k= only goes with layout='uniform'")
            if self.num_layers is not None:
                raise ConfigError("give every_k= or num_layers= for layout='uniform', not both")
        if self.num_layers is not None:
            self.num_layers = _as_int(self.num_layers, "num_layers")
            if self.num_layers <= 0:
                raise ConfigError(f"num_layers must be a positive integer, got {self.num_layers}")
            if self.layout == "positions":
                raise ConfigError("positions= already fixes the depth: drop num_layers=")
        if self.method == "solar" and self.zero_init:
            raise ConfigError(
                "method='solar' is never function preserving (it repeats whole layer ranges, it does not"
                " insert identity layers): drop zero_init=True, or use method='copy' for zero-initialised copies"
            )
        if self.zero_init is None:
            self.zero_init = self.method != "solar"
        if self.restore_norm is None:
            self.restore_norm = self.method == "opt"
        if self.zero_target not in ZERO_TARGETS:
            raise ConfigError(f"unknown zero_target {self.zero_target!r}: choose one of {', '.join(ZERO_TARGETS)}")
        if self.zero_target != "auto" and not self.zero_init:
            raise ConfigError(
                f"zero_target={self.zero_target!r} only applies with zero_init=True: drop one of them"
            )
        if not (self.sinkhorn_reg > 0):
            raise ConfigError(f"sinkhorn_reg must be > 0, got {self.sinkhorn_reg}")
        if self.sinkhorn_max_iter <= 0:
            raise ConfigError(f"sinkhorn_max_iter must be positive, got {self.sinkhorn_max_iter}")
        if self.sinkhorn_tol is not None and not (0.0 < self.sinkhorn_tol < 1.0):
            raise ConfigError(f"sinkhorn_tol must be in (0, 1) (a relative marginal error) or None, got {self.sinkhorn_tol}")
        if not (0.0 <= self.fusion_weight <= 1.0):
            raise ConfigError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"UpscaleConfig version {self.version} is not readable by this release")

    @property
    def function_preserving(self) -> bool:
        return bool(self.zero_init) and self.method != "solar"

    def sinkhorn_tol_for(self, dtype: Any) -> float:
        """Sinkhorn's stopping rule for a new layer written in ``dtype`` (a ``torch.dtype``):
        ``sinkhorn_tol`` when set, else ``max(1e-4, eps)`` (see the class docstring)."""
        if self.sinkhorn_tol is not None:
            return float(self.sinkhorn_tol)
        import torch

        return max(1e-4, torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["positions"] is not None:
            d["positions"] = list(d["positions"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UpscaleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}: valid options are {', '.join(sorted(known))}")
        return cls(**d)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is available, else ``"cpu"``; a named GPU must exist.

    Resolved when an upscale runs, not when the config is made, so one config serves a laptop and
    a GPU box; the stored provenance keeps what was asked (``"auto"``).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but no such CUDA device is available: use device='auto' or 'cpu'")
    return device


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be integers, got {value!r}") from None
    return int(value)


