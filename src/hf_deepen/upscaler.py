"""DepthUpscaler: a loaded model -> spec -> the pipeline (plan -> align -> fuse -> surgery) -> the same model, deeper."""

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
from .errors import ConfigError, UnsupportedModelError
from .io import atomic_save, model_card, prepare_model, write_json
from .pipeline import execute, make_plan, options, resolve
from .pipeline.sink import SurgerySink
from .pipeline.source import ModelStateSource
from .plan import DepthPlan
from .report import UpscaleReport
from .surgery import PROVENANCE_KEY
from .threads import Threads, torch_threads

#: from_pretrained kwargs that also apply to the tokenizer
_TOKENIZER_KWARGS = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "subfolder", "trust_remote_code")


class DepthUpscaler:
    """Make a pretrained decoder-only model deeper.

    >>> up = DepthUpscaler.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> model = up.upscale()                      # OpT-DeUS, exact OT, layout="auto" (calibration pass)
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

    def plan(self, config: UpscaleConfig | dict | None = None, *, calibration: Any = None, tokenizer: Any = None,
             **kwargs: Any) -> DepthPlan:
        """The depth plan :meth:`upscale` would follow, without changing anything.

        ``layout="auto"`` runs its calibration pass here (on ``calibration``, default: pydoc topics).
        """
        cfg = options(config, kwargs)
        return make_plan(cfg, self.spec, self.model.config, len(self._layers()), *self._auto_scores(cfg, calibration, tokenizer))

    # ---- the job ----------------------------------------------------------------------------
    def upscale(
        self,
        config: UpscaleConfig | dict | None = None,
        *,
        progress: bool | None = None,
        calibration: Any = None,
        tokenizer: Any = None,
        threads: int | str | Threads | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Insert new layers and return the (same) model, deeper.

        Options are those of :class:`~hf_deepen.UpscaleConfig`, as a config object, a dict or
        keywords (keywords override the config): ``method``, ``solver``, ``layout``, ``num_layers``,
        ``positions``, ``every_k``, ``zero_init``, ``fusion_weight``, ``restore_norm``, ...

        ``calibration`` (for ``align_on="activations"``): text (a string or a list of strings,
        tokenised with ``tokenizer`` or the loaded model's tokenizer) or a 2-D tensor of token ids.

        ``threads``: torch threads for the job (restored after): None (default) keeps torch's setting,
        an int sets it, ``"auto"`` uses the CPUs other processes leave idle (see :mod:`hf_deepen.threads`;
        the CLI's default); the :class:`~hf_deepen.threads.Threads` of an enclosing ``torch_threads``
        block is used as it is.
        """
        cfg = options(config, kwargs)
        with torch_threads(threads) as used:
            self._upscale(cfg, calibration, tokenizer, progress, used)
        return self.model

    def _upscale(self, cfg: UpscaleConfig, calibration: Any, tokenizer: Any, progress: bool | None,
                 threads: Threads) -> None:
        layers = self._layers()
        if calibration is not None and cfg.align_on != "activations" and cfg.layout != "auto":
            raise ConfigError(
                "calibration= is only used with align_on='activations' or layout='auto': drop it or set one"
            )
        seconds = {"load": self.load_seconds} if getattr(self, "load_seconds", None) is not None else {}
        ta = time.perf_counter()
        plan = make_plan(cfg, self.spec, self.model.config, len(layers), *self._auto_scores(cfg, calibration, tokenizer))
        if cfg.layout == "auto":
            seconds["layout_calibration"] = time.perf_counter() - ta
        capture = None
        if cfg.align_on == "activations":
            def capture(plan: DepthPlan) -> dict[int, dict[str, torch.Tensor]]:
                used = {j for s in plan.layers if s.kind == "new" for j in s.sources}
                return self._calibrate(cfg, layers, used, calibration, tokenizer)
        run = resolve(cfg, self.spec, self.model.config, plan, self.base_model, capture=capture, seconds=seconds)
        report = run.new_report()
        report.threads = str(threads)
        execute(run, ModelStateSource(self.model, layers), SurgerySink(self.model, run), report, progress=progress)
        self.report = report

    def _auto_scores(self, cfg: UpscaleConfig, calibration: Any, tokenizer: Any) -> tuple[Any, Any]:
        """``layout="auto"``: slot scores and the reason from a block-influence pass; else ``(None, None)``."""
        if cfg.layout != "auto":
            return None, None
        from .auto_layout import auto_layout_ids, auto_scores, block_influence, flat_scores

        if tokenizer is None and not isinstance(calibration, torch.Tensor):
            try:
                tokenizer = self.tokenizer
            except (OSError, ValueError) as e:  # a checkpoint without tokenizer files
                if calibration is not None:
                    raise ConfigError(f"calibration text needs a tokenizer and the model has none ({e.__class__.__name__}):"
                                      " pass tokenizer=... or token ids") from e
        try:
            ids, source = auto_layout_ids(cfg, self.model.config, calibration, tokenizer)
        except ConfigError as e:  # no tokenizer, or one that makes less than a block of the default text
            if calibration is not None:
                raise
            return flat_scores(cfg, len(self._layers()), str(e))
        return auto_scores(block_influence(self.model, self._layers(), ids), cfg, ids, source)

    def _calibrate(self, cfg: UpscaleConfig, layers: torch.nn.ModuleList, indices: set[int], calibration: Any,
                   tokenizer: Any) -> dict[int, dict[str, torch.Tensor]]:
        """Token ids from ``calibration`` and the activations of the source layers on them."""
        from .align.activations import activation_ids, capture_activations

        if tokenizer is None and calibration is not None and not isinstance(calibration, torch.Tensor):
            tokenizer = self.tokenizer
        ids = activation_ids(cfg, self.model.config, calibration, tokenizer)
        return capture_activations(self.model, self.spec, layers, sorted(indices), ids)

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

