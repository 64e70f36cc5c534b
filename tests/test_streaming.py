"""The streaming path gives the same checkpoint, tensor for tensor, as the in-memory path."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_deepen import UnsupportedModelError, new_layer_indices
from hf_deepen.streaming import upscale_checkpoint

from conftest import logits, stream_and_memory, tiny_model


@pytest.mark.parametrize("case", [dict(method="opt"), dict(method="opt", solver="sinkhorn", zero_init=False),
                                  dict(method="copy", every_k=2), dict(method="solar")], ids=str)
@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_streaming_equals_in_memory(tmp_path, kind, case, ids):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")  # several input shards
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    rep, mem, ca, cb = stream_and_memory(tmp_path / "base", tmp_path, **case)
    assert ca["num_hidden_layers"] == cb["num_hidden_layers"] == rep.plan.num_layers
    assert ca.get("layer_types") == cb.get("layer_types")
    assert ca["hf_deepen"] == cb["hf_deepen"]
    assert (tmp_path / "stream" / "model.safetensors.index.json").exists()  # output sharded too
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(mem, ids), atol=0, rtol=0)
    assert new_layer_indices(loaded) == rep.plan.new_layer_indices
    assert rep.params_after == sum(p.numel() for p in mem.parameters())


def test_streaming_refuses_and_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    tiny_model("gqa").config.save_pretrained(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        upscale_checkpoint(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_streaming_report_has_the_stage_breakdown(tmp_path):
    tiny_model("gqa").save_pretrained(tmp_path / "base")
    rep = upscale_checkpoint(tmp_path / "base", tmp_path / "out", method="opt")
    t = rep.timings
    assert {"read", "cost", "assign", "fuse", "write", "align+fuse"} <= set(t)
    assert 0 < t["cost"] + t["assign"] + t["fuse"] <= t["align+fuse"]


# ---- calibration passes while streaming (align_on="activations", layout="auto") -----------------
def _calib_model(kind):
    if kind == "gemma3_text":  # sliding/full layer types, scaled embeddings, q/k norms, post-norms
        from test_families import make_model

        return make_model("gemma3_text")
    return tiny_model(kind)


CALIB = torch.randint(0, 90, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", [dict(method="opt", align_on="activations"), dict(method="opt", layout="auto"),
                                  dict(method="copy", layout="auto")], ids=str)
@pytest.mark.parametrize("kind", ["gqa", "gemma3_text"])
def test_streaming_calibration_equals_in_memory(tmp_path, kind, case):
    """The calibration pass run one layer at a time from the checkpoint gives the in-memory plans and
    tensors, bit for bit (and layout='auto' the same positions and recorded reason)."""
    _calib_model(kind).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    rep, mem, ca, cb = stream_and_memory(tmp_path / "base", tmp_path, calibration=CALIB, **case)
    assert ca["hf_deepen"] == cb["hf_deepen"]
    if case.get("layout") == "auto":
        assert "block influence" in (rep.plan.reason or "")
        assert "layout_calibration" in rep.timings
    else:
        assert rep.timings["calibration"] > 0


def test_layerwise_pass_holds_one_layer_and_matches_the_model(tmp_path):
    """The hidden states entering every layer equal the loaded model's, and while layer j runs no
    other decoder layer holds real parameters."""
    from hf_deepen.auto_layout import block_influence
    from hf_deepen.pipeline.layerwise import layerwise_model
    from hf_deepen.pipeline.source import SafetensorsSource

    model = _calib_model("gemma3_text")
    model.save_pretrained(tmp_path / "base")
    n = model.config.num_hidden_layers
    src = SafetensorsSource(tmp_path / "base", "model.layers.", n)
    seen, live = {}, []

    def grab(store, j):
        def fn(mod, args, kwargs):
            store[j] = (args[0] if args else kwargs["hidden_states"]).clone()

        return fn

    want = {}
    hs = [layer.register_forward_pre_hook(grab(want, j), with_kwargs=True) for j, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(CALIB[:2], use_cache=False)
    for h in hs:
        h.remove()
    try:
        with layerwise_model(src, model.config, "model.layers", n - 1, CALIB) as (runner, layers):
            for j, layer in enumerate(layers):
                layer.register_forward_pre_hook(grab(seen, j), with_kwargs=True)
                layer.register_forward_pre_hook(
                    lambda mod, a, k: live.append(sum(not next(l.parameters()).is_meta for l in layers)),
                    with_kwargs=True)
            with torch.no_grad():
                runner(input_ids=CALIB[:2], use_cache=False)
            assert all(next(l.parameters()).is_meta for l in layers)  # all dropped again
            assert live == [1] * n
            seen = dict(seen)  # (the next pass overwrites the hooks' store)
            bi = block_influence(runner, layers, CALIB, device=torch.device("cpu"))
    finally:
        src.close()
    assert sorted(seen) == list(range(n))
    for j in range(n):
        assert torch.equal(seen[j], want[j]), j
    assert bi == block_influence(model, model.model.layers, CALIB)


def test_streaming_calibration_refusals_leave_nothing(tmp_path):
    from hf_deepen import ConfigError

    tiny_model("gqa").save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="only used with"):
        upscale_checkpoint(tmp_path / "base", tmp_path / "out", calibration=CALIB, layout="top")  # weights, fixed layout
    with pytest.raises(ConfigError, match="needs calibration text"):
        upscale_checkpoint(tmp_path / "base", tmp_path / "out", align_on="activations")
    with pytest.raises(ConfigError, match="has none"):  # text, and the checkpoint has no tokenizer
        upscale_checkpoint(tmp_path / "base", tmp_path / "out", align_on="activations", calibration="some text")
    assert not (tmp_path / "out").exists()
