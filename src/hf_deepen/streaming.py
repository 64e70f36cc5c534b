"""Streaming: upscale a safetensors checkpoint directory to a new directory without loading the model.

Only the tensors of the layers being built are read (lazily, with ``safetensors.safe_open``), and
tensors are written shard by shard, so peak memory is bounded by the source layers of one new
layer plus one output shard, whatever the model size. The new layers are made by the same
function as in memory (:func:`hf_deepen.fuse.build_layer_state`), so the output is identical,
tensor for tensor, to ``DepthUpscaler(model).upscale(...)`` followed by ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch.registry import _SPECS, ADD_A_FAMILY
from .config import UpscaleConfig
from .errors import ConfigError, UnsupportedArchitectureError, UnsupportedModelError
from .fuse import build_layer_state
from .io import atomic_save, model_card, write_json
from .layouts import build_plan
from .report import UpscaleReport
from .surgery import PROVENANCE_KEY, record_provenance, update_config

WEIGHTS_INDEX = "model.safetensors.index.json"
_SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.msgpack|\.h5)$|^(config\.json|README\.md)$|safetensors\.index\.json$")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '2GB' / '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


class _Checkpoint:
    """Lazy access to every tensor of a safetensors checkpoint directory."""

    def __init__(self, path: Path):
        index = path / WEIGHTS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UnsupportedModelError(
                f"{str(path)!r} holds no safetensors weights (model.safetensors or {WEIGHTS_INDEX}): the streaming"
                " path reads safetensors only; load other formats with DepthUpscaler.from_pretrained"
            )
        self.path, self.weight_map = path, weight_map
        self._files: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(self.path / fname, framework="pt")
        return self._files[fname].get_tensor(name)

    def close(self) -> None:
        for f in self._files.values():
            if hasattr(f, "__exit__"):
                f.__exit__(None, None, None)
        self._files.clear()


class _ShardWriter:
    """Writes tensors into consecutive shards of at most ``max_bytes`` and an index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        save_file(self.current, self.out / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-00000.tmp", self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / fname)
            weight_map.update({k: fname for k in names})
        write_json(self.out / WEIGHTS_INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def upscale_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: UpscaleConfig | dict | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool | None = None,
    extra_files: dict[str, str] | None = None,
    **kwargs: Any,
) -> UpscaleReport:
    """Upscale the checkpoint in directory ``src`` into directory ``out``, streaming tensors.

    ``config`` / keywords are those of :class:`~hf_deepen.UpscaleConfig`. Writes sharded
    safetensors (with an index when there is more than one shard), the updated ``config.json``
    with provenance, the tokenizer and other small files of ``src``, a model card and
    ``hf_deepen_report.json``; all into a temporary directory moved into place at the end.
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from .upscaler import DepthUpscaler, _show

    src = Path(src)
    cfg = DepthUpscaler._config(config, kwargs)
    t0 = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(src)  # no remote code: unknown custom configs fail here
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _SPECS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no architecture spec; the streaming path does not guess from a module"
            f" tree: {ADD_A_FAMILY}"
        )
    spec = _SPECS[model_type].bind(hf_config)
    shape = spec.head_shape(hf_config)
    if cfg.zero_init:
        spec.zero_target(cfg.zero_target)  # refuse a target this family lacks before any work
    if cfg.align_on != "weights":
        raise ConfigError(
            "align_on='activations' needs forward passes through the model, which the streaming path never"
            " builds: drop streaming (upscale in memory) or use align_on='weights'"
        )
    ckpt = _Checkpoint(src)
    prefix = spec.layers_path + "."
    layer_re = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    per_layer: dict[int, list[str]] = {}
    others: list[str] = []
    for name in ckpt.weight_map:
        m = layer_re.fullmatch(name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            others.append(name)
    num_base = hf_config.num_hidden_layers
    if sorted(per_layer) != list(range(num_base)):
        raise UnsupportedModelError(
            f"{str(src)!r}: found tensors for {len(per_layer)} layers under {prefix!r}, config says {num_base}"
        )
    plan = build_plan(num_base, cfg)
    spec.check_plan(plan, hf_config)
    report = UpscaleReport(plan=plan, config=cfg, architecture=spec.name,
                           function_preserving=cfg.function_preserving and spec.can_preserve(hf_config))
    report.timings["plan"] = time.perf_counter() - t0

    def layer_state(i: int) -> dict[str, torch.Tensor]:
        return {k: ckpt.get(f"{prefix}{i}.{k}") for k in per_layer[i]}

    def write(tmp: Path) -> None:
        writer = _ShardWriter(tmp, _parse_size(max_shard_size))
        before = [n for n in others if not _after_layers(n)]
        after = [n for n in others if _after_layers(n)]
        for n in before:
            writer.add(n, ckpt.get(n))
        align_s = 0.0
        params = {"before": 0, "after": 0}
        for n in others:
            params["before"] += _numel(ckpt, n)
        params["after"] = params["before"]
        for i in range(num_base):
            params["before"] += sum(_numel(ckpt, f"{prefix}{i}.{k}") for k in per_layer[i])
        for i, s in tqdm(list(enumerate(plan.layers)), desc=f"hf_deepen {cfg.method}", unit="layer", disable=not _show(progress)):
            if s.kind == "base":
                state = layer_state(s.sources[0])
            else:
                ta = time.perf_counter()
                res = build_layer_state(spec, cfg, shape, [layer_state(j) for j in s.sources], f"{model_type} layers {list(s.sources)}")
                align_s += time.perf_counter() - ta
                state = res.canon
                report.layers.append({"index": i, "sources": list(s.sources), "method": cfg.method, "diagnostics": res.diagnostics})
                DepthUpscaler._check(res.diagnostics, i, report)
            for k, t in state.items():
                writer.add(f"{prefix}{i}.{k}", t)
                params["after"] += t.numel()
            del state
        for n in after:
            writer.add(n, ckpt.get(n))
        writer.finish()
        report.params_before, report.params_after = params["before"], params["after"]
        report.timings["align+fuse"] = align_s
        update_config(hf_config, spec, plan)
        record_provenance(hf_config, plan, cfg, str(src), spec)
        hf_config.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and not _SKIP_COPY.search(f.name):
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(model_card(getattr(hf_config, PROVENANCE_KEY)))
        report.timings["total"] = time.perf_counter() - t0
        write_json(tmp / "hf_deepen_report.json", report.to_dict())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    try:
        atomic_save(out, write, overwrite=overwrite)
    finally:
        ckpt.close()
    return report


def _after_layers(name: str) -> bool:
    """Tensors conventionally stored after the decoder layers (final norm, LM head)."""
    return "lm_head" in name or name.split(".")[-2:-1] in (["norm"], ["ln_f"], ["final_layer_norm"])


def _numel(ckpt: _Checkpoint, name: str) -> int:
    fname = ckpt.weight_map[name]
    if fname not in ckpt._files:
        ckpt._files[fname] = safe_open(ckpt.path / fname, framework="pt")
    shape = ckpt._files[fname].get_slice(name).get_shape()
    n = 1
    for d in shape:
        n *= d
    return n


