"""Registry of architecture specs keyed by ``config.model_type``, and detection.

``get_spec(model)`` returns the registered spec for the model's family (bound to the model's
config with :meth:`ArchSpec.bind`), or tries the generic
fallback (the Llama layout, accepted only if every tensor of a layer is understood), or raises
:class:`UnsupportedArchitectureError` naming the model_type and the tensors it could not place.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from .spec import ArchSpec, llama_like

_SPECS: dict[str, ArchSpec] = {}

ADD_A_FAMILY = (
    "add a spec with hf_deepen.arch.register_spec(llama_like(...)) or ArchSpec(...);"
    " see 'Adding a family' in docs/families.md"
)


def register_spec(spec: ArchSpec) -> ArchSpec:
    """Register ``spec`` for each of its ``model_types`` (a later registration wins)."""
    for mt in spec.model_types:
        _SPECS[mt] = spec
    return spec


def registered_model_types() -> list[str]:
    return sorted(_SPECS)


def get_module(root: torch.nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_spec(model: torch.nn.Module) -> ArchSpec:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type in _SPECS:
        return _SPECS[model_type].bind(config)
    try:
        return _infer_spec(model, model_type)
    except UnsupportedArchitectureError as why:  # not Llama-shaped: find the structure by probing
        from .discover import discover_spec

        return discover_spec(model, why)


def _infer_spec(model: torch.nn.Module, model_type: str | None) -> ArchSpec:
    """Generic fallback: accept an unregistered family only if it is Llama-shaped throughout."""
    candidate = llama_like(f"generic:{model_type}", (str(model_type),))
    try:
        layers = get_module(model, candidate.layers_path)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported yet: no architecture spec, and its decoder layers are"
            f" not at {candidate.layers_path!r}; {ADD_A_FAMILY}"
        ) from None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported yet: {candidate.layers_path!r} is not a list of layers;"
            f" {ADD_A_FAMILY}"
        )
    unknown: list[str] = []
    for layer in layers:  # every layer: a stack may mix dense and MoE blocks (first_k_dense_replace)
        canon, more = candidate.to_canonical(layer.state_dict())
        unknown += [n for n in more if n not in unknown]
    missing = [r for r in ("q", "k", "v", "o", "up", "down") if r not in canon]
    if unknown or missing:
        what = []
        if unknown:
            what.append(f"tensors it does not understand: {', '.join(sorted(unknown))}")
        if missing:
            what.append(f"no tensor for role(s) {', '.join(missing)}")
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported yet (no architecture spec; the generic Llama-shaped"
            f" fallback found {'; '.join(what)}); {ADD_A_FAMILY}"
        )
    return candidate
