"""Encoders (BERT, RoBERTa, ELECTRA, DistilBERT, DeBERTa, ModernBERT, ...): what a discovered spec needs on top.

Discovery (``arch/discover.py``) already finds an encoder's stack, its per-layer config lists and
its OT units; two things are encoder-specific and live here.

**Post-LN blocks (BERT-style).** A BERT layer computes ``h = LN1(x + A(x))`` and
``y = LN2(h + F(h))``. Zeroing the writers ``A``, ``F`` (the attention and MLP output projections)
leaves ``y = LN2(LN1(x))``, which is not ``x``: the input ``x`` of a block is the previous block's
``LN2_p`` output, ``x = g_p * n + b_p`` with ``n`` normalised (mean 0, variance ~1), and
``LN(g * n + b) != g * n + b`` for a trained gain ``g`` that is not constant (the mean and the
variance of ``g * n`` depend on ``n``). No choice of the new block's own norm parameters fixes
that: its output is ``g2 * normalise(g1 * normalise(x) + b1) + b2``, and ``normalise(x)`` is not an
affine function of ``n`` unless ``g_p`` is constant. So, keeping every base layer as it is, a new
post-LN block cannot be the identity (``tests/test_encoders.py`` shows the naive copy-the-norms
construction failing).

What *is* exact is a reparametrisation of the pair (base layer ``p``, new layer): the affine of
``p``'s output norm moves up into the new block.

- base layer ``p``: ``LN2_p`` gain -> 1, bias -> 0, so it outputs ``n``;
- new layer: writers zeroed, ``LN1`` gain -> 1, bias -> 0 (``normalise(n) = n``), ``LN2`` gain and
  bias -> ``g_p``, ``b_p``, so it outputs ``g_p * n + b_p = x``, what layer ``p + 1`` read before;
- the new layer's readers of its input (query, key, value) get ``g_p`` and ``b_p`` folded in
  (``W diag(g_p)``, ``b + W b_p``), and those of ``h`` (the MLP's first Linear) its own ``LN1``
  affine, so they compute on the stream what their source layers computed.

The result is the identity up to LayerNorm's ``eps``: ``normalise(n)`` is ``n`` scaled by
``sqrt((v + eps) / (v + eps * (v + eps)))``, where ``v`` is the variance of the sum layer ``p``
normalised, a relative error of about ``(eps / 2) * |1 / v - 1|`` (no constant gain cancels it, as it
depends on ``v``). For BERT's ``eps = 1e-12`` that is far below float32 rounding; for
``eps = 1e-5`` (RoBERTa-base, XLM-R) it is of the order of float32 rounding of the logits. Measured
on the tiny test models with perturbed norms: max logit difference 4-7e-6 in float32 (logits up to
12), and 1.7e-12 / 1.7e-7 / 1.7e-5 in float64 for eps 1e-12 / 1e-7 / 1e-5. What changes is the
hidden state *between* ``p`` and the new layer (``output_hidden_states``): ``n`` instead of
``g_p * n + b_p``. The construction is checked on the
model itself when the spec is built (one block with perturbed weights, on its captured input):
a layout whose check fails is not used, and zero-init on it is refused.

The structure is found by probing (:func:`find_post_ln`), not by names: the block's norms on the
hidden size that run, in call order (two for BERT, three for a BART decoder layer with its
cross-attention: inner norms are made plain and folded into their readers). A sub-block that does
not run on the probe (a causal-LM BART decoder's cross-attention: there are no encoder states) has
its parameters zeroed and its norm made plain in the new layer, so the new layer is the identity
(up to eps) whether or not it runs (``tests/test_encoders.py`` checks both); the writers are
the parameters whose zeroing leaves ``norm_k(...norm_1(x))`` (given back in call order, as for
pre-LN blocks); the readers are the ``Linear`` s whose input *is* the block input or an inner norm's
output. The whole construction is then checked in float32 (:func:`check_post_ln`). This applies to
masked-LM model types not loaded as their causal-LM class (:func:`_is_encoder`), where a block that
does not fit gets zero-init refused; a causal-LM class gets the construction when it fits.

**A first layer built differently (ModernBERT).** ModernBERT's layer 0 has no attention norm
(``nn.Identity``; the embeddings are normed): a new layer made from layer 0 and placed at index
``>= 1`` must have one, or ``from_pretrained`` rebuilds it with a freshly initialised norm. After
surgery each new layer is compared with what the model class builds at its index, and a module of
the wrong type is replaced by the upper neighbour's (a fresh one if it has none). In a
function-preserving upscale the attention that reads it is zeroed, so this changes nothing.

ModernBERT's global / local attention pattern is ``config.layer_types`` (transformers >= 5;
``global_attn_every_n_layers`` only seeds it): a new layer takes its source's entry and base layers
keep theirs, so the pattern is no longer "every n-th" but every layer attends as it did.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import UnsupportedArchitectureError
from .discover import DiscoveredSpec, _hidden, capture_calls, close_rel, run_block

Tensor = torch.Tensor


@dataclass(frozen=True)
class PostLN:
    """What probing found in a post-LN block: its residual writers, its norms in call order (two for
    BERT; three for a BART decoder layer, whose cross-attention has its own), and for each stage the
    Linears that read it (the block input, then each norm's output but the last), which are folded
    so they see what their source saw."""

    writers: tuple[str, ...]  # parameters whose zeroing leaves ``norms[-1](...norms[0](x))``
    norms: tuple[str, ...]
    readers: tuple[tuple[str, ...], ...] = ()  # readers[0]: of the block input; readers[j]: of norms[j-1]
    #: a sub-block that did not run when probed (a causal-LM decoder's cross-attention: no encoder
    #: states): its parameters are zeroed and its norms made plain in the new layer, so that it is
    #: the identity (up to eps) also when it does run
    idle: tuple[str, ...] = ()
    idle_norms: tuple[str, ...] = ()

    @property
    def attn_norm(self) -> str:
        return self.norms[0]

    @property
    def out_norm(self) -> str:
        return self.norms[-1]

    @property
    def input_readers(self) -> tuple[str, ...]:
        return self.readers[0] if self.readers else ()

    @property
    def mid_readers(self) -> tuple[str, ...]:
        return tuple(r for stage in self.readers[1:] for r in stage)

    @property
    def name(self) -> str:
        return " -> ".join(self.norms)


def _is_norm(mod: torch.nn.Module, hidden: int) -> bool:
    w = getattr(mod, "weight", None)
    return (isinstance(mod, torch.nn.LayerNorm) or "Norm" in type(mod).__name__) and not list(mod.children()) \
        and isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == hidden


def find_post_ln(block: torch.nn.Module, call: tuple) -> tuple[PostLN | None, str]:
    """Probe one block (on a perturbed copy, with its captured ``call``) for the post-LN structure:
    exactly two norms on the hidden size called, and a set of parameters (the residual writers) whose
    zeroing makes the block ``out_norm(attn_norm(x))``; ``(None, why)`` if it is not such a block."""
    from .discover import _units

    args, kwargs = call
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        return None, "the block's input could not be captured"
    hidden = x.shape[-1]
    blk = copy.deepcopy(block).float().eval()
    call = _as_float(call)
    x = kwargs.get("hidden_states", args[0] if args else None).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in blk.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05 * (float(p.abs().mean()) + 0.02))
    names = {id(m): n for n, m in blk.named_modules()}
    order: dict[str, int] = {}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def pre(mod, a):
        n = names[id(mod)]
        order.setdefault(n, len(order))
        if a and isinstance(a[0], torch.Tensor) and n not in inputs:
            inputs[n] = a[0].detach().clone()

    def post(mod, a, out):
        if isinstance(out, torch.Tensor):
            outputs.setdefault(names[id(mod)], out.detach().clone())

    mods = dict(blk.named_modules())
    hooks = [m.register_forward_pre_hook(pre) for m in mods.values()]
    hooks += [m.register_forward_hook(post) for m in mods.values()]
    try:
        y = run_block(blk, call)
    finally:
        for h in hooks:
            h.remove()
    if y is None:
        return None, "the block could not be run on its captured input"
    norms = [n for n in mods if n and _is_norm(mods[n], hidden)]
    idle_norms = tuple(n for n in norms if n not in order)
    norms = [n for n in norms if n in order]
    if len(norms) < 2:
        return None, (f"not a block of norms after its residual adds ({len(norms)} norm(s) on the hidden size run"
                      f"{', not called here: ' + ', '.join(idle_norms) if idle_norms else ''})")
    # modules that never ran (a cross-attention without encoder states): neutralised in the new layer
    idle = tuple(f"{n}.{k}" for n, m in mods.items() if n and n not in order and n not in idle_norms
                 for k, _ in m.named_parameters(recurse=False))
    norms.sort(key=order.get)
    if getattr(mods[norms[-1]], "bias", None) is None:
        return None, f"the output norm {norms[-1]} has no bias (the affine moved up needs one)"

    def target() -> Tensor:
        with torch.no_grad():
            t = x
            for n in norms:
                t = mods[n](t)
            return t

    params = dict(blk.named_parameters())
    perturbed = {k: v.detach().clone() for k, v in params.items()}
    groups = [(r, m, keys) for r, m, keys in _units(blk, order) if m not in norms]
    with torch.no_grad():
        for _, _, keys in groups:
            for k in keys:
                params[k].zero_()
        if not close_rel(run_block(blk, call), target(), 1e-6):
            return None, (f"zeroing every parameter but the norms does not leave {' o '.join(reversed(norms))}(x):"
                          " something writes to the residual stream without a parameter to zero")
        writers: list[str] = []
        for _, _, keys in groups:  # give each group back, in the order the block runs them
            for k in keys:
                params[k].copy_(perturbed[k])
            if not close_rel(run_block(blk, call), target(), 1e-6):
                for k in keys:
                    params[k].zero_()
                writers.extend(keys)
    if not writers:
        return None, "no residual writer found"

    def readers(value: Tensor | None, norm: str) -> tuple[str, ...]:
        if value is None:
            return ()
        biased = getattr(mods[norm], "bias", None) is not None
        out = []
        for n, m in mods.items():
            if isinstance(m, torch.nn.Linear) and n in inputs and inputs[n].shape == value.shape \
                    and torch.equal(inputs[n], value) and f"{n}.weight" not in writers and (m.bias is not None or not biased):
                out.append(n)
        return tuple(sorted(out, key=order.get))

    stages = (readers(x, norms[-1]),) + tuple(readers(outputs.get(n), n) for n in norms[:-1])
    return PostLN(tuple(writers), tuple(norms), stages, idle, idle_norms), ""


def _fold(state: dict[str, Tensor], readers: tuple[str, ...], gain: Tensor, bias: Tensor | None) -> None:
    """``W x`` for ``x = gain * u + bias`` as a function of ``u``: ``W diag(gain)``, ``b + W bias``."""
    for r in readers:
        w = state[f"{r}.weight"]
        w64, g64 = w.to(torch.float64), gain.to(torch.float64)
        if bias is not None:
            state[f"{r}.bias"] = (state[f"{r}.bias"].to(torch.float64) + w64 @ bias.to(torch.float64)).to(w.dtype)
        state[f"{r}.weight"] = (w64 * g64[None, :]).to(w.dtype)


def post_ln_state(new: Mapping[str, Tensor], lower: Mapping[str, Tensor], lay: PostLN) -> dict[str, Tensor]:
    """The function-preserving new layer (see the module docstring) from a made layer ``new`` and the
    state of the base layer it goes after (``lower``, before its output norm is made plain)."""
    out = dict(new)
    g_p = lower[f"{lay.out_norm}.weight"].detach()
    b_p = lower.get(f"{lay.out_norm}.bias")
    b_p = b_p.detach() if b_p is not None else None
    for k in lay.writers + lay.idle:
        out[k] = torch.zeros_like(out[k])
    for norm in lay.idle_norms:
        out[f"{norm}.weight"] = torch.ones_like(out[f"{norm}.weight"])
        if f"{norm}.bias" in out:
            out[f"{norm}.bias"] = torch.zeros_like(out[f"{norm}.bias"])
    _fold(out, lay.input_readers, g_p, b_p)
    for j, norm in enumerate(lay.norms[:-1]):  # each inner norm made plain, its affine folded into its readers
        w = out[f"{norm}.weight"]
        _fold(out, lay.readers[j + 1] if j + 1 < len(lay.readers) else (), w, out.get(f"{norm}.bias"))
        out[f"{norm}.weight"] = torch.ones_like(w)
        if f"{norm}.bias" in out:
            out[f"{norm}.bias"] = torch.zeros_like(out[f"{norm}.bias"])
    dt = out[f"{lay.out_norm}.weight"].dtype
    out[f"{lay.out_norm}.weight"] = g_p.to(dt).clone()
    if b_p is not None:
        out[f"{lay.out_norm}.bias"] = b_p.to(dt).clone()
    return out


def make_plain(layer: torch.nn.Module, lay: PostLN) -> None:
    """Set ``layer``'s output norm to gain 1, bias 0 (its affine has moved to the new layer above)."""
    norm = layer.get_submodule(lay.out_norm)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()


# ---- checking the construction on the model ---------------------------------------------------
def _with_hidden(call: tuple, x: Tensor) -> tuple:
    args, kwargs = call
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def _as_float(call: tuple) -> tuple:
    def f(v: Any) -> Any:
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args, kwargs = call
    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


def check_post_ln(layers: torch.nn.ModuleList, calls: Mapping[int, tuple], lay: PostLN) -> float | None:
    """Max relative difference between ``p(x)`` and ``new(plain_p(x))`` on one block with perturbed
    weights (``None`` if it could not run). Layer 1 is used when there is one: its input is a
    block's output norm, as a new layer's is."""
    i = 1 if 1 in calls else next(iter(calls), None)
    if i is None:
        return None
    # in float32: the construction is checked, not bf16 rounding (which it is exposed to like any layer)
    block = copy.deepcopy(layers[i]).float().eval()
    calls = {i: _as_float(calls[i])}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in block.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.3 * (float(p.abs().mean()) + 0.1))
    y_ref = run_block(block, calls[i])
    state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    new = copy.deepcopy(block)
    new.load_state_dict(post_ln_state(state, state, lay))
    make_plain(block, lay)
    mid = run_block(block, calls[i])
    if y_ref is None or mid is None:
        return None
    y = run_block(new, _with_hidden(calls[i], mid))
    if y is None or y.shape != y_ref.shape:
        return None
    return float((y.float() - y_ref.float()).abs().max()) / (1.0 + float(y_ref.float().abs().max()))


