"""Surgery: the only module that mutates a model.

Given a :class:`~hf_deepen.plan.DepthPlan` and the state dicts of the new layers, it rebuilds the
decoder's ``ModuleList`` (base layers are reused in place, not copied), renumbers every per-layer
index attribute (``self_attn.layer_idx``: the KV cache is looked up by it, and a stale index gives
wrong cached logits while greedy tokens can still look right), updates ``num_hidden_layers`` and
every per-layer config list *at the insertion point*, and records provenance in the config.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping

import torch
from transformers import PretrainedConfig

from ._version import __version__
from .arch.registry import get_module
from .arch.spec import ArchSpec
from .plan import DepthPlan

if TYPE_CHECKING:
    from .pipeline import ResolvedRun

PROVENANCE_KEY = "hf_deepen"


def clone_layer(layer: torch.nn.Module, shared: Mapping[int, Any]) -> torch.nn.Module:
    """Deep-copy ``layer`` while keeping references to shared objects (the model's config).

    A plain ``deepcopy`` would give the new layer its own copy of the config, so a later
    ``model.set_attn_implementation(...)`` would silently not reach it.
    """
    return copy.deepcopy(layer, memo=dict(shared))


def renumber(layers: torch.nn.ModuleList, attrs: tuple[str, ...]) -> None:
    for i, layer in enumerate(layers):
        for module in layer.modules():
            for attr in attrs:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, i)


def per_layer_fields(config: PretrainedConfig, spec: ArchSpec, num_layers: int) -> list[str]:
    """Config fields with one entry per layer: the spec's, plus any ``*layer*`` list of that length."""
    names = set(spec.per_layer_config)
    for k, v in vars(config).items():
        if "layer" in k and isinstance(v, (list, tuple)) and len(v) == num_layers:
            names.add(k)
    return sorted(n for n in names if isinstance(getattr(config, n, None), (list, tuple)))


def update_config(config: PretrainedConfig, spec: ArchSpec, plan: DepthPlan) -> None:
    """Set ``num_hidden_layers`` and rebuild per-layer lists; a new layer takes the entry of the
    base layer it was made from first (its lower neighbour). Fields that describe layers by index
    (MoE ``mlp_only_layers``) are rewritten by the spec's :meth:`~ArchSpec.update_layer_config`."""
    config = spec.layer_config(config)  # a multimodal wrapper: its text_config
    owned = spec.update_layer_config(config, [s.sources[0] for s in plan.layers])
    het = vars(config).get("_heterogeneity_spec")  # a heterogeneous config (Gemma-4): overrides by layer index
    if het is not None and isinstance(getattr(het, "per_layer_overrides", None), dict):
        old_over = dict(het.per_layer_overrides)
        het.per_layer_overrides.clear()
        het.per_layer_overrides.update({i: copy.deepcopy(old_over[s.sources[0]]) for i, s in enumerate(plan.layers)
                                        if s.sources[0] in old_over})
    for name in per_layer_fields(config, spec, plan.base_num_layers):
        if name in owned:
            continue
        old = list(getattr(config, name))
        if len(old) != plan.base_num_layers:
            continue
        setattr(config, name, [old[s.sources[0]] for s in plan.layers])
    setattr(config, spec.count_field, plan.num_layers)


def record_provenance(config: PretrainedConfig, run: "ResolvedRun", function_preserving: bool | None = None) -> dict[str, Any]:
    """Append this stage (the resolved run) to ``config.hf_deepen``; earlier stages' new-layer indices are
    remapped. ``function_preserving``: what the finished upscale found, where it differs from the run's claim."""
    plan, cfg, spec = run.plan, run.cfg, run.spec
    prev = getattr(config, PROVENANCE_KEY, None) or {}
    remap = plan.base_index_map()
    stages = []
    for s in prev.get("stages", []):
        s = dict(s)
        s["new_layer_indices"] = [remap[i] for i in s["new_layer_indices"] if i in remap]
        stages.append(s)
    stages.append(
        {
            "base_model": run.base_model,
            "architecture": spec.name,
            "base_num_layers": plan.base_num_layers,
            "num_layers": plan.num_layers,
            "method": cfg.method,
            "solver": cfg.solver if cfg.method == "opt" else None,
            "layout": plan.layout,
            **({"layout_reason": plan.reason} if plan.reason else {}),
            "new_layer_indices": plan.new_layer_indices,
            "sources": {str(i): list(plan.layers[i].sources) for i in plan.new_layer_indices},
            "function_preserving": run.function_preserving if function_preserving is None else function_preserving,
            "zero_target": run.zero_target,
            "config": cfg.to_dict(),
            "library_version": __version__,
        }
    )
    all_new = sorted({i for s in stages for i in s["new_layer_indices"]})
    record = {"library_version": __version__, "stages": stages, "new_layer_indices": all_new}
    setattr(config, PROVENANCE_KEY, record)
    return record


def apply_plan(
    model: torch.nn.Module, spec: ArchSpec, plan: DepthPlan, new_states: Mapping[int, Mapping[str, torch.Tensor]]
) -> torch.nn.ModuleList:
    """Insert the new layers described by ``plan`` into ``model`` (in place) and renumber."""
    parent_path, _, attr = spec.layers_path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    old = list(getattr(parent, attr))
    shared = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    new: list[torch.nn.Module] = []
    for i, src in enumerate(plan.layers):
        if src.kind == "base":
            new.append(old[src.sources[0]])
            continue
        layer = clone_layer(old[src.sources[0]], shared)
        with torch.no_grad():
            layer.load_state_dict(dict(new_states[i]), strict=True)
        new.append(layer)
    layers = torch.nn.ModuleList(new)
    setattr(parent, attr, layers)
    renumber(layers, spec.index_attrs)
    return layers
