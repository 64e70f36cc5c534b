"""Structure discovered, not listed: a spec for any decoder stack that no named spec describes.

:func:`discover_spec` is what :func:`~hf_deepen.arch.get_spec` falls back to when a model's family
has no named spec and is not Llama-shaped. It works on the model itself, not on names:

1. **The stack.** The largest ``ModuleList`` whose length is the layer count of the config (or of
   its ``text_config`` for a multimodal wrapper): ``model.layers``, ``transformer.h``,
   ``model.language_model.layers``, ... The config field that counts the layers (``num_hidden_layers``,
   ``n_layer``, ``num_layers``, ``text_config.num_hidden_layers``) is found by its value. When the
   stack is the language model of a wrapper whose ``text_config`` names a family with a spec (LLaVA
   around Llama, Gemma-3 around Gemma-3-text), that spec is used, moved to the nested stack.
2. **Residual writers, by probing.** One forward pass captures each block's inputs; then, on a
   perturbed copy of a block's weights, every parameter group is zeroed (the block must then be the
   identity: it only adds to the residual stream) and groups are given back, in the order the block
   runs them, as long as the block stays the identity. What is left zeroed is the smallest set of
   late tensors that makes the block the identity (``o_proj`` and ``down_proj`` for Llama, the
   experts' ``down_proj`` and its bias for gpt-oss, the mixer's ``out_proj`` for a Mamba block). A
   block that is not the identity with everything zeroed (post-LN) gets no zero-init: copies and
   averages still work, but are reported as not function preserving.
3. **OT units, proved by permutation.** Candidate units are read from shapes (MLP neurons between
   the Linears that make them and the one that reads them; attention KV-head groups from the
   config's head counts, with per-head tensors such as sinks; experts, with their router rows).
   A candidate is kept only if permuting its units, by a random permutation, leaves the block's
   output unchanged on the perturbed weights; OT fusion then aligns each kept unit space and
   averages every other tensor in place. The report lists which units were aligned and which
   candidates were refused. With no proven unit, OT is refused (avg / copy still work).
4. **Config.** Per-layer lists (any list of the layer count in the layer config) take the entry of
   the new layer's source; index lists (``full_attn_idxs``-style) are renumbered; the layer index
   attributes (any int attribute that equals the layer's position in every block) are renumbered.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import ConfigError, UnsupportedArchitectureError
from .spec import ArchSpec, HeadShape

Tensor = torch.Tensor
#: config fields that count layers, tried in this order
COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
#: sub-configs that may hold a wrapper's language model
SUB_CONFIGS = ("text_config", "language_config", "llm_config", "decoder")
#: list fields of the layer count that are not per-layer
_NOT_PER_LAYER = {"architectures"}
_ID_TOKENS = 6


# ---- unit groups ------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitGroup:
    """``n`` units that may be permuted together: slices of tensors (``entries``: key, dim, block
    size) and items of ``ModuleList`` s (``lists``: prefix, the tensor names inside one item)."""

    name: str
    n: int
    entries: tuple[tuple[str, int, int], ...] = ()
    lists: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def keys(self) -> set[tuple[str, int]]:
        out = {(k, d) for k, d, _ in self.entries}
        for p, rest in self.lists:
            out |= {(f"{p}.{i}.{r}", -1) for i in range(self.n) for r in rest}
        return out


def _split(block: int) -> tuple[int, int]:
    """An entry's ``block``: ``b > 0`` contiguous blocks of ``b``; ``-c``: ``c`` equal chunks (``[gate; up]``)
    whose ``i``-th rows together form unit ``i``."""
    return (1, block) if block > 0 else (-block, 1)


def _to_units(x: Tensor, dim: int, block: int) -> Tensor:
    c, b = _split(block)
    n = x.shape[dim] // (b * c)
    y = x.reshape(*x.shape[:dim], c, n, b, *x.shape[dim + 1 :]).movedim(dim + 1, 0)
    return y.reshape(n, -1)


def _from_units(u: Tensor, shape: torch.Size, dim: int, block: int) -> Tensor:
    c, b = _split(block)
    n = shape[dim] // (b * c)
    moved = (n, *shape[:dim], c, b, *shape[dim + 1 :])
    return u.reshape(moved).movedim(0, dim + 1).reshape(shape)


def features(state: Mapping[str, Tensor], g: UnitGroup) -> Tensor:
    """``[n, d]`` float64: unit ``i``'s slices of every tensor of the group, side by side."""
    parts = [_to_units(state[k].detach().to(torch.float64), d, b) for k, d, b in g.entries]
    for p, rest in g.lists:
        parts.append(torch.stack([torch.cat([state[f"{p}.{i}.{r}"].detach().to(torch.float64).flatten() for r in rest])
                                  for i in range(g.n)]))
    return torch.cat(parts, dim=1)


