"""Where a checkpoint lives, and whether an upscale of it can stream (no model instantiated).

The CLI streams by default (:func:`streaming_source`): a local directory of safetensors weights, or
a Hub id whose snapshot is already in the local cache, is upscaled tensor by tensor
(:func:`hf_deepen.streaming.upscale_checkpoint`). Only what streaming cannot do loads the model:
GGUF files (dequantized by transformers), other weight formats, a Hub id not in the cache and a
family without an architecture spec. Calibration passes (``align_on="activations"``,
``layout="auto"``) stream too: they run the checkpoint one decoder layer at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DeepenError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _has_safetensors(d: Path) -> bool:
    return any((d / w).is_file() for w in WEIGHTS) and (d / "config.json").is_file()


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot directory of Hub repo ``repo_id`` if it is in the cache with safetensors
    weights and a config, else None (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, not a valid repo id, offline: the in-memory path decides
        return None
    return path if _has_safetensors(path) else None


def streaming_source(model: str, *, gguf_file: str | None = None, revision: str | None = None,
                     streaming: bool | None = None) -> Path | None:
    """The directory to stream from, or None to load the model in memory.

    ``streaming``: None decides (stream whenever possible), True insists (an error naming the
    reason when it cannot), False never streams.
    """
    if streaming is False:
        return None
    why = None
    path = None
    if gguf_file:
        why = "a GGUF file is dequantized by transformers: drop --streaming"
    else:
        local = Path(model)
        if local.is_dir():
            if revision:
                why = "--revision applies to Hub ids, not a local directory: drop it"
            elif _has_safetensors(local):
                path = local
            else:
                why = f"{model!r} holds no safetensors weights (model.safetensors or its index) with a config.json"
        else:
            path = cached_snapshot(model, revision)
            if path is None:
                why = f"{model!r} is neither a local directory nor a Hub snapshot in the local cache"
        if path is not None:
            from .arch.registry import _SPECS

            try:
                model_type = json.loads((path / "config.json").read_text()).get("model_type")
            except (OSError, ValueError):
                model_type = None
            if model_type not in _SPECS:
                why, path = f"model_type {model_type!r} has no architecture spec for streaming", None
    if path is None and streaming:
        raise DeepenError(f"cannot stream: {why}")
    return path
