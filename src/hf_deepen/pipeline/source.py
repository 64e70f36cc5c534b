"""Tensor sources: where base layers' tensors come from, and the read-ahead thread.

:class:`ModelStateSource` reads a loaded model's layers (free: views of its parameters).
:class:`SafetensorsSource` reads a safetensors checkpoint directory lazily, one layer at a time,
with plain file reads (see :class:`SafetensorsFile`), and copies tensors it does not change
through byte for byte in bounded chunks. :class:`ReadAhead` overlaps reading with alignment: the
next pair's bytes are asked into the OS page cache (no process memory) while the current pair
aligns, and a background thread may read up to ``depth`` layers ahead into memory.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..errors import UnsupportedModelError

WEIGHTS_INDEX = "model.safetensors.index.json"

#: safetensors dtype names <-> torch dtypes
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: bytes per read/write when copying a tensor through unchanged (small: copies run next to alignment)
COPY_CHUNK = 8 * 2**20


class TensorSource(Protocol):
    """Base layers' tensors, one layer at a time (a fresh dict each call: the caller may consume it)."""

    #: how many layers :class:`ReadAhead` may read ahead of the pipeline into memory (0: read when asked)
    read_ahead: int

    def read(self, j: int) -> dict[str, torch.Tensor]: ...

    def prefetch(self, j: int) -> None:
        """Hint that layer ``j`` is read soon (start its I/O; hold nothing)."""

    def num_params(self) -> int: ...


class ModelStateSource:
    """The decoder layers of a loaded model (their ``state_dict``: the parameters themselves, not copies)."""

    read_ahead = 0  # nothing to overlap

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList):
        self.model, self.layers = model, layers

    def read(self, j: int) -> dict[str, torch.Tensor]:
        return self.layers[j].state_dict()

    def prefetch(self, j: int) -> None:
        pass

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class SafetensorsFile:
    """One safetensors file read with plain ``readinto`` calls, not ``mmap``.

    ``safe_open`` maps the file: every page it touches counts in the process's RSS until the map
    is closed, so streaming a 16 GB checkpoint through open maps reports (reclaimable, but real)
    gigabytes of resident memory. Reading into owned buffers keeps RSS what the code holds. Each
    thread gets its own file handle (the read-ahead and the shard writer read concurrently).
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        self._fhs: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _file(self, offset: int) -> Any:
        tid = threading.get_ident()
        fh = self._fhs.get(tid)
        if fh is None:
            with self._lock:
                fh = self._fhs[tid] = open(self.path, "rb", buffering=0)
        fh.seek(self.base + offset)
        return fh

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"{self.path.name}: tensor {name!r} has dtype {e['dtype']}, which the streaming path does not read")
        b, end = e["data_offsets"]
        buf = torch.empty(end - b, dtype=torch.uint8)
        f = self._file(b)
        view, got = memoryview(buf.numpy()), 0
        while got < end - b:
            k = f.readinto(view[got:])
            if not k:
                raise UnsupportedModelError(f"{self.path}: truncated while reading {name!r}")
            got += k
        return buf.view(dtype).reshape(e["shape"])

    def prefetch(self, name: str) -> None:
        """Ask the OS to read tensor ``name``'s bytes into its page cache, in the background (no RSS)."""
        if hasattr(os, "posix_fadvise"):
            b, end = self.entries[name]["data_offsets"]
            os.posix_fadvise(self._file(b).fileno(), self.base + b, end - b, os.POSIX_FADV_WILLNEED)

    def chunks(self, name: str, step: int = COPY_CHUNK):
        """Tensor ``name``'s bytes, in chunks of at most ``step`` bytes."""
        b, end = self.entries[name]["data_offsets"]
        f = self._file(b)
        left = end - b
        while left:
            chunk = f.read(min(left, step))
            if not chunk:
                raise UnsupportedModelError(f"{self.path}: truncated while reading {name!r}")
            yield chunk
            left -= len(chunk)

    def close(self) -> None:
        with self._lock:
            for fh in self._fhs.values():
                fh.close()
            self._fhs.clear()


