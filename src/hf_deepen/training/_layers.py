"""Finding an upscaled model's decoder layers and its new ones (works on a PEFT-wrapped model too)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError
from ..provenance import new_layer_indices, provenance

NO_PROVENANCE = (
    "the model carries no hf_deepen provenance (config.hf_deepen is missing), so the new layers are unknown:"
    " upscale it first with DepthUpscaler(model).upscale(...), or load a model that was saved after upscaling"
    " (the record survives save_pretrained/from_pretrained); to train layers of your choice pass layers=[...]"
)


def unwrap(model: Any) -> torch.nn.Module:
    """The ``PreTrainedModel`` under a PEFT wrapper (or ``model`` itself)."""
    inner = model
    get = getattr(inner, "get_base_model", None)  # PeftModel -> the PreTrainedModel it wraps
    if callable(get):
        inner = get()
    return inner


def layers_path(model: Any) -> str:
    """Dotted path, from the unwrapped model, to its ``ModuleList`` of decoder layers."""
    base = unwrap(model)
    try:
        from ..arch import get_spec

        return get_spec(base).layers_path
    except Exception:  # unregistered family: the ModuleList that has num_hidden_layers entries
        n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
        for name, mod in base.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n:
                return name
    raise ConfigError(
        f"cannot find the decoder layers of {type(base).__name__}: no architecture spec and no ModuleList of"
        " config.num_hidden_layers entries; register a spec with hf_deepen.arch.register_spec(...)"
    )


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    base = unwrap(model)
    obj: Any = base
    for part in layers_path(model).split("."):
        obj = getattr(obj, part)
    return obj


def resolve_new_layers(model: Any, stage: int | None = None, layers: Iterable[int] | None = None) -> list[int]:
    """The layer indices to train: ``layers`` if given, else the new layers from provenance."""
    n = len(decoder_layers(model))
    if layers is not None:
        idx = sorted({int(i) for i in layers})
    else:
        base = unwrap(model)
        if not provenance(base):
            raise ConfigError(NO_PROVENANCE)
        try:
            idx = new_layer_indices(base, stage)
        except (IndexError, KeyError):
            stages = len(provenance(base).get("stages", []))
            raise ConfigError(
                f"stage={stage} does not exist: the model records {stages} upscaling stage(s); pass stage=None"
                f" (all new layers), 0..{stages - 1}, or -1 (the latest)"
            ) from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigError(
            f"layer indices {bad} are out of range for a model with {n} decoder layers: the provenance does not"
            " match this model (was it truncated or re-upscaled without hf_deepen?); pass layers=[...] explicitly"
        )
    if not idx:
        raise ConfigError("no layers to train: the provenance lists no new layers; pass layers=[...] explicitly")
    return idx


def layer_param_names(model: Any, indices: Iterable[int]) -> set[str]:
    """Fully qualified names (as ``model.named_parameters()`` gives them) of the parameters of these layers."""
    layers = decoder_layers(model)
    ids = {id(p) for i in indices for p in layers[i].parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}
