"""DepthUpscaler: model -> spec -> plan -> alignment/fusion -> surgery -> the same model, deeper."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .arch import get_module, get_spec
from .arch.spec import ArchSpec
from .config import UpscaleConfig
from .errors import AlignmentWarning, ConfigError, UnsupportedModelError
from .fuse import add_stage_seconds, build_layer_state
from .io import atomic_save, model_card, prepare_model, write_json
from .layouts import build_plan
from .plan import DepthPlan
from .report import UpscaleReport
from .surgery import PROVENANCE_KEY, apply_plan, record_provenance, update_config

#: from_pretrained kwargs that also apply to the tokenizer
_TOKENIZER_KWARGS = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "subfolder", "trust_remote_code")
#: a plan whose marginals are further off than this (relative) triggers an AlignmentWarning
MARGINAL_TOL = 1e-3
#: a plan costing more than this times the identity's triggers an AlignmentWarning (a soft plan always
#: costs a little more than the optimum, so exactly 1 would warn on every Sinkhorn plan of near-aligned layers)
COST_RATIO_TOL = 1.01


class DepthUpscaler:
    """Make a pretrained decoder-only model deeper.

    >>> up = DepthUpscaler.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> model = up.upscale()                      # OpT-DeUS, exact OT, top-half interleave
    >>> model.save_pretrained("out")

    The model is changed **in place**: base layers are reused, not copied, new layers are inserted
    into the same ``ModuleList``, and the same ``PreTrainedModel`` object is returned (as PEFT's
    ``inject_adapter`` and torchao's ``quantize_`` do). Keep a copy, or reload, to compare with the
    base model. After :meth:`upscale`, :attr:`report` holds timings and alignment diagnostics.
    """

    def __init__(self, model: PreTrainedModel, *, spec: ArchSpec | None = None, base_model: str | None = None):
        if not isinstance(model, PreTrainedModel):
            raise UnsupportedModelError(
                f"DepthUpscaler takes a transformers PreTrainedModel, got {type(model).__name__}: load it with"
                " AutoModelForCausalLM.from_pretrained(...) or use DepthUpscaler.from_pretrained(...)"
            )
        prepare_model(model)
        self.model = model
        self.spec = spec or get_spec(model)
        self.base_model = base_model or getattr(model.config, "_name_or_path", None) or None
        self.report: UpscaleReport | None = None
        self._load: tuple[str, dict[str, Any]] | None = None
        self._tokenizer = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *, trust_remote_code: bool = False, model_class: Any = None,
        **kwargs: Any
    ) -> "DepthUpscaler":
        """Load with ``AutoModelForCausalLM.from_pretrained``; every keyword passes through.

        ``model_class``: another class to load with (``AutoModelForMaskedLM`` for an encoder such as
        BERT or ModernBERT, ``AutoModel`` for a bare stack). No remote code runs unless
        ``trust_remote_code=True`` is given.
        """
        from .validate import checkpoint_errors, preflight

        t0 = time.perf_counter()
        source = preflight(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        with checkpoint_errors(pretrained_model_name_or_path):
            model = (model_class or AutoModelForCausalLM).from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                          **kwargs)
        name = str(pretrained_model_name_or_path)
        if kwargs.get("gguf_file"):
            name = f"{name}/{kwargs['gguf_file']}" if Path(name).is_dir() else f"{name}:{kwargs['gguf_file']}"
        up = cls(model, base_model=name)
        up.load_seconds = time.perf_counter() - t0
        tok_kwargs = {k: v for k, v in kwargs.items() if k in _TOKENIZER_KWARGS}
        tok_kwargs["trust_remote_code"] = trust_remote_code
        up._load = (str(pretrained_model_name_or_path), tok_kwargs)
        return up

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of a model loaded with :meth:`from_pretrained` (loaded on first use)."""
        if self._tokenizer is None and self._load is not None:
            from transformers import AutoTokenizer

            path, kw = self._load
            self._tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        return self._tokenizer

    # ---- planning ---------------------------------------------------------------------------
    def _layers(self) -> torch.nn.ModuleList:
        layers = get_module(self.model, self.spec.layers_path)
        n_cfg = self.spec.num_layers(self.model.config)
        if len(layers) != n_cfg:
            raise UnsupportedModelError(
                f"the model has {len(layers)} decoder layers but config.num_hidden_layers={n_cfg}: fix the config"
            )
        return layers

    @staticmethod
    def _config(config: UpscaleConfig | dict | None, kwargs: dict[str, Any]) -> UpscaleConfig:
        if config is None:
            return UpscaleConfig(**kwargs) if kwargs else UpscaleConfig()
        if isinstance(config, dict):
            return UpscaleConfig.from_dict({**config, **kwargs})
        if kwargs:
            return UpscaleConfig.from_dict({**config.to_dict(), **kwargs})
        return config

    def plan(self, config: UpscaleConfig | dict | None = None, *, calibration: Any = None, tokenizer: Any = None,
             **kwargs: Any) -> DepthPlan:
        """The depth plan :meth:`upscale` would follow, without changing anything.

        ``layout="auto"`` runs its calibration pass here (on ``calibration``, default: pydoc topics).
        """
        cfg = self._config(config, kwargs)
        plan = build_plan(len(self._layers()), cfg, *self._auto_scores(cfg, calibration, tokenizer))
        self.spec.check_plan(plan, self.model.config)
        return plan

    # ---- the job ----------------------------------------------------------------------------
    def upscale(
        self,
        config: UpscaleConfig | dict | None = None,
        *,
        progress: bool | None = None,
        calibration: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Insert new layers and return the (same) model, deeper.

        Options are those of :class:`~hf_deepen.UpscaleConfig`, as a config object, a dict or
        keywords (keywords override the config): ``method``, ``solver``, ``layout``, ``num_layers``,
        ``positions``, ``every_k``, ``zero_init``, ``fusion_weight``, ``restore_norm``, ...

        ``calibration`` (for ``align_on="activations"``): text (a string or a list of strings,
        tokenised with ``tokenizer`` or the loaded model's tokenizer) or a 2-D tensor of token ids.
        """
        from tqdm.auto import tqdm

        cfg = self._config(config, kwargs)
        model, spec = self.model, self.spec
        layers = self._layers()
        ta = time.perf_counter()
        plan = build_plan(len(layers), cfg, *self._auto_scores(cfg, calibration, tokenizer))
        t_layout = time.perf_counter() - ta
        spec.check_plan(plan, model.config)
        shape = spec.head_shape(model.config)
        if cfg.zero_init:
            spec.zero_target(cfg.zero_target)  # refuse a target this family lacks before any work
        report = UpscaleReport(plan=plan, config=cfg, architecture=spec.name,
                               function_preserving=spec.preserves_function(cfg, model.config))
        report.params_before = sum(p.numel() for p in model.parameters())
        if getattr(self, "load_seconds", None) is not None:
            report.timings["load"] = self.load_seconds
        if cfg.layout == "auto":
            report.timings["layout_calibration"] = t_layout

        new = [(i, s) for i, s in enumerate(plan.layers) if s.kind == "new"]
        if cfg.method in ("opt", "avg"):  # NaN/inf: refuse with the tensor's name before any work
            from .validate import check_layers_finite

            used = sorted({j for _, s in new for j in s.sources})
            check_layers_finite([layers[j].state_dict() for j in used], used, spec.layers_path + ".")
        acts = None
        if cfg.align_on == "activations":
            tc = time.perf_counter()
            acts = self._calibrate(cfg, layers, {j for _, s in new for j in s.sources}, calibration, tokenizer)
            report.timings["calibration"] = time.perf_counter() - tc
        elif calibration is not None and cfg.layout != "auto":
            raise ConfigError(
                "calibration= is only used with align_on='activations' or layout='auto': drop it or set one"
            )

        t0 = time.perf_counter()
        states: dict[int, dict[str, torch.Tensor]] = {}
        align_s = 0.0
        for i, src in tqdm(new, desc=f"hf_deepen {cfg.method}", unit="layer", disable=not _show(progress)):
            sources = [layers[j].state_dict() for j in src.sources]
            where = f"{model.config.model_type} layers {list(src.sources)}"
            ta = time.perf_counter()
            context = {}
            if acts is not None:
                from .align.activations import activation_costs

                o = [spec.to_canonical(st)[0]["o"] for st in sources]
                context["costs"] = activation_costs(acts[src.sources[0]], acts[src.sources[1]], o[0], o[1], shape)
            res = build_layer_state(spec, cfg, shape, sources, where, **context)
            align_s += time.perf_counter() - ta
            states[i] = res.canon
            report.layers.append({"index": i, "sources": list(src.sources), "method": cfg.method, "diagnostics": res.diagnostics})
            self._check(res.diagnostics, i, report)
            add_stage_seconds(report.timings, res.diagnostics)  # cost / assign / fuse, inside align+fuse
        report.timings["align+fuse"] = align_s
        report.timings["build"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        apply_plan(model, spec, plan, states)
        update_config(model.config, spec, plan)
        spec.after_surgery(model, get_module(model, spec.layers_path))
        record_provenance(model.config, plan, cfg, self.base_model, spec)
        report.timings["surgery"] = time.perf_counter() - t1
        report.params_after = sum(p.numel() for p in model.parameters())
        self.report = report
        return model

    def _auto_scores(self, cfg: UpscaleConfig, calibration: Any, tokenizer: Any) -> tuple[Any, Any]:
        """``layout="auto"``: slot scores and the reason from a block-influence pass; else ``(None, None)``."""
        if cfg.layout != "auto":
            return None, None
        from .auto_layout import (DEFAULT_CALIBRATION, auto_positions, block_influence, calibration_block_ids,
                                  default_calibration_text, reason, slot_scores)
        from .layouts import FUSIONS_NEEDING_PAIR

        source = "the given calibration"
        if calibration is None:
            calibration, source = default_calibration_text(), DEFAULT_CALIBRATION
        if tokenizer is None and not isinstance(calibration, torch.Tensor):
            tokenizer = self.tokenizer
        seq_len = min(256, getattr(self.model.config, "max_position_embeddings", None) or 256)
        ids = calibration_block_ids(tokenizer, calibration, cfg.calibration_tokens, seq_len)
        bi = block_influence(self.model, self._layers(), ids)
        scores = slot_scores(bi, cfg.method in FUSIONS_NEEDING_PAIR)
        n_base = len(bi)
        n_new = (cfg.num_layers if cfg.num_layers is not None else n_base + n_base // 2) - n_base
        why = None
        if 0 < n_new <= len(scores):
            why = reason(bi, scores, auto_positions(scores, n_new), int(ids.numel()), source)
        return scores, why

    def _calibrate(self, cfg: UpscaleConfig, layers: torch.nn.ModuleList, indices: set[int], calibration: Any,
                   tokenizer: Any) -> dict[int, dict[str, torch.Tensor]]:
        """Token ids from ``calibration`` and the activations of the source layers on them."""
        from .align.activations import calibration_ids, capture_activations

        if calibration is None:
            raise ConfigError(
                "align_on='activations' needs calibration text: upscale(calibration=[...texts...]) (or token ids);"
                " on the command line --calibration FILE"
            )
        if tokenizer is None and not isinstance(calibration, torch.Tensor):
            tokenizer = self.tokenizer
        seq_len = min(256, getattr(self.model.config, "max_position_embeddings", None) or 256)
        ids = calibration_ids(tokenizer, calibration, cfg.calibration_tokens, seq_len)
        return capture_activations(self.model, self.spec, layers, sorted(indices), ids)

    @staticmethod
    def _check(d: dict[str, float], index: int, report: UpscaleReport) -> None:
        msgs = []
        for name in ("heads", "neurons", "query", "experts", "expert_neurons"):
            err = d.get(f"{name}_marginal_error")
            if err is not None and err > MARGINAL_TOL:
                msgs.append(f"{name} plan marginals off by {err:.1e} (> {MARGINAL_TOL:g}): raise sinkhorn_max_iter or sinkhorn_reg")
            ratio = d.get(f"{name}_cost_ratio")
            if ratio is not None and ratio > COST_RATIO_TOL:
                msgs.append(f"{name} plan costs {ratio:.3f}x leaving units in place: lower sinkhorn_reg or use solver='exact'")
        for m in msgs:
            text = f"new layer {index}: {m}"
            report.warnings.append(text)
            warnings.warn(text, AlignmentWarning, stacklevel=3)

    # ---- output -----------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        overwrite: bool = False,
        tokenizer: Any = None,
        extra_files: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Save the model (safetensors), its tokenizer, a model card and ``hf_deepen_report.json``.

        Written to a temporary directory first and moved into place, so a failure never leaves a
        directory that looks complete; an existing non-empty directory needs ``overwrite=True``.
        """
        if not getattr(self.model.config, PROVENANCE_KEY, None):
            raise ConfigError("nothing to save yet: call upscale() first (or use model.save_pretrained)")
        tok = tokenizer
        if tok is None:
            try:
                tok = self.tokenizer
            except (OSError, ValueError) as e:  # a checkpoint without tokenizer files
                warnings.warn(f"no tokenizer saved with the model: {e.__class__.__name__}: {str(e)[:200]}", stacklevel=2)

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, **kwargs)
            if tok is not None:
                tok.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(getattr(self.model.config, PROVENANCE_KEY)))
            if self.report is not None:
                write_json(tmp / "hf_deepen_report.json", self.report.to_dict())
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)

        need = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return atomic_save(save_directory, write, overwrite=overwrite, need_bytes=need)


def _show(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    import sys

    return sys.stderr.isatty()
