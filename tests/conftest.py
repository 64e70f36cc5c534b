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


def cache_kwarg(model) -> str:
    """The forward keyword for a KV cache: ``cache`` from transformers 5.25 (``past_key_values`` is
    deprecated there and removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(out):
    """The KV cache a forward pass returned, under either name."""
    c = getattr(out, "cache", None)
    return out.past_key_values if c is None else c


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: intra-op threads only add contention (10x slower on a loaded 2-core box).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def checkpoint_tensors(d):
    """Every tensor of a safetensors checkpoint directory, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def stream_and_memory(base, tmp_path, load_kwargs=None, **options):
    """Upscale the checkpoint ``base`` with the streaming path and in memory, save both, and check
    they hold the same tensor names and bit-identical tensors. Returns ``(report, in-memory model,
    streamed config.json, in-memory config.json)`` for the caller's further checks."""
    import json

    from hf_deepen import DepthUpscaler
    from hf_deepen.streaming import upscale_checkpoint

    rep = upscale_checkpoint(base, tmp_path / "stream", max_shard_size="150KB", **options)
    mem = AutoModelForCausalLM.from_pretrained(base, **(load_kwargs or {})).eval()
    up = DepthUpscaler(mem, base_model=str(base))
    up.upscale(progress=False, **options)
    up.save_pretrained(tmp_path / "mem", tokenizer=None)

    a, b = checkpoint_tensors(tmp_path / "stream"), checkpoint_tensors(tmp_path / "mem")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((tmp_path / "stream" / "config.json").read_text())
    cb = json.loads((tmp_path / "mem" / "config.json").read_text())
    return rep, mem, ca, cb
