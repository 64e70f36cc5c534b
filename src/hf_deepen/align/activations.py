r"""Activation-based costs: align units by what they compute on real text, not by their weights.

Weight-based alignment (the default, and the paper's) compares the parameters of two units. Two
units can compute nearly the same thing with different weights (and vice versa), so the model
merging literature also matches units by their **activations** on a small calibration set
(Git Re-Basin's activation matching, ZipIt!'s correlation matching). Here, over the same ``N``
calibration tokens, each layer sees its own input (the base model's residual stream at its depth):

* **MLP neuron** *u*: its hidden activation (the input of ``down``) on every token, ``[N]``.
  Cost ``1 - corr(a_u, b_v)`` (Pearson correlation across tokens, as in ZipIt!): scale-free,
  because neighbouring layers' activations differ in scale.
* **Query head** *h*: what it writes into the residual stream, ``o_h(attn_h(x))``, ``[N, hidden]``
  per token. That is basis-free (a head's internal ``head_dim`` basis is not identifiable from
  weights: ``W_o R^T R W_v`` is the same head for any rotation ``R``), and it already reflects the
  head's K and V. Cost ``1 - cos`` between the two ``[N, hidden]`` contributions, computed without
  materialising them: ``<A_h W_h^T, B_g W'_g^T> = sum((A_h^T B_g) * (W_h^T W'_g))``, with ``A_h``
  the head's pre-``o`` output ``[N, head_dim]`` and ``W_h`` its ``o`` columns.
* **KV group**: the optimal cost of matching its query heads (the nested problem of
  :func:`~hf_deepen.align.align_layers`); no separate K/V term, since head outputs include them.

The plans are then applied to the weights exactly as weight-based plans are. The streaming path
runs the same pass one layer at a time (:mod:`hf_deepen.pipeline.layerwise`); MoE layers are not
supported.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..arch.spec import HeadShape
from ..errors import ConfigError, UnsupportedArchitectureError

Tensor = torch.Tensor


def _module_of(spec: Any, role: str, layer: torch.nn.Module) -> torch.nn.Module:
    name = spec.tensors.get(role, "")
    if name.endswith(".weight"):
        try:
            return layer.get_submodule(name[: -len(".weight")])
        except AttributeError:
            pass
    raise UnsupportedArchitectureError(
        f"activation-based alignment: the spec {spec.name!r} maps role {role!r} to {name!r}, not a module's weight;"
        " use align_on='weights' for this family"
    )


@contextmanager
def _capturing(spec: Any, layers: torch.nn.ModuleList, indices: Sequence[int]) -> Iterator[dict[int, dict[str, list]]]:
    """Record, for each layer in ``indices``, the inputs of its ``o`` and ``down`` projections."""
    store: dict[int, dict[str, list]] = {i: {"o": [], "down": []} for i in indices}
    handles = []

    def hook(i: int, role: str):
        def fn(module, args):
            x = args[0].detach()
            store[i][role].append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32))

        return fn

    try:
        for i in indices:
            for role in ("o", "down"):
                handles.append(_module_of(spec, role, layers[i]).register_forward_pre_hook(hook(i, role)))
        yield store
    finally:
        for h in handles:
            h.remove()


def calibration_ids(tokenizer: Any, calibration: Any, num_tokens: int, seq_len: int) -> Tensor:
    """``[B, seq_len]`` token ids from ``calibration``: token ids (a 2-D tensor, used as is) or text
    (a string or a list of strings: tokenised, joined and cut into blocks, up to ``num_tokens``)."""
    if isinstance(calibration, Tensor):
        if calibration.ndim != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise ConfigError("calibration token ids must be a 2-D integer tensor [batch, seq_len]")
        return calibration.long()
    if isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not all(isinstance(t, str) for t in calibration):
        raise ConfigError("calibration must be text (a string or a list of strings) or a 2-D tensor of token ids")
    if tokenizer is None:
        raise ConfigError(
            "calibration text needs a tokenizer: use DepthUpscaler.from_pretrained(...), pass tokenizer=..., or"
            " pass token ids"
        )
    sep = tokenizer.eos_token or "\n\n"
    from ..evaluate import text_ids

    ids = text_ids(tokenizer, sep.join(calibration))
    n = min(ids.numel(), num_tokens) // seq_len
    if n == 0:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than one block of {seq_len}: give more text"
        )
    return ids[: n * seq_len].view(n, seq_len)


def calibration_seq_len(config: Any) -> int:
    """Calibration block length: 256 tokens, or the model's context if shorter."""
    return min(256, getattr(config, "max_position_embeddings", None) or 256)


