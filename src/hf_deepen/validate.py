"""Checks that run before any weight is loaded or any work is done, each failing with the fix.

In the order a run meets them:

1. :func:`check_source`: the model argument is an existing directory or could be a Hub id
   (otherwise the Hub client's "Repo id must be in the form..." traceback is what a typo gets).
2. :func:`check_checkpoint`: a local safetensors checkpoint is whole: every header readable,
   every file as long as its header says (a truncated download), the index and the shards agree,
   and each layer's tensors have the shapes the config gives (on ``meta`` tensors: no data read).
3. :func:`check_plan`: the options fit the model's config (target depth, positions, zero-init
   target, the family's own refusals), from ``config.json`` alone.
4. :func:`check_finite`: the source layers of a fusion hold no NaN or inf (OT cannot align them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import CheckpointError, ModelNotFoundError, WeightError

WEIGHTS_INDEX = "model.safetensors.index.json"
#: what huggingface_hub.utils.validate_repo_id accepts: ``name`` or ``namespace/name``
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
_HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers over 100 MB too
_REFETCH = "re-download it (e.g. `hf download REPO --local-dir DIR`) or re-save the checkpoint"


def check_source(source: str | os.PathLike) -> str | Path:
    """``source`` as a :class:`~pathlib.Path` if it is a local directory, as a string if it could be
    a Hub id; :class:`ModelNotFoundError` if it is neither."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{text!r} is a file, not a model directory: pass the directory that holds config.json"
            " (for a GGUF file: the directory, and the file name as gguf_file= / --gguf-file)"
        )
    looks_like_path = isinstance(source, os.PathLike) or text.startswith(("/", "./", "../", "~", "\\")) or os.sep + os.sep in text
    if looks_like_path or not _REPO_ID.match(text) or "--" in text or ".." in text or len(text) > 96:
        raise ModelNotFoundError(
            f"no such directory {text!r}, and not a Hub id (which reads 'org/name'): check the path"
        )
    return text


# ---- the checkpoint on disk ---------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(tensor entries, data start)`` of a safetensors file, checking the file holds all its data."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): {_REFETCH}") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: {size:,} bytes, its header needs {8 + n + end:,}: {_REFETCH}"
        )
    return header, 8 + n


def check_checkpoint(directory: str | os.PathLike, config: Any = None) -> dict[str, dict[str, Any]]:
    """Check the safetensors checkpoint in ``directory``; return ``{tensor name: header entry}``.

    Raises :class:`CheckpointError` naming the file and the fix for a truncated or unreadable
    shard, an index entry whose shard is missing or does not hold it, a tensor the index leaves
    out, and (given the model ``config`` and a family spec) layer tensors whose shapes disagree
    with the config. A directory without safetensors files is not checked (returns ``{}``).
    """
    d = Path(directory)
    index = d / WEIGHTS_INDEX
    files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files and not index.exists():
        return {}
    weight_map = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid index ({type(e).__name__}: {e}): {_REFETCH}") from None
    # only the files transformers reads (not a stray consolidated.safetensors next to the shards)
    used = set(weight_map.values()) if weight_map is not None else {"model.safetensors"}
    headers = {f: read_header(d / f)[0] for f in files if f in used}
    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard not in headers:
                raise CheckpointError(
                    f"{index.name} maps {name!r} to {shard}, which is missing from {d}: download the missing shard"
                )
            if name not in headers[shard]:
                raise CheckpointError(f"{index.name} maps {name!r} to {shard}, which does not hold it: {_REFETCH}")
        listed = set(weight_map.values())
        for shard in listed:
            missing = sorted(set(headers[shard]) - set(weight_map))
            if missing:
                raise CheckpointError(
                    f"{shard} holds {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''},"
                    f" which {index.name} does not list (it would load as random weights): re-download the index"
                    " or re-save the checkpoint"
                )
        entries = {name: headers[shard][name] for name, shard in weight_map.items()}
    elif "model.safetensors" in headers:
        entries = headers["model.safetensors"]
    else:  # other safetensors files (an adapter, consolidated.safetensors): the loader decides
        return {}
    if config is not None:
        _check_layer_shapes(entries, config, d)
    return entries


