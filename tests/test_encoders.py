"""Encoders: BERT, RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2, MPNet (post-LN) and ModernBERT (pre-LN),
4 -> 6 layers. (benchmarks/encoder_census.py sweeps every masked-LM type.)

Every parameter is perturbed first (norm gains and biases included): with LayerNorms at their
init (gain 1, bias 0) a post-LN block with zeroed writers is already close to the identity and the
function-preservation checks would have no power.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_deepen import DepthUpscaler
from hf_deepen.arch import ArchitectureWarning, encoder
from hf_deepen.arch.encoder import EncoderSpec, post_ln_state
from hf_deepen.errors import UnsupportedArchitectureError

VOCAB = 99
POST_LN = ("bert", "roberta", "electra", "distilbert")
TYPES = POST_LN + ("modernbert",)
#: post-LN with other names and attention (relative positions), found by the same probing
MORE = ("deberta-v2", "mpnet")
METHODS = ("copy", "avg", "opt")


def config(model_type: str, **kw):
    if model_type == "distilbert":
        base = dict(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=37, pad_token_id=0)
    else:
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                    pad_token_id=0)
    if model_type == "modernbert":  # local window 4 < the test sequences: sliding vs global matters
        base.update(global_attn_every_n_layers=2, local_attention=4, bos_token_id=1, eos_token_id=2,
                    cls_token_id=1, sep_token_id=2)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def perturb(model, seed: int = 0, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def build(model_type: str, cls=AutoModelForMaskedLM, **kw):
    torch.manual_seed(0)
    return perturb(cls.from_config(config(model_type, **kw)))


def ids(n: int = 11, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def layers_of(model):
    from hf_deepen.arch import get_module

    return get_module(model, DepthUpscaler(model).spec.layers_path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", TYPES + MORE)
def test_function_preserving(model_type, method):
    model = build(model_type)
    x = ids()
    ref = logits(model, x)
    up = DepthUpscaler(model)
    assert isinstance(up.spec, EncoderSpec)
    out = up.upscale(method=method)
    assert up.report.function_preserving
    assert out.config.num_hidden_layers == 6 if model_type != "distilbert" else out.config.n_layers == 6
    assert len(layers_of(out)) == 6
    torch.testing.assert_close(logits(out, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_solar_and_no_zero_init_run_but_do_not_preserve(model_type):
    x = ids()
    for kw in (dict(method="solar"), dict(method="copy", zero_init=False)):
        model = build(model_type)
        ref = logits(model, x)
        up = DepthUpscaler(model)
        out = up.upscale(**kw)
        assert not up.report.function_preserving
        assert len(layers_of(out)) == 6
        assert (logits(out, x) - ref).abs().max() > 1e-4  # a real change, or the FP checks above prove nothing


def test_naive_post_ln_construction_is_not_the_identity():
    """The construction that keeps base layers as they are (writers zeroed, the new layer's norms copied
    from the output norm of the layer below) is not the identity; moving that norm's affine up is."""
    model = build("bert")
    layers = layers_of(model)
    calls = encoder.capture_calls(model, layers, model.config)
    p = layers[1]
    x = calls[2][0][0] if calls[2][0] else calls[2][1]["hidden_states"]  # the input of layer 2 = p's output
    lay = DepthUpscaler(model).spec.post_ln
    assert set(lay.writers) == {"attention.output.dense.weight", "attention.output.dense.bias",
                                "output.dense.weight", "output.dense.bias"}
    assert lay.input_readers == ("attention.self.query", "attention.self.key", "attention.self.value")
    assert lay.mid_readers == ("intermediate.dense",)
    state = {k: v.clone() for k, v in p.state_dict().items()}
    naive = copy.deepcopy(p)
    st = dict(state)
    for k in lay.writers:
        st[k] = torch.zeros_like(st[k])
    for norm in (lay.attn_norm, lay.out_norm):
        st[f"{norm}.weight"] = state[f"{lay.out_norm}.weight"]
        st[f"{norm}.bias"] = state[f"{lay.out_norm}.bias"]
    naive.load_state_dict(st)
    y = encoder.run_block(naive, encoder._with_hidden(calls[2], x))
    assert (y - x).abs().max() > 1e-2  # LN(g * n + b) != g * n + b

    # the reparametrisation: p outputs n (plain norm), the new layer puts g_p, b_p back
    new = copy.deepcopy(p)
    new.load_state_dict(post_ln_state(state, state, lay))
    plain_p = copy.deepcopy(p)
    encoder.make_plain(plain_p, lay)
    n = encoder.run_block(plain_p, calls[1])
    assert (n - x).abs().max() > 1e-2  # the hidden state between the two does change
    y = encoder.run_block(new, encoder._with_hidden(calls[2], n))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", POST_LN)