def activation_ids(cfg: Any, config: Any, calibration: Any, tokenizer: Any) -> Tensor:
    """The token ids of an ``align_on="activations"`` run (``calibration`` is required)."""
    if calibration is None:
        raise ConfigError(
            "align_on='activations' needs calibration text: upscale(calibration=[...texts...]) (or token ids);"
            " on the command line --calibration FILE"
        )
    return calibration_ids(tokenizer, calibration, cfg.calibration_tokens, calibration_seq_len(config))


@torch.no_grad()
def capture_activations(
    model: torch.nn.Module, spec: Any, layers: torch.nn.ModuleList, indices: Sequence[int], ids: Tensor,
    batch_size: int = 4, device: torch.device | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Run ``model`` on ``ids`` and return, per layer index, ``{"o": [N, q_dim], "down": [N, I]}``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        with _capturing(spec, layers, sorted(set(indices))) as store:
            for s in range(0, ids.shape[0], batch_size):
                model(ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return {i: {r: torch.cat(v) for r, v in d.items()} for i, d in store.items()}


def _corr_cost(a: Tensor, b: Tensor) -> Tensor:
    """``1 - corr`` between the columns of ``a`` ``[N, n]`` and ``b`` ``[N, n]`` (float64)."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return (1.0 - a.T @ b).clamp_min_(0.0)


def activation_costs(
    acts_a: Mapping[str, Tensor], acts_b: Mapping[str, Tensor], o_a: Tensor, o_b: Tensor, shape: HeadShape
) -> dict[str, Tensor]:
    """Cost matrices for :func:`~hf_deepen.align.align_layers` from captured activations.

    ``o_a`` / ``o_b``: the two layers' canonical ``o`` weights ``[hidden, num_heads * head_dim]``.
    Returns ``{"query": [kv, G, kv, G], "kv": [kv, kv] (zeros), "neurons": [I, I]}``.
    """
    hq, hkv, g, hd = shape.num_heads, shape.num_kv_heads, shape.group_size, shape.head_dim
    A = acts_a["o"].to(torch.float64).reshape(-1, hq, hd)
    B = acts_b["o"].to(torch.float64).reshape(-1, hq, hd)
    Wa = o_a.to(torch.float64).reshape(-1, hq, hd)
    Wb = o_b.to(torch.float64).reshape(-1, hq, hd)
    # Gram blocks: cross[h, k] = <A_h Wa_h^T, B_k Wb_k^T> over all tokens and hidden dims
    AB = torch.einsum("nhd,nke->hkde", A, B)
    WW = torch.einsum("mhd,mke->hkde", Wa, Wb)
    cross = (AB * WW).sum((-1, -2))
    na = (torch.einsum("nhd,nhe->hde", A, A) * torch.einsum("mhd,mhe->hde", Wa, Wa)).sum((-1, -2))
    nb = (torch.einsum("nhd,nhe->hde", B, B) * torch.einsum("mhd,mhe->hde", Wb, Wb)).sum((-1, -2))
    na, nb = na.clamp_min(1e-24).sqrt(), nb.clamp_min(1e-24).sqrt()
    q = (1.0 - cross / (na[:, None] * nb[None, :])).clamp_min(0.0)
    return {
        "query": q.reshape(hkv, g, hkv, g),
        "kv": torch.zeros(hkv, hkv, dtype=torch.float64),
        "neurons": _corr_cost(acts_a["down"], acts_b["down"]),
    }


__all__ = ["activation_costs", "activation_ids", "calibration_ids", "capture_activations"]
