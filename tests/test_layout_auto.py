"""layout="auto": positions from a block-influence calibration pass, recorded with their reason."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_deepen import DepthUpscaler, PlanError
from hf_deepen.auto_layout import auto_positions, block_influence, slot_scores
from hf_deepen.config import UpscaleConfig
from hf_deepen.layouts import build_plan


def tiny(layers=8, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def ids(n=4, t=32):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(1))


def test_flat_profile_is_uniform_and_mass_attracts_layers():
    from hf_deepen.layouts import _LAYOUTS

    for n_slots, n_new in ((8, 4), (29, 15), (17, 9), (30, 15)):
        assert auto_positions([0.3] * n_slots, n_new) == _LAYOUTS["uniform"](n_new, n_slots, n_slots + 1)
    # all the change in the first half: every new layer goes there
    pos = auto_positions([1.0] * 4 + [0.0] * 4, 4)
    assert pos == [0, 1, 2, 3]
    # distinct slots even when one slot holds all the mass
    assert sorted(set(auto_positions([0, 0, 100, 0, 0], 3))) == auto_positions([0, 0, 100, 0, 0], 3)
    assert len(auto_positions([0, 0, 100, 0, 0], 3)) == 3
    with pytest.raises(PlanError):
        auto_positions([1.0, 1.0], 3)
    # an outlier (layer 0 of a real model) counts as at most SCORE_CAP median slots
    assert auto_positions([50.0] + [1.0] * 9, 5) == auto_positions([2.0] + [1.0] * 9, 5)
    assert auto_positions([50.0] + [1.0] * 9, 5, cap=0)[:3] == [0, 1, 2]


def test_block_influence_matches_hidden_states():
    m = tiny()
    x = ids()
    bi = block_influence(m, m.model.layers, x)
    with torch.no_grad():
        hs = m(input_ids=x, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i (the last one has the final norm applied: skip it)
    for i in range(len(bi) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i][:, 1:], hs[i + 1][:, 1:], dim=-1)
        assert abs(bi[i] - (1 - cos).mean().item()) < 1e-5
    assert all(0 <= b <= 2 for b in bi)


def test_upscale_auto_is_function_preserving_and_records_reason():
    m = tiny()
    x = ids()
    with torch.no_grad():
        ref = m(input_ids=x).logits.clone()
    up = DepthUpscaler(m)
    plan = up.plan(layout="auto", calibration=x)
    bi = block_influence(m, m.model.layers, x)
    expect = auto_positions(slot_scores(bi, needs_pair=True), 4)
    assert [s.sources[0] for s in plan.layers if s.kind == "new"] == expect
    assert plan.reason and "block influence" in plan.reason and str(expect) in plan.reason
    model = up.upscale(layout="auto", calibration=x, progress=False)
    assert model.config.num_hidden_layers == 12
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-5, rtol=0)
    stage = model.config.hf_deepen["stages"][-1]
    assert stage["layout"] == "auto" and stage["layout_reason"] == plan.reason
    assert up.report.plan.to_dict()["reason"] == plan.reason


def test_copy_auto_may_use_the_last_slot():
    m = tiny(layers=6)
    up = DepthUpscaler(m)
    plan = up.plan(method="copy", layout="auto", num_layers=12, calibration=ids())
    assert [s.sources[0] for s in plan.layers if s.kind == "new"] == list(range(6))


def test_auto_without_a_model_is_a_typed_error():
    with pytest.raises(PlanError, match="calibration pass"):
        build_plan(8, UpscaleConfig(layout="auto"))


def letters_tokenizer(**kwargs):
    """A transformers tokenizer with one token per lower-case letter (anything else is [UNK])."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[UNK]", **kwargs)


def test_default_calibration_is_pydoc_text():
    m = tiny()
    plan = DepthUpscaler(m).plan(layout="auto", tokenizer=letters_tokenizer())
    assert "pydoc_data.topics" in plan.reason and plan.num_layers == 12


def test_calibration_text_longer_than_the_model_maximum_is_not_a_warning():
    """The calibration text is one long token stream cut into short blocks: the tokenizer's warning that
    the stream is longer than the model's maximum length is wrong here and must not reach the user."""
    import logging

    def make():  # a tokenizer warns once per instance: one to show the warning is heard, one for the run
        return letters_tokenizer(model_max_length=64)

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("transformers.tokenization_utils_base")
    h = Keep(level=logging.WARNING)
    log.addHandler(h)
    try:
        make()("a" * 100)  # the warning this test listens for does reach the handler
        assert any("longer than the specified maximum" in m for m in seen), seen
        seen.clear()
        plan = DepthUpscaler(tiny()).plan(layout="auto", tokenizer=make())
    finally:
        log.removeHandler(h)
    assert "pydoc_data.topics" in plan.reason
    assert not [m for m in seen if "longer than the specified maximum" in m], seen


def test_auto_is_the_default_and_without_a_tokenizer_warns_and_is_uniform():
    from hf_deepen import LayoutWarning, new_layer_indices
    from hf_deepen.layouts import _LAYOUTS

    assert UpscaleConfig().layout == "auto" and UpscaleConfig(every_k=2).layout == "uniform"
    model = tiny(8)
    up = DepthUpscaler(model)  # a model object: no tokenizer for the default text
    with pytest.warns(LayoutWarning, match="no calibration pass"):
        up.upscale(progress=False)
    uniform = _LAYOUTS["uniform"](4, 7, 8)
    assert [s.sources[0] for s in up.report.plan.layers if s.kind == "new"] == uniform
    stage = model.config.hf_deepen["stages"][-1]
    assert stage["layout"] == "auto" and "flat profile" in stage["layout_reason"]
    assert new_layer_indices(model) == [p + 1 + i for i, p in enumerate(uniform)]


def test_auto_keeps_to_the_slots_the_family_accepts():
    """A MoE model with a dense layer in the middle: fusing it with a sparse neighbour is refused, so
    the auto layout must choose around it (a fixed layout that crosses it is refused)."""
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=300, num_experts=4,
                         num_experts_per_tok=2, mlp_only_layers=[4], decoder_sparse_step=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    up = DepthUpscaler(model)
    with pytest.raises(PlanError, match="dense MLP"):
        up.plan(method="opt", layout="uniform")  # slots 0, 2, 4, 6 of 7: (4, 5) mixes kinds
    plan = up.plan(method="opt", layout="auto", calibration=ids())
    slots = [s.sources[0] for s in plan.layers if s.kind == "new"]
    assert len(slots) == 4 and not {3, 4} & set(slots), slots
    assert "slots skipped (refused by the architecture" in plan.reason
    up.upscale(method="opt", layout="auto", calibration=ids(), progress=False)
    assert model.config.num_hidden_layers == 12
