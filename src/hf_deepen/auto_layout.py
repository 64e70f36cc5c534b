"""``layout="auto"``: place the new layers from a short calibration pass on real text.

What is measured: the *block influence* of every base layer, ``BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])``
(ShortGPT, Men et al. 2024, arXiv:2403.03853), where ``h_i`` is the residual stream entering layer
``i`` and ``h_{i+1}`` the one leaving it, averaged over the calibration tokens (position 0, the
attention-sink / BOS token, excluded). ShortGPT and "The Unreasonable Ineffectiveness of the Deeper
Layers" (Gromov et al. 2024) find that layers with a low BI (mostly the upper-middle and top layers
of pre-norm models) are redundant: removing them costs little.

What is decided: growth is the mirror image of pruning. A new layer is worth most where the base
model does most of its work, and least where layers are near-identity (there a fused or copied
neighbour adds a second near-identity block). So the new layers are spread **evenly along the
cumulative block influence**: the ``j``-th of ``n`` new layers (``j = 1 .. n``) goes at the last slot
whose running sum of slot scores is still within ``j / n`` of the total, so slots where the hidden state changes a
lot get new layers densely and near-identity stretches get few. With a flat profile this is the
``uniform`` layout exactly, which measured best among the fixed layouts in our quality study, and the
paper's ``top`` layout (all new layers in the low-BI top half) measured worst: the rule moves away
from the worst layout towards where the measurements point, without clustering everything at the
bottom. A slot's score is the mean BI of its two parents for a fusion (new layer built from
``p, p + 1``) and the BI of the copied layer ``p`` for a copy. At most one new layer per slot;
collisions move to the nearest free slot.

One guard: the first layer of a pre-norm model (and often the last) changes the hidden state an order
of magnitude more than the others (turning embeddings into the residual stream, and preparing the
unembedding): SmolLM2-135M's layer 0 has BI 0.99 against a median of 0.04, Gemma-3-270M's 0.82 against
0.05. Uncapped, that outlier alone would pull a third of the new layers to the bottom slots. Each
slot's score is therefore capped at ``SCORE_CAP`` (2) times the median slot score: an outlier counts
as at most two ordinary layers, and the rest of the profile decides.

The reason (scores, positions, rule) is recorded in the plan (``DepthPlan.reason``) and from there in
the model's provenance (``config.hf_deepen["stages"][-1]["layout_reason"]``).
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

import torch

from .errors import ConfigError, PlanError

#: the calibration text used when none is given: CPython's pydoc topics (the language reference)
DEFAULT_CALIBRATION = "pydoc_data.topics"


def default_calibration_text(num_docs: int = 24) -> list[str]:
    """The first ``num_docs`` documents (sorted keys) of CPython's ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:num_docs]]


