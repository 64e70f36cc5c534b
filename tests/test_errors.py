"""Bad input gets a typed error (DeepenError and ValueError) whose message names the fix."""

import pytest
import torch
from transformers import PretrainedConfig, PreTrainedModel

from hf_deepen import (
    ConfigError,
    DeepenError,
    DepthUpscaler,
    PlanError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
    UpscaleConfig,
)
from hf_deepen.arch import register_spec, llama_like

from conftest import tiny_model


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(method="frankenmerge"), ConfigError, "choose one of opt, avg, copy, solar"),
        (dict(solver="greedy"), ConfigError, "choose one of exact, sinkhorn"),
        (dict(layout="sideways"), ConfigError, "choose one of"),
        (dict(num_layers=0), ConfigError, "positive"),
        (dict(num_layers=-3), ConfigError, "positive"),
        (dict(every_k=0), ConfigError, "positive"),
        (dict(positions=[1], layout="top"), ConfigError, "drop one"),
        (dict(method="solar", zero_init=True), ConfigError, "never function preserving"),
        (dict(sinkhorn_reg=0), ConfigError, "sinkhorn_reg"),
        (dict(sinkhorn_tol=0.0), ConfigError, "sinkhorn_tol"),
        (dict(sinkhorn_tol=1.5), ConfigError, "sinkhorn_tol"),
        (dict(fusion_weight=1.5), ConfigError, r"\[0, 1\]"),
        (dict(positions=["a"]), ConfigError, "integers"),
    ],
)
def test_config_errors(kwargs, err, match):
    with pytest.raises(err, match=match) as e:
        UpscaleConfig(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, DeepenError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(positions=[9]), r"out of range .* 0 .* to 4"),
        (dict(positions=[5]), "out of range"),  # after the last layer: no upper neighbour to fuse with
        (dict(positions=[-1]), "out of range"),
        (dict(positions=[1, 1]), "more than once"),
        (dict(positions=[]), "at least one"),
        (dict(num_layers=6), "does not exceed"),
        (dict(num_layers=20), "num_layers <= 11"),
        (dict(method="solar", num_layers=13), "between 7 and 12"),
        (dict(every_k=9), "every_k=9 inserts nothing"),
    ],
)
def test_plan_errors(kwargs, match):
    up = DepthUpscaler(tiny_model("gqa"))
    with pytest.raises(PlanError, match=match):
        up.upscale(**kwargs)
    assert len(up.model.model.layers) == 6  # nothing changed


def test_copy_may_go_after_the_last_layer():
    up = DepthUpscaler(tiny_model("gqa"))
    assert up.plan(method="copy", positions=[5]).new_layer_indices == [6]


class ToyConfig(PretrainedConfig):
    model_type = "toy_rnn"

    def __init__(self, num_hidden_layers=2, hidden_size=8, **kw):
        super().__init__(**kw)
        self.num_hidden_layers, self.hidden_size = num_hidden_layers, hidden_size


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.GRUCell(8, 8) for _ in range(config.num_hidden_layers))


def test_unknown_family_is_discovered_and_ot_refused_with_the_reason():
    # no spec and not Llama-shaped: the stack is found by its length; copies work, OT needs proven units
    up = DepthUpscaler(ToyModel(ToyConfig()))
    assert up.spec.name == "discovered:toy_rnn" and not up.spec.can_preserve(up.model.config)
    with pytest.raises(UnsupportedArchitectureError, match=r"discovered:toy_rnn.*no unit whose permutation.*avg"):
        up.upscale(method="opt", num_layers=3)
    up.upscale(method="copy", num_layers=3, zero_init=False)
    assert len(up.model.model.layers) == 3 and up.model.config.num_hidden_layers == 3


def test_no_decoder_stack_names_the_layer_count():
    model = ToyModel(ToyConfig())
    model.config.num_hidden_layers = 5  # no ModuleList of 5 blocks anywhere
    with pytest.raises(UnsupportedArchitectureError, match=r"toy_rnn.*no ModuleList.*num_hidden_layers=5"):
        DepthUpscaler(model)


def test_not_a_pretrained_model():
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        DepthUpscaler(torch.nn.Linear(2, 2))


def test_unknown_tensor_refused_by_opt_but_not_by_copy():
    model = tiny_model("gqa")
    for layer in model.model.layers:
        layer.mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(96)))
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp\.scale.*residual="):
        DepthUpscaler(model).upscale(method="opt")
    assert len(model.model.layers) == 6
    DepthUpscaler(model).upscale(method="copy")
    assert len(model.model.layers) == 9


def test_spec_that_does_not_fit_is_refused():
    model = tiny_model("gqa")
    model.config.num_key_value_heads = 4  # lies about the geometry
    with pytest.raises(UnsupportedArchitectureError, match="k_proj.weight.*rows"):
        DepthUpscaler(model).upscale()


def test_registering_a_spec_for_a_new_model_type():
    model = tiny_model("gqa")
    model.config.model_type = "my_llama"
    spec = register_spec(llama_like("my_llama", ("my_llama",)))
    assert DepthUpscaler(model).spec is spec


def test_save_before_upscale():
    with pytest.raises(ConfigError, match="upscale"):
        DepthUpscaler(tiny_model("gqa")).save_pretrained("/tmp/never")
