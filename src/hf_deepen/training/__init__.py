"""Training helpers for upscaled models: freeze the base, LoRA on the new layers, summaries.

These helpers only set ``requires_grad`` flags or build a ``peft.LoraConfig``; train with whatever you
already use (``transformers.Trainer``, TRL's ``SFTTrainer``, a plain Accelerate loop). peft is imported
only when :func:`lora_config_for_new_layers` is called. See ``docs/training.md`` and ``examples/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._layers import decoder_layers, layer_param_names, layers_path, resolve_new_layers, unwrap

__all__ = [
    "freeze_base_layers",
    "lora_config_for_new_layers",
    "new_layer_parameter_names",
    "default_target_modules",
    "trainable_summary",
]


def new_layer_parameter_names(model: Any, stage: int | None = None, *, layers: Iterable[int] | None = None) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters of the new layers."""
    return layer_param_names(model, resolve_new_layers(model, stage, layers))


def freeze_base_layers(
    model: Any, stage: int | None = None, *, layers: Iterable[int] | None = None, verbose: bool = True
) -> dict[str, Any]:
    """Freeze everything except the new layers' parameters (in place).

    The new layers are read from the provenance hf_deepen records in ``model.config.hf_deepen``, so
    this works on a freshly upscaled model and on one reloaded with ``from_pretrained``. ``stage``
    picks one upscaling stage (``-1``: the latest) instead of all of them; ``layers`` overrides the
    provenance with explicit indices. Embeddings, final norm, LM head and all base layers are frozen.

    Returns ``{"trainable": n, "total": m, "new_layers": [...], "trainable_percent": p}``
    (parameter counts; tied weights counted once) and prints it unless ``verbose=False``.

    Raises :class:`~hf_deepen.ConfigError` (a ``ValueError``) if the model carries no provenance.
    """
    idx = resolve_new_layers(model, stage, layers)
    keep = layer_param_names(model, idx)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        total += p.numel()
        trainable += p.numel() if name in keep else 0
    out = {
        "trainable": trainable,
        "total": total,
        "new_layers": idx,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
    }
    if verbose:
        print(
            f"hf_deepen: training new layers {idx} only: trainable params {trainable:,} of {total:,}"
            f" ({out['trainable_percent']:.2f}%)"
        )
    return out


#: canonical spec roles of the projections LoRA targets by default
_PROJECTION_ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc1", "fc2")


def default_target_modules(model: Any, layer: int = 0) -> list[str]:
    """Short names of the attention and MLP projections of a decoder layer (e.g. ``q_proj`` ... ``down_proj``).

    Taken from the architecture spec where there is one (only projections present in the layer),
    else every ``nn.Linear`` (or GPT-2 style ``Conv1D``) in the layer.
    """
    import torch

    mod = decoder_layers(model)[layer]
    present = {name for name, _ in mod.named_modules()}
    names: list[str] = []
    try:
        from ..arch import get_spec

        tensors = getattr(get_spec(unwrap(model)), "tensors", {}) or {}
    except Exception:
        tensors = {}
    for role in _PROJECTION_ROLES:
        path = tensors.get(role)
        if path and path.endswith(".weight") and path[: -len(".weight")] in present:
            short = path[: -len(".weight")].rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    if not names:
        for name, m in mod.named_modules():
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                short = name.rsplit(".", 1)[-1]
                if short not in names:
                    names.append(short)
    return names


def lora_config_for_new_layers(
    model: Any,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    *,
    stage: int | None = None,
    layers: Iterable[int] | None = None,
    **kw: Any,
):
    """A ``peft.LoraConfig`` that puts adapters on the new layers only.

    ``layers_to_transform`` is set to the new layers (from provenance, see :func:`freeze_base_layers`)
    and ``layers_pattern`` to the name of the model's layer list (``"layers"`` for Llama-like models).
    ``target_modules`` defaults to the attention and MLP projections of the layer
    (:func:`default_target_modules`); it must be a list of names, not a regex string, because PEFT
    ignores ``layers_to_transform`` for a regex. Other keywords go to ``LoraConfig``
    (``task_type`` defaults to ``"CAUSAL_LM"``, ``lora_dropout`` to 0.0).
    """
    from peft import LoraConfig

    idx = resolve_new_layers(model, stage, layers)
    if target_modules is None:
        target_modules = default_target_modules(model, idx[0])
    elif isinstance(target_modules, str):
        from ..errors import ConfigError

        raise ConfigError(
            f"target_modules={target_modules!r} is a string, which PEFT treats as a regex and then ignores"
            " layers_to_transform: pass a list of module names, e.g. ['q_proj', 'v_proj']"
        )
    kw.setdefault("task_type", "CAUSAL_LM")
    kw.setdefault("lora_dropout", 0.0)
    kw.setdefault("layers_pattern", layers_path(model).rsplit(".", 1)[-1])
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), layers_to_transform=idx, **kw
    )


def trainable_summary(model: Any) -> str:
    """A few lines: trainable/total parameters, which decoder layers train, what else trains."""
    layers = decoder_layers(model)
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            owner[id(p)] = i
    trainable = total = 0
    in_layers: dict[int, int] = {}
    other: list[str] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        if id(p) in owner:
            in_layers[owner[id(p)]] = in_layers.get(owner[id(p)], 0) + p.numel()
        else:
            other.append(name)
    try:
        from ..provenance import new_layer_indices

        new = new_layer_indices(unwrap(model))
    except Exception:
        new = []
    pct = 100.0 * trainable / max(total, 1)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"]
    lines.append(f"decoder layers: {len(layers)}; new (hf_deepen provenance): {new if new else 'none recorded'}")
    lines.append(f"layers with trainable params: {sorted(in_layers)}")
    if new:
        extra = sorted(set(in_layers) - set(new))
        missing = sorted(set(new) - set(in_layers))
        if extra:
            lines.append(f"  note: base layers {extra} are trainable")
        if missing:
            lines.append(f"  note: new layers {missing} are frozen")
    if other:
        shown = ", ".join(other[:5]) + (f", ... ({len(other)} in all)" if len(other) > 5 else "")
        lines.append(f"trainable outside the decoder layers: {shown}")
    return "\n".join(lines)