#: relative tolerance of :func:`check_post_ln`: float32 rounding of three norms, plus ``10 * eps`` of the norm
POST_LN_TOL = 1e-5


def _norm_eps(layer: torch.nn.Module, lay: PostLN) -> float:
    norm = layer.get_submodule(lay.out_norm)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 0.0
    return float(eps) if isinstance(eps, (int, float)) else 0.0


# ---- the spec -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec(DiscoveredSpec):
    """A discovered spec for an encoder: post-LN zero-init by reparametrisation (``post_ln``), and
    new layers rebuilt to the module structure of their index (see the module docstring).

    ``post_ln_refused`` is why a post-LN block gets no function-preserving construction (zero-init
    is then refused with that reason); ``None`` when none was needed or it was found."""

    post_ln: PostLN | None = None
    post_ln_refused: str | None = None
    #: ``check_rebuild`` skips its per-position block comparison: ``after_surgery`` gives each new layer
    #: the modules its class builds at its index (ModernBERT's layer 0), and the tests reload it
    rebuilds_layers: ClassVar[bool] = True
    # the plan of the upscale in progress and whether its new layers were built post-LN preserving,
    # shared by the copies ``for_state`` makes (set by ``check_plan`` / ``make_layer``)
    pending: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def can_preserve(self, config: Any) -> bool:
        if self.post_ln is not None:
            return True
        return self.post_ln_refused is None and super().can_preserve(config)

    def zero_target(self, requested: str) -> str:
        if self.post_ln_refused is not None:
            raise UnsupportedArchitectureError(
                f"{self.name}: zero-init cannot make a new layer the identity here ({self.post_ln_refused});"
                " pass zero_init=False for copy / avg / opt layers that are not function preserving"
            )
        return super().zero_target(requested)

    def zero_values(self, requested: str) -> dict[str, float]:
        if self.post_ln is not None:
            self.zero_target(requested)
            return {k: 0.0 for k in self.post_ln.writers}
        if self.post_ln_refused is not None:  # (called with zero_init off too; upscale refuses it on)
            return {}
        return super().zero_values(requested)

    def check_plan(self, plan: Any, config: Any) -> None:
        super().check_plan(plan, config)
        self.pending.clear()
        self.pending["plan"] = plan

    def make_layer(self, method: str, sources: list[Mapping[str, Tensor]], shape: Any, cfg: Any,
                   zero: Mapping[str, float] | None = None, dtype: torch.dtype = torch.float64, **context: Any):
        keep = {}
        if self.post_ln is not None and cfg.zero_init and method != "solar":
            # read before fusing: a streaming/consuming source hands its tensors over to the fusion
            keep = {f"{self.post_ln.out_norm}.{p}": sources[0][f"{self.post_ln.out_norm}.{p}"].detach().clone()
                    for p in ("weight", "bias")}
        res = super().make_layer(method, sources, shape, cfg, zero, dtype, **context)
        if keep:
            res.canon = post_ln_state(res.canon, keep, self.post_ln)
            res.diagnostics["post_ln"] = (f"writers zeroed, {self.post_ln.out_norm} affine moved up from the layer below"
                                          " (its norm set to gain 1, bias 0): the identity up to LayerNorm eps")
            self.pending["post_ln"] = True
        return res

    def after_surgery(self, model: Any, layers: Any) -> None:
        super().after_surgery(model, layers)
        plan = self.pending.pop("plan", None)
        new = plan.new_layer_indices if plan is not None and len(layers) == plan.num_layers else []
        rebuild_modules(layers, self.layer_config(model.config), new)
        if self.post_ln is not None and self.pending.pop("post_ln", False):
            for i in new:  # in order: a run of new layers hands the affine up to the last one
                make_plain(layers[i - 1], self.post_ln)
            dtype = layers[new[0]].get_submodule(self.post_ln.out_norm).weight.dtype if new else torch.float32
            if torch.finfo(dtype).bits < 32:
                import warnings

                from .spec import ArchitectureWarning

                warnings.warn(
                    f"{self.name}: post-LN new layers in {dtype}: the hidden state below each new layer is normalised"
                    f" once more, after a {dtype} rounding, so outputs match the base model to {dtype} rounding, not bit"
                    " for bit (upscale in float32 and cast afterwards for the float32 guarantee)",
                    ArchitectureWarning, stacklevel=3,
                )


