import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 97


def tiny_config(kind: str = "gqa", layers: int = 6):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, vocab_size=VOCAB,
                  max_position_embeddings=128, tie_word_embeddings=False)
    if kind == "mha":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    if kind == "gqa":
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=16, **common)
    if kind == "mistral":
        return MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(kind)


def tiny_model(kind: str = "gqa", layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers), dtype=torch.float32).eval()
    # random init leaves norms at 1 and tiny weights; perturb so layers differ and tests have power
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 10), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
