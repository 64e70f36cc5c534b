"""Family x method matrix: every registered architecture spec on a tiny random model.

For each family and method (OpT-DeUS with the exact and the Sinkhorn solver, Avg-DeUS, LLaMA Pro
copy, SOLAR) the model is upscaled in place and checked for:

* function preservation (all methods but SOLAR): logits unchanged, to 1e-5;
* KV-cache consistency: generation logits with and without the cache agree (a stale
  ``layer_idx`` or a per-layer list updated at the wrong place shows up here);
* a save_pretrained / from_pretrained round trip: no missing, unexpected or re-initialised weights,
  identical state dict and logits, per-layer module attributes rebuilt from the config equal to
  those of the upscaled model;
* the saved config: ``num_hidden_layers`` and every per-layer list, at the insertion points.

A shuffled-layer test per family checks the spec's canonical view: permuting KV groups, query heads
within groups and MLP neurons (and, for MoE layers, experts with their router rows and the neurons
inside each expert) through ``to_canonical`` / ``from_canonical`` is a symmetry of the model (same
logits), and exact OT alignment recovers the permutation bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_deepen import DepthUpscaler, UnsupportedArchitectureError
from hf_deepen.align import align_layer_pair
from hf_deepen.arch import ArchitectureWarning, get_module, get_spec
from hf_deepen.surgery import per_layer_fields



pytestmark = pytest.mark.usefixtures("one_thread")


SEED = 0
NUM_LAYERS = 4
ATTN = "eager"
_COMMON = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _common(**kw):
    d = dict(_COMMON)
    for k, v in kw.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_MHA = dict(num_key_value_heads=None, head_dim=None)

# model_type, config kwargs (tiny, GQA where the family supports it; sliding windows and per-layer
# lists made non-trivial so that an insertion at the wrong place is visible)
FAMILIES = {
    "llama": ("llama", _common(attention_bias=True)),
    "mistral": ("mistral", _common(sliding_window=4)),
    "qwen2": ("qwen2", _common(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "qwen3": ("qwen3", _common(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "granite": (
        "granite",
        _common(
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
    ),
    "olmo2": ("olmo2", _common()),
    "smollm3": ("smollm3", _common(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4)),
    "gemma": ("gemma", _common()),
    "gemma2": ("gemma2", _common(sliding_window=4)),
    "gemma3_text": (
        "gemma3_text",
        _common(
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "phi3": ("phi3", _common()),
    "gpt2": (
        "gpt2",
        dict(vocab_size=100, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_inner=48, n_positions=64,
             bos_token_id=1, eos_token_id=2),
    ),
    "gpt_neox": (
        "gpt_neox",
        _common(**_MHA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ),
    "gpt_neox_sequential": ("gpt_neox", _common(**_MHA, use_parallel_residual=False)),
    "opt": (
        "opt",
        dict(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
             word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
}

# MoE: 4 experts, top-2. The Qwen configs have a dense layer (mlp_only_layers), so that the
# dense/sparse layer list is rewritten; Qwen2-MoE's dense layer sits above the insertion points
# (FAMILY_OPTS), so its index moves, and it has a shared expert and a sliding window.
_MOE = dict(num_experts_per_tok=2)
_QWEN_MOE = dict(_MOE, num_experts=4, moe_intermediate_size=24)
FAMILIES.update(
    {
        "mixtral": ("mixtral", _common(**_MOE, num_local_experts=4, sliding_window=4)),
        "qwen2_moe": (
            "qwen2_moe",
            _common(**_QWEN_MOE, shared_expert_intermediate_size=40, mlp_only_layers=[3],
                    use_sliding_window=True, sliding_window=4, max_window_layers=2),
        ),
        "qwen3_moe": ("qwen3_moe", _common(**_QWEN_MOE, mlp_only_layers=[0])),
    }
)
# per-family upscale options for the methods that take a layout (SOLAR fixes its own): the default
# top-half layout would fuse Qwen2-MoE's dense layer 3 with sparse layer 2, which is refused
FAMILY_OPTS = {"qwen2_moe": dict(positions=[0, 1])}

METHODS = {
    "opt-exact": dict(method="opt", solver="exact"),
    "opt-sinkhorn": dict(method="opt", solver="sinkhorn"),
    "avg": dict(method="avg"),
    "copy": dict(method="copy"),
    "solar": dict(method="solar"),
}

# module attributes that a layer derives from the config at construction; after the upscale they
# must equal those of a model rebuilt from the saved config
_LAYER_ATTRS = ("layer_idx", "layer_type", "attention_type", "sliding_window", "is_sliding", "use_rope", "scaling")


def make_model(family: str, **overrides) -> torch.nn.Module:
    model_type, kw = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**kw, **overrides})
    config._attn_implementation = ATTN
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, 100, (2, 10), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def gen_logits(model, ids, use_cache: bool) -> torch.Tensor:
    out = model.generate(
        ids[:, :6],
        attention_mask=torch.ones_like(ids[:, :6]),
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return torch.stack(out.logits, dim=1)


def layer_attrs(model, spec) -> list[dict]:
    out = []
    for layer in get_module(model, spec.layers_path):
        d = {}
        for mname, m in layer.named_modules():
            for a in _LAYER_ATTRS:
                v = getattr(m, a, None)
                if isinstance(v, (int, float, str, bool)):
                    d[f"{mname}.{a}"] = v
        out.append(d)
    return out


def mlp_kinds(model, spec) -> list[str]:
    """Per layer, ``"sparse"`` if its MLP is a mixture of experts, else ``"dense"``."""
    return ["sparse" if hasattr(getattr(layer, "mlp", None), "experts") else "dense"
            for layer in get_module(model, spec.layers_path)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_upscale_matrix(family, method, tmp_path):
    opts = dict(METHODS[method])
    if method != "solar":
        opts.update(FAMILY_OPTS.get(family, {}))
    model = make_model(family)
    ids = inputs()
    ref = logits(model, ids)
    ref_gen = gen_logits(model, ids, use_cache=True)
    fields = per_layer_fields(model.config, get_spec(model), NUM_LAYERS)
    base_lists = {n: list(getattr(model.config, n)) for n in fields}
    base_kinds = mlp_kinds(model, get_spec(model))

    up = DepthUpscaler(model)
    plan = up.plan(**opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArchitectureWarning)
        out = up.upscale(progress=False, **opts)
    assert out is model
    spec = up.spec
    layers = get_module(model, spec.layers_path)
    assert len(layers) == plan.num_layers == model.config.num_hidden_layers > NUM_LAYERS
    preserving = method != "solar"

    new = logits(model, ids)
    if preserving:
        assert max_diff(new, ref) <= 1e-5, f"{family}/{method}: logits changed"

    # cache: generation logits with and without the KV cache agree (and match the base model)
    cached = gen_logits(model, ids, use_cache=True)
    uncached = gen_logits(model, ids, use_cache=False)
    # (two computation orders: float32 rounding only, a stale cache index is off by O(1))
    assert max_diff(cached, uncached) <= 1e-4, f"{family}/{method}: cached generation differs"
    if preserving:
        assert max_diff(cached, ref_gen) <= 1e-5

    # per-layer config lists rebuilt at the insertion points
    expected_lists = {n: [v[s.sources[0]] for s in plan.layers] for n, v in base_lists.items()}
    for n, v in expected_lists.items():
        assert list(getattr(model.config, n)) == v, n
    # MoE: every layer keeps the MLP type of the base layer it comes from (a new one its lower
    # neighbour's), and the rewritten config (mlp_only_layers, ...) builds exactly that list
    expected_kinds = [base_kinds[s.sources[0]] for s in plan.layers]
    assert mlp_kinds(model, spec) == expected_kinds
    assert mlp_kinds(AutoModelForCausalLM.from_config(model.config), spec) == expected_kinds

    # save / reload: nothing missing or re-initialised, identical tensors and logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=ATTN)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved_sd, loaded_sd = model.state_dict(), loaded.state_dict()
    assert saved_sd.keys() == loaded_sd.keys()
    for k, v in saved_sd.items():
        assert torch.equal(v, loaded_sd[k]), f"{k} differs after reload"
    assert max_diff(logits(loaded, ids), new) <= 1e-6
    assert layer_attrs(loaded, spec) == layer_attrs(model, spec)
    assert mlp_kinds(loaded, spec) == expected_kinds

    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.num_hidden_layers == plan.num_layers
    for n, v in expected_lists.items():
        assert list(getattr(cfg, n)) == v, n
    assert cfg.hf_deepen["new_layer_indices"] == plan.new_layer_indices


# ---- the canonical view: permutation symmetry and exact recovery --------------------------------
def _permute(canon, shape, g: torch.Generator, router: bool = True):
    """Permute KV groups, query heads within each group, MLP neurons and MoE experts (with the
    neurons inside each expert and, unless ``router=False``, the router rows), consistently."""
    hkv, gs, hd = shape.num_kv_heads, shape.group_size, shape.head_dim
    pg = torch.randperm(hkv, generator=g)
    heads = torch.cat([pg[j] * gs + torch.randperm(gs, generator=g) for j in range(hkv)])

    def rows(t, order, unit):
        return t.reshape(len(order), unit, *t.shape[1:])[order].reshape(t.shape)

    out = dict(canon)
    for r in ("q", "q_bias"):
        if r in out:
            out[r] = rows(out[r], heads, hd)
    for r in ("k", "k_bias", "v", "v_bias"):
        if r in out:
            out[r] = rows(out[r], pg, hd)
    out["o"] = rows(out["o"].T, heads, hd).T
    if "up" in out:  # a dense MLP (or a MoE layer's shared expert)
        pn = torch.randperm(out["up"].shape[0], generator=g)
        for r in ("gate", "up", "gate_bias", "up_bias"):
            if r in out:
                out[r] = out[r][pn]
        out["down"] = out["down"][:, pn]
    if "experts_up" in out:  # experts as units, with their own neurons inside
        e, i = out["experts_up"].shape[:2]
        pe = torch.randperm(e, generator=g)
        assert not torch.equal(pe, torch.arange(e))  # else the router test below proves nothing
        pns = [torch.randperm(i, generator=g) for _ in range(e)]
        for r in ("experts_gate", "experts_up"):
            out[r] = torch.stack([out[r][pe[j]][pns[j]] for j in range(e)])
        out["experts_down"] = torch.stack([out["experts_down"][pe[j]][:, pns[j]] for j in range(e)])
        if router:
            out["router"] = out["router"][pe]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shuffled_layer_is_recovered(family):
    model = make_model(family)
    spec = get_spec(model)
    shape = spec.head_shape(model.config)
    layer = get_module(model, spec.layers_path)[1]
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    canon_a, unknown = spec.to_canonical(state)
    assert not unknown, f"{family}: spec leaves {unknown} unplaced"
    spec.check_shapes(canon_a, shape, family)
    back = spec.from_canonical(canon_a)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    shuffled = spec.from_canonical(_permute(canon_a, shape, torch.Generator().manual_seed(SEED + 2)))
    assert shuffled.keys() == state.keys()

    # the permutation is a symmetry of the model: the spec's roles are what the model computes
    ids = inputs()
    ref = logits(model, ids)
    layer.load_state_dict(shuffled)
    assert max_diff(logits(model, ids), ref) <= 1e-4, f"{family}: the canonical permutation changed the model"

    # exact OT alignment of the original layer to the shuffled one recovers the shuffle exactly
    canon_b, _ = spec.to_canonical(shuffled)
    aligned = align_layer_pair(canon_a, canon_b, shape, "exact").apply(canon_a)
    for k, v in canon_b.items():
        assert torch.allclose(aligned[k].double(), v.to(torch.float64), rtol=0, atol=1e-6), f"{family}: {k} not recovered"
    re = spec.from_canonical({k: v.to(torch.float32) for k, v in aligned.items()})
    for k, v in shuffled.items():
        assert torch.allclose(re[k], v, rtol=0, atol=1e-6), k


_MOE_FAMILIES = [f for f in FAMILIES if FAMILIES[f][0] in ("mixtral", "qwen2_moe", "qwen3_moe")]


@pytest.mark.parametrize("family", _MOE_FAMILIES)
def test_moe_router_rows_must_follow_experts(family):
    """The shuffle above is a symmetry only because the router rows move with their experts: moving
    the experts alone changes the model (so the symmetry check has the power to catch a spec or an
    alignment that leaves the router behind)."""
    model = make_model(family)
    spec = get_spec(model)
    shape = spec.head_shape(model.config)
    layer = get_module(model, spec.layers_path)[1]
    canon, _ = spec.to_canonical(layer.state_dict())
    assert "experts_up" in canon and "router" in canon
    ids = inputs()
    ref = logits(model, ids)
    layer.load_state_dict(spec.from_canonical(_permute(canon, shape, torch.Generator().manual_seed(SEED + 2), router=False)))
    assert max_diff(logits(model, ids), ref) > 1e-3


# ---- family-specific refusals and warnings ----------------------------------------------------
def test_opt_post_ln_warns_and_is_not_preserving():
    model = make_model("opt", do_layer_norm_before=False)
    ids = inputs()
    ref = logits(model, ids)
    up = DepthUpscaler(model)
    with pytest.warns(ArchitectureWarning, match="post-LN"):
        up.upscale(method="copy", progress=False)
    assert max_diff(logits(model, ids), ref) > 1e-3
    # and the record says so (the config asked for zero-init, the architecture cannot honour it)
    assert model.config.hf_deepen["stages"][-1]["function_preserving"] is False
    assert up.report.function_preserving is False and "function-preserving  False" in up.report.summary()


def test_gpt2_inverse_layer_idx_scaling_is_refused():
    model = make_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        DepthUpscaler(model).upscale(progress=False)


def test_gpt_neox_spec_needs_binding():
    model = make_model("gpt_neox")
    from hf_deepen.arch.registry import _SPECS

    state = get_module(model, "gpt_neox.layers")[0].state_dict()
    with pytest.raises(UnsupportedArchitectureError, match="bind"):
        _SPECS["gpt_neox"].to_canonical(state)


def test_olmo2_with_attention_bias_refuses_ot_but_averages():
    model = make_model("olmo2", attention_bias=True)
    with pytest.raises(UnsupportedArchitectureError, match="q_norm"):
        DepthUpscaler(model).upscale(method="opt", progress=False)
    ids = inputs()
    ref = logits(model, ids)
    DepthUpscaler(model).upscale(method="avg", progress=False)
    assert max_diff(logits(model, ids), ref) <= 1e-5