def calibration_block_ids(tokenizer: Any, calibration: Any, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Token ids ``[B, seq_len]`` for the pass; text blocks start with BOS when the tokenizer adds one."""
    from .align.activations import calibration_ids
    from .evaluate import bos_prefix

    if isinstance(calibration, torch.Tensor):
        return calibration_ids(tokenizer, calibration, num_tokens, seq_len)
    prefix = bos_prefix(tokenizer) if tokenizer is not None else []
    ids = calibration_ids(tokenizer, calibration, num_tokens, seq_len - len(prefix))
    if prefix:
        ids = torch.cat([torch.full((ids.shape[0], 1), prefix[0], dtype=ids.dtype), ids], dim=1)
    return ids


@torch.no_grad()
def block_influence(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor,
                    batch_size: int = 4, device: torch.device | None = None) -> list[float]:
    """``1 - mean cos(h_in, h_out)`` of every decoder layer on ``ids`` (tokens after position 0)."""
    n = len(layers)
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def fn(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            inputs[i] = h

        return fn

    def post(i: int):
        def fn(mod, args, kwargs, out):
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            h_in = inputs.pop(i)
            cos = torch.nn.functional.cosine_similarity(h_in[:, 1:].float(), h_out[:, 1:].float(), dim=-1)
            sums[i] += (1.0 - cos).double().sum().cpu()

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        for s in range(0, ids.shape[0], batch_size):
            x = ids[s : s + batch_size].to(device)
            model(input_ids=x, use_cache=False)
            count += x.shape[0] * (x.shape[1] - 1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ConfigError("layout='auto' needs calibration blocks of at least 2 tokens")
    return (sums / count).tolist()


def auto_layout_ids(cfg: Any, config: Any, calibration: Any, tokenizer: Any) -> tuple[torch.Tensor, str]:
    """The token ids of the block-influence pass (``calibration``, default the pydoc topics) and what they are."""
    source = "the given calibration"
    if calibration is None:
        calibration, source = default_calibration_text(), DEFAULT_CALIBRATION
    from .align.activations import calibration_seq_len

    return calibration_block_ids(tokenizer, calibration, cfg.calibration_tokens, calibration_seq_len(config)), source


def auto_scores(bi: Sequence[float], cfg: Any, ids: torch.Tensor, source: str) -> tuple[list[float], str | None]:
    """Slot scores from the block influence ``bi`` and the reason recorded in the plan."""
    from .layouts import FUSIONS_NEEDING_PAIR, target_depth

    scores = slot_scores(bi, cfg.method in FUSIONS_NEEDING_PAIR)
    n_base = len(bi)
    n_new = target_depth(n_base, cfg) - n_base
    why = None
    if 0 < n_new <= len(scores):
        why = reason(bi, scores, auto_positions(scores, n_new), int(ids.numel()), source)
    return scores, why


def flat_profile(cfg: Any, num_base: int) -> list[float]:
    """One equal score per insertion slot (``num_base - 1`` slots for a fusion, ``num_base`` for a copy):
    the profile on which ``auto`` places its layers as ``uniform`` does."""
    from .layouts import FUSIONS_NEEDING_PAIR

    return [1.0] * (num_base - 1 if cfg.method in FUSIONS_NEEDING_PAIR else num_base)


def flat_scores(cfg: Any, num_base: int, why: str) -> tuple[list[float], str]:
    """No calibration pass could run on the default text (``why``: no tokenizer, or too few tokens):
    a flat profile, i.e. the ``uniform`` layout, with a :class:`~hf_deepen.LayoutWarning` saying why,
    and a fixed reason recorded in the plan (the same on every path)."""
    import warnings

    from .errors import LayoutWarning

    warnings.warn(
        f"layout='auto' ran no calibration pass on the default text ({why}) and uses the uniform layout, its result on a flat"
        " profile: pass calibration= token ids or tokenizer=... to place the layers from data, or"
        " layout='uniform' to choose this explicitly", LayoutWarning, stacklevel=4)
    return flat_profile(cfg, num_base), ("auto without a calibration pass (no usable tokenizer for the default calibration text): a flat"
                    " profile, i.e. the uniform layout")


def slot_scores(bi: Sequence[float], needs_pair: bool) -> list[float]:
    """Score of each insertion slot: mean BI of the two parents (fusions) or the copied layer's BI."""
    if needs_pair:
        return [(bi[p] + bi[p + 1]) / 2 for p in range(len(bi) - 1)]
    return list(bi)


#: a slot's score counts at most this many times the median slot score (see the module doc)
SCORE_CAP = 2.0


def auto_positions(scores: Sequence[float], n_new: int, cap: float = SCORE_CAP,
                   allowed: Collection[int] | None = None) -> list[int]:
    """``n_new`` distinct slots spread evenly along the cumulative ``scores`` (see the module doc).

    ``allowed``: the slots the architecture accepts a new layer in (default: all); the others get no
    score and take no collision (a MoE model's dense/sparse boundary, a layer 0 built differently)."""
    n_slots = len(scores)
    ok = set(range(n_slots)) if allowed is None else {p for p in allowed if 0 <= p < n_slots}
    if not 0 < n_new <= len(ok):
        raise PlanError(f"{n_new} new layers do not fit in the {len(ok)} slots this model accepts"
                        f" ({n_slots} in all): choose fewer new layers (num_layers) or upscale in stages")
    w = [max(float(s), 0.0) if i in ok else 0.0 for i, s in enumerate(scores)]
    acc_w = sorted(w[i] for i in ok)
    med = acc_w[len(acc_w) // 2]
    if med > 0 and cap:
        w = [min(x, cap * med) for x in w]
    total = sum(w)
    if not total > 0:  # a degenerate profile: uniform over the accepted slots
        w = [1.0 if i in ok else 0.0 for i in range(n_slots)]
        total = float(len(ok))
    cum, acc = [], 0.0
    for x in w:
        acc += x
        cum.append(acc)
    chosen: list[int] = []
    taken: set[int] = set()
    for j in range(n_new):
        target = (j + 1) / n_new * total + 1e-9 * total
        # the last slot with a positive score whose running sum has not passed the target
        # (a flat profile: floor((j + 1) * n_slots / n_new) - 1, the uniform layout's formula)
        fit = [i for i, c in enumerate(cum) if w[i] > 0 and c <= target]
        p = fit[-1] if fit else next(i for i, x in enumerate(w) if x > 0)
        if p in taken:  # nearest free slot, the later one on a tie
            free = [q for q in range(n_slots) if q not in taken and q in ok]
            p = min(free, key=lambda q: (abs(q - p), -q))
        taken.add(p)
        chosen.append(p)
    return sorted(chosen)


def reason(bi: Sequence[float], scores: Sequence[float], positions: Sequence[int], tokens: int,
           source: str) -> str:
    top = sorted(range(len(bi)), key=lambda i: -bi[i])[:3]
    low = sorted(range(len(bi)), key=lambda i: bi[i])[:3]
    return (
        f"auto: new layers spread evenly along the cumulative block influence (ShortGPT BI = 1 - cos(h_in, h_out))"
        f" measured on {tokens} calibration tokens of {source}; most change in layers {top}, least in {low};"
        f" slot scores capped at {SCORE_CAP:g}x their median; BI per layer {[round(b, 4) for b in bi]};"
        f" positions {list(positions)}"
    )