def rebuild_modules(layers: torch.nn.ModuleList, config: Any, new: list[int]) -> list[str]:
    """Give each new layer the submodule types its class builds at its index (ModernBERT's layer-0
    ``Identity`` attention norm becomes a LayerNorm at index >= 1), taken from the layer above when it
    has one of that type; returns ``"i.name"`` for each module replaced."""
    import inspect

    done: list[str] = []
    for i in new:
        layer = layers[i]
        try:
            params = list(inspect.signature(type(layer).__init__).parameters)
            if len(params) < 3 or params[2] not in ("layer_idx", "layer_id", "layer_index"):
                return done
            with torch.device("meta"):
                fresh = type(layer)(config, i)
        except Exception:  # noqa: BLE001 - not built as cls(config, layer_idx): leave it
            return done
        want = dict(fresh.named_modules())
        have = dict(layer.named_modules())
        above = dict(layers[i + 1].named_modules()) if i + 1 < len(layers) else {}
        for name, mod in want.items():
            if not name or name not in have or type(have[name]) is type(mod):
                continue
            if name in above and type(above[name]) is type(mod):
                repl = copy.deepcopy(above[name])
            else:
                p = next(layer.parameters())
                repl = type(layer)(config, i).get_submodule(name).to(device=p.device, dtype=p.dtype)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, repl)
            done.append(f"{i}.{name}")
            have = dict(layer.named_modules())
    return done


