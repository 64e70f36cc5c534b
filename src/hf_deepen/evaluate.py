"""Held-out perplexity of a causal LM on a plain text file (``hf-deepen eval``).

The text is tokenised once, cut into non-overlapping blocks of ``block_size`` tokens (the last,
shorter block dropped), and the mean next-token negative log-likelihood over all predicted tokens
is reported with its perplexity. A tokenizer that prepends a BOS token to its inputs (Gemma) gets
BOS as the first token of every block (:func:`bos_prefix`): Gemma-3 without it scores ~2 nats worse. For the paper's downstream tasks use lm-eval-harness (see the
README); this is the quick, offline check.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens), 1-D: one long stream that the callers cut into
    blocks, so the tokenizer's warning about sequences longer than the model's maximum is silenced
    (``verbose=False``, for transformers' tokenizers; any other callable is called without it): no block
    is ever that long."""
    from transformers import PreTrainedTokenizerBase

    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    return tokenizer(text, return_tensors="pt", add_special_tokens=False, **quiet).input_ids[0]


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if ``tokenizer`` prepends BOS when it adds special tokens (Gemma), else ``[]``.

    Models trained that way see BOS at position 0 of every sequence; blocks cut from one long token
    stream must start with it too (Llama-style SmolLM2 tokenizers add nothing: ``[]``).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        with_special = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
    except TypeError:  # a minimal tokenizer without add_special_tokens
        return []
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def heldout_loss(model: Any, tokenizer: Any, text: str, block_size: int = 256, batch_size: int = 4,
                 max_blocks: int | None = None) -> dict[str, float]:
    from .errors import ConfigError

    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2, got {block_size}")
    ids = text_ids(tokenizer, text)
    prefix = bos_prefix(tokenizer)
    body = block_size - len(prefix)
    n = ids.numel() // body
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one block of {block_size}: lower block_size")
    blocks = ids[: n * body].view(n, body)
    if prefix:
        blocks = torch.cat([torch.full((n, 1), prefix[0], dtype=blocks.dtype), blocks], dim=1)
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = blocks[i : i + batch_size].to(device)
            logits = model(b).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += b[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "blocks": n}
