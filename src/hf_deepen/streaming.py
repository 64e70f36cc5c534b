"""Streaming: upscale a safetensors checkpoint directory to a new directory without loading the model.

Only the tensors of the layers being built are read (with plain file reads, see
:class:`_SafetensorsFile`); every other tensor is copied through byte for byte in bounded chunks,
and output shards are laid out in advance so each tensor is written as soon as it exists. Peak
memory is bounded by the source layers of one new layer and its OT problem, whatever the model
size or shard size. The new layers are made by the same
function as in memory (:func:`hf_deepen.fuse.build_layer_state`), so the output is identical,
tensor for tensor, to ``DepthUpscaler(model).upscale(...)`` followed by ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch

from .arch.registry import _SPECS, ADD_A_FAMILY
from .config import UpscaleConfig
from .errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError, UnsupportedModelError
from .fuse import add_stage_seconds, build_layer_state
from .io import atomic_save, model_card, write_json
from .layouts import build_plan
from .report import UpscaleReport
from .surgery import PROVENANCE_KEY, record_provenance, update_config

logger = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
_SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.msgpack|\.h5)$|^(config\.json|README\.md)$|safetensors\.index\.json$")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '2GB' / '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


#: safetensors dtype names <-> torch dtypes
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: bytes per read/write when copying a tensor through unchanged
_COPY_CHUNK = 64 * 2**20


class _SafetensorsFile:
    """One safetensors file read with plain ``readinto`` calls, not ``mmap``.

    ``safe_open`` maps the file: every page it touches counts in the process's RSS until the map
    is closed, so streaming a 16 GB checkpoint through open maps reports (reclaimable, but real)
    gigabytes of resident memory. Reading into owned buffers keeps RSS what the code holds.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        self._fh = None

    def _file(self):
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
        return self._fh

    def nbytes(self, name: str) -> int:
        b, e = self.entries[name]["data_offsets"]
        return e - b

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"{self.path.name}: tensor {name!r} has dtype {e['dtype']}, which the streaming path does not read")
        b, end = e["data_offsets"]
        buf = torch.empty(end - b, dtype=torch.uint8)
        f = self._file()
        f.seek(self.base + b)
        view, got = memoryview(buf.numpy()), 0
        while got < end - b:
            k = f.readinto(view[got:])
            if not k:
                raise UnsupportedModelError(f"{self.path}: truncated while reading {name!r}")
            got += k
        return buf.view(dtype).reshape(e["shape"])

    def copy_to(self, name: str, out: Any) -> None:
        """Write tensor ``name``'s bytes to the open file ``out``, in bounded chunks."""
        b, end = self.entries[name]["data_offsets"]
        f = self._file()
        f.seek(self.base + b)
        left = end - b
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise UnsupportedModelError(f"{self.path}: truncated while reading {name!r}")
            out.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Checkpoint:
    """Lazy access to every tensor of a safetensors checkpoint directory (headers read up front)."""

    def __init__(self, path: Path):
        index = path / WEIGHTS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            weight_map = None
        else:
            raise UnsupportedModelError(
                f"{str(path)!r} holds no safetensors weights (model.safetensors or {WEIGHTS_INDEX}): the streaming"
                " path reads safetensors only; load other formats with DepthUpscaler.from_pretrained"
            )
        self.path = path
        self._files: dict[str, _SafetensorsFile] = {}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._file("model.safetensors").entries}
        self.weight_map: dict[str, str] = weight_map

    def _file(self, fname: str) -> _SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = _SafetensorsFile(self.path / fname)
        return self._files[fname]

    #: floating-point tensors are read as this dtype (None: as stored); see upscale_checkpoint(dtype=)
    cast: torch.dtype | None = None

    def _casts(self, e: dict[str, Any]) -> bool:
        return self.cast is not None and _DTYPES.get(e["dtype"], torch.uint8).is_floating_point and _DTYPES[e["dtype"]] != self.cast

    def entry(self, name: str) -> dict[str, Any]:
        """``{"dtype", "shape", "data_offsets"}`` of tensor ``name`` (from the header: no data read), as read
        (after :attr:`cast`; the offsets then only give the size)."""
        e = self._file(self.weight_map[name]).entries[name]
        if not self._casts(e):
            return e
        n = 1
        for d in e["shape"]:
            n *= d
        return {"dtype": _DTYPE_NAMES[self.cast], "shape": e["shape"], "data_offsets": [0, n * self.cast.itemsize]}

    def get(self, name: str) -> torch.Tensor:
        t = self._file(self.weight_map[name]).get(name)
        return t.to(self.cast) if self.cast is not None and t.is_floating_point() else t

    def copy_to(self, name: str, out: Any) -> None:
        f = self._file(self.weight_map[name])
        e = f.entries[name]
        if not self._casts(e):
            f.copy_to(name, out)
            return
        src = _DTYPES[e["dtype"]]
        b, end = e["data_offsets"]
        fh = f._file()
        fh.seek(f.base + b)
        step = _COPY_CHUNK - _COPY_CHUNK % src.itemsize
        left = end - b
        while left:  # cast chunk by chunk: bounded memory whatever the tensor
            chunk = fh.read(min(left, step))
            if not chunk:
                raise UnsupportedModelError(f"{f.path}: truncated while reading {name!r}")
            t = torch.frombuffer(bytearray(chunk), dtype=src).to(self.cast)
            out.write(memoryview(t.view(torch.uint8).numpy()))
            left -= len(chunk)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _nbytes(entry: dict[str, Any]) -> int:
    b, e = entry["data_offsets"]
    return e - b


