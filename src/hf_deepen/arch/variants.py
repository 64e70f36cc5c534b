"""Families whose separate-projection layout needs a rule beyond plain data: OLMo-2 and OPT."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from .registry import register_spec
from .spec import ArchitectureWarning, ArchSpec, HeadShape, llama_like


@dataclass(frozen=True)
class Olmo2Spec(ArchSpec):
    """OLMo-2: post-norm only, and q/k RMSNorms over the *whole* projection.

    ``self_attn.q_norm`` normalises the full ``q`` vector (all heads together) with one gain per
    row of ``q_proj``. The RMS over all heads does not change when heads are permuted, but the gain
    must move with its row: it is mapped to the ``q_bias`` / ``k_bias`` slot of the canonical
    layer, which is permuted exactly like the rows of ``q`` / ``k``. That slot is free because
    OLMo-2 checkpoints have no attention biases; a config with ``attention_bias=True`` gets a spec
    where the norms are left unmapped, so OT fusion refuses them (avg / copy still work).

    Function preservation: the block outputs are ``post_attention_layernorm(o_proj(...))`` and
    ``post_feedforward_layernorm(down_proj(...))``; zeroing either the post-norm gains (default,
    ``zero_target="post_norm"``) or o_proj / down_proj (RMSNorm(0) = 0) makes the new layer the
    identity.
    """

    def bind(self, config: Any) -> ArchSpec:
        if not getattr(config, "attention_bias", False):
            return self
        tensors = dict(llama_like("x", ()).tensors)  # q/k biases in their own slots
        return dataclasses.replace(
            self,
            tensors=tensors,
            notes=self.notes + " attention_bias=True: q_norm/k_norm unmapped, OT fusion refuses them.",
        )


_olmo2 = llama_like(
    "olmo2",
    ("olmo2",),
    tensors={"q_bias": "self_attn.q_norm.weight", "k_bias": "self_attn.k_norm.weight"},
    residual=("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
    # plain RMSNorm gains: 0 makes each block output zero (zero_target="post_norm", the default here)
    post_norms={"post_attention_layernorm.weight": 0.0, "post_feedforward_layernorm.weight": 0.0},
)
register_spec(Olmo2Spec(**{f.name: getattr(_olmo2, f.name) for f in dataclasses.fields(_olmo2)}))


@dataclass(frozen=True)
class OptSpec(ArchSpec):
    """OPT: separate q/k/v/out_proj with biases, non-gated ReLU MLP (fc1 / fc2), LayerNorms.

    Pre-LN OPT (``do_layer_norm_before=True``: every size but 350m) is function preserving with
    out_proj / fc2 (and their biases) zeroed. Post-LN OPT (``do_layer_norm_before=False``, opt-350m)
    cannot be: its layer is ``LN(x + attn(x))``, and ``LN(x)`` is not ``x``, so no choice of the new
    layer's weights makes it the identity. We warn (an :class:`ArchitectureWarning`) rather than
    refuse, because SOLAR and ``zero_init=False`` are legitimate there; the upscaled model will
    not reproduce the base model's outputs.
    """

    KV_HEADS_FIELD = None

    def can_preserve(self, config: Any) -> bool:
        return bool(getattr(config, "do_layer_norm_before", True))

    def head_shape(self, config: Any) -> HeadShape:
        if not getattr(config, "do_layer_norm_before", True):
            warnings.warn(
                f"{config.model_type}: post-LN OPT (do_layer_norm_before=False, e.g. facebook/opt-350m) cannot be"
                " upscaled function-preservingly: a new layer computes LayerNorm(x) even with zeroed outputs, so"
                " the deeper model will not reproduce the base model's outputs (continued training is needed)",
                ArchitectureWarning,
                stacklevel=3,
            )
        return super().head_shape(config)


register_spec(
    OptSpec(
        name="opt",
        model_types=("opt",),
        tensors={
            "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight",
            "o": "self_attn.out_proj.weight",
            "q_bias": "self_attn.q_proj.bias",
            "k_bias": "self_attn.k_proj.bias",
            "v_bias": "self_attn.v_proj.bias",
            "o_bias": "self_attn.out_proj.bias",
            "up": "fc1.weight",
            "up_bias": "fc1.bias",
            "down": "fc2.weight",
            "down_bias": "fc2.bias",
        },
        residual=("self_attn_layer_norm.*", "final_layer_norm.*"),
        layers_path="model.decoder.layers",
        per_layer_config=(),
    )
)
