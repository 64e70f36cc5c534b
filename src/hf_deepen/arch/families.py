"""The built-in family specs. Each is a few lines of data; see spec.py for the vocabulary."""

from __future__ import annotations

from .registry import register_spec
from .spec import llama_like

# Llama family: separate q/k/v/o (optional biases), gated MLP, pre-norms.
register_spec(llama_like("llama", ("llama", "mistral")))

# Qwen2: as Llama, with q/k/v biases (handled by the optional *_bias roles) and layer_types.
register_spec(llama_like("qwen2", ("qwen2",)))

# Qwen3: per-head q_norm / k_norm gains, shared by all heads: never permuted, only averaged.
register_spec(
    llama_like(
        "qwen3",
        ("qwen3",),
        residual=(
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
        ),
    )
)
