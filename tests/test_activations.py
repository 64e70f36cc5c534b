"""Activation-based alignment (align_on="activations"): invariants and refusals."""

from __future__ import annotations

import pytest
import torch

from hf_deepen import ConfigError, DepthUpscaler, UpscaleConfig
from hf_deepen.align import align_layers
from hf_deepen.align.activations import activation_costs, calibration_ids, capture_activations
from hf_deepen.arch import get_module, get_spec

from test_families import SEED, _permute, inputs, logits, make_model, max_diff


pytestmark = pytest.mark.usefixtures("one_thread")


def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 5)
    return torch.randint(3, 100, (6, 32), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_shuffled_layer_is_recovered_from_activations(family, solver):
    """Permuting a layer's heads and neurons is a symmetry of the model: the permuted layer sees the
    same inputs, so its units' activations are the originals, reordered. OT on activation costs must
    recover the permutation (Sinkhorn at a small regularisation, to rounding)."""
    model = make_model(family)
    spec = get_spec(model)
    shape = spec.head_shape(model.config)
    layers = get_module(model, spec.layers_path)
    ids = calib()
    state = {k: v.clone() for k, v in layers[1].state_dict().items()}
    canon_a, _ = spec.to_canonical(state)
    acts_a = capture_activations(model, spec, layers, [1], ids)[1]

    shuffled = spec.from_canonical(_permute(canon_a, shape, torch.Generator().manual_seed(SEED + 3)))
    layers[1].load_state_dict(shuffled)
    acts_b = capture_activations(model, spec, layers, [1], ids)[1]
    canon_b, _ = spec.to_canonical(shuffled)

    costs = activation_costs(acts_a, acts_b, canon_a["o"], canon_b["o"], shape)
    al = align_layers(canon_a, canon_b, shape, solver, reg=1e-3, max_iter=20000, costs=costs)
    aligned = al.apply(canon_a)
    atol = 1e-6 if solver == "exact" else 1e-3
    for k, v in canon_b.items():
        assert torch.allclose(aligned[k].double(), v.double(), rtol=0, atol=atol), f"{family}/{solver}: {k}"
    # and the weight-free cost of the recovered plan is ~0 (identical units)
    assert al.neurons.cost < 1e-6 and al.heads.cost < 1e-6


def test_a_layer_aligned_to_itself_is_unchanged():
    model = make_model("llama")
    spec = get_spec(model)
    shape = spec.head_shape(model.config)
    layers = get_module(model, spec.layers_path)
    acts = capture_activations(model, spec, layers, [2], calib())[2]
    canon, _ = spec.to_canonical(layers[2].state_dict())
    costs = activation_costs(acts, acts, canon["o"], canon["o"], shape)
    al = align_layers(canon, canon, shape, "exact", costs=costs)
    assert torch.equal(al.neurons.permutation, torch.arange(canon["up"].shape[0]))
    assert torch.equal(al.heads.permutation, torch.arange(shape.num_kv_heads))


def test_upscale_with_activations_is_function_preserving_and_recorded():
    model = make_model("llama")
    ids = inputs()
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    up.upscale(progress=False, align_on="activations", calibration=calib())
    assert max_diff(logits(model, ids), ref) <= 1e-5
    assert model.config.hf_deepen["stages"][-1]["config"]["align_on"] == "activations"
    assert "calibration" in up.report.timings
    d = up.report.layers[0]["diagnostics"]
    assert 0 <= d["neurons_cost_ratio"] <= 1.0 + 1e-9  # the optimum never costs more than the identity


def test_activations_change_the_plan():
    """Not a weight-based plan under another name: on a random model the two disagree."""
    a, b = make_model("llama"), make_model("llama")
    DepthUpscaler(a).upscale(progress=False, zero_init=False)
    DepthUpscaler(b).upscale(progress=False, zero_init=False, align_on="activations", calibration=calib())
    new = a.config.hf_deepen["new_layer_indices"]
    assert new == b.config.hf_deepen["new_layer_indices"]
    assert any(not torch.equal(a.model.layers[i].mlp.up_proj.weight, b.model.layers[i].mlp.up_proj.weight) for i in new)


def test_calibration_text_is_tokenised():
    class Tok:
        eos_token = "</s>"

        def __call__(self, text, return_tensors, add_special_tokens):
            class R:
                input_ids = torch.arange(len(text)).unsqueeze(0) % 50

            return R()

    ids = calibration_ids(Tok(), ["hello world"] * 20, num_tokens=64, seq_len=16)
    assert ids.shape == (4, 16)
    with pytest.raises(ConfigError, match="fewer than one block"):
        calibration_ids(Tok(), "hi", num_tokens=64, seq_len=16)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        calibration_ids(None, "hi", num_tokens=64, seq_len=16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(align_on="activations"), "needs calibration"),
        (dict(layout="uniform", calibration=torch.zeros(2, 8, dtype=torch.long)), "only used with align_on"),
        (dict(align_on="activations", calibration=torch.zeros(8)), "2-D integer tensor"),
    ],
)
def test_bad_calibration_input_is_refused_before_any_change(kwargs, match):
    model = make_model("llama")
    n = model.config.num_hidden_layers
    with pytest.raises(ConfigError, match=match):
        DepthUpscaler(model).upscale(progress=False, **kwargs)
    assert model.config.num_hidden_layers == n == len(model.model.layers)


def test_config_refusals():
    with pytest.raises(ConfigError, match="only applies to method='opt'"):
        UpscaleConfig(method="avg", align_on="activations")
    with pytest.raises(ConfigError, match="unknown align_on"):
        UpscaleConfig(align_on="gradients")
    with pytest.raises(ConfigError, match="calibration_tokens"):
        UpscaleConfig(calibration_tokens=0)