class _ShardWriter:
    """Writes a checkpoint whose tensors (names, dtypes, shapes) are all known before any is made.

    The shards are laid out first (consecutive, at most ``max_bytes`` each unless one tensor is
    larger), so each shard's safetensors header can be written before its data, and every tensor
    is then written the moment it exists and dropped: nothing is buffered, whatever the shard
    size. Tensors must be handed over in the planned order.
    """

    def __init__(self, out: Path, max_bytes: int, entries: list[tuple[str, str, list[int], int]]):
        self.out = out
        self.shards: list[list[tuple[str, str, list[int], int]]] = []
        size = 0
        for e in entries:
            if not self.shards or (size and size + e[3] > max_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append(e)
            size += e[3]
        self.total = sum(e[3] for e in entries)
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._shard = -1
        self._fh = None

    def _next(self, name: str) -> tuple[str, list[int], int]:
        if self._pos >= len(self._order) or self._order[self._pos][1][0] != name:
            want = self._order[self._pos][1][0] if self._pos < len(self._order) else None
            raise RuntimeError(f"internal: shard writer expected tensor {want!r}, got {name!r}")
        i, (_, dtype, shape, nbytes) = self._order[self._pos]
        self._pos += 1
        if i != self._shard:
            self._open(i)
        return dtype, shape, nbytes

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, dtype, shape, nbytes in self.shards[i]:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._fh = open(self.out / (self.names[i] + ".tmp"), "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def add(self, name: str, t: torch.Tensor) -> None:
        dtype, shape, nbytes = self._next(name)
        if _DTYPE_NAMES.get(t.dtype) != dtype or list(t.shape) != list(shape):
            raise RuntimeError(f"internal: tensor {name!r} is {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
        t = t.detach().to("cpu").contiguous().reshape(-1)
        self._fh.write(memoryview(t.view(torch.uint8).numpy()))

    def copy(self, name: str, ckpt: "_Checkpoint", src_name: str) -> None:
        """Write tensor ``src_name`` of ``ckpt`` as ``name``, byte for byte, in bounded chunks."""
        self._next(name)
        ckpt.copy_to(src_name, self._fh)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"internal: shard writer got {self._pos} of {len(self._order)} tensors")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for name in self.names:
            os.replace(self.out / (name + ".tmp"), self.out / name)
        if len(self.names) > 1:
            weight_map = {e[0]: self.names[i] for i, shard in enumerate(self.shards) for e in shard}
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
    dtype: torch.dtype | str | None = None,
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
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from .upscaler import DepthUpscaler, _show

    from .validate import check_checkpoint, check_layers_finite, check_source

    if not isinstance(check_source(src), Path):
        raise ModelNotFoundError(f"no such directory {str(src)!r}: the streaming path reads a local checkpoint directory")
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
    check_checkpoint(src, hf_config)  # truncated shards, index vs shards, shapes vs config: before any work
    _return_freed_memory()
    ckpt = _Checkpoint(src)
    cast = _cast_dtype(dtype)
    if cast is not None:
        ckpt.cast = cast
        hf_config.dtype = cast
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
                           function_preserving=spec.preserves_function(cfg, hf_config))
    report.timings["plan"] = time.perf_counter() - t0

    def layer_state(i: int) -> dict[str, torch.Tensor]:
        tr = time.perf_counter()
        state = {k: ckpt.get(f"{prefix}{i}.{k}") for k in per_layer[i]}
        if cfg.method in ("opt", "avg"):
            check_layers_finite([state], [i], prefix)
        timings["read"] += time.perf_counter() - tr
        return state

    timings = {"read": 0.0, "align+fuse": 0.0, "write": 0.0}
    writers: list[_ShardWriter] = []  # closed in the finally below, whatever ends the write

    def write(tmp: Path) -> None:
        before = [n for n in others if not _after_layers(n)]
        after = [n for n in others if _after_layers(n)]
        # every output tensor is known before any is made: a new layer has the names, dtypes and
        # shapes of its first source layer (checked when it is written)
        order: list[tuple[str, str]] = [(n, n) for n in before]  # (output name, source of its dtype/shape)
        for i, s in enumerate(plan.layers):
            order += [(f"{prefix}{i}.{k}", f"{prefix}{s.sources[0]}.{k}") for k in per_layer[s.sources[0]]]
        order += [(n, n) for n in after]
        entries = [(name, ckpt.entry(src)["dtype"], ckpt.entry(src)["shape"], _nbytes(ckpt.entry(src))) for name, src in order]
        writer = _ShardWriter(tmp, _parse_size(max_shard_size), entries)
        writers.append(writer)
        params = {"before": sum(_numel(ckpt, n) for n in ckpt.weight_map), "after": 0}

        def copy(name: str, src_name: str) -> None:
            tw = time.perf_counter()
            writer.copy(name, ckpt, src_name)
            timings["write"] += time.perf_counter() - tw
            params["after"] += _numel(ckpt, src_name)

        for n in before:
            copy(n, n)
        for i, s in tqdm(list(enumerate(plan.layers)), desc=f"hf_deepen {cfg.method}", unit="layer", disable=not _show(progress)):
            if s.kind == "base":
                for k in per_layer[s.sources[0]]:
                    copy(f"{prefix}{i}.{k}", f"{prefix}{s.sources[0]}.{k}")
                continue
            sources = [layer_state(j) for j in s.sources]
            ta = time.perf_counter()
            res = build_layer_state(spec, cfg, shape, sources, f"{model_type} layers {list(s.sources)}", consume=True)
            del sources
            timings["align+fuse"] += time.perf_counter() - ta
            report.layers.append({"index": i, "sources": list(s.sources), "method": cfg.method, "diagnostics": res.diagnostics})
            DepthUpscaler._check(res.diagnostics, i, report)
            add_stage_seconds(timings, res.diagnostics)  # cost / assign / fuse, inside align+fuse
            d = res.diagnostics
            logger.info("new layer %d from %s: %.1f s (align %.1f s, fuse %.1f s)", i, list(s.sources),
                        time.perf_counter() - ta, d.get("seconds_align", 0.0), d.get("seconds_fuse", 0.0))
            tw = time.perf_counter()
            state = res.canon
            res.canon = {}
            for k in per_layer[s.sources[0]]:
                t = state.pop(k)
                writer.add(f"{prefix}{i}.{k}", t)
                params["after"] += t.numel()
                del t
            if state:
                raise RuntimeError(f"internal: new layer {i} has unplanned tensors {sorted(state)}")
            timings["write"] += time.perf_counter() - tw
        for n in after:
            copy(n, n)
        tw = time.perf_counter()
        writer.finish()
        timings["write"] += time.perf_counter() - tw
        report.params_before, report.params_after = params["before"], params["after"]
        report.timings.update(timings)
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

    need = sum(_nbytes(ckpt.entry(n)) for n in others) + sum(
        _nbytes(ckpt.entry(f"{prefix}{s.sources[0]}.{k}")) for s in plan.layers for k in per_layer[s.sources[0]])
    try:
        atomic_save(out, write, overwrite=overwrite, need_bytes=need)
    finally:
        for w in writers:
            w.close()
        ckpt.close()
    return report


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
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r}: use float32, bfloat16, float16 (or None/'auto' for the checkpoint's own)")
    return dtype


def _after_layers(name: str) -> bool:
    """Tensors conventionally stored after the decoder layers (final norm, LM head)."""
    return "lm_head" in name or name.split(".")[-2:-1] in (["norm"], ["ln_f"], ["final_layer_norm"])


def _numel(ckpt: _Checkpoint, name: str) -> int:
    n = 1
    for d in ckpt.entry(name)["shape"]:
        n *= d
    return n
