#!/usr/bin/env python
"""Multi-process continued pre-training of the new layers with a plain Accelerate loop.

The same script runs on one CPU, on several CPU processes, on GPUs with DDP, FSDP or DeepSpeed:
the strategy comes from ``accelerate launch`` (its flags or a config file), not from the code.

    # 2 CPU processes (torch.distributed with gloo), as the tests run it:
    accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_cpt.py --cpu --tiny
    #   = accelerate launch --multi_gpu --num_processes 2 examples/accelerate_cpt.py --cpu --tiny
    #   = torchrun --nproc_per_node 2 examples/accelerate_cpt.py --cpu --tiny
    # NB: `accelerate launch --num_processes 2 --cpu` starts ONE process in accelerate 1.x unless it is
    # given an MPI hostfile (--mpirun_hostfile, with mpirun installed); the torchrun-based launch
    # above plus the script's --cpu gives 2 processes on one machine without MPI.
    # GPUs: FSDP (FSDP2) or DeepSpeed ZeRO-2/3, see the config files and docs/training.md
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/accelerate_cpt.py --model runs/upscaled
    accelerate launch --config_file examples/accelerate_deepspeed.yaml examples/accelerate_cpt.py --model runs/upscaled

Order matters for sharded training: the model is loaded and upscaled once (main process first,
saved to ``<out>/upscaled``; every process then loads that directory), the base layers are
frozen *before* ``accelerator.prepare``, and the optimizer gets only the trainable parameters.
Writes ``<out>/model`` (full weights, gathered from all processes) and ``<out>/metrics.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import _common
import torch

from hf_deepen.training import freeze_base_layers, trainable_summary


def main(argv=None):
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--text", default=None, help="plain text file (default: pydoc_data.topics)")
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--cpu", action="store_true",
                   help="force CPU processes (gloo); needed for multi-process CPU runs, see the docstring")
    p.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                   help="overrides the launcher's setting")
    args = p.parse_args(argv)
    if args.tiny and args.max_chars is None:
        args.max_chars = 40_000

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"mixed_precision": args.mixed_precision} if args.mixed_precision else {}
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=args.cpu, **kw)
    set_seed(args.seed)
    out = Path(args.out)
    log = acc.print

    # 1. one upscale, on the main process; every process loads the saved result
    model_dir = Path(args.model) if args.model else out / "upscaled"
    with acc.main_process_first():
        if acc.is_main_process and not args.model and not (model_dir / "config.json").exists():
            model, tok = _common.load_upscaled(args, progress=True)
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            del model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)

    # 2. data: the same blocks on every process; the prepared DataLoaders shard them
    text_path = Path(args.text) if args.text else out / "pydoc_topics.txt"
    with acc.main_process_first():
        if not args.text and acc.is_main_process:
            _common.write_pydoc_text(text_path)
    text = text_path.read_text(encoding="utf-8")[: args.max_chars]
    train_ds, eval_ds = _common.lm_blocks(text, tok, args.seq_len, max_eval_blocks=args.eval_blocks, seed=args.seed)
    cols = ["input_ids", "attention_mask", "labels"]
    train_ds.set_format("torch", columns=cols)
    eval_ds.set_format("torch", columns=cols)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True)
    eval_dl = torch.utils.data.DataLoader(eval_ds, batch_size=args.batch_size)

    # 3. freeze before prepare (FSDP/DeepSpeed shard what they are given), optimizer on trainables only
    counts = freeze_base_layers(model, verbose=acc.is_main_process)
    log(trainable_summary(model))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    model, opt, train_dl, eval_dl = acc.prepare(model, opt, train_dl, eval_dl)
    log(f"accelerate: {acc.state.distributed_type} x{acc.num_processes} on {acc.device},"
        f" mixed precision {acc.mixed_precision}")

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad():
            for batch in eval_dl:
                loss = model(**batch).loss
                losses.append(acc.gather_for_metrics(loss.detach().repeat(batch["input_ids"].shape[0])))
        model.train()
        return torch.cat(losses).float().mean().item()

    before = evaluate()
    log(f"held-out loss before: {before:.4f} (ppl {math.exp(before):.2f})")
    model.train()
    step = 0
    while step < args.max_steps:
        for batch in train_dl:
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            if acc.sync_gradients:
                step += 1
                if step % max(1, args.max_steps // 10) == 0 or step == args.max_steps:
                    log(f"step {step}/{args.max_steps} loss {acc.reduce(loss.detach(), 'mean').item():.4f}")
                if step >= args.max_steps:
                    break
    after = evaluate()
    log(f"held-out loss after:  {after:.4f} (ppl {math.exp(after):.2f})")

    # 4. save: get_state_dict gathers sharded (FSDP/ZeRO-3) weights; only the main process writes
    acc.wait_for_everyone()
    state = acc.get_state_dict(model)
    acc.unwrap_model(model).save_pretrained(
        out / "model", is_main_process=acc.is_main_process, save_function=acc.save, state_dict=state
    )
    if acc.is_main_process:
        tok.save_pretrained(out / "model")
        _common.write_metrics(out, {
            "eval_loss_before": before, "eval_loss_after": after, "steps": step,
            "num_processes": acc.num_processes, "distributed_type": str(acc.state.distributed_type),
            "trainable": counts["trainable"], "total": counts["total"], "new_layers": counts["new_layers"],
            "model_dir": str(out / "model"),
        })
    acc.end_training()


if __name__ == "__main__":
    main()