def test_post_ln_norms_after_upscale(model_type):
    model = build(model_type)
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers_of(model)]
    up = DepthUpscaler(model)
    lay = up.spec.post_ln
    out = up.upscale(method="avg")
    layers = layers_of(out)
    new = out.config.hf_deepen["new_layer_indices"]
    src = {i: s for i, s in enumerate(up.report.plan.layers)}
    for i, layer in enumerate(layers):
        st = layer.state_dict()
        if i in new:
            lower = before[src[i].sources[0]]
            for k in lay.writers:
                assert not st[k].any(), k
            assert torch.equal(st[f"{lay.attn_norm}.weight"], torch.ones_like(st[f"{lay.attn_norm}.weight"]))
            assert torch.equal(st[f"{lay.out_norm}.weight"], lower[f"{lay.out_norm}.weight"])
            assert torch.equal(st[f"{lay.out_norm}.bias"], lower[f"{lay.out_norm}.bias"])
        elif i + 1 in new:  # a base layer under a new one: only its output norm changed, to plain
            orig = before[src[i].sources[0]]
            assert set(k for k in st if not torch.equal(st[k], orig[k])) == {f"{lay.out_norm}.weight",
                                                                             f"{lay.out_norm}.bias"}
            assert torch.equal(st[f"{lay.out_norm}.weight"], torch.ones_like(st[f"{lay.out_norm}.weight"]))
            assert not st[f"{lay.out_norm}.bias"].any()
        else:
            orig = before[src[i].sources[0]]
            assert all(torch.equal(st[k], orig[k]) for k in st)


@pytest.mark.parametrize("model_type", TYPES + MORE)
def test_save_reload_with_automodel(model_type, tmp_path):
    model = build(model_type)
    x = ids()
    up = DepthUpscaler(model)
    out = up.upscale(method="opt")
    want = logits(out, x)
    out.save_pretrained(tmp_path)
    again, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(logits(again.eval(), x), want, atol=0, rtol=0)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not [k for k in info["missing_keys"] if not k.startswith("pooler.")], info  # (an MLM head has no pooler)
    with torch.no_grad():
        h = base.eval()(input_ids=x).last_hidden_state
        h_ref = out.base_model(input_ids=x).last_hidden_state
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    assert len(layers_of(base)) == 6


def test_modernbert_layer_types_follow_their_layers(tmp_path):
    """The global / local pattern is config.layer_types: each layer keeps its own attention kind (a new
    layer takes its source's), which the reload must rebuild; a sequence longer than the local window
    makes the two kinds compute differently."""
    model = build("modernbert")
    base_types = list(model.config.layer_types)
    assert base_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    x = ids(13)
    ref = logits(model, x)
    out = DepthUpscaler(model).upscale(method="avg", positions=[0, 1])
    assert out.config.layer_types == [base_types[i] for i in (0, 0, 1, 1, 2, 3)]
    for layer, kind in zip(out.model.layers, out.config.layer_types):
        assert layer.attention_type == kind
        assert (layer.attn.sliding_window is None) == (kind == "full_attention")
    # layer 0 has no attention norm (Identity); the new layer 1 made from it must have one
    assert isinstance(out.model.layers[0].attn_norm, torch.nn.Identity)
    assert all(isinstance(layer.attn_norm, torch.nn.LayerNorm) for layer in out.model.layers[1:])
    torch.testing.assert_close(logits(out, x), ref, atol=1e-5, rtol=1e-5)
    out.save_pretrained(tmp_path)
    again, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert again.config.layer_types == out.config.layer_types
    torch.testing.assert_close(logits(again.eval(), x), logits(out, x), atol=0, rtol=0)