def apply_units(state: dict[str, Tensor], g: UnitGroup, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace, in ``state``, each tensor of ``g`` by ``fn`` applied to its ``[n, d]`` unit view."""
    for k, d, b in g.entries:
        t = state[k]
        state[k] = _from_units(fn(_to_units(t, d, b)), t.shape, d, b).to(t.dtype)
    for p, rest in g.lists:
        stacked = torch.stack([torch.cat([state[f"{p}.{i}.{r}"].flatten() for r in rest]) for i in range(g.n)])
        moved = fn(stacked)
        for i in range(g.n):
            off = 0
            for r in rest:
                t = state[f"{p}.{i}.{r}"]
                state[f"{p}.{i}.{r}"] = moved[i, off : off + t.numel()].reshape(t.shape).to(t.dtype)
                off += t.numel()


@dataclass(frozen=True)
class LayerFacts:
    """What probing found for one kind of block (one set of tensor names and shapes)."""

    writers: tuple[str, ...] | None  # tensors zeroed to make the block the identity; None: impossible
    groups: tuple[UnitGroup, ...] = ()
    refused: tuple[str, ...] = ()  # candidate unit groups whose permutation changed the block
    ones: tuple[str, ...] = ()  # residual gains (Doge's input_residual) set to 1 along with the writers
    #: the writers make the block a positive per-token multiple of its input, not the identity (Beam's
    #: depth-scaled adds, Dory's interpolation on the sphere): function preserving only where every later
    #: reader of the stream is scale invariant, checked end to end (:meth:`DiscoveredSpec.verify_function`)
    scaled: bool = False


NO_FACTS = LayerFacts(None, (), ("the block could not be probed",))


def signature(state: Mapping[str, Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in state.items()))


# ---- the discovered spec ------------------------------------------------------------------------
@dataclass(frozen=True)
class DiscoveredSpec(ArchSpec):
    """A spec built by :func:`discover_spec` from probing one model (see the module docstring).

    Its canonical layer is the layer's own state dict (no roles): copy / avg / SOLAR work on any
    tensor, zero-init zeroes the probed residual writers, OT aligns the proven unit groups."""

    facts: Mapping[tuple, LayerFacts] = field(default_factory=dict)
    layer_signatures: tuple[tuple, ...] = ()
    bound: LayerFacts | None = None
    index_lists: tuple[str, ...] = ()

    def for_state(self, state: Mapping[str, Tensor]) -> ArchSpec:
        return dataclasses.replace(self, bound=self.facts.get(signature(state), NO_FACTS))

    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        return dict(state), []

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(canon)

    def check_shapes(self, canon: Mapping[str, Tensor], shape: HeadShape, where: str) -> None:
        return None

    def head_shape(self, config: Any) -> HeadShape:
        try:
            return super().head_shape(self.layer_config(config))
        except Exception:  # noqa: BLE001 - no head geometry needed: units come from probing
            return HeadShape(1, 1, 1)

    def can_preserve(self, config: Any) -> bool:
        return bool(self.facts) and all(f.writers is not None for f in self.facts.values())

    def zero_target(self, requested: str) -> str:
        if requested == "post_norm":
            raise ConfigError(
                f"zero_target='post_norm': the {self.name!r} layer structure was discovered by probing, which finds the"
                " tensors that write to the residual stream, not post-norms; use zero_target='outputs' or 'auto'"
            )
        return "outputs"

    def zero_values(self, requested: str) -> dict[str, float]:
        self.zero_target(requested)
        facts = self.bound
        if not facts or facts.writers is None:
            return {}
        return {**{k: 0.0 for k in facts.writers}, **{k: 1.0 for k in facts.ones}}


    def check_plan(self, plan: Any, config: Any) -> None:
        """Refuse, before any work, a plan whose config would not rebuild this model on reload: the
        updated config must validate (Dory checks its layer groups add up), and a model built from it
        must have, at each position, a block of the kind the plan puts there (Jamba derives its layer
        kinds from ``attn_layer_period`` / ``offset``, not from a per-layer list)."""
        cls = self.extra.get("model_cls")
        if cls is None or not self.layer_signatures or plan.num_layers == plan.base_num_layers:
            return
        check_rebuild(self, cls, plan, config)

    def update_layer_config(self, config: Any, sources: list[int]) -> tuple[str, ...]:
        # the lists as they were, for model attributes copied from them at construction (after_surgery)
        self.extra["lists_before"] = {k: list(v) for k in self.per_layer_config + self.index_lists
                                      if isinstance(v := getattr(config, k, None), (list, tuple))}
        for name in self.extra.get("also_count", ()):  # BART-style causal LM: the cache counts num_hidden_layers
            setattr(config, name, len(sources))
        owned = []
        for name in self.extra.get("prefix_counts", ()):  # the first k layers of one kind (LFM2-MoE's num_dense_layers)
            first = set(self.layer_signatures[: getattr(config, name)])
            kinds = [self.layer_signatures[s] in first for s in sources]
            k = kinds.index(False) if False in kinds else len(kinds)
            if not any(kinds[k:]):  # otherwise left as is: the rebuild check refuses the plan
                setattr(config, name, k)
                owned.append(name)
        sections = self.extra.get("section_counts", ())  # contiguous groups that add up (Dory's input/recurrent/output)
        if sections:
            bounds, at = [], 0
            for name in sections:
                at += getattr(config, name)
                bounds.append(at)
            group = [next(g for g, b in enumerate(bounds) if s < b) for s in sources]
            if group == sorted(group):  # otherwise left as is: the rebuild check refuses the plan
                for g, name in enumerate(sections):
                    setattr(config, name, group.count(g))
                owned += list(sections)
        for name in self.extra.get("pattern_lists", ()):  # a repeating pattern (RecurrentGemma's block_types)
            old = list(getattr(config, name))
            setattr(config, name, [old[s % len(old)] for s in sources])  # written out in full for the new stack
            owned.append(name)
        for name in self.index_lists:
            old = getattr(config, name, None)
            if isinstance(old, (list, tuple)):
                keep = set(old)
                setattr(config, name, [i for i, s in enumerate(sources) if s in keep])
                owned.append(name)
        return tuple(owned)

    def after_surgery(self, model: Any, layers: Any) -> None:
        """Model-level lists and index sets follow the plan; per-layer constants a block computes from
        its index or the layer count are refreshed and, where the block's forward reads them, settled so
        the block still computes what it did (:mod:`.constants`); what cannot be settled is warned about."""
        import warnings

        from .spec import ArchitectureWarning

        refresh_model_lists(model, self.layer_config(model.config), self.extra.get("lists_before", {}))
        packed = self.extra.pop("outer_layer_slices", None)
        if packed is not None:
            slice_outer_tensors(model, *packed)
        routed = []
        for name, attr, value, preserved in self.extra.pop("model_index_sets", []):
            try:
                setattr(model.get_submodule(name), attr, copy.copy(value))
            except AttributeError:  # (a model of another class than the one checked)
                continue
            if not preserved:
                routed.append(f"{name or type(model).__name__}.{attr} = {sorted(value)}")
        if routed:
            warnings.warn(
                f"{self.name}: the model derives layer indices from the config ({'; '.join(routed)}); for the new"
                " stack they no longer name the same base layers, so the upscaled model (like its reload) is not"
                " function preserving: choose positions that keep them",
                ArchitectureWarning, stacklevel=3,
            )
        from .constants import settle_constants

        changed = settle_constants(model, layers, self.layer_config(model.config), self.facts)
        self.extra["unsettled"] = changed
        if changed and "scaled_reference" not in self.extra:  # otherwise verify_function decides
            warnings.warn(
                f"{self.name}: blocks compute constants from their index ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}); they were updated for the new positions, so layers that moved"
                " up compute differently and the upscaled model is not function preserving",
                ArchitectureWarning, stacklevel=3,
            )

    def verify_function(self, model: Any, preserving: bool) -> str | None:
        """Blocks that zero-init makes a positive per-token multiple of their input (not the identity)
        preserve the function only if every later reader of the stream is scale invariant, or the
        refreshed constants rescale it uniformly (Beam's depth-scaled adds). Checked end to end: the
        upscaled model's logits on the probe ids must be the base model's (1e-5 relative). Returns
        why not (and warns), or None."""
        import warnings

        from .spec import ArchitectureWarning

        ref = self.extra.get("scaled_reference")
        if ref is None or not preserving:
            return None
        if close_rel(probe_logits(model, self.layer_config(model.config)), ref, 1e-5):
            return None
        why = (f"{self.name}: zero-init makes a new block a positive multiple of its input, not the identity, and the"
               " upscaled model's logits on a probe differ from the base model's (a reader of the residual stream"
               " is not scale invariant"
               + (f", or constants computed from the index: {', '.join(self.extra.get('unsettled', [])[:4])}"
                  if self.extra.get("unsettled") else "") + "): not function preserving")
        warnings.warn(why, ArchitectureWarning, stacklevel=3)
        return why

    def built_alike(self, lower: int, upper: int) -> bool:
        sigs = self.layer_signatures
        return max(lower, upper) >= len(sigs) or sigs[lower] == sigs[upper]

    def fusion_refusal(self, lower: int, upper: int, method: str) -> str | None:
        """:meth:`_fuse_mixed`'s refusal, from the layers' signatures: OT between two layers of different
        kinds needs a proven unit whose tensors both have."""
        sigs = self.layer_signatures
        if method != "opt" or self.built_alike(lower, upper):
            return None
        common = {k for k, _ in set(sigs[lower]) & set(sigs[upper])}
        facts = self.facts.get(sigs[lower], NO_FACTS)  # the new layer is the lower parent's kind (for_state)
        if any({k for k, _ in g.keys()} <= common for g in facts.groups):
            return None
        return f"layers {lower} and {upper} are of different kinds with no proven unit in common"

    def make_layer(self, method: str, sources: list[Mapping[str, Tensor]], shape: HeadShape, cfg: Any,
                   zero: Mapping[str, float] | None = None, dtype: torch.dtype = torch.float64, **context: Any):
        from ..fuse import make_layer

        if len(sources) == 2 and signature(sources[0]) != signature(sources[1]):
            return self._fuse_mixed(method, sources, cfg, zero, dtype)
        if method != "opt":
            return make_layer(method, sources, shape, cfg, zero, dtype=dtype, **context)
        if context.get("costs") is not None:
            raise UnsupportedArchitectureError(
                f"{self.name}: align_on='activations' needs the named attention roles; use align_on='weights'"
            )
        facts = self.bound or NO_FACTS
        if not facts.groups:
            why = "; ".join(facts.refused) or "no candidate units (MLP neurons, KV-head groups, experts) found"
            raise UnsupportedArchitectureError(
                f"{self.name}: OT fusion has no unit whose permutation provably leaves this block unchanged ({why});"
                " use method='avg' or 'copy'"
            )
        return self._fuse(sources, cfg, zero, dtype, facts.groups, facts.refused)

    def _fuse_mixed(self, method: str, sources: list[Mapping[str, Tensor]], cfg: Any, zero: Any, dtype: torch.dtype):
        """Two parents of different kinds (a hybrid stack: attention and a linear mixer): the new layer is
        the lower parent's kind; tensors both have (same name, same shape) are fused, the rest kept from it."""
        from ..fuse import FusionResult

        a, b = sources
        common = {k for k in a if k in b and a[k].shape == b[k].shape}
        if method in ("copy", "solar"):
            res = FusionResult({k: v.detach().to(dtype) for k, v in a.items()}, {})
            if cfg.zero_init:
                for k, v in (zero or {}).items():
                    if k in res.canon:
                        res.canon[k] = torch.full_like(res.canon[k], v)
            return res
        groups = ()
        if method == "opt":
            facts = self.bound or NO_FACTS
            groups = tuple(g for g in facts.groups if {k for k, _ in g.keys()} <= common)
            if not groups:
                raise UnsupportedArchitectureError(
                    f"{self.name}: OT fusion of two layers of different kinds needs a unit both have (MLP neurons,"
                    " experts) whose permutation is proven; none is: use method='avg' or 'copy'"
                )
        res = self._fuse([{k: a[k] for k in common}, {k: b[k] for k in common}], cfg, zero, dtype, groups, ())
        for k in a:
            if k not in common:
                res.canon[k] = torch.full_like(a[k], zero[k], dtype=dtype) if cfg.zero_init and k in (zero or {}) \
                    else a[k].detach().to(dtype)
        res.diagnostics["kept_from_lower_parent"] = len(a) - len(common)
        res.diagnostics["fused_with_upper_parent"] = len(common)
        return res

    def _fuse(self, sources, cfg, zero, dtype, groups, refused):
        from ..align.solvers import solve
        from ..fuse import FusionResult

        a, b = sources
        a64 = {k: v.detach().to(torch.float64) for k, v in a.items()}
        b64 = {k: v.detach().to(torch.float64) for k, v in b.items()}
        diag: dict[str, Any] = {"ot_units": [f"{g.name} ({g.n})" for g in groups]} if groups else {}
        if refused:
            diag["ot_refused"] = list(refused)
        moved = set()
        for g in groups:
            fa, fb = features(a64, g), features(b64, g)
            plan = solve(torch.cdist(fa, fb).pow(2), cfg.solver, cfg.sinkhorn_reg, cfg.sinkhorn_max_iter,
                         tol=cfg.sinkhorn_tol_for(dtype))
            apply_units(a64, g, lambda u, plan=plan: plan.move(u, 0))
            ident = float((fa - fb).pow(2).sum())
            diag[f"ot_cost_ratio:{g.name}"] = plan.cost / ident if ident > 0 else 1.0
            moved |= {k for k, _ in g.keys()}
        if groups:
            diag["ot_tensors_aligned"] = len(moved)
            diag["ot_tensors_averaged_in_place"] = len([k for k in b if k not in moved])
        w = cfg.fusion_weight
        out = {k: ((1.0 - w) * a64[k] + w * b64[k]).to(dtype) for k in b}
        if cfg.zero_init:
            for k, v in (zero or {}).items():
                if k in out:
                    out[k] = torch.full_like(out[k], v)
        return FusionResult(out, diag)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:240]


def check_rebuild(spec: ArchSpec, cls: type, plan: Any, config: Any) -> None:
    """See :meth:`DiscoveredSpec.check_plan`."""
    import copy
    import warnings

    from ..surgery import update_config
    from .registry import get_module

    def validates(c: Any) -> Exception | None:
        try:
            type(c).from_dict(c.to_dict())
        except Exception as e:  # noqa: BLE001 - any validation error of the family's config class
            return e
        return None

    new = copy.deepcopy(config)
    update_config(new, spec, plan)
    err = validates(new)
    if err is not None and validates(config) is None:
        raise UnsupportedArchitectureError(
            f"{spec.name}: the config with {plan.num_layers} layers does not validate ({_first_line(err)}): the"
            f" family describes its layer structure in config fields that depend on each other; hf_deepen updates"
            f" '{spec.count_field}' and per-layer lists only, so a reload would fail. Not supported for this family"
        )
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            whole_before, whole_fresh = cls(copy.deepcopy(config)), cls(new)
            before, fresh = get_module(whole_before, spec.layers_path), get_module(whole_fresh, spec.layers_path)
    except Exception:  # noqa: BLE001 - the model cannot be built on meta: nothing to compare against
        return
    inside = spec.layers_path + "."
    after = whole_fresh.state_dict()
    outer = [(k, tuple(v.shape), tuple(after[k].shape)) for k, v in whole_before.state_dict().items()
             if not k.startswith(inside) and k in after and after[k].shape != v.shape]
    # packed per-layer tensors (Gemma-3n / Gemma-4's per-layer input embeddings, [vocab, L * D] and
    # the projection to them): one dimension of L * D for L layers, layer-major, sliced by the plan
    L, L2 = plan.base_num_layers, plan.num_layers
    slices = [(k, d, a[d] // L) for k, a, b in outer if len(a) == len(b)
              for d in [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
              if sum(x != y for x, y in zip(a, b)) == 1 and a[d] % L == 0 and b[d] == a[d] // L * L2]
    spec.extra["outer_layer_slices"] = (plan, slices) if len(slices) == len(outer) and slices else None
    if outer and spec.extra["outer_layer_slices"] is None:
        k, a, b = next(o for o in outer if o[0] not in {s[0] for s in slices})
        raise UnsupportedArchitectureError(
            f"{spec.name}: tensors outside the decoder stack are sized by the layer count ({k}: {list(a)} for"
            f" {plan.base_num_layers} layers, {list(b)} for {plan.num_layers}, not as one block of rows or columns"
            " per layer); hf_deepen cannot tell which part belongs to which layer. Not supported for this family"
        )
    spec.extra["model_index_sets"] = model_index_sets(whole_before, whole_fresh, spec.layers_path, plan)
    if getattr(spec, "rebuilds_layers", False):  # after_surgery rebuilds each new layer to its index's modules
        return
    if tuple(signature(b.state_dict()) for b in before) != tuple(spec.layer_signatures):
        return  # the model in memory is not what its config builds (adapters, quantized): nothing to compare
    for i, src in enumerate(plan.layers):
        want = spec.layer_signatures[src.sources[0]]
        got = signature(fresh[i].state_dict()) if i < len(fresh) else None
        if got != want:
            kind = type(fresh[i]).__name__ if i < len(fresh) else "no layer"
            raise UnsupportedArchitectureError(
                f"{spec.name}: position {i} of the upscaled stack takes a block like layer {src.sources[0]},"
                f" but a model built from the updated config has a different block there ({kind}): the family derives layer kinds from the layer index"
                " (a period / offset or a count of leading layers in the config), not from a per-layer list, so the saved model would not reload"
                " as upscaled. Not supported for this family (choose num_layers / positions that keep the pattern)"
            )


def slice_outer_tensors(model: torch.nn.Module, plan: Any, slices: list[tuple[str, int, int]]) -> None:
    """Rewrite each packed per-layer tensor outside the stack (``(name, dim, D)``: ``dim`` holds one
    block of ``D`` per layer, layer-major) for the new stack: position ``i`` gets the block of the layer
    it was made from (``plan.layers[i].sources[0]``), so base layers read what they read before and a
    new layer its source's. The owning module's size attributes follow (``embedding_dim``,
    ``out_features`` / ``in_features``)."""
    idx = torch.tensor([s.sources[0] for s in plan.layers])
    for name, dim, d in slices:
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        old = getattr(mod, attr)
        shape = list(old.shape)
        blocks = old.detach().reshape(*shape[:dim], plan.base_num_layers, d, *shape[dim + 1:])
        new = blocks.index_select(dim, idx.to(old.device)).reshape(*shape[:dim], plan.num_layers * d, *shape[dim + 1:])
        if isinstance(old, torch.nn.Parameter):
            setattr(mod, attr, torch.nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
        else:
            setattr(mod, attr, new.contiguous())
        if isinstance(mod, torch.nn.Embedding) and dim == 1:
            mod.embedding_dim = new.shape[1]
        elif isinstance(mod, torch.nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = new.shape[0], new.shape[1]


def model_index_sets(before: torch.nn.Module, fresh: torch.nn.Module, layers_path: str, plan: Any) -> list[tuple]:
    """Layer indices a model keeps *outside* its blocks, derived from the config at construction
    (NeoMME's ``value_embedding_layers``: the first and last full-attention layer get value
    embeddings). Found by building the model from the config before and after the upscale (on
    ``meta``) and comparing every set / list / tuple of layer indices of the modules outside the stack.

    Returns ``(module, attribute, value for the new stack, preserved)`` for each one that changes:
    ``preserved`` when the new value names exactly the base layers the old one named, at their new
    positions (the model then routes as before, and keeps doing so after a reload); else a reload
    routes differently and the upscale is not function preserving (:meth:`DiscoveredSpec.after_surgery`
    warns). Either way the model in memory takes the new value, which is what ``from_pretrained`` builds.
    """
    pos = {s.sources[0]: i for i, s in enumerate(plan.layers) if s.kind == "base"}
    fresh_mods = dict(fresh.named_modules())
    out = []
    for name, mod in before.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        ref = fresh_mods.get(name)
        if ref is None or type(ref) is not type(mod):
            continue
        for attr, old in vars(mod).items():
            new = vars(ref).get(attr)
            if attr.startswith("_") or not isinstance(old, (set, frozenset, list, tuple)) or type(new) is not type(old) \
                    or new == old or not old or not all(type(v) is int for v in (*old, *new)) \
                    or not all(0 <= v < plan.base_num_layers for v in old):
                continue
            moved = [pos.get(v) for v in old]
            out.append((name, attr, new, None not in moved and type(old)(moved) == new))
    return out


def refresh_model_lists(model: torch.nn.Module, config: Any, before: Mapping[str, list]) -> None:
    """Model attributes copied from per-layer config fields at construction (Mllama's
    ``cross_attention_layers``) take the updated field; only copies (equal to the field before the
    upscale), not lists of the same name built otherwise (LFM3's rotary ``layer_types``)."""
    for mod in model.modules():
        for name, old in before.items():
            cur = vars(mod).get(name)
            if isinstance(cur, (list, tuple)) and list(cur) == old:
                val = getattr(config, name, None)
                if isinstance(val, (list, tuple)):
                    setattr(mod, name, type(vars(mod)[name])(val))


class _Nested:
    """Mixin: a named spec moved to a wrapper's nested language model (config from ``config_path``)."""

    def _sub(self, config: Any) -> Any:
        first = self.config_path.split(".")[0] if self.config_path else ""
        return self.layer_config(config) if first and hasattr(config, first) else config

    def head_shape(self, config: Any) -> HeadShape:
        return super().head_shape(self._sub(config))

    def can_preserve(self, config: Any) -> bool:
        return super().can_preserve(self._sub(config))

    def check_plan(self, plan: Any, config: Any) -> None:
        return super().check_plan(plan, self._sub(config))


_NESTED: dict[type, type] = {}


def nest(spec: ArchSpec, layers_path: str, config_path: str, count_field: str, per_layer: tuple[str, ...]) -> ArchSpec:
    """``spec`` (a named family spec) serving the same layers under ``layers_path``."""
    base = type(spec)
    cls = _NESTED.get(base)
    if cls is None:
        cls = _NESTED[base] = type(f"Nested{base.__name__}", (_Nested, base), {})
    kw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    kw.update(layers_path=layers_path, config_path=config_path, count_field=count_field,
              name=f"{spec.name}@{layers_path}", per_layer_config=tuple(sorted(set(spec.per_layer_config) | set(per_layer))))
    return cls(**kw)


# ---- discovery ----------------------------------------------------------------------------------
def _configs(config: Any) -> list[tuple[str, Any]]:
    out = [("", config)]
    for k in SUB_CONFIGS:
        sub = getattr(config, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out.append((k, sub))
    return out


def find_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList, str, str]:
    """``(layers_path, layers, config_path, count_field)`` of the decoder stack. Each config's first
    count field (:data:`COUNT_FIELDS` order) is tried first; the others only if no stack matches it
    (LongCat-Flash: ``num_hidden_layers`` counts two attention sublayers per block, ``num_layers`` the
    blocks)."""
    first, rest = [], []
    for path, c in _configs(model.config):
        found = []
        for f in COUNT_FIELDS:
            v = getattr(c, f, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append((path, f, v))
        first += found[:1]
        rest += found[1:]
        v = getattr(c, "decoder_layers", None)  # encoder-decoder (BART: num_hidden_layers is encoder_layers)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            first = [t for t in first if not (t[0] == path and t[2] == v)] + [(path, "decoder_layers", v)]
    best = _largest_stack(model, first) or _largest_stack(model, rest)
    if best is None:
        found = ", ".join(f"{p + '.' if p else ''}{f}={v}" for p, f, v in first) or "none found"
        raise UnsupportedArchitectureError(
            f"model_type {getattr(model.config, 'model_type', None)!r}: no ModuleList of blocks whose length is the"
            f" layer count of the config ({found});"
            " pass a spec: DepthUpscaler(model, spec=ArchSpec(...)), see docs/families.md"
        )
    return best[1], best[2], best[3], best[4]


def _largest_stack(model: torch.nn.Module, counts: list[tuple[str, str, int]]) -> tuple | None:
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) == 0:
            continue
        match = [(p, f) for p, f, v in counts if v == len(m)]
        if not match:
            continue
        # a wrapper's language model: prefer its text_config when both count the same
        p, f = next(((p, f) for p, f in match if p and "language" in name), match[0])
        if p == "" and len(match) > 1 and "vision" in name:
            continue
        size = sum(t.numel() for t in m.parameters())
        if best is None or size > best[0]:
            best = (size, name, m, p, f)
    return best


def _layer_lists(config: Any, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(per-layer lists of length ``n``, index lists) among the config's fields."""
    per, idx = [], []
    for k, v in vars(config).items():
        if k.startswith("_") or k in _NOT_PER_LAYER or not isinstance(v, (list, tuple)):
            continue
        ints = bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x for x in v) and min(v) < n
        if (ints and (len(v) <= n or max(v) >= n) and list(v) == sorted(set(v)) and any(t in k for t in ("idx", "indices", "layer", "ids"))
                and (len(v) < n or n > 2)):
            idx.append(k)  # layer indices (moe_layers, full_attn_idxs): renumbered, not repeated
        elif len(v) == n and n > 1:
            per.append(k)
    return tuple(sorted(per)), tuple(sorted(idx))


def _pattern_lists(config: Any, layers: torch.nn.ModuleList, per: tuple[str, ...]) -> tuple[str, ...]:
    """Lists of layer kinds shorter than the stack, repeated along it (RecurrentGemma's ``block_types``):
    those whose repetition tells the blocks apart exactly as their tensors do."""
    n = len(layers)
    sigs = [signature(layer.state_dict()) for layer in layers]
    out = []
    for k, v in vars(config).items():
        if (k.startswith("_") or k in per or k in _NOT_PER_LAYER or not isinstance(v, (list, tuple))
                or not 1 < len(v) < n or not all(isinstance(x, str) for x in v) or len(set(v)) < 2):
            continue
        ext = [v[i % len(v)] for i in range(n)]
        if len(set(ext)) > 1 and all((ext[i] == ext[j]) == (sigs[i] == sigs[j]) for i in range(n) for j in range(n)):
            out.append(k)
    return tuple(out)


def _prefix_counts(config: Any, layers: torch.nn.ModuleList, count: str) -> tuple[str, ...]:
    """Int fields that count leading layers of one kind (``num_dense_layers``): the blocks before that
    index share no tensor layout with the blocks after it."""
    n = len(layers)
    sigs = [signature(layer.state_dict()) for layer in layers]
    out = []
    for k, v in vars(config).items():
        if (k.startswith("_") or k == count or type(v) is not int or not 0 < v < n
                or not any(t in k for t in ("layer", "dense", "first", "replace"))):
            continue
        if not set(sigs[:v]) & set(sigs[v:]):
            out.append(k)
    return tuple(out)


def _section_counts(config: Any, n: int, count: str, per: tuple[str, ...], skip: tuple[str, ...]) -> tuple[str, ...]:
    """Int fields counting contiguous groups of layers that must add up to the stack (Dory's
    ``n_input_layers + n_recurrent_layers + n_output_layers``), in the config's declaration order:
    each group grows by the new layers whose source lies in it. Only where the config refuses a
    longer stack unless they are updated (its ``validate``)."""
    cand = [k for k, v in vars(config).items()
            if not k.startswith("_") and k != count and k not in skip and type(v) is int and 0 <= v <= n
            and "layers" in k]
    if len(cand) < 2 or sum(getattr(config, k) for k in cand) != n or not callable(getattr(config, "validate", None)):
        return ()

    def validates(grown: str | None) -> bool:
        c = copy.deepcopy(config)
        setattr(c, count, n + 1)
        for k in per:
            v = getattr(c, k)
            setattr(c, k, type(v)([*v, v[-1]]))
        if grown is not None:
            setattr(c, grown, getattr(c, grown) + 1)
        try:
            c.validate()
            return True
        except Exception:  # noqa: BLE001 - any validation error
            return False

    return tuple(cand) if not validates(None) and validates(cand[-1]) else ()


def _index_attrs(layers: torch.nn.ModuleList) -> tuple[str, ...]:
    found = {"layer_idx"}
    if len(layers) < 2:
        return tuple(sorted(found))
    for mname, mod in layers[0].named_modules():
        for attr, val in vars(mod).items():
            if type(val) is not int or attr.startswith("_") or val != 0:
                continue
            try:
                ok = all(getattr(layers[i].get_submodule(mname), attr, None) == i for i in range(len(layers)))
            except AttributeError:
                ok = False
            if ok:
                found.add(attr)
    return tuple(sorted(found))


def _fits(spec: ArchSpec, layer: torch.nn.Module, config: Any) -> bool:
    try:
        canon, unknown = spec.to_canonical(layer.state_dict())
        spec.check_shapes(canon, spec.head_shape(config), "probe")
        return not unknown
    except Exception:  # noqa: BLE001
        return False


def discover_spec(model: torch.nn.Module, why: Exception | None = None) -> ArchSpec:
    """A spec for ``model`` found by looking at it (see the module docstring)."""
    from .registry import _SPECS
    from .spec import llama_like

    config = model.config
    mt = getattr(config, "model_type", None)
    path, layers, cpath, count = find_stack(model)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    twins = [n for n, m in parent.named_children()
             if isinstance(m, torch.nn.ModuleList) and m is not layers and len(m) == len(layers)]
    if twins:
        raise UnsupportedArchitectureError(
            f"model_type {mt!r}: a layer is split over parallel ModuleLists ({path.rpartition('.')[2]},"
            f" {', '.join(twins)}), not one block per entry; inserting into one of them would leave the others"
            " short. Not supported: pass a spec whose layers_path is a ModuleList of whole blocks"
        )
    lc = getattr(config, cpath) if cpath else config
    per, idx = _layer_lists(lc, len(layers))
    index_attrs = _index_attrs(layers)
    # a wrapper around a family we know: that spec, moved to the nested stack
    if path != "model.layers" or cpath:
        sub_mt = getattr(lc, "model_type", None)
        named = _SPECS[sub_mt].bind(lc) if sub_mt in _SPECS else None
        if named is None and cpath:
            named = llama_like(f"generic:{sub_mt}", (str(sub_mt),))
        if named is not None and _fits(named, layers[0], lc):
            return nest(named, path, cpath, count, per)
    extra: dict[str, Any] = {"model_cls": type(model)}
    if count == "decoder_layers" and getattr(lc, "num_hidden_layers", None) == len(layers) \
            and not any(n.rpartition(".")[2] == "encoder" for n, _ in model.named_modules()):
        extra["also_count"] = ("num_hidden_layers",)  # its encoder_layers: no encoder here, the cache reads it
    extra["pattern_lists"] = _pattern_lists(lc, layers, per)
    extra["prefix_counts"] = _prefix_counts(lc, layers, count)
    extra["section_counts"] = _section_counts(lc, len(layers), count, per, extra["prefix_counts"])
    facts, sigs = probe(model, layers, lc)
    if any(f.scaled for f in facts.values()):  # checked end to end after the surgery (verify_function)
        ref = probe_logits(model, lc)
        if ref is None:
            facts = {k: dataclasses.replace(f, writers=None, ones=(), scaled=False) if f.scaled else f
                     for k, f in facts.items()}
        else:
            extra["scaled_reference"] = ref
    spec = DiscoveredSpec(
        name=f"discovered:{mt}", model_types=(str(mt),), tensors={}, residual=("*",), layers_path=path,
        index_attrs=index_attrs, per_layer_config=per, config_path=cpath, count_field=count,
        facts=facts, layer_signatures=sigs, index_lists=idx, extra=extra,
        notes=f"structure discovered by probing ({type(why).__name__ if why else 'no spec'})",
    )
    from .encoder import encoder_spec  # encoders: post-LN zero-init, a first layer built differently

    return encoder_spec(spec, model, layers) or spec


# ---- probing ------------------------------------------------------------------------------------
def _hidden(out: Any) -> Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    try:
        first = out[0]
        return first if isinstance(first, torch.Tensor) else None
    except Exception:  # noqa: BLE001
        return None


def run_block(block: torch.nn.Module, call: tuple) -> Tensor | None:
    """``block``'s hidden-state output on its captured ``(args, kwargs)``, without grad; None if it fails."""
    args, kwargs = call
    with torch.no_grad():
        try:
            return _hidden(block(*args, **kwargs))
        except Exception:  # noqa: BLE001 - a block that cannot run this way
            return None


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _probe_ids(model: torch.nn.Module, config: Any) -> Tensor:
    """The few token ids every probe runs on (fixed seed)."""
    vocab = getattr(config, "vocab_size", None) or getattr(model.config, "vocab_size", None) or 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, min(int(vocab), 1000)), (1, _ID_TOKENS), generator=g)
    return ids.to(next(model.parameters()).device)


def capture_calls(model: torch.nn.Module, layers: torch.nn.ModuleList, config: Any) -> dict[int, tuple]:
    """One forward pass on a few token ids; the ``(args, kwargs)`` each block was called with."""
    calls: dict[int, tuple] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            calls.setdefault(i, (tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}))
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    ids = _probe_ids(model, config)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - a model that cannot run this way is still copyable
        pass
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return calls


def _units(block: torch.nn.Module, order: dict[str, int]) -> list[tuple[int, str, list[str]]]:
    units = []
    for mname, mod in block.named_modules():
        names = [n for n, p in mod.named_parameters(recurse=False) if p.is_floating_point()]
        if not names:
            continue
        pre = f"{mname}." if mname else ""
        rank = order.get(mname, -1)  # a module the block does not call (functional use): given back first
        if set(names) <= {"weight", "bias"}:
            units.append((rank, mname or "<block>", [pre + n for n in names]))
            continue
        groups: dict[str, list[str]] = {}
        for n in names:
            base = n[: -len("_bias")] if n.endswith("_bias") else n
            groups.setdefault(base, []).append(pre + n)
        for base, keys in groups.items():
            units.append((rank, pre + base, keys))
    units.sort(key=lambda u: u[0])
    return units


def probe(model: torch.nn.Module, layers: torch.nn.ModuleList, config: Any) -> tuple[dict, tuple]:
    sigs = tuple(signature(layer.state_dict()) for layer in layers)
    if any(p.device.type == "meta" for p in model.parameters()):
        return {}, sigs
    calls = capture_calls(model, layers, config)
    facts: dict[tuple, LayerFacts] = {}
    for i, layer in enumerate(layers):
        if sigs[i] in facts or i not in calls:
            continue
        facts[sigs[i]] = _probe_block(layer, calls[i], config)
    return facts, sigs


def probe_logits(model: torch.nn.Module, config: Any) -> Tensor | None:
    """The model's logits (float) on the probe's token ids, or None where it does not run that way."""
    ids = _probe_ids(model, config)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001
        return None
    finally:
        model.train(was)
    y = getattr(out, "logits", None)
    return y.detach().float().clone() if isinstance(y, torch.Tensor) else None


def _probe_block(block: torch.nn.Module, call: tuple, config: Any) -> LayerFacts:
    args, kwargs = call
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        return NO_FACTS
    original = {k: v.detach().clone() for k, v in block.state_dict().items()}
    order: dict[str, int] = {}
    names = {id(m): n for n, m in block.named_modules()}

    def seen(mod: torch.nn.Module, _args: Any) -> None:
        order.setdefault(names[id(mod)], len(order))

    hooks = [m.register_forward_pre_hook(seen) for m in block.modules()]
    was = block.training
    block.eval()
    run = functools.partial(run_block, block, call)

    try:
        g = torch.Generator().manual_seed(1)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for p in params.values():
                if p.is_floating_point():
                    noise = torch.randn(p.shape, generator=g).to(p)
                    p.add_(noise * 0.05 * (float(p.abs().mean()) + 0.02))
        perturbed = {k: v.detach().clone() for k, v in block.state_dict().items()}
        y_ref = run()
        for h in hooks:
            h.remove()
        hooks = []
        if y_ref is None or not torch.isfinite(y_ref).all():
            return NO_FACTS
        units = _units(block, order)
        writers = _writers(block, params, perturbed, units, run, x)
        ones: tuple[str, ...] = ()
        gains = [k for k, p in params.items() if p.dim() == 1 and "residual" in k.rpartition(".")[2]]
        if writers is None and gains:  # a learned gain on the residual (Doge): the identity needs it at 1
            block.load_state_dict(perturbed)
            with torch.no_grad():
                for k in gains:
                    params[k].fill_(1.0)
            rest = [(r, n, [k for k in keys if k not in gains]) for r, n, keys in units]
            writers = _writers(block, params, {**perturbed, **{k: params[k].detach().clone() for k in gains}},
                               [u for u in rest if u[2]], run, x)
            ones = tuple(gains) if writers is not None else ()
        scaled = False
        if writers is None:  # a positive per-token multiple of the input (depth-scaled or normed residual)
            block.load_state_dict(perturbed)
            writers = _writers(block, params, perturbed, units, run, x, same=_is_scaled_identity)
            scaled = writers is not None
        block.load_state_dict(perturbed)
        groups, refused = _proven_groups(block, perturbed, y_ref, run, config, x.shape[-1], x)
        return LayerFacts(writers, groups, refused, ones, scaled)
    finally:
        for h in hooks:
            h.remove()
        block.load_state_dict(original)
        block.train(was)


def _is_scaled_identity(y: Tensor | None, x: Tensor) -> bool:
    """``y = c x`` with one positive ``c`` per token (not all 1: that is :func:`_is_identity`)."""
    if y is None or y.shape != x.shape or x.dim() < 2:
        return False
    y64, x64 = y.double(), x.double()
    xx = (x64 * x64).sum(-1, keepdim=True)
    if not bool((xx > 0).all()):
        return False
    c = (y64 * x64).sum(-1, keepdim=True) / xx
    if not bool((c > 1e-3).all()):
        return False
    return bool((y64 - c * x64).abs().max() <= 1e-6 * (1.0 + float(y64.abs().max())))


def close_rel(y: Tensor | None, t: Tensor, tol: float) -> bool:
    """``y`` has ``t``'s shape and ``max|y - t| <= tol * (1 + max|t|)`` (None: False)."""
    if y is None or y.shape != t.shape:
        return False
    return float((y.float() - t.float()).abs().max()) <= tol * (1.0 + float(t.float().abs().max()))


def _is_identity(y: Tensor | None, x: Tensor) -> bool:
    return close_rel(y, x, 1e-6)


def _writers(block, params, perturbed, units, run, x, same=None) -> tuple[str, ...] | None:
    same = same or _is_identity
    with torch.no_grad():
        for _, _, keys in units:
            for k in keys:
                params[k].zero_()
        if not same(run(), x):
            return None
        zeroed = []
        for _, _, keys in units:  # give each group back, in the order the block runs them
            for k in keys:
                params[k].copy_(perturbed[k])
            if not same(run(), x):
                for k in keys:
                    params[k].zero_()
                zeroed.extend(keys)
    return tuple(zeroed)


def _linears(mod: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, c) for n, c in mod.named_children()
            if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2
            and isinstance(getattr(c, "in_features", None), int) and isinstance(c, torch.nn.Linear)]


def _get(config: Any, name: str) -> Any:
    """``getattr(config, name, None)``, also None where a heterogeneous config (Gemma-4 unified) refuses a
    global read of a per-layer attribute."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError
        return None


def _candidates(block: torch.nn.Module, config: Any, hidden: int) -> list[UnitGroup]:
    out: list[UnitGroup] = []
    state = block.state_dict()
    heads = next((_get(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if
                  isinstance(_get(config, k), int)), None)
    kv = _get(config, "num_key_value_heads") or heads
    hd = _get(config, "head_dim") or (hidden // heads if heads else None)
    # every Linear of the block by its full name (for units whose producer and reader are not siblings:
    # BERT's intermediate.dense -> output.dense, attention.self.query -> attention.output.dense)
    all_lins = [(f"{m}.{n}" if m else n, c) for m, mod in block.named_modules() for n, c in _linears(mod)]
    covered: set[int] = set()
    for mname, mod in block.named_modules():
        pre = f"{mname}." if mname else ""
        lins = _linears(mod)

        def wb(n: str, dim: int, block_: int) -> list[tuple[str, int, int]]:
            full = n[3:] if n.startswith("../") else f"{pre}{n}"  # "../": a full name in the block
            e = [(f"{full}.weight", dim, block_)]
            if dim == 0 and f"{full}.bias" in state:
                e.append((f"{full}.bias", 0, block_))
            return e

        # MLP neurons: Linears that make n features, and those that read them
        for n in sorted({c.in_features for _, c in lins} - {hidden}):
            prod = [nm for nm, c in lins if c.out_features == n and c.in_features != n]
            fused = [nm for nm, c in lins if c.out_features == 2 * n and c.in_features != n]
            cons = [nm for nm, c in lins if c.in_features == n]
            if prod and n > 1:
                covered.add(n)
                entries = [e for nm in prod for e in wb(nm, 0, 1)] + [e for nm in cons for e in wb(nm, 1, 1)]
                # a norm between them (MLA's q_a_layernorm over the latent ranks): its gain moves too
                used = {e[0] for e in entries}
                gains = [(k, 0, 1) for k, t in state.items() if k.startswith(pre) and k not in used and t.dim() == 1
                         and t.shape[0] == n and t.is_floating_point()]
                if gains:
                    out.append(UnitGroup(f"{pre}neurons", n, tuple(entries + gains)))
                out.append(UnitGroup(f"{pre}neurons", n, tuple(entries)))
            elif fused and n > 1:  # a fused [gate; up] (chunked) or interleaved projection
                for block in (-2, 2):
                    entries = [e for nm in fused for e in wb(nm, 0, block)] + [e for nm in cons for e in wb(nm, 1, 1)]
                    out.append(UnitGroup(f"{pre}neurons", n, tuple(entries)))
        # selective-scan channels (a Mamba-1 mixer: A_log is channels x state): every tensor of the mixer with a
        # channel axis (in_proj's [x; z] rows as two chunks, the depthwise conv, x_proj / out_proj columns, ...)
        a_log = state.get(f"{pre}A_log")
        if a_log is not None and a_log.dim() == 2 and f"{pre}D" in state:
            d, ents, ok = a_log.shape[0], [], True
            for k, t in state.items():
                if not k.startswith(pre) or not t.is_floating_point():
                    continue
                if t.dim() > 1 and t.shape[0] in (d, 2 * d) and t.shape[1] == d:  # two channel axes: ambiguous
                    ok = False
                    break
                if t.shape[0] == d:
                    ents.append((k, 0, 1))
                elif t.shape[0] == 2 * d:
                    ents.append((k, 0, -2))
                elif t.dim() == 2 and t.shape[1] == d:
                    ents.append((k, 1, 1))
            if ok and len(ents) > 3:
                out.append(UnitGroup(f"{pre}channels", d, tuple(ents)))
        # KV-head groups: q (rows of g heads), k / v (rows of one head), o (columns of g heads)
        if heads and kv and hd and isinstance(kv, int) and kv > 1 and heads % kv == 0:
            hq, hkv, g = heads * hd, kv * hd, heads // kv
            ocands = [nm for nm, c in lins if c.in_features == hq and c.out_features == hidden]
            sq = [nm for nm, c in lins if c.in_features == hidden and c.out_features == hq]
            kvl = [nm for nm, c in lins if c.in_features == hidden and c.out_features == hkv] if hq != hkv else []
            mine = {f"{pre}{nm}" for nm in sq + kvl}
            far = [f"../{nm}" for nm, c in all_lins if c.in_features == hq and c.out_features == hidden and nm not in mine]
            # o is told from q / k / v by trying each (verification keeps the one that is right)
            options = []
            need = 3 if hq == hkv else 1
            for o in dict.fromkeys(ocands + (far if len(far) == 1 else [])):
                q = [nm for nm in sq if nm != o]
                if len(q) == need and (hq == hkv or len(kvl) == 2):
                    options.append((q, o))
            for q, o in options[:4]:
                entries = [e for nm in q for e in wb(nm, 0, g * hd)] + wb(o, 1, g * hd)
                if hq != hkv:
                    entries += [e for nm in kvl for e in wb(nm, 0, hd)]
                used = {e[0] for e in entries}
                extra = []
                for k, t in state.items():
                    if not k.startswith(pre) or k in used or t.dim() < 1 or not t.is_floating_point():
                        continue
                    if t.shape[0] == heads and heads != hd:
                        extra.append((k, 0, g))
                    elif t.dim() == 1 and t.shape[0] == hq and hq == hkv:
                        extra.append((k, 0, g * hd))
                out.append(UnitGroup(f"{pre}kv_head_groups", kv, tuple(entries + extra)))
                if extra:
                    out.append(UnitGroup(f"{pre}kv_head_groups", kv, tuple(entries)))
        # experts: 3-D parameters [E, ...] of one module, with the router rows of its parent
        direct = {n: p for n, p in mod.named_parameters(recurse=False)}
        three = [n for n, p in direct.items() if p.dim() == 3]
        if three:
            e_n = direct[three[0]].shape[0]
            if e_n > 1 and all(direct[n].shape[0] == e_n for n in three):
                entries = [(f"{pre}{n}", 0, 1) for n, p in direct.items() if p.dim() >= 2 and p.shape[0] == e_n]
                parent = mname.rpartition(".")[0]
                ppre = f"{parent}." if parent else ""
                for k, t in state.items():
                    if k.startswith(ppre) and not k.startswith(pre) and t.dim() in (1, 2) and t.shape[0] == e_n \
                            and t.is_floating_point():
                        entries.append((k, 0, 1))
                out.append(UnitGroup(f"{pre}experts", e_n, tuple(entries)))
        # experts as a ModuleList of identical modules, routed by a sibling
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and len({type(c) for c in mod}) == 1:
            rest = tuple(k for k, _ in mod[0].state_dict().items())
            e_n = len(mod)
            if rest and all(tuple(c.state_dict()) == rest for c in mod):
                parent = mname.rpartition(".")[0]
                ppre = f"{parent}." if parent else ""
                router = [(k, 0, 1) for k, t in state.items() if k.startswith(ppre) and not k.startswith(pre)
                          and t.dim() in (1, 2) and t.shape[0] == e_n and t.is_floating_point()]
                if router:
                    out.append(UnitGroup(f"{pre}experts", e_n, tuple(router), ((mname, rest),)))
    for n in sorted({c.in_features for _, c in all_lins} - {hidden} - covered):
        prod = [nm for nm, c in all_lins if c.out_features == n and c.in_features != n]
        cons = [nm for nm, c in all_lins if c.in_features == n]
        if prod and n > 1:
            entries = [(f"{nm}.weight", 0, 1) for nm in prod] + [(f"{nm}.bias", 0, 1) for nm in prod if f"{nm}.bias" in state]
            entries += [(f"{nm}.weight", 1, 1) for nm in cons]
            out.append(UnitGroup("neurons", n, tuple(entries)))
    return out


def _proven_groups(block, perturbed, y_ref, run, config, hidden, x_in=None) -> tuple[tuple[UnitGroup, ...], tuple[str, ...]]:
    kept: list[UnitGroup] = []
    refused: list[str] = []
    taken: set[tuple[str, int]] = set()
    rng = random.Random(0)
    for g in _candidates(block, config, hidden):
        if any(g.name == k.name and g.n == k.n for k in kept):
            continue  # (the variant without extra tensors, tried only if the full one failed)
        if g.keys() & taken:
            continue
        perm = list(range(g.n))
        while perm == list(range(g.n)):
            rng.shuffle(perm)
        idx = torch.tensor(perm)
        state = dict(perturbed)
        # the proof is checked where it is sharpest: on the outputs of the modules that read the
        # units (o_proj, down_proj, ...), whose outputs must not change at all, as well as on the
        # block's output; the residual stream would hide a small error in a weak path
        readers = sorted({k.rpartition(".")[0] for k, d, _ in g.entries if d == 1})
        mods = dict(block.named_modules())
        seen: dict[str, list[Tensor]] = {}
        hooks = [mods[r].register_forward_hook(lambda m, a, o, r=r: seen.setdefault(r, []).append(o.detach().clone()))
                 for r in readers if r in mods and r]
        try:
            y0 = run()
            ref_out = {r: v for r, v in seen.items()}
            seen.clear()
            apply_units(state, g, lambda u: u[idx])
            block.load_state_dict(state)
            y = run()
        except Exception:  # noqa: BLE001
            y, y0, ref_out = None, None, {}
        finally:
            for h in hooks:
                h.remove()
            block.load_state_dict(perturbed)
        ok = y is not None and y0 is not None and y.shape == y_ref.shape
        if ok:
            delta = float((y0.float() - x_in.float()).abs().max()) if x_in is not None and x_in.shape == y0.shape else 1.0
            ok = float((y.float() - y0.float()).abs().max()) <= 1e-5 * (delta + 1e-3 * float(y0.float().abs().max()))
        for r, outs in ref_out.items():
            new = seen.get(r, [])
            if not ok or len(new) != len(outs):
                ok = False
                break
            for a, b in zip(outs, new):
                if a.shape != b.shape or float((a.float() - b.float()).abs().max()) > 1e-5 * float(a.float().abs().max()) + 1e-12:
                    ok = False
        if ok:
            kept.append(g)
            taken |= g.keys()
        else:
            refused.append(f"{g.name} ({g.n}): permuting them changed the block output")
    refused = [r for r in refused if not any(r.startswith(f"{k.name} ({k.n})") for k in kept)]
    return tuple(kept), tuple(dict.fromkeys(refused))