def _first_special(sigs: tuple) -> bool:
    """Layer 0 built differently, the rest alike (ModernBERT and its decoder: no attention norm at 0)."""
    return len(sigs) > 2 and sigs[0] != sigs[1] and len(set(sigs[1:])) == 1


def _is_encoder(model: torch.nn.Module) -> bool:
    """A masked-LM model type loaded as anything but its causal-LM class (``BertForMaskedLM``,
    ``BertModel``, ``RobertaForSequenceClassification``; not ``BertLMHeadModel`` or ``BartForCausalLM``,
    which are left to the decoder rules when no post-LN construction is found)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    mt = getattr(model.config, "model_type", None)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt, ())
    causal = (causal,) if isinstance(causal, str) else tuple(causal)
    return mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and type(model).__name__ not in causal


def encoder_spec(spec: DiscoveredSpec, model: torch.nn.Module, layers: torch.nn.ModuleList) -> EncoderSpec | None:
    """``spec`` as an :class:`EncoderSpec` when ``model`` is an encoder (a masked-LM model type), its
    blocks are post-LN with a known layout, or its layer 0 alone is built differently; ``None``
    otherwise (the discovered spec is used as it is)."""
    # some block is not the identity with everything zeroed (a norm after the residual add)
    post_ln = bool(spec.facts) and any(f.writers is None for f in spec.facts.values())
    first_special = _first_special(spec.layer_signatures)
    lay, refused = None, None
    if post_ln:
        calls = capture_calls(model, layers, spec.layer_config(model.config))
        i = 1 if 1 in calls else next(iter(calls), None)
        lay, why = find_post_ln(layers[i], calls[i]) if i is not None else (None, "no block input captured")
        if lay is not None:
            err = check_post_ln(layers, calls, lay)
            if err is None or err > POST_LN_TOL + 10 * _norm_eps(layers[i], lay):
                why = (f"moving the output norm's affine into the new layer did not give the identity on this"
                       f" model (relative error {err})")
                lay = None
        if lay is None and _is_encoder(model):  # (a decoder keeps the discovered per-layer rule)
            refused = f"the block is not the identity with its writers zeroed, and not a post-LN block hf_deepen can handle: {why}"
    if not (_is_encoder(model) or lay is not None or first_special):
        return None
    kw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    kw["notes"] = (spec.notes + (f"; post-LN ({lay.name}): zero-init moves the output norm's affine up"
                                 if lay else "")).strip("; ")
    return EncoderSpec(**kw, post_ln=lay, post_ln_refused=refused)