def test_unknown_post_ln_layout_refuses_zero_init(monkeypatch):
    monkeypatch.setattr(encoder, "find_post_ln", lambda block, call: (None, "(test: no structure)"))
    model = build("bert")
    up = DepthUpscaler(model)
    assert up.spec.post_ln is None and up.spec.post_ln_refused
    with pytest.raises(UnsupportedArchitectureError, match="zero_init=False"):
        up.upscale(method="copy")
    out = up.upscale(method="avg", zero_init=False)
    assert not up.report.function_preserving and len(layers_of(out)) == 6


def _train(model, tmp_path, labels):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = torch.randint(3, VOCAB, (8, 12), generator=g)
    cols = {"input_ids": data.tolist(), "attention_mask": torch.ones_like(data).tolist()}
    cols["labels"] = labels(data)
    ds = Dataset.from_dict(cols)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Trainer(model=model.train(), args=args, train_dataset=ds).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _mlm_labels(data):
    lab = data.clone()
    lab[:, ::2] = -100
    return lab.tolist()


@pytest.mark.parametrize("model_type", ["bert", "modernbert"])
def test_trainer_masked_lm(model_type, tmp_path):
    model = build(model_type)
    up = DepthUpscaler(model)
    out = up.upscale(method="opt")
    new = out.config.hf_deepen["new_layer_indices"]
    writers = up.spec.post_ln.writers if up.spec.post_ln else ()
    changed = _train(out, tmp_path, _mlm_labels)
    path = up.spec.layers_path
    for i in new:  # the zeroed writers of every new layer get a gradient and move
        names = [f"{path}.{i}.{w}" for w in writers] or [n for n in changed if n.startswith(f"{path}.{i}.")]
        assert names and all(n in changed for n in names), (i, names)
    out.save_pretrained(tmp_path / "saved")
    AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")


def test_trainer_sequence_classification(tmp_path):
    model = build("roberta", AutoModelForSequenceClassification, num_labels=3)
    x = ids()
    ref = logits(model, x)
    up = DepthUpscaler(model)
    out = up.upscale(method="avg")
    assert up.report.function_preserving
    torch.testing.assert_close(logits(out, x), ref, atol=1e-5, rtol=1e-5)
    changed = _train(out, tmp_path, lambda d: (d[:, 0] % 3).tolist())
    assert any(n.startswith("classifier.") for n in changed)
    assert any(f".layer.{i}." in n for n in changed for i in out.config.hf_deepen["new_layer_indices"])


def test_bert_with_cross_attention_is_preserved_with_and_without_encoder_states():
    """A BERT decoder layer with cross-attention has a third norm between the two, idle when probed
    (no encoder states): the new layers get their cross-attention zeroed and its norm made plain, and
    the deeper model equals the base one both without encoder states and with them."""
    model = build("bert", is_decoder=True, add_cross_attention=True)
    spec = DepthUpscaler(model).spec
    assert spec.post_ln is not None and spec.post_ln.idle_norms == ("crossattention.output.LayerNorm",)
    x = ids()
    enc = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))

    def both(m):
        with torch.no_grad():
            return m(input_ids=x).logits, m(input_ids=x, encoder_hidden_states=enc).logits

    ref = both(model)
    DepthUpscaler(model).upscale(method="copy")
    assert model.config.num_hidden_layers == 6
    for got, want in zip(both(model), ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_modernbert_decoder_first_layer_rebuilt(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = config("modernbert-decoder", local_attention=4)
    torch.manual_seed(0)
    model = perturb(AutoModelForCausalLM.from_config(cfg))
    x = ids(13)
    ref = logits(model, x)
    out = DepthUpscaler(model).upscale(method="copy", positions=[0])
    assert isinstance(out.model.layers[1].attn_norm, torch.nn.LayerNorm)
    torch.testing.assert_close(logits(out, x), ref, atol=1e-5, rtol=1e-5)
    out.save_pretrained(tmp_path)
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    torch.testing.assert_close(logits(again.eval(), x), logits(out, x), atol=0, rtol=0)


def test_bare_automodel_upscaled_twice():
    """A bare ``AutoModel`` (no head), upscaled 4 -> 6 -> 9: the second stage's lower layers include
    layers the first made (their output norm carries the moved affine)."""
    torch.manual_seed(0)
    model = perturb(AutoModel.from_config(config("bert")))
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).last_hidden_state
    DepthUpscaler(model).upscale(method="opt")
    DepthUpscaler(model).upscale(method="avg", positions=[0, 2, 4])
    assert len(model.encoder.layer) == 9 and model.config.num_hidden_layers == 9
    assert len(model.config.hf_deepen["stages"]) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, ref, atol=1e-5, rtol=1e-5)


