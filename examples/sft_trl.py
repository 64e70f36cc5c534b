#!/usr/bin/env python
"""Supervised fine-tuning of the new layers only, with TRL's ``SFTTrainer`` on a local JSONL chat file.

Each line of the file is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
(TRL's conversational format); the tokenizer's chat template renders it. The base layers are frozen
with :func:`hf_deepen.training.freeze_base_layers` before the model is handed to ``SFTTrainer``.

    python examples/sft_trl.py --max-steps 20                   # SmolLM2-135M-Instruct, upscaled here
    python examples/sft_trl.py --model runs/cpt_new_layers/model --data my_chats.jsonl
    python examples/sft_trl.py --tiny --max-steps 2             # seconds (tests)

Writes ``<out>/model`` and ``<out>/metrics.json`` (held-out loss on a few conversations, before/after).
"""

from __future__ import annotations

from pathlib import Path

import _common
import torch

from hf_deepen.training import freeze_base_layers, trainable_summary

DATA = Path(__file__).resolve().parent / "data" / "chat.jsonl"


def main(argv=None):
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="JSONL file, one {'messages': [...]} conversation a line")
    p.add_argument("--eval-size", type=int, default=4, help="conversations held out for the before/after loss")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="trade compute for memory (TRL turns it on by default; off here: faster on a CPU)")
    p.set_defaults(lr=1e-4, seq_len=512)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _common.load_upscaled(args)
    ds = load_dataset("json", data_files=args.data, split="train").shuffle(seed=args.seed)
    split = ds.train_test_split(test_size=args.eval_size, seed=args.seed)
    print(f"data: {args.data}: {len(split['train'])} train / {len(split['test'])} held-out conversations")

    counts = freeze_base_layers(model)
    print(trainable_summary(model))

    config = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"), max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_length=args.seq_len, packing=False, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to="none", use_cpu=True,
        seed=args.seed, disable_tqdm=True, bf16=False, fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=split["train"], eval_dataset=split["test"], processing_class=tok
    )
    # SFTTrainer must not have unfrozen anything
    assert sum(q.numel() for q in trainer.model.parameters() if q.requires_grad) == counts["trainable"]
    before = trainer.evaluate()["eval_loss"]
    snap = {n: q.detach().clone() for n, q in model.named_parameters()}
    trainer.train()
    changed = {n for n, q in model.named_parameters() if not torch.equal(q, snap[n])}
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert changed and changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    del snap
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {before:.4f}  after: {after:.4f}")

    msgs = [{"role": "user", "content": "What is LoRA?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
    sample = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"sample reply: {sample!r}")

    out = Path(args.out)
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(out / "model")
    _common.write_metrics(out, {
        "eval_loss_before": before, "eval_loss_after": after, "steps": args.max_steps,
        "trainable": counts["trainable"], "total": counts["total"], "new_layers": counts["new_layers"],
        "changed_tensors": len(changed), "frozen_unchanged": True, "sample_reply": sample, "model_dir": str(out / "model"),
    })


if __name__ == "__main__":
    main()
