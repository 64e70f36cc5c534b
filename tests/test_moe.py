"""Mixture-of-experts specifics beyond the family matrix (tests/test_families.py): dense / sparse
layer lists, the refusal to fuse a dense layer with a sparse one, and streaming from checkpoints
that store one tensor per expert."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_deepen import DepthUpscaler, LayoutWarning, PlanError
from hf_deepen.arch import get_module, get_spec
from hf_deepen.streaming import upscale_checkpoint

from conftest import checkpoint_tensors, stream_and_memory
from test_families import inputs, logits, make_model, max_diff, mlp_kinds


pytestmark = pytest.mark.usefixtures("one_thread")


def _round_trip(model, tmp_path):
    """save -> load: no missing / unexpected keys (a dense/sparse pattern that does not match the
    layers makes from_pretrained re-initialise them with only a warning), same tensors and logits."""
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    a, b = model.state_dict(), loaded.eval().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = inputs()
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= 1e-6
    return loaded


@pytest.mark.parametrize("method", ["opt", "avg"])
def test_fusing_dense_with_sparse_is_refused(method, tmp_path):
    model = make_model("qwen2_moe", mlp_only_layers=[2])  # the top-half layout fuses (1, 2) and (2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    up = DepthUpscaler(model)
    with pytest.raises(PlanError, match=r"layers \[1, 2\].*positions= from \[0\].*method='copy'"):
        up.plan(method=method, layout="top")
    # the default layout (auto) keeps to the slots the family accepts: one here, for two new layers
    with pytest.raises(PlanError, match=r"positions= from \[0\]"), pytest.warns(LayoutWarning):
        up.plan(method=method)
    with pytest.raises(PlanError, match="dense MLP"):
        up.upscale(method=method, progress=False)
    assert model.config.num_hidden_layers == 4 and model.state_dict().keys() == before.keys()
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(PlanError, match="sparse MoE"):
        upscale_checkpoint(tmp_path / "base", tmp_path / "out", method=method)
    assert not (tmp_path / "out").exists()


def test_copy_takes_the_lower_neighbours_type_and_rewrites_the_sparse_step(tmp_path):
    """decoder_sparse_step=2: layers 1, 3 sparse, 0, 2 dense. A copy of sparse layer 1 inserted
    after it lands at index 2, where step 2 would make it dense: the pattern is not expressible
    with step 2 and is rewritten as step 1 with an explicit mlp_only_layers list."""
    model = make_model("qwen2_moe", mlp_only_layers=[], decoder_sparse_step=2)
    spec = get_spec(model)
    assert mlp_kinds(model, spec) == ["dense", "sparse", "dense", "sparse"]
    ids = inputs()
    ref = logits(model, ids)
    DepthUpscaler(model).upscale(method="copy", positions=[1, 2], progress=False)
    kinds = ["dense", "sparse", "sparse", "dense", "dense", "sparse"]  # 0, 1, copy(1), 2, copy(2), 3
    assert mlp_kinds(model, spec) == kinds
    assert model.config.decoder_sparse_step == 1
    assert model.config.mlp_only_layers == [0, 3, 4]
    assert spec.sparse_layers(model.config) == [k == "sparse" for k in kinds]
    assert max_diff(logits(model, ids), ref) <= 1e-5
    loaded = _round_trip(model, tmp_path)
    assert mlp_kinds(loaded, spec) == kinds


def test_sparse_step_is_kept_when_expressible():
    model = make_model("qwen3_moe", mlp_only_layers=[3], decoder_sparse_step=2)  # sparse: 1 only
    spec, config = get_spec(model), model.config
    # identity plan: nothing to rewrite
    assert spec.update_layer_config(config, [0, 1, 2, 3]) == ("mlp_only_layers", "decoder_sparse_step")
    assert (config.decoder_sparse_step, config.mlp_only_layers) == (2, [3])
    # a dense layer inserted at the front shifts sparse layer 1 to index 2: step 2 no longer fits
    spec.update_layer_config(config, [0, 0, 1, 2, 3])
    assert (config.decoder_sparse_step, config.mlp_only_layers) == (1, [0, 1, 3, 4])


def test_dense_layers_of_a_moe_model_are_fused_as_dense(tmp_path):
    """Two neighbouring dense layers (mlp_only_layers) are aligned and fused like any Llama layer;
    the new layer is dense too, and the dense layer above it moves up in mlp_only_layers."""
    model = make_model("qwen2_moe", mlp_only_layers=[1, 2])
    spec = get_spec(model)
    ids = inputs()
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    up.upscale(method="opt", positions=[1], progress=False)
    assert "experts_cost" not in up.report.layers[0]["diagnostics"]
    assert "neurons_cost" in up.report.layers[0]["diagnostics"]
    assert mlp_kinds(model, spec) == ["sparse", "dense", "dense", "dense", "sparse"]
    assert model.config.mlp_only_layers == [1, 2, 3]
    assert max_diff(logits(model, ids), ref) <= 1e-5
    _round_trip(model, tmp_path)


def test_moe_layer_fused_with_itself_is_itself():
    """OpT-DeUS of a layer with itself (exact OT, zero_init off) returns the layer: the expert and
    neuron plans are the identity."""
    from hf_deepen.config import UpscaleConfig
    from hf_deepen.fuse import build_layer_state

    model = make_model("qwen2_moe")
    spec = get_spec(model)
    state = get_module(model, spec.layers_path)[1].state_dict()
    cfg = UpscaleConfig(method="opt", zero_init=False)
    res = build_layer_state(spec, cfg, spec.head_shape(model.config), [state, state], "self")
    assert res.canon.keys() == state.keys()
    for k, v in state.items():
        assert torch.allclose(res.canon[k], v, rtol=0, atol=1e-6), k
    assert res.diagnostics["experts_cost"] == pytest.approx(0, abs=1e-9)
    assert res.diagnostics["experts_sharpness"] == 1.0


@pytest.mark.parametrize("method", ["opt", "copy"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_streaming_equals_in_memory(family, method, tmp_path):
    """Checkpoints store one tensor per expert (Mixtral: block_sparse_moe.experts.{e}.w1/w2/w3);
    the streaming path reads and writes that layout, and gives the same files as in memory."""
    positions = {"qwen2_moe": [0, 1]}.get(family)  # qwen2_moe's dense layer 3 must not be fused
    kw = dict(method=method, **({"positions": positions} if positions else {}))
    model = make_model(family)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert any(".experts.0." in k for k in checkpoint_tensors(tmp_path / "base"))  # per-expert on disk
    rep, mem, ca, cb = stream_and_memory(tmp_path / "base", tmp_path, {"attn_implementation": "eager"}, **kw)
    for key in ("num_hidden_layers", "mlp_only_layers", "decoder_sparse_step", "layer_types", "hf_deepen"):
        assert ca.get(key) == cb.get(key), key
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "stream", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = inputs()
    torch.testing.assert_close(logits(loaded.eval(), ids), logits(mem, ids), atol=0, rtol=0)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)  # function preserving
    assert rep.params_after == sum(p.numel() for p in mem.parameters())
