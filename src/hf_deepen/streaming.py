"""Streaming: upscale a safetensors checkpoint directory to a new directory without loading the model.

The pipeline (:mod:`hf_deepen.pipeline`) from a :class:`~hf_deepen.pipeline.source.SafetensorsSource`
(only the tensors of the layers being built are read, one layer ahead of the alignment) to a
:class:`~hf_deepen.pipeline.sink.ShardWriterSink` (every other tensor copied through byte for byte
in bounded chunks by a background writer; shards laid out in advance so each tensor is written as
soon as it exists). Peak memory is bounded by the source layers of one new layer, its OT problem
and one layer in flight each way, whatever the model size or shard size. The new layers come from
the same stages as in memory, so the output is identical, tensor for tensor, to
``DepthUpscaler(model).upscale(...)`` followed by ``save_pretrained``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .arch.registry import _SPECS, ADD_A_FAMILY
from .config import UpscaleConfig
from .errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError
from .io import atomic_save, write_json
from .pipeline import execute, make_plan, options, resolve
from .pipeline.sink import ShardWriterSink, output_bytes
from .pipeline.source import DTYPE_NAMES, SafetensorsSource
from .report import UpscaleReport
from .threads import Threads, torch_threads


def upscale_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: UpscaleConfig | dict | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool | None = None,
    extra_files: dict[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    threads: int | str | Threads | None = None,
    **kwargs: Any,
) -> UpscaleReport:
    """Upscale the checkpoint in directory ``src`` into directory ``out``, streaming tensors.

    ``config`` / keywords are those of :class:`~hf_deepen.UpscaleConfig`. Writes sharded
    safetensors (with an index when there is more than one shard), the updated ``config.json``
    with provenance, the tokenizer and other small files of ``src``, a model card and
    ``hf_deepen_report.json``; all into a temporary directory moved into place at the end.

    ``dtype`` (``torch.float32``, ``"bfloat16"``, ...): the floating-point tensors are cast to it as
    they are read (as ``from_pretrained(dtype=...)`` would load them), so new layers are fused from
    the cast weights; default (None or ``"auto"``): the checkpoint's own dtypes, copied byte for byte.

    ``threads``: torch threads for the job (restored after): None (default) keeps torch's setting,
    an int sets it, ``"auto"`` uses the CPUs other processes leave idle (:mod:`hf_deepen.threads`); the
    :class:`~hf_deepen.threads.Threads` of an enclosing ``torch_threads`` block is used as it is.
    """
    with torch_threads(threads) as used:
        return _upscale_checkpoint(src, out, config, overwrite=overwrite, max_shard_size=max_shard_size,
                                   progress=progress, extra_files=extra_files, dtype=dtype, calibration=calibration,
                                   tokenizer=tokenizer, threads=used, kwargs=kwargs)


def _upscale_checkpoint(src: Any, out: Any, config: Any, *, overwrite: bool, max_shard_size: int | str,
                        progress: bool | None, extra_files: dict[str, str] | None, dtype: Any, calibration: Any,
                        tokenizer: Any, threads: Threads, kwargs: dict[str, Any]) -> UpscaleReport:
    from transformers import AutoConfig

    from .validate import check_checkpoint, check_source

    if not isinstance(check_source(src), Path):
        raise ModelNotFoundError(f"no such directory {str(src)!r}: the streaming path reads a local checkpoint directory")
    src = Path(src)
    cfg = options(config, kwargs)
    t0 = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(src)  # no remote code: unknown custom configs fail here
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _SPECS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no architecture spec; the streaming path does not guess from a module"
            f" tree: {ADD_A_FAMILY}"
        )
    spec = _SPECS[model_type].bind(hf_config)
    if calibration is not None and cfg.align_on != "activations" and cfg.layout != "auto":
        raise ConfigError("calibration= is only used with align_on='activations' or layout='auto': drop it or set one")
    check_checkpoint(src, hf_config)  # truncated shards, index vs shards, shapes vs config: before any work
    _return_freed_memory()
    cast = _cast_dtype(dtype)
    if cast is not None:
        hf_config.dtype = cast
    source = SafetensorsSource(src, spec.layers_path + ".", hf_config.num_hidden_layers, cast)
    try:
        calib = _Calibration(source, hf_config, spec, src, calibration, tokenizer)
        seconds: dict[str, float] = {}
        ta = time.perf_counter()
        plan = make_plan(cfg, spec, hf_config, hf_config.num_hidden_layers, *calib.auto_scores(cfg))
        if cfg.layout == "auto":
            seconds["layout_calibration"] = time.perf_counter() - ta
        seconds["plan"] = time.perf_counter() - t0
        capture = (lambda plan: calib.activations(cfg, plan)) if cfg.align_on == "activations" else None
        run = resolve(cfg, spec, hf_config, plan, str(src), capture=capture, seconds=seconds)
    except BaseException:
        source.close()
        raise
    report = run.new_report()
    report.threads = str(threads)

    def write(tmp: Path) -> None:
        with ShardWriterSink(run, source, tmp, max_shard_size, src) as sink:
            execute(run, source, sink, report, progress=progress)
        report.timings["total"] = time.perf_counter() - t0
        write_json(tmp / "hf_deepen_report.json", report.to_dict())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    try:
        atomic_save(out, write, overwrite=overwrite, need_bytes=output_bytes(run, source))
    finally:
        source.close()
    return report


class _Calibration:
    """The calibration passes of a streaming run (``layout="auto"``, ``align_on="activations"``), run on
    the checkpoint one layer at a time; the tokenizer is loaded only if text needs it."""

    def __init__(self, source: SafetensorsSource, config: Any, spec: Any, src: Path, calibration: Any,
                 tokenizer: Any):
        self.source, self.config, self.spec, self.src = source, config, spec, src
        self.calibration, self._tokenizer = calibration, tokenizer

    def tokenizer(self, calibration: Any) -> Any:
        if self._tokenizer is None and not isinstance(calibration, torch.Tensor):
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.src)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"calibration text needs a tokenizer and {str(self.src)!r} has none ({e.__class__.__name__}):"
                    " pass tokenizer=... or token ids"
                ) from e
        return self._tokenizer

    def auto_scores(self, cfg: UpscaleConfig) -> tuple[Any, Any]:
        if cfg.layout != "auto":
            return None, None
        from .auto_layout import auto_layout_ids, auto_scores, block_influence, flat_scores
        from .pipeline.layerwise import layerwise_model

        try:
            ids, what = auto_layout_ids(cfg, self.config, self.calibration, self.tokenizer(self.calibration))
        except ConfigError as e:  # no tokenizer, or one that makes less than a block of the default text
            if self.calibration is not None:
                raise
            return flat_scores(cfg, self.config.num_hidden_layers, str(e))
        n = self.config.num_hidden_layers
        with layerwise_model(self.source, self.config, self.spec.layers_path, n - 1, ids) as (runner, layers):
            bi = block_influence(runner, layers, ids, device=torch.device("cpu"))
        return auto_scores(bi, cfg, ids, what)

    def activations(self, cfg: UpscaleConfig, plan: Any) -> dict[int, dict[str, torch.Tensor]]:
        from .align.activations import activation_ids, capture_activations
        from .pipeline.layerwise import layerwise_model

        tok = self.tokenizer(self.calibration) if self.calibration is not None else None
        ids = activation_ids(cfg, self.config, self.calibration, tok)
        used = sorted({j for s in plan.layers if s.kind == "new" for j in s.sources})
        if not used:
            return {}
        with layerwise_model(self.source, self.config, self.spec.layers_path, used[-1], ids) as (runner, layers):
            return capture_activations(runner, self.spec, layers, used, ids, device=torch.device("cpu"))


def _return_freed_memory() -> None:
    """Have glibc serve every allocation of 1 MiB or more by ``mmap``, so freed layer tensors go back to
    the OS at once instead of staying in the heap as fragmented RSS (its default threshold grows up
    to 32 MiB once large blocks are freed). Linux/glibc only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _cast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype=`` of :func:`upscale_checkpoint` as a floating torch dtype, or None (keep the checkpoint's)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r}: use float32, bfloat16, float16 (or None/'auto' for the checkpoint's own)")
    return dtype

