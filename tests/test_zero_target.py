"""zero_target: what zero-init zeroes, for post-norm families (Gemma-2/3, OLMo-2).

Both targets are exactly function preserving; they differ in how the new layer starts to train.
The training test below is the reason ``"auto"`` picks the post-norm gains for these families.
"""

from __future__ import annotations

import pytest
import torch

from hf_deepen import ConfigError, DepthUpscaler, UpscaleConfig, new_layer_indices
from hf_deepen.arch import get_module

from test_families import inputs, logits, make_model, max_diff

POST_NORM_FAMILIES = {
    # family -> (post-norm tensor names, the gain value that zeroes them)
    "gemma2": (("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"), -1.0),
    "gemma3_text": (("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"), -1.0),
    "olmo2": (("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"), 0.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("target", ["auto", "outputs", "post_norm"])
@pytest.mark.parametrize("family", list(POST_NORM_FAMILIES))
def test_both_targets_are_exact(family, target):
    names, zero = POST_NORM_FAMILIES[family]
    model = make_model(family)
    ids = inputs()
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    up.upscale(progress=False, method="opt", zero_target=target)
    assert max_diff(logits(model, ids), ref) <= 1e-5

    resolved = "post_norm" if target == "auto" else target
    assert model.config.hf_deepen["stages"][-1]["zero_target"] == resolved
    layers = get_module(model, up.spec.layers_path)
    for i in new_layer_indices(model):
        sd = layers[i].state_dict()
        gains_zeroed = all(torch.all(sd[n] == zero) for n in names)
        outputs_zeroed = all(torch.all(sd[n] == 0) for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
        assert (gains_zeroed, outputs_zeroed) == ((True, False) if resolved == "post_norm" else (False, True))


def test_pre_norm_family_refuses_post_norm_target():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="zero_target='outputs'"):
        DepthUpscaler(model).upscale(progress=False, zero_target="post_norm")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # auto is the outputs there
    DepthUpscaler(model).upscale(progress=False, method="copy")
    assert model.config.hf_deepen["stages"][-1]["zero_target"] == "outputs"


def test_zero_target_needs_zero_init():
    with pytest.raises(ConfigError, match="zero_init"):
        UpscaleConfig(zero_init=False, zero_target="outputs")
    with pytest.raises(ConfigError, match="unknown zero_target"):
        UpscaleConfig(zero_target="gains")


def _logit_change_after_one_step(family: str, target: str, lr: float) -> float:
    """Relative change of the logits after one SGD step on the new layers only."""
    model = make_model(family)
    up = DepthUpscaler(model)
    up.upscale(progress=False, method="opt", zero_target=target)
    new = set(new_layer_indices(model))
    layers = get_module(model, up.spec.layers_path)
    params = [p for i, layer in enumerate(layers) if i in new for p in layer.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ids = inputs()
    before = logits(model, ids)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    model.eval()
    return max_diff(logits(model, ids), before) / float(before.abs().max())


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_post_norm_target_opens_the_layer_smoothly(family):
    """With zeroed projections the post-norm sees a zero input: its gradient carries 1/sqrt(eps), so one
    small step switches the new layer fully on (the post-norm rescales any output to full size). With
    zeroed gains the first step changes the model in proportion to the learning rate."""
    lr = 1e-4
    jump_outputs = _logit_change_after_one_step(family, "outputs", lr)
    jump_gains = _logit_change_after_one_step(family, "post_norm", lr)
    assert jump_gains < 0.01, jump_gains
    assert jump_outputs > 10 * jump_gains, (jump_outputs, jump_gains)
