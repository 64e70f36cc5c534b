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
