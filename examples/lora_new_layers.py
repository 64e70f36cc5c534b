#!/usr/bin/env python
"""LoRA on the new layers only (PEFT), then merge the adapters into the weights and save.

``lora_config_for_new_layers`` builds a ``peft.LoraConfig`` whose ``layers_to_transform`` is the list
of layers hf_deepen inserted, so adapters go on their attention and MLP projections and nowhere else.
Training uses a plain ``transformers.Trainer`` on text (default: ``pydoc_data.topics``).

    python examples/lora_new_layers.py --max-steps 30 --r 16
    python examples/lora_new_layers.py --tiny --max-steps 2     # seconds (tests)

Writes ``<out>/adapter`` (the LoRA adapter alone), ``<out>/merged`` (a plain model with the
adapters merged; it keeps the hf_deepen provenance) and ``<out>/metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import _common
import torch

from hf_deepen import new_layer_indices
from hf_deepen.training import lora_config_for_new_layers, trainable_summary


def main(argv=None):
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument("--text", default=None, help="plain text file (default: pydoc_data.topics written to <out>)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the text")
    p.add_argument("--eval-blocks", type=int, default=8)
    p.set_defaults(lr=1e-3)
    args = p.parse_args(argv)
    if args.tiny and args.max_chars is None:
        args.max_chars = 40_000
    torch.manual_seed(args.seed)

    from peft import get_peft_model
    from transformers import Trainer, default_data_collator

    model, tok = _common.load_upscaled(args)
    text_path = Path(args.text) if args.text else _common.write_pydoc_text(Path(args.out) / "pydoc_topics.txt")
    text = text_path.read_text(encoding="utf-8")[: args.max_chars]
    train_ds, eval_ds = _common.lm_blocks(text, tok, args.seq_len, max_eval_blocks=args.eval_blocks, seed=args.seed)

    before_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora_cfg = lora_config_for_new_layers(model, r=args.r, alpha=args.alpha)
    print(f"LoRA: r={lora_cfg.r} alpha={lora_cfg.lora_alpha} on {sorted(lora_cfg.target_modules)}"
          f" of layers {lora_cfg.layers_to_transform}")
    peft_model = get_peft_model(model, lora_cfg)
    print(trainable_summary(peft_model))

    trainer = Trainer(
        model=peft_model, args=_common.training_arguments(args), train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=default_data_collator,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {before:.4f}  after: {after:.4f}")

    out = Path(args.out)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")

    # which tensors did training + merging change? only the new layers' projections may differ
    new = set(new_layer_indices(merged))
    changed = sorted(k for k, v in merged.state_dict().items() if not torch.equal(v, before_state[k]))
    changed_layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in changed if ".layers." in k})
    outside = [k for k in changed if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) not in new]
    assert not outside, f"LoRA changed tensors outside the new layers: {outside[:3]}"
    print(f"merged: {len(changed)} tensors changed, all in new layers {changed_layers}")
    _common.write_metrics(out, {
        "eval_loss_before": before, "eval_loss_after": after, "steps": args.max_steps,
        "r": args.r, "alpha": args.alpha, "new_layers": sorted(new), "changed_layers": changed_layers,
        "changed_tensors": len(changed), "merged_dir": str(out / "merged"), "adapter_dir": str(out / "adapter"),
    })


if __name__ == "__main__":
    main()
