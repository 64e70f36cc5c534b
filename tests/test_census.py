"""A sample of the census (benchmarks/census.py) in CI: tiny random models of families with no named
spec (or nested in a multimodal wrapper), upscaled 4 -> 6 with every method.

Checked per method: no crash (only a typed refusal), logits unchanged where zero-init applies,
cached == uncached generation, and for copy save -> from_pretrained as the original class with the
same logits. The full sweep over every model type is the benchmark (``benchmarks/census.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import census  # noqa: E402

from hf_deepen import DepthUpscaler  # noqa: E402
from hf_deepen.arch import DiscoveredSpec  # noqa: E402

#: type -> methods expected function preserving (all four run; solar never preserves)
SAMPLE = {
    "phi": ("copy", "avg", "opt"),          # parallel attention + MLP, LayerNorm with bias (discovered)
    "bloom": ("copy", "avg", "opt"),        # transformer.h, fused query_key_value, ALiBi (discovered)
    "olmoe": ("copy", "avg", "opt"),        # MoE: experts aligned as units with the router rows
    "gpt_oss": ("copy", "avg", "opt"),      # attention sinks, biased experts, sliding/full layer_types
    "lfm2": ("copy", "avg", "opt"),         # hybrid conv / attention blocks, full_attn_idxs index list
    "stablelm": ("copy", "avg", "opt"),     # LayerNorm biases, partial rotary
    "gpt2": ("copy", "avg", "opt"),         # named spec (Conv1D), the gpt2 style
    "gemma3": ("copy", "avg", "opt"),       # multimodal: the Gemma-3 text spec on model.language_model
    "llava": ("copy", "avg", "opt"),        # multimodal, image-text-to-text only
    "gemma4_text": ("copy", "avg", "opt"),  # packed per-layer input embeddings [vocab, L * D] outside the stack
}


@pytest.fixture(scope="module", params=sorted(SAMPLE))
def built(request):
    model, ids, ref, _ = census.build_tiny(request.param)
    return request.param, model, ids, ref


@pytest.mark.parametrize("method", census.METHODS)
def test_census_sample(built, method):
    model_type, model, ids, ref = built
    rec = census.run_method(model, ids, ref, method, save=method == "copy")
    assert rec["status"] != "crash", rec
    assert rec["status"] != "refused", rec  # every family of the sample upscales with every method
    assert rec["cache"], rec
    if method in SAMPLE[model_type]:
        assert rec["status"] == "fp", rec
    if method == "copy":
        assert rec["reload"] == type(model).__name__


@pytest.mark.parametrize("method", ("copy", "opt"))
def test_decoder_with_a_special_first_layer_is_not_refused_by_the_encoder_rules(method):
    # Inkling-2's layer 0 is built differently, so it gets the encoder spec (layer rebuild); its
    # non-identity block must not refuse zero-init for the whole model (it did, after the merge).
    # (the tiny base model cannot reload itself: no save here)
    model, ids, ref, _ = census.build_tiny("inkling2_text")
    rec = census.run_method(model, ids, ref, method, save=False)
    assert rec["status"] == "fp", rec


def test_auto_layout_keeps_away_from_pairs_the_family_cannot_fuse():
    # HY-V4: a dense layer 0 below MoE layers. OT between a dense and a MoE layer has no unit in common
    # (fusion_refusal, from the layer signatures), so the default layout (auto; uniform here, no
    # tokenizer) must not put a new layer at slot 0: it did, and the upscale was refused.
    model, ids, ref, _ = census.build_tiny("hy_v4")
    spec = DepthUpscaler(model).spec
    assert spec.fusion_refusal(0, 1, "opt") and spec.fusion_refusal(1, 2, "opt") is None
    assert spec.fusion_refusal(0, 1, "avg") is None
    rec = census.run_method(model, ids, ref, "opt", save=False)
    assert rec["status"] == "fp", rec


def test_discovered_writers_and_units_of_a_moe_block():
    model, _, _, _ = census.build_tiny("gpt_oss")
    spec = DepthUpscaler(model).spec
    assert isinstance(spec, DiscoveredSpec)
    (facts,) = set(spec.facts.values())
    assert set(facts.writers) == {"self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.experts.down_proj",
                                  "mlp.experts.down_proj_bias"}
    names = {g.name for g in facts.groups}
    assert "mlp.experts.experts" in names
    experts = next(g for g in facts.groups if g.name == "mlp.experts.experts")
    assert {"mlp.router.weight", "mlp.router.bias"} <= {k for k, _, _ in experts.entries}


def test_multimodal_wrapper_keeps_vision_tower_and_counts_text_layers():
    model, ids, ref, _ = census.build_tiny("llava")
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    up = DepthUpscaler(model)
    assert up.spec.layers_path == "model.language_model.layers" and up.spec.config_path == "text_config"
    up.upscale(method="opt", num_layers=6)
    assert model.config.text_config.num_hidden_layers == 6 and len(model.model.language_model.layers) == 6
    after = model.model.vision_tower.state_dict()
    assert all((after[k] == v).all() for k, v in vision.items())


def test_deepseek_v3_mla_latent_ranks_and_experts_are_proven_units():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, vocab_size=256, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    census._randomize(model)
    spec = DepthUpscaler(model).spec
    units = {(g.name, g.n) for f in spec.facts.values() for g in f.groups}
    # the q latent ranks move with the gain of the norm between q_a_proj and q_b_proj
    assert ("self_attn.neurons", 32) in units and ("mlp.experts.experts", 4) in units
    ids = torch.randint(0, 256, (1, 7))
    ref = census.logits(model, ids)
    rec = census.run_method(model, ids, ref, "opt", save=False)
    assert rec["status"] == "fp" and rec["cache"], rec


def test_packed_per_layer_tensors_follow_their_layers():
    """Gemma-4 packs one block of ``hidden_size_per_layer_input`` columns per layer into tensors outside
    the stack (``embed_tokens_per_layer``, ``per_layer_model_projection``): after the upscale position
    ``i`` holds the block of the layer it was made from, so base layers read what they read before."""
    import torch

    model, ids, ref, _ = census.build_tiny("gemma4_text")
    d = model.config.hidden_size_per_layer_input
    emb = model.model.embed_tokens_per_layer.weight.detach().clone()
    proj = model.model.per_layer_model_projection.weight.detach().clone()
    DepthUpscaler(model).upscale(method="copy", num_layers=6, progress=False)
    new_emb, new_proj = model.model.embed_tokens_per_layer, model.model.per_layer_model_projection
    assert new_emb.weight.shape == (emb.shape[0], 6 * d) and new_emb.embedding_dim == 6 * d
    assert new_proj.weight.shape == (6 * d, proj.shape[1]) and new_proj.out_features == 6 * d
    from hf_deepen import new_layer_indices

    new = set(new_layer_indices(model))
    base_positions = [i for i in range(6) if i not in new]
    for j, i in enumerate(base_positions):  # base layer j now at position i
        assert torch.equal(new_emb.weight[:, i * d:(i + 1) * d], emb[:, j * d:(j + 1) * d])
        assert torch.equal(new_proj.weight[i * d:(i + 1) * d], proj[j * d:(j + 1) * d])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref, atol=1e-5, rtol=1e-5)