class SafetensorsSource:
    """Lazy access to a safetensors checkpoint directory (headers read up front, tensors on demand).

    Tensors under ``prefix`` (``model.layers.``) are grouped by layer: :meth:`read` returns one
    layer's state dict. ``cast``: floating-point tensors are read as this dtype (None: as stored).
    """

    #: 0: memory first. The next pair's bytes are still fetched into the page cache while the current
    #: pair aligns (:meth:`prefetch`); 1 would also hold one more layer in memory (+1 layer at the peak,
    #: for the copy into owned buffers: ~0.7 s per 88 MB layer on a loaded 2-core machine)
    read_ahead = 0

    def __init__(self, path: Path, prefix: str, num_layers: int, cast: torch.dtype | None = None):
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
        self.path, self.prefix, self.cast = path, prefix, cast
        # every header read now, in this thread (the read-ahead and the writer threads then only read data)
        self._files = {f: SafetensorsFile(path / f) for f in sorted(set((weight_map or {"": "model.safetensors"}).values()))}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._files["model.safetensors"].entries}
        self.weight_map: dict[str, str] = weight_map
        layer_re = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        self.per_layer: dict[int, list[str]] = {}  # layer -> its tensor names, relative to the layer
        self.others: list[str] = []  # embeddings, final norm, LM head
        for name in weight_map:
            m = layer_re.fullmatch(name)
            if m:
                self.per_layer.setdefault(int(m.group(1)), []).append(m.group(2))
            else:
                self.others.append(name)
        if sorted(self.per_layer) != list(range(num_layers)):
            raise UnsupportedModelError(
                f"{str(path)!r}: found tensors for {len(self.per_layer)} layers under {prefix!r}, config says {num_layers}"
            )

    def _file(self, fname: str) -> SafetensorsFile:
        return self._files[fname]

    def _casts(self, e: dict[str, Any]) -> bool:
        return self.cast is not None and DTYPES.get(e["dtype"], torch.uint8).is_floating_point and DTYPES[e["dtype"]] != self.cast

    def entry(self, name: str) -> dict[str, Any]:
        """``{"dtype", "shape", "data_offsets"}`` of tensor ``name`` (from the header: no data read), as read
        (after :attr:`cast`; the offsets then only give the size)."""
        e = self._file(self.weight_map[name]).entries[name]
        if not self._casts(e):
            return e
        return {"dtype": DTYPE_NAMES[self.cast], "shape": e["shape"], "data_offsets": [0, numel(e) * self.cast.itemsize]}

    def get(self, name: str) -> torch.Tensor:
        t = self._file(self.weight_map[name]).get(name)
        return t.to(self.cast) if self.cast is not None and t.is_floating_point() else t

    def read(self, j: int) -> dict[str, torch.Tensor]:
        return {k: self.get(f"{self.prefix}{j}.{k}") for k in self.per_layer[j]}

    def prefetch(self, j: int) -> None:
        for k in self.per_layer[j]:
            name = f"{self.prefix}{j}.{k}"
            self._file(self.weight_map[name]).prefetch(name)

    def num_params(self) -> int:
        return sum(numel(self.entry(n)) for n in self.weight_map)

    def copy_to(self, name: str, out: Any) -> None:
        """Write tensor ``name`` (as read: cast if :attr:`cast` says so) to the open file ``out``, in bounded chunks."""
        f = self._file(self.weight_map[name])
        e = f.entries[name]
        if not self._casts(e):
            for chunk in f.chunks(name):
                out.write(chunk)
            return
        src = DTYPES[e["dtype"]]
        for chunk in f.chunks(name, COPY_CHUNK - COPY_CHUNK % src.itemsize):  # bounded memory whatever the tensor
            t = torch.frombuffer(bytearray(chunk), dtype=src).to(self.cast)
            out.write(memoryview(t.view(torch.uint8).numpy()))

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def numel(entry: dict[str, Any]) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n


def nbytes(entry: dict[str, Any]) -> int:
    b, e = entry["data_offsets"]
    return e - b


class ReadAhead:
    """``read(j)`` for each ``j`` of ``order``, on a background thread, at most ``depth`` layers ahead of
    :meth:`next` (``depth=0``: read in the caller's thread). An error in the thread is raised by :meth:`next`.
    ``prefetch(j)`` is called for the next ``hint`` layers of ``order`` each time one is taken.
    ``seconds``: time spent reading; ``wait``: time :meth:`next` waited for it."""

    def __init__(self, read: Callable[[int], dict[str, torch.Tensor]], order: list[int], depth: int,
                 prefetch: Callable[[int], None] | None = None, hint: int = 2):
        self._read, self._order, self.depth = read, list(order), depth
        self._prefetch, self._hint, self._hinted = prefetch, hint, 0
        self.seconds = self.wait = 0.0
        self._pos = 0
        self._q: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ReadAhead":
        if self.depth > 0 and self._order:
            self._thread = threading.Thread(target=self._run, name="hf_deepen-read", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        for j in self._order:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            t = time.perf_counter()
            try:
                item = (j, self._read(j), None)
            except BaseException as e:  # noqa: BLE001 - handed to the pipeline's thread
                self._q.put((j, None, e))
                return
            self.seconds += time.perf_counter() - t
            self._q.put(item)

    def next(self, j: int) -> dict[str, torch.Tensor]:
        if self._order[self._pos] != j:
            raise RuntimeError(f"internal: read-ahead expected layer {self._order[self._pos]}, asked for {j}")
        self._pos += 1
        if self._prefetch is not None:  # the layers after this one: their I/O runs while this pair aligns
            while self._hinted < min(self._pos + self._hint, len(self._order)):
                if self._hinted >= self._pos:
                    self._prefetch(self._order[self._hinted])
                self._hinted += 1
        t = time.perf_counter()
        if self._thread is None:
            state = self._read(j)
            self.seconds += time.perf_counter() - t
            return state
        while True:
            try:
                got, state, err = self._q.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    raise RuntimeError("internal: the read-ahead thread stopped") from None
        self.wait += time.perf_counter() - t
        self._slots.release()
        if err is not None:
            raise err
        return state

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        while not self._q.empty():  # drop what was read ahead
            self._q.get_nowait()