def _check_layer_shapes(entries: Mapping[str, dict[str, Any]], config: Any, where: Path) -> None:
    """Each layer's tensors as the config says: head geometry through the family's spec, on meta tensors."""
    from .arch.registry import _SPECS

    spec = _SPECS.get(getattr(config, "model_type", None))
    if spec is None:
        return
    prefixes = [spec.layers_path + ".", spec.layers_path.split(".", 1)[-1] + "."]  # with or without "model."
    layer_re = re.compile("(?:" + "|".join(re.escape(p) for p in prefixes) + r")(\d+)\.(.+)")
    layers: dict[int, dict[str, list[int]]] = {}
    for name, e in entries.items():
        m = layer_re.fullmatch(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = e["shape"]
    if not layers:
        return
    try:
        n = spec.num_layers(config)
    except AttributeError:
        return
    if n is not None and sorted(layers) != list(range(n)):
        raise CheckpointError(
            f"{where}: tensors for layers {_ranges(sorted(layers))}, but config.json says num_hidden_layers={n}:"
            " a shard or index entry is missing, or config.json belongs to another checkpoint"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bound = spec.bind(config)
            shape = bound.head_shape(config)
        except Exception:  # the spec's own refusal comes later, with its own message
            return
    hq, hkv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    hidden = getattr(config, "hidden_size", None)
    for i, names in sorted(layers.items()):
        state = {k: torch.empty(s, device="meta") for k, s in names.items()}
        try:
            s = bound.for_state(state)
            canon, _ = s.to_canonical(state)
        except Exception:  # a layout the spec refuses: its own error comes later
            return
        want = {"q": (0, hq), "k": (0, hkv), "v": (0, hkv), "o": (1, hq), "o_bias": (0, hidden), "down_bias": (0, hidden)}
        if hidden:
            want.update({"q@in": (1, hidden), "o@out": (0, hidden)})
        for key, (dim, n) in want.items():
            role = key.split("@")[0]
            t = canon.get(role)
            if n is None or t is None or t.dim() <= dim or t.shape[dim] == n:
                continue
            name = s.tensors.get(role, role)
            raise CheckpointError(
                f"{where}: layer {i}'s {name} has shape {list(t.shape)} where config.json (heads={shape.num_heads},"
                f" kv_heads={shape.num_kv_heads}, head_dim={shape.head_dim}, hidden_size={hidden}) implies"
                f" {n} along dim {dim}: config.json belongs to another checkpoint, or the weights are damaged"
            )


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]} ({len(xs)} layers)" if xs else "none"


# ---- the plan, from the config alone --------------------------------------------------------------
def load_config(source: str | Path, **kwargs: Any) -> Any:
    """The model's ``PretrainedConfig`` (no weights read), or None if it cannot be read here (the
    full load then reports why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception:
        return None


def check_plan(config: Any, cfg: Any) -> Any:
    """Build the depth plan of ``cfg`` (an :class:`~hf_deepen.UpscaleConfig`) for a model with this
    ``config`` and run the family's checks on it, reading no weight. Returns the plan (None for a
    model_type without a named spec, checked when the model is loaded); raises
    :class:`~hf_deepen.PlanError` / :class:`~hf_deepen.ConfigError` /
    :class:`~hf_deepen.UnsupportedArchitectureError` as the real run would."""
    from .arch.registry import _SPECS
    from .layouts import build_plan

    spec = _SPECS.get(getattr(config, "model_type", None))
    if spec is None:  # a family found by probing the model: its checks run when it is loaded
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real run warns once
        spec = spec.bind(config)
        spec.head_shape(config)
    if cfg.zero_init:
        spec.zero_target(cfg.zero_target)
    n = spec.num_layers(config)
    if cfg.layout == "auto":  # the positions come from the calibration pass: check that enough slots are accepted
        from .auto_layout import flat_profile
        from .pipeline import make_plan

        return make_plan(cfg, spec, config, n, flat_profile(cfg, n))
    plan = build_plan(n, cfg)
    spec.check_plan(plan, config)
    return plan


# ---- the weights ------------------------------------------------------------------------------------
def check_finite(tensor: torch.Tensor, name: str, layer: int | None = None) -> None:
    """:class:`WeightError` if ``tensor`` holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        at = f" (layer {layer})" if layer is not None else ""
        raise WeightError(
            f"the checkpoint has NaN/inf in {name}{at}: {nan} NaN and {inf} inf of {tensor.numel()} values;"
            " re-download or repair it; OT cannot align non-finite weights"
        )


def check_layers_finite(states: list[Mapping[str, torch.Tensor]], indices: list[int], prefix: str) -> None:
    """:func:`check_finite` on every tensor of the source layers ``states`` (layers ``indices``)."""
    for state, i in zip(states, indices):
        for k, t in state.items():
            check_finite(t, f"{prefix}{i}.{k}", i)


# ---- entry points used by the loaders -------------------------------------------------------------
def preflight(source: str | os.PathLike, **load_kwargs: Any) -> str | Path:
    """:func:`check_source`, then :func:`check_checkpoint` (with the config's shapes) when ``source``
    is a local safetensors directory; returns what to hand to ``from_pretrained``."""
    src = check_source(source)
    if isinstance(src, Path) and not load_kwargs.get("gguf_file") and not load_kwargs.get("subfolder"):
        kw = {k: load_kwargs[k] for k in ("trust_remote_code",) if k in load_kwargs}
        config = load_config(src, **kw) if (src / "config.json").exists() else None
        check_checkpoint(src, config)
    return src if isinstance(src, str) else str(src)


@contextlib.contextmanager
def checkpoint_errors(source: Any) -> Iterator[None]:
    """Raise safetensors' own read errors (a shard damaged after the checks) as :class:`CheckpointError`."""
    try:
        yield
    except Exception as e:
        if type(e).__name__ != "SafetensorError" and "safetensors" not in type(e).__module__:
            raise
        raise CheckpointError(f"cannot read the checkpoint {source}: {e}: {_REFETCH}") from e