def test_from_pretrained_with_a_model_class(tmp_path):
    model = build("modernbert")
    model.save_pretrained(tmp_path / "base")
    x = ids(13)
    ref = logits(model, x)
    up = DepthUpscaler.from_pretrained(tmp_path / "base", model_class=AutoModelForMaskedLM)
    out = up.upscale(method="opt")
    assert type(out).__name__ == "ModernBertForMaskedLM"
    with pytest.warns(UserWarning, match="no tokenizer"):
        up.save_pretrained(tmp_path / "deep")
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "deep").eval()
    torch.testing.assert_close(logits(again, x), ref, atol=1e-5, rtol=1e-5)
    assert again.config.hf_deepen["stages"][0]["function_preserving"]


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-4])
def test_post_ln_error_is_layernorm_eps_not_structure(eps):
    """In float64 the only difference left is LayerNorm's eps (``normalise(n)`` is ``n`` up to a factor
    ``1 + O(eps)``): it scales with eps, so the construction itself is exact."""
    model = build("roberta", layer_norm_eps=eps).double()
    x = ids()
    ref = logits(model, x)
    out = DepthUpscaler(model).upscale(method="avg")
    err = float((logits(out, x) - ref).abs().max())
    assert err < 20 * eps * float(ref.abs().max()), err
    assert eps < 1e-9 or err > 1e-3 * eps  # (the eps effect is real: the bound is not vacuous)


def test_post_ln_readers_see_the_stream_as_their_source_did():
    """The folds: the new layer's query / key / value on ``n`` (what the plain lower layer now outputs)
    equal its source's on ``x = g_p * n + b_p``, and its MLP input Linear on a plain-normed ``u`` equals
    the source's on ``g1 * u + b1`` (with writers put back, the new layer is then its source's function
    of the stream except for the residual path)."""
    model = build("bert")
    p = layers_of(model)[2]
    lay = DepthUpscaler(model).spec.post_ln
    state = {k: v.clone() for k, v in p.state_dict().items()}
    new = copy.deepcopy(p)
    new.load_state_dict(post_ln_state(state, state, lay))
    g = torch.Generator().manual_seed(3)
    n = torch.randn(5, 32, generator=g)
    x = n * state[f"{lay.out_norm}.weight"] + state[f"{lay.out_norm}.bias"]
    with torch.no_grad():
        for r in lay.input_readers:
            torch.testing.assert_close(new.get_submodule(r)(n), p.get_submodule(r)(x), atol=1e-5, rtol=1e-5)
        u = torch.randn(5, 32, generator=g)
        h = u * state[f"{lay.attn_norm}.weight"] + state[f"{lay.attn_norm}.bias"]
        for r in lay.mid_readers:
            torch.testing.assert_close(new.get_submodule(r)(u), p.get_submodule(r)(h), atol=1e-5, rtol=1e-5)


def test_trainer_with_frozen_base_layers_moves_only_new_layers(tmp_path):
    from hf_deepen.training import freeze_base_layers, new_layer_parameter_names

    model = build("bert")
    out = DepthUpscaler(model).upscale(method="copy")
    freeze_base_layers(out, verbose=False)
    changed = _train(out, tmp_path, _mlm_labels)
    assert changed and changed <= new_layer_parameter_names(out)


