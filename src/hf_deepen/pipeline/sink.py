"""Sinks: where the deeper model's layers go.

:class:`SurgerySink` inserts the new layers into the loaded model (module surgery, at the end, so a
failed run leaves the model as it was). :class:`ShardWriterSink` writes a sharded safetensors
checkpoint (index, config, tokenizer and other small files, model card) with a background thread:
base layers are copied through byte for byte while the pipeline aligns, and at most one new
layer waits to be written (memory stays bounded).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..io import model_card, write_json
from ..surgery import PROVENANCE_KEY, apply_plan, record_provenance, update_config
from .source import DTYPE_NAMES, WEIGHTS_INDEX, SafetensorsSource, nbytes, numel

if TYPE_CHECKING:
    from ..report import UpscaleReport
    from . import ResolvedRun

#: files of the source directory not copied to the output (weights are written, config and card remade)
SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.msgpack|\.h5)$|^(config\.json|README\.md)$|safetensors\.index\.json$")


class Sink(Protocol):
    def base(self, i: int, j: int) -> None:
        """Layer ``i`` of the deeper model is base layer ``j``, unchanged."""

    def new(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Layer ``i`` of the deeper model is new, with state dict ``state`` (handed over)."""

    def finish(self, report: "UpscaleReport") -> None:
        """Every layer was handed over: complete the output (config, provenance)."""

    def seconds(self) -> dict[str, float]: ...

    def num_params(self) -> int: ...


class SurgerySink:
    """Module surgery into the loaded model: the new layers are kept until :meth:`finish` inserts them."""

    def __init__(self, model: Any, run: "ResolvedRun"):
        self.model, self.run = model, run
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self._seconds = 0.0

    def base(self, i: int, j: int) -> None:
        pass

    def new(self, i: int, state: dict[str, torch.Tensor]) -> None:
        self.states[i] = state

    def finish(self, report: "UpscaleReport") -> None:
        t = time.perf_counter()
        run, model = self.run, self.model
        apply_plan(model, run.spec, run.plan, self.states)
        self.states = {}
        update_config(model.config, run.spec, run.plan)
        from ..arch import get_module

        run.spec.after_surgery(model, get_module(model, run.spec.layers_path))
        if run.spec.verify_function(model, run.function_preserving) is not None:
            report.function_preserving = False
        record_provenance(model.config, run, report.function_preserving)
        self._seconds = time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        return {"surgery": self._seconds}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        self.states = {}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '2GB' / '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def after_layers(name: str) -> bool:
    """Tensors conventionally stored after the decoder layers (final norm, LM head)."""
    return "lm_head" in name or name.split(".")[-2:-1] in (["norm"], ["ln_f"], ["final_layer_norm"])


def planned_tensors(run: "ResolvedRun", src: SafetensorsSource) -> list[tuple[str, str]]:
    """Every output tensor, in file order, as ``(output name, the source tensor giving its dtype and shape)``:
    a new layer has the names, dtypes and shapes of its first source layer (checked when it is written)."""
    p = run.prefix
    order = [(n, n) for n in src.others if not after_layers(n)]
    for i, s in enumerate(run.plan.layers):
        order += [(f"{p}{i}.{k}", f"{p}{s.sources[0]}.{k}") for k in src.per_layer[s.sources[0]]]
    return order + [(n, n) for n in src.others if after_layers(n)]


def output_bytes(run: "ResolvedRun", src: SafetensorsSource) -> int:
    return sum(nbytes(src.entry(s)) for _, s in planned_tensors(run, src))


