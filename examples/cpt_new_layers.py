#!/usr/bin/env python
"""Continued pre-training of the new layers only, with a plain ``transformers.Trainer``.

Upscale SmolLM2-135M-Instruct (or load an upscaled model with ``--model``), freeze everything but
the layers hf_deepen inserted, train on a plain text file, and report held-out loss before/after.

    python examples/cpt_new_layers.py --max-steps 30            # SmolLM2, a few minutes on a laptop CPU
    python examples/cpt_new_layers.py --text my_corpus.txt --out runs/cpt
    python examples/cpt_new_layers.py --tiny --max-steps 2      # seconds (tests)

Default text: the English documentation that ships with Python (``pydoc_data.topics``).
Writes ``<out>/model`` (model + tokenizer, provenance kept) and ``<out>/metrics.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import _common
import torch

from hf_deepen.training import freeze_base_layers, trainable_summary


def main(argv=None):
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--text", default=None, help="plain text file (default: pydoc_data.topics written to <out>)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the text")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks for the before/after loss")
    args = p.parse_args(argv)
    if args.tiny and args.max_chars is None:
        args.max_chars = 40_000
    torch.manual_seed(args.seed)

    model, tok = _common.load_upscaled(args)
    text_path = Path(args.text) if args.text else _common.write_pydoc_text(Path(args.out) / "pydoc_topics.txt")
    text = text_path.read_text(encoding="utf-8")[: args.max_chars]
    train_ds, eval_ds = _common.lm_blocks(text, tok, args.seq_len, max_eval_blocks=args.eval_blocks, seed=args.seed)
    print(f"text: {text_path} ({len(text):,} chars) -> {len(train_ds)} train / {len(eval_ds)} held-out blocks")

    counts = freeze_base_layers(model)  # everything but the new layers: requires_grad=False
    print(trainable_summary(model))

    from transformers import Trainer, default_data_collator

    trainer = Trainer(
        model=model, args=_common.training_arguments(args), train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=default_data_collator,
    )
    before = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {before:.4f} (ppl {math.exp(before):.2f})")
    snapshot = {n: q.detach().clone() for n, q in model.named_parameters() if not q.requires_grad}
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss after:  {after:.4f} (ppl {math.exp(after):.2f})")
    base_changed = [n for n, q in model.named_parameters() if n in snapshot and not torch.equal(q, snapshot[n])]
    assert not base_changed, f"frozen parameters changed: {base_changed[:3]}"

    out = Path(args.out)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    _common.write_metrics(out, {
        "eval_loss_before": before, "eval_loss_after": after, "steps": args.max_steps,
        "trainable": counts["trainable"], "total": counts["total"], "new_layers": counts["new_layers"],
        "frozen_unchanged": True, "model_dir": str(out / "model"),
    })


if __name__ == "__main__":
    main()
