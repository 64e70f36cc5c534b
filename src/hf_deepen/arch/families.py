"""The built-in Llama-shaped family specs. Each is a few lines of data; see spec.py for the vocabulary.

Families with fused or transposed tensors live in ``fused.py`` (Phi-3, GPT-2, GPT-NeoX); families
whose mapping depends on the config live in ``variants.py`` (OLMo-2, OPT). The table of what is
supported, and why each family is (or is not) function preserving, is docs/families.md.
"""

from __future__ import annotations

from .registry import register_spec
from .spec import llama_like

_PRE_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
#: Gemma-2/3 "sandwich" norms: a norm before and after each block. Zeroing o_proj / down_proj is
#: still exact, because the post-norm of a zero vector is zero (RMSNorm(0) = 0).
_SANDWICH_NORMS = _PRE_NORMS + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
#: Gemma-2/3 post-norms (gain stored as w, applied as 1 + w): w = -1 makes a block output zero, the
#: smooth way to make a new layer the identity (zero_target="post_norm", the default for these).
_GEMMA_POST_NORMS = {"post_attention_layernorm.weight": -1.0, "post_feedforward_layernorm.weight": -1.0}
#: per-head q/k RMSNorm gains of size head_dim, shared by all heads: never permuted, only averaged.
_QK_HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")

# Llama family: separate q/k/v/o (optional biases), gated MLP, pre-norms. Mistral is the same
# layer (its sliding window is a single global setting, not per layer).
register_spec(llama_like("llama", ("llama", "mistral")))

# Qwen2: as Llama, with q/k/v biases (handled by the optional *_bias roles) and layer_types.
register_spec(llama_like("qwen2", ("qwen2",)))

# Qwen3: per-head q_norm / k_norm gains, shared by all heads: never permuted, only averaged.
register_spec(llama_like("qwen3", ("qwen3",), residual=_PRE_NORMS + _QK_HEAD_NORMS))

# Granite: the Llama layer; embedding / attention / residual / logits multipliers are scalars in
# the config (residual_multiplier scales a zero block output to zero).
register_spec(llama_like("granite", ("granite",)))

# SmolLM3: the Llama layer; RoPE is switched off per layer by config.no_rope_layers (read into
# self_attn.use_rope at construction), so that list is updated at the insertion point.
register_spec(llama_like("smollm3", ("smollm3",), per_layer_config=("layer_types", "no_rope_layers")))

# Gemma: the Llama layer (RMSNorm gains stored as w with scale 1 + w; GeGLU MLP).
register_spec(llama_like("gemma", ("gemma",)))

# Gemma-2: sandwich norms, sliding/full attention alternating by layer_types, logit softcapping.
register_spec(llama_like("gemma2", ("gemma2",), residual=_SANDWICH_NORMS, post_norms=_GEMMA_POST_NORMS))

# Gemma-3 (text): as Gemma-2, plus per-head q_norm / k_norm and per-layer-type RoPE.
register_spec(
    llama_like("gemma3_text", ("gemma3_text",), residual=_SANDWICH_NORMS + _QK_HEAD_NORMS, post_norms=_GEMMA_POST_NORMS)
)