class ShardWriter:
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
        i, (_, dtype, shape, size) = self._order[self._pos]
        self._pos += 1
        if i != self._shard:
            self.open(i)
        return dtype, shape, size

    def open(self, i: int) -> None:
        """Start shard ``i``: its header, then its tensors as they come."""
        self.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, dtype, shape, size in self.shards[i]:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + size]}
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._fh = open(self.out / (self.names[i] + ".tmp"), "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def add(self, name: str, t: torch.Tensor) -> None:
        dtype, shape, _ = self._next(name)
        if DTYPE_NAMES.get(t.dtype) != dtype or list(t.shape) != list(shape):
            raise RuntimeError(f"internal: tensor {name!r} is {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
        t = t.detach().to("cpu").contiguous().reshape(-1)
        self._fh.write(memoryview(t.view(torch.uint8).numpy()))

    def copy(self, name: str, src: SafetensorsSource, src_name: str) -> None:
        """Write tensor ``src_name`` of ``src`` as ``name``, byte for byte, in bounded chunks."""
        self._next(name)
        src.copy_to(src_name, self._fh)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closed even when its final flush fails (a full disk), which is then raised

    def finish(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"internal: shard writer got {self._pos} of {len(self._order)} tensors")
        self.close()
        for name in self.names:
            os.replace(self.out / (name + ".tmp"), self.out / name)
        if len(self.names) > 1:
            weight_map = {e[0]: self.names[i] for i, shard in enumerate(self.shards) for e in shard}
            write_json(self.out / WEIGHTS_INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})


class ShardWriterSink:
    """A sharded safetensors checkpoint in ``out``, written by a background thread.

    The pipeline hands over copy jobs (base layers, embeddings: no tensor held) and new layers; at
    most ``WRITE_BEHIND`` new layers wait for the writer, so memory stays bounded. An error in the
    writer (a full disk) is raised in the pipeline's thread at its next hand-over. Use as a context
    manager: leaving it stops the thread and closes every file, whatever ended the run.
    """

    WRITE_BEHIND = 1  #: new layers that may wait for the writer while the pipeline goes on

    def __init__(self, run: "ResolvedRun", src: SafetensorsSource, out: Path, max_shard_size: int | str,
                 src_dir: Path):
        self.run, self.src, self.out, self.src_dir = run, src, out, src_dir
        order = planned_tensors(run, src)
        entries = [(name, src.entry(s)["dtype"], src.entry(s)["shape"], nbytes(src.entry(s))) for name, s in order]
        self._params = sum(numel(src.entry(s)) for _, s in order)
        self.writer = ShardWriter(out, parse_size(max_shard_size), entries)
        self.writer.open(0)  # the first shard exists from the start
        self._jobs: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self.WRITE_BEHIND)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.write_s = self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="hf_deepen-write", daemon=True)
        self._thread.start()
        for n in src.others:
            if not after_layers(n):
                self._jobs.put(("copy", n, n))

    def __enter__(self) -> "ShardWriterSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None:
                    break
                t = time.perf_counter()
                kind, name, obj = job
                if kind == "copy":
                    self.writer.copy(name, self.src, obj)
                else:
                    for k in list(obj):
                        self.writer.add(f"{name}{k}", obj.pop(k))
                    self._slots.release()
                self.write_s += time.perf_counter() - t
            self.writer.close()
        except BaseException as e:  # noqa: BLE001 - raised in the pipeline's thread
            self._error = e
            try:
                self.writer.close()
            except OSError:
                pass  # the error above says it

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("internal: the shard writer thread stopped")

    # ---- the pipeline's side ---------------------------------------------------------------
    def base(self, i: int, j: int) -> None:
        self._check()
        p = self.run.prefix
        for k in self.src.per_layer[j]:
            self._jobs.put(("copy", f"{p}{i}.{k}", f"{p}{j}.{k}"))

    def new(self, i: int, state: dict[str, torch.Tensor]) -> None:
        s = self.run.plan.layers[i]
        names = self.src.per_layer[s.sources[0]]
        if sorted(state) != sorted(names):
            raise RuntimeError(f"internal: new layer {i} has tensors {sorted(set(state) ^ set(names))} not planned")
        t = time.perf_counter()
        while not self._slots.acquire(timeout=0.1):
            self._check()
        self.wait_s += time.perf_counter() - t
        self._check()
        self._jobs.put(("add", f"{self.run.prefix}{i}.", {k: state.pop(k) for k in names}))

    def finish(self, report: "UpscaleReport") -> None:
        for n in self.src.others:
            if after_layers(n):
                self._jobs.put(("copy", n, n))
        self._jobs.put(None)
        t = time.perf_counter()
        while self._thread.is_alive():
            self._thread.join(timeout=0.1)
        self.wait_s += time.perf_counter() - t
        if self._error is not None:
            raise self._error
        t = time.perf_counter()
        self.writer.finish()
        self.write_s += time.perf_counter() - t
        run, config = self.run, self.run.config
        update_config(config, run.spec, run.plan)
        record_provenance(config, run)
        config.save_pretrained(self.out)
        for f in self.src_dir.iterdir():
            if f.is_file() and not SKIP_COPY.search(f.name):
                shutil.copy2(f, self.out / f.name)
        (self.out / "README.md").write_text(model_card(getattr(config, PROVENANCE_KEY)))

    def seconds(self) -> dict[str, float]:
        return {"write": self.write_s, "write_wait": self.wait_s}

    def num_params(self) -> int:
        return self._params

    def close(self) -> None:
        """Stop the writer (it ends the job in hand) and close its files."""
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.writer.close()
