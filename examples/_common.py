"""Shared plumbing of the example scripts: arguments, loading + upscaling, a tiny offline model, text data.

Not part of the library: the examples import it as a sibling module (``import _common``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="an already upscaled model directory (its config carries hf_deepen provenance);"
                        " default: SmolLM2-135M-Instruct from the embedded GGUF, upscaled here")
    p.add_argument("--tiny", action="store_true",
                   help="use a tiny random Llama (hidden 64, 4 layers) and a byte-level tokenizer: seconds, for tests")
    p.add_argument("--method", default="opt", choices=("opt", "avg", "copy", "solar"), help="upscaling method")
    p.add_argument("--num-layers", type=int, default=None, help="target depth (default: L + L//2)")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/" + Path(sys.argv[0]).stem, help="output directory")
    return p


# ---- tiny offline model ---------------------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials), built in memory: no files, no Hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    fast.chat_template = CHATML
    fast.model_max_length = 4096
    return fast


def tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


# ---- loading ---------------------------------------------------------------------------------------
def load_upscaled(args: argparse.Namespace, progress: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)``: an upscaled model (from ``--model``, or upscaled now), float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_deepen import DepthUpscaler, new_layer_indices

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model)
        if not new_layer_indices(model):
            raise SystemExit(f"{args.model} carries no hf_deepen provenance: upscale it first (or drop --model)")
    elif args.tiny:
        tok = tiny_tokenizer()
        up = DepthUpscaler(tiny_model(tok, args.seed), base_model="tiny-random-llama")
        model = up.upscale(method=args.method, num_layers=args.num_layers, tokenizer=tok, progress=False)
    else:
        from hf_deepen.io import default_gguf

        d, g = default_gguf()
        up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)
        tok = up.tokenizer
        model = up.upscale(method=args.method, num_layers=args.num_layers, progress=progress)
        if up.report is not None:
            print(up.report.summary())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    print(f"model: {model.config.num_hidden_layers} layers, new layers {new_layer_indices(model)}")
    return model, tok


# ---- text data -------------------------------------------------------------------------------------
def write_pydoc_text(path: str | os.PathLike, max_chars: int | None = None) -> Path:
    """Write the English documentation that ships with Python (``pydoc_data.topics``) to a text file."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    if max_chars:
        text = text[:max_chars]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def lm_blocks(text: str, tokenizer, seq_len: int, eval_fraction: float = 0.1, max_eval_blocks: int = 32, seed: int = 0):
    """Tokenize ``text``, cut it into ``seq_len``-token blocks, hold out a random ``eval_fraction``.

    Returns two ``datasets.Dataset`` with ``input_ids``, ``attention_mask``, ``labels`` (= inputs).
    """
    from datasets import Dataset

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise SystemExit(f"the text has {len(ids)} tokens: too short for two blocks of {seq_len}; lower --seq-len")
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    random.Random(seed).shuffle(blocks)
    n_eval = min(max_eval_blocks, max(1, math.ceil(n * eval_fraction)))
    ev, tr = blocks[:n_eval], blocks[n_eval:]

    def ds(bs):
        return Dataset.from_dict({"input_ids": bs, "attention_mask": [[1] * seq_len for _ in bs], "labels": bs})

    return ds(tr), ds(ev)


def training_arguments(args: argparse.Namespace, **kw: Any):
    """``TrainingArguments`` for a short CPU run: no reporting, no checkpoints, quiet."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(Path(args.out) / "trainer"), max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, args.max_steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def write_metrics(out: str | os.PathLike, metrics: dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
