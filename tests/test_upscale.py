"""End-to-end invariants of DepthUpscaler on tiny Llama/Mistral/Qwen2-shaped models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_deepen import DepthUpscaler, UpscaleConfig, new_layer_indices, provenance

from conftest import cache_kwarg, kv_cache, logits, tiny_model

FP_CASES = [
    dict(method="opt", solver="exact"),
    dict(method="opt", solver="sinkhorn"),
    dict(method="avg"),
    dict(method="copy"),
    dict(method="opt", layout="bottom"),
    dict(method="opt", layout="middle", num_layers=8),
    dict(method="avg", layout="uniform", num_layers=9),
    dict(method="copy", every_k=2),
    dict(method="opt", positions=[0, 4]),
]


def cached_vs_full(model, ids, split=6):
    """Logits of the last tokens computed incrementally with a KV cache vs in one full pass."""
    with torch.no_grad():
        full = model(ids).logits[:, split:]
        out = model(ids[:, :split], use_cache=True)
        past, steps = kv_cache(out), []
        assert past is not None  # else the "cached" pass recomputes everything and the test cannot fail
        for t in range(split, ids.shape[1]):
            o = model(ids[:, t : t + 1], use_cache=True, **{cache_kwarg(model): past})
            past = kv_cache(o)
            steps.append(o.logits)
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mistral", "qwen2"])
@pytest.mark.parametrize("case", FP_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_function_preserving_upscale(kind, case, ids):
    model = tiny_model(kind)
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    out = up.upscale(**case)
    assert out is model  # in place, same object, no wrapper
    assert type(out).__name__.endswith("ForCausalLM")
    torch.testing.assert_close(logits(out, ids), ref, atol=1e-5, rtol=0)
    full, cached = cached_vs_full(out, ids)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    n = len(out.model.layers)
    assert out.config.num_hidden_layers == n == up.report.plan.num_layers
    assert [l.self_attn.layer_idx for l in out.model.layers] == list(range(n))


def test_stale_layer_idx_is_caught_by_the_cache_check(ids):
    # the cache comparison above must be able to fail: undo the renumbering and it does
    model = tiny_model("gqa")
    DepthUpscaler(model).upscale(method="copy", zero_init=False, positions=[1])
    full, cached = cached_vs_full(model, ids)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = min(i, 5)  # what a plain insert leaves behind
    full, cached = cached_vs_full(model, ids)
    assert (cached - full).abs().max() > 1e-3


def test_generate_with_and_without_cache_agree(ids):
    model = tiny_model("gqa")
    DepthUpscaler(model).upscale(zero_init=False)  # not function preserving: new layers do work
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    a = model.generate(ids, use_cache=True, **kw)
    b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=1e-4)


def test_without_zero_init_logits_change(ids):
    model = tiny_model("gqa")
    ref = logits(model, ids)
    DepthUpscaler(model).upscale(method="avg", zero_init=False)
    assert (logits(model, ids) - ref).abs().max() > 1e-3


def test_solar_layout_and_not_function_preserving(ids):
    model = tiny_model("gqa", layers=8)
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    up.upscale(method="solar")  # 8 -> 12: layers 0-5 then 2-7
    plan = up.report.plan
    assert [s.sources[0] for s in plan.layers] == list(range(6)) + list(range(2, 8))
    assert plan.new_layer_indices == [6, 7, 8, 9]
    assert up.report.config.function_preserving is False
    assert (logits(model, ids) - ref).abs().max() > 1e-3
    full, cached = cached_vs_full(model, ids)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # repeated layers are independent copies, not shared modules
    assert model.model.layers[6] is not model.model.layers[2]
    torch.testing.assert_close(model.model.layers[6].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)


def test_paper_top_layout_positions():
    assert DepthUpscaler(tiny_model("gqa", layers=6)).plan(layout="top").new_layer_indices == [3, 5, 7]
    up = DepthUpscaler(tiny_model("mha", layers=4))
    plan = up.plan(layout="top")
    assert plan.num_layers == 6
    # pairs (i, i+1) for i = L/2-1 .. L-2
    assert [s.sources for s in plan.layers if s.kind == "new"] == [(1, 2), (2, 3)]


def test_save_load_round_trip(tmp_path, ids):
    model = tiny_model("qwen2")
    up = DepthUpscaler(model)
    up.upscale(zero_init=False)  # non-trivial new layers
    ref = logits(model, ids)
    up.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert "README.md" in files and "hf_deepen_report.json" in files
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2508.08011" in card and "opt/exact" in card and str(up.report.plan.new_layer_indices) in card
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
    assert loaded.config.num_hidden_layers == 9
    assert loaded.config.layer_types == model.config.layer_types and len(loaded.config.layer_types) == 9
    assert new_layer_indices(loaded) == up.report.plan.new_layer_indices
    # no half-written output: an existing directory is refused, then replaced when asked
    with pytest.raises(ValueError, match="overwrite"):
        up.save_pretrained(tmp_path / "out")
    up.save_pretrained(tmp_path / "out", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_config_consistency_and_shared_config():
    model = tiny_model("qwen2")
    F, S = "full_attention", "sliding_attention"
    model.config.layer_types = [F, S, S, F, F, S]
    DepthUpscaler(model).upscale(positions=[0, 2])  # new layers after 0 and 2 take those layers' types
    assert model.config.layer_types == [F, F, S, S, S, F, F, S]
    for layer in model.model.layers:
        assert layer.self_attn.config is model.config
    model.set_attn_implementation("sdpa")
    assert model.model.layers[2].self_attn.config._attn_implementation == "sdpa"
    d = model.config.to_dict()
    again = type(model.config).from_dict(d)
    assert again.num_hidden_layers == 8 and again.layer_types == model.config.layer_types
    assert again.hf_deepen == json.loads(json.dumps(provenance(model)))


def test_progressive_growth_remaps_provenance(tmp_path, ids):
    model = tiny_model("gqa", layers=4)
    ref = logits(model, ids)
    DepthUpscaler(model).upscale(positions=[1, 2])  # 4 -> 6, new at 2 and 4
    assert new_layer_indices(model) == [2, 4]
    model.save_pretrained(tmp_path / "s1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s1").eval()
    DepthUpscaler(model).upscale(method="copy", positions=[0, 3])  # new after 0 and after 3
    rec = provenance(model)
    assert len(rec["stages"]) == 2
    # stage 1's layers 2 and 4 move to 3 and 6; stage 2 adds 1 and 5
    assert rec["stages"][0]["new_layer_indices"] == [3, 6]
    assert rec["stages"][1]["new_layer_indices"] == [1, 5]
    assert rec["new_layer_indices"] == [1, 3, 5, 6]
    assert new_layer_indices(model, stage=-1) == [1, 5]
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_deterministic(solver):
    a, b = tiny_model("gqa", seed=3), tiny_model("gqa", seed=3)
    DepthUpscaler(a).upscale(solver=solver, zero_init=False)
    DepthUpscaler(b).upscale(solver=solver, zero_init=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_config_object_and_kwargs_and_dict():
    up = DepthUpscaler(tiny_model("gqa"))
    cfg = UpscaleConfig(method="avg", num_layers=8)
    assert up.plan(cfg).num_layers == 8
    assert up.plan(cfg, num_layers=7).num_layers == 7
    assert up.plan({"method": "copy", "every_k": 3}).new_layer_indices == [3, 7]
    assert UpscaleConfig.from_dict(cfg.to_dict()) == cfg


def test_report_and_training_readiness():
    model = tiny_model("gqa")
    up = DepthUpscaler(model)
    up.upscale()
    r = up.report
    assert r.params_after > r.params_before
    assert {"align+fuse", "surgery"} <= set(r.timings)
    for layer in r.layers:
        d = layer["diagnostics"]
        assert d["heads_marginal_error"] == 0 and d["neurons_marginal_error"] == 0
        assert d["neurons_cost_ratio"] <= 1.0
    assert "mean retained_norm" in r.summary()
    assert all(p.requires_grad for p in model.parameters())
    # one training step moves the new layers (zeroed outputs receive gradient)
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    new = r.plan.new_layer_indices[0]
    assert model.model.layers[new].self_attn.o_proj.weight.grad.abs().sum() > 0