def test_bf16_post_ln_warns_and_stays_within_bf16_rounding():
    from hf_deepen.arch import ArchitectureWarning

    model = build("bert")
    x = ids()
    ref32 = logits(model, x)
    model = model.to(torch.bfloat16)
    ref = logits(model, x).float()
    with pytest.warns(ArchitectureWarning, match="rounding"):
        DepthUpscaler(model).upscale(method="avg")
    gap = float((ref - ref32).abs().max())  # what bf16 itself costs this model
    assert float((logits(model, x).float() - ref).abs().max()) <= 2 * gap


def test_three_norm_post_ln_block_with_cross_attention():
    """A BART decoder layer (self-attention, cross-attention, MLP: three post-norms) run with encoder
    states: all three norms are found in call order, the inner two made plain, and the construction
    is the identity; the cross-attention's key / value read the encoder states and are not folded."""
    from transformers import BartConfig
    from transformers.models.bart.modeling_bart import BartDecoderLayer

    cfg = BartConfig(d_model=32, decoder_attention_heads=4, decoder_ffn_dim=37, vocab_size=VOCAB)
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([perturb(BartDecoderLayer(cfg, layer_idx=i)) for i in range(2)])
    g = torch.Generator().manual_seed(5)
    call = ((), {"hidden_states": torch.randn(2, 7, 32, generator=g),
                 "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)})
    lay, why = encoder.find_post_ln(layers[1], call)
    assert lay is not None, why
    assert lay.norms == ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
    assert set(lay.writers) == {f"{m}.{p}" for m in ("self_attn.out_proj", "encoder_attn.out_proj", "fc2")
                                for p in ("weight", "bias")}
    assert "encoder_attn.q_proj" in lay.mid_readers and "encoder_attn.k_proj" not in lay.mid_readers
    assert encoder.check_post_ln(layers, {1: call}, lay) < 1e-5
    # without the encoder states (a causal LM) the cross-attention and its norm never run: they are
    # neutralised in the new layer (parameters zeroed, norm plain), which is then the identity both
    # without the encoder states and with them
    causal = ((), {"hidden_states": call[1]["hidden_states"]})
    lay, why = encoder.find_post_ln(layers[1], causal)
    assert lay is not None, why
    assert lay.norms == ("self_attn_layer_norm", "final_layer_norm")
    assert lay.idle_norms == ("encoder_attn_layer_norm",)
    assert {k.rpartition(".")[0] for k in lay.idle} == {f"encoder_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert encoder.check_post_ln(layers, {1: causal}, lay) < 1e-5
    assert encoder.check_post_ln(layers, {1: call}, lay) < 1e-5
    # the neutralising is what makes it hold with encoder states: without it, it does not
    bare = dataclasses.replace(lay, idle=(), idle_norms=())
    assert encoder.check_post_ln(layers, {1: causal}, bare) < 1e-5
    assert encoder.check_post_ln(layers, {1: call}, bare) > 1e-2


def test_layer_indices_kept_outside_the_blocks_follow_their_layers(tmp_path):
    """NeoMME keeps, on the model, the indices of the layers that get value embeddings (derived from
    ``layer_types`` at construction). They follow their base layers to the new positions, so the
    deeper model is function preserving and reloads as it is; a plan that would make a reload route
    them to another layer is warned about as not function preserving."""
    pytest.importorskip("transformers.models.neomme")
    model = build("neomme")
    x = ids()
    ref = logits(model, x)
    assert model.model.value_embedding_layers == {3}
    DepthUpscaler(model).upscale(method="copy", num_layers=6, layout="top")
    assert model.model.value_embedding_layers == {5}  # base layer 3, now at 5
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.model.value_embedding_layers == {5}
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=0, rtol=0)
    # a copy of the last (full-attention) layer right after it: a reload gives both value embeddings
    model = build("neomme")
    with pytest.warns(ArchitectureWarning, match="value_embedding_layers"):
        DepthUpscaler(model).upscale(method="copy", positions=[3])
    assert model.model.value_embedding_layers == {3, 4}  # what from_pretrained builds
