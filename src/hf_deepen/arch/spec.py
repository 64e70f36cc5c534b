"""ArchSpec: one family's decoder layer described as data.

Everything downstream (alignment, fusion, surgery) works on a *canonical layer*: a flat dict of
tensors keyed by role, independent of how a family names or packs them:

=============  ==========================================  ====================================
role           shape                                       permuted by
=============  ==========================================  ====================================
``q``          ``[num_heads * head_dim, hidden]``          query head (rows, ``head_dim`` each)
``k``, ``v``   ``[num_kv_heads * head_dim, hidden]``       KV head (rows)
``o``          ``[hidden, num_heads * head_dim]``          query head (columns)
``gate``       ``[intermediate, hidden]`` (optional)       MLP neuron (rows)
``up``         ``[intermediate, hidden]``                  MLP neuron (rows)
``down``       ``[hidden, intermediate]``                  MLP neuron (columns)
``*_bias``     the rows of the matching weight             as the weight; ``o_bias`` and
                                                           ``down_bias`` live on the residual
                                                           stream and are never permuted
=============  ==========================================  ====================================

Mixture-of-experts layers (``arch/moe.py``) add an *expert* unit space, with the neurons of each
expert nested inside it (``E`` experts of ``I`` neurons each):

================  =================================  =============================================
role              shape                              permuted by
================  =================================  =============================================
``router``        ``[E, hidden]``                    expert (rows)
``experts_gate``  ``[E, I, hidden]``                 expert (dim 0), then its neurons (dim 1)
``experts_up``    ``[E, I, hidden]``                 expert (dim 0), then its neurons (dim 1)
``experts_down``  ``[E, hidden, I]``                 expert (dim 0), then its neurons (dim 2)
================  =================================  =============================================

A shared expert (Qwen2-MoE) is an ordinary MLP that every token goes through: it takes the dense
``gate`` / ``up`` / ``down`` roles.

``q_bias`` / ``k_bias`` may hold any per-row vector of ``q`` / ``k`` that moves with its rows, not
only a bias: OLMo-2's ``q_norm`` / ``k_norm`` gains (one entry per row of the whole projection)
are mapped there (see ``arch/variants.py``).

Any other tensor of the layer must be listed in ``residual`` (norm gains and other tensors that
live on the residual stream or are shared by all heads, such as Qwen3's per-head ``q_norm``):
those are never permuted, only averaged or copied. A tensor that is neither is refused by OT
fusion with a message that names it, because permuting around it could silently break the layer.

A family whose tensors are fused or transposed (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``)
overrides :meth:`ArchSpec.to_canonical` / :meth:`ArchSpec.from_canonical`; the rest of the
library never sees the difference (see ``arch/fused.py``). A spec that needs the model config to
read a layer (GPT-NeoX's per-head interleaved ``query_key_value``) overrides :meth:`ArchSpec.bind`,
which :func:`~hf_deepen.arch.get_spec` calls with the model's config. :meth:`ArchSpec.head_shape`
is called once per upscale before any tensor is read, so it is where a spec refuses (raise) or
warns about a config it cannot serve.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import UnsupportedArchitectureError

Tensor = torch.Tensor

#: roles whose rows are split by query head
QUERY_HEAD_ROWS = ("q", "q_bias")
#: roles whose rows are split by KV head
KV_HEAD_ROWS = ("k", "k_bias", "v", "v_bias")
#: roles whose columns are split by query head
QUERY_HEAD_COLS = ("o",)
#: roles whose rows are split by MLP neuron
NEURON_ROWS = ("gate", "up", "gate_bias", "up_bias")
#: roles whose columns are split by MLP neuron
NEURON_COLS = ("down",)
#: MoE roles (``arch/moe.py``) whose rows are split by expert, and by neuron within an expert
EXPERT_ROWS = ("router", "experts_gate", "experts_up")
#: MoE roles whose last dimension is split by neuron within an expert (dim 0 by expert)
EXPERT_COLS = ("experts_down",)
EXPERT_ROLES = EXPERT_ROWS + EXPERT_COLS
#: roles that write to the residual stream: zeroed for a function-preserving new layer (the
#: router is not among them: with every expert's output zero, routing can stay as fused and train)
OUTPUT_ROLES = ("o", "o_bias", "down", "down_bias", "experts_down")
ROLES = (
    QUERY_HEAD_ROWS + KV_HEAD_ROWS + QUERY_HEAD_COLS + NEURON_ROWS + NEURON_COLS + ("o_bias", "down_bias") + EXPERT_ROLES
)


class ArchitectureWarning(UserWarning):
    """A spec serves this model, but with a caveat (e.g. zero-init cannot be function preserving)."""


@dataclass(frozen=True)
class HeadShape:
    """Attention geometry of one layer, read from the model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ArchSpec:
    """How one family stores a decoder layer.

    Parameters
    ----------
    name:
        Spec name (shown in errors and provenance).
    model_types:
        ``config.model_type`` values this spec serves.
    tensors:
        Role -> parameter name inside one decoder layer (``"self_attn.q_proj.weight"``). Roles
        missing from a given layer (biases) are simply absent.
    residual:
        Glob patterns of layer tensors that are never permuted (norm gains, residual biases).
    layers_path:
        Dotted path from the ``PreTrainedModel`` to the ``ModuleList`` of decoder layers.
    index_attrs:
        Attribute names, on any submodule of a layer, that hold the layer's index (the KV cache
        is looked up by it). They are renumbered after insertion.
    per_layer_config:
        Config fields that hold one entry per layer (``layer_types``); a new layer takes the
        entry of the base layer it is inserted after (its lower neighbour).
    config_path:
        Dotted path from the model config to the config that describes the layers (``""``: the
        config itself; ``"text_config"`` for a multimodal wrapper's language model).
    count_field:
        The field of that config holding the number of layers (``n_layer`` for some families).
    post_norms:
        Norms applied to a block's *output* before it joins the residual stream (Gemma-2/3,
        OLMo-2), as tensor name -> the gain value that makes the norm output zero. Used by
        ``zero_target="post_norm"``; empty for pre-norm families.
    """

    name: str
    model_types: tuple[str, ...]
    tensors: Mapping[str, str]
    residual: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    layers_path: str = "model.layers"
    index_attrs: tuple[str, ...] = ("layer_idx",)
    per_layer_config: tuple[str, ...] = ("layer_types",)
    post_norms: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    config_path: str = ""
    count_field: str = "num_hidden_layers"

    # ---- the config that describes the layers -------------------------------------------------
    def layer_config(self, config: Any) -> Any:
        """The (sub-)config holding the layer count and per-layer lists (``config_path``)."""
        for part in self.config_path.split(".") if self.config_path else ():
            config = getattr(config, part)
        return config

    def num_layers(self, config: Any) -> int:
        """The number of decoder layers the config declares (``count_field`` of :meth:`layer_config`)."""
        return getattr(self.layer_config(config), self.count_field)

    #: the config field holding the KV head count; None for families without grouped-query
    #: attention (GPT-2, OPT, GPT-NeoX), where a stray ``num_key_value_heads`` must not be read
    KV_HEADS_FIELD: ClassVar[str | None] = "num_key_value_heads"

    # ---- binding to one model -----------------------------------------------------------
    def bind(self, config: Any) -> "ArchSpec":
        """The spec for one model with this ``config`` (default: ``self``).

        Override when reading a layer needs the config (head counts of a fused tensor that the
        layer's own shapes do not give away), or when the mapping depends on config flags.
        """
        return self

    def for_state(self, state: Mapping[str, Tensor]) -> "ArchSpec":
        """The spec for a layer stored as ``state`` (default: ``self``).

        Override when a family's layers are stored one way in memory and another way in
        checkpoints (MoE experts: one 3-D tensor per projection in the model, one tensor per
        expert on disk, which transformers converts on load and save), so that the streaming path
        writes a new layer in the layout its base layers have on disk.
        """
        return self

    # ---- hooks on the depth plan and the config (default: nothing to do) ---------------------
    def fusion_refusal(self, lower: int, upper: int, method: str) -> str | None:
        """Why base layers ``lower`` and ``upper`` cannot be fused with ``method``, known before reading
        any weight, or None (default: nothing known; ``check_plan`` and the fusion itself still refuse).
        ``layout="auto"`` keeps away from such pairs."""
        return None

    def built_alike(self, lower: int, upper: int) -> bool:
        """Whether base layers ``lower`` and ``upper`` have the same structure (default: True, a named
        family's layers all do); ``layout="auto"`` prefers fusing such pairs."""
        return True

    def check_plan(self, plan: Any, config: Any) -> None:
        """Raise if this model cannot follow ``plan`` (a :class:`~hf_deepen.plan.DepthPlan`).

        Called once per upscale before any tensor is read. MoE families refuse to fuse a dense
        layer with a sparse one (their MLP tensors differ).
        """

    def update_layer_config(self, config: Any, sources: list[int]) -> tuple[str, ...]:
        """Rewrite config fields that describe layers by *index* (not one entry per layer).

        ``sources[i]`` is the base layer whose type new-model layer ``i`` takes (its lower
        neighbour for a new layer). Called by :func:`~hf_deepen.surgery.update_config` with the
        base config, before ``num_hidden_layers`` changes; returns the names of the fields it
        rewrote, which the generic per-layer-list update then leaves alone.
        """
        return ()

    def after_surgery(self, model: Any, layers: Any) -> None:
        """Called after the new layers are in place and the config updated (default: nothing)."""

    def verify_function(self, model: Any, preserving: bool) -> str | None:
        """Called last on an in-memory upscale: why the deeper ``model`` is not function preserving
        although the run asked for it (``preserving``), or None (default: nothing to check)."""
        return None

    # ---- function preservation ------------------------------------------------------------
    def can_preserve(self, config: Any) -> bool:
        """Whether zero-init can make a new layer the identity for this config (False for post-LN)."""
        return True

    def preserves_function(self, cfg: Any, config: Any) -> bool:
        """Whether an upscale with ``cfg`` (an UpscaleConfig) leaves this model's function unchanged:
        the options ask for it and the architecture allows it."""
        return bool(cfg.function_preserving) and self.can_preserve(config)

    def zero_target(self, requested: str) -> str:
        """Resolve ``UpscaleConfig.zero_target`` for this family (``"auto"`` -> post-norms if any)."""
        from ..errors import ConfigError

        if requested == "auto":
            return "post_norm" if self.post_norms else "outputs"
        if requested == "post_norm" and not self.post_norms:
            raise ConfigError(
                f"zero_target='post_norm': the {self.name!r} layer has no norm on its block outputs to zero (only"
                " Gemma-2/3 and OLMo-2 style post-norm families do); use zero_target='outputs' or 'auto'"
            )
        return requested

    def zero_values(self, requested: str) -> dict[str, float]:
        """Canonical keys (roles or tensor names) -> the value zero-init writes into them."""
        if self.zero_target(requested) == "post_norm":
            return dict(self.post_norms)
        return {r: 0.0 for r in OUTPUT_ROLES}

    # ---- geometry -------------------------------------------------------------------------
    def head_shape(self, config: Any) -> HeadShape:
        heads = config.num_attention_heads
        kv = (getattr(config, self.KV_HEADS_FIELD, None) if self.KV_HEADS_FIELD else None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv:
            raise UnsupportedArchitectureError(
                f"{config.model_type}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        return HeadShape(heads, kv, head_dim)

    # ---- canonical view --------------------------------------------------------------------
    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Split one layer's state dict into ``(canonical, unknown)``.

        ``canonical`` maps roles and residual tensor names to tensors; ``unknown`` lists the
        tensor names that are neither (fine for copies and plain averages, refused by OT).
        """
        by_name = {v: k for k, v in self.tensors.items()}
        canon: dict[str, Tensor] = {}
        unknown: list[str] = []
        for name, t in state.items():
            if name in by_name:
                canon[by_name[name]] = t
            else:
                canon[name] = t
                if not any(fnmatch.fnmatchcase(name, pat) for pat in self.residual):
                    unknown.append(name)
        return canon, unknown

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_canonical`: the state dict of one layer."""
        return {self.tensors.get(k, k): v for k, v in canon.items()}

    def check_shapes(self, canon: Mapping[str, Tensor], shape: HeadShape, where: str) -> None:
        """Raise if the canonical tensors do not match the head geometry read from the config."""
        hq = shape.num_heads * shape.head_dim
        hkv = shape.num_kv_heads * shape.head_dim
        expect_rows = {"q": hq, "q_bias": hq, "k": hkv, "k_bias": hkv, "v": hkv, "v_bias": hkv}
        for role, rows in expect_rows.items():
            if role in canon and canon[role].shape[0] != rows:
                raise UnsupportedArchitectureError(
                    f"{where}: tensor {self.tensors.get(role, role)!r} has {canon[role].shape[0]} rows, expected"
                    f" {rows} from the config (heads={shape.num_heads}, kv_heads={shape.num_kv_heads},"
                    f" head_dim={shape.head_dim}); the spec {self.name!r} does not fit this model"
                )
        if "o" in canon and canon["o"].shape[1] != hq:
            raise UnsupportedArchitectureError(
                f"{where}: tensor {self.tensors.get('o', 'o')!r} has {canon['o'].shape[1]} columns, expected {hq}"
            )
        for role in ("q", "k", "v", "o", "up", "down"):
            if role not in canon:
                raise UnsupportedArchitectureError(
                    f"{where}: the spec {self.name!r} maps role {role!r} to {self.tensors.get(role)!r}, which this"
                    " layer does not have"
                )
        n = canon["up"].shape[0]
        if canon["down"].shape[1] != n or ("gate" in canon and canon["gate"].shape[0] != n):
            raise UnsupportedArchitectureError(f"{where}: MLP tensors disagree on the number of hidden units")


def llama_like(name: str, model_types: tuple[str, ...], **kw: Any) -> ArchSpec:
    """Spec for the Llama layer layout (separate q/k/v/o, gated MLP, two RMSNorms)."""
    tensors = {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "q_bias": "self_attn.q_proj.bias",
        "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
        "o_bias": "self_attn.o_proj.bias",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "gate_bias": "mlp.gate_proj.bias",
        "up_bias": "mlp.up_proj.bias",
        "down_bias": "mlp.down_proj.bias",
    }
    tensors.update(kw.pop("tensors", {}))
    return ArchSpec(name=name, model_types=model_types, tensors=tensors, **kw)
