"""Peak memory of the CLI's default upscale (issue 13): does ``hf-deepen upscale DIR --out OUT``
stream, and how much RSS does it take, against the checkpoint's size?

A Llama-shaped checkpoint of random bf16 weights (``scale.py``'s ``1b6`` shape: 16 layers, 1.56 GiB)
is written to ``--work`` (not kept in the repository), then upscaled 16 -> 24 layers by the CLI in a
child process, with no flag (the default) and, unless ``--no-in-memory``, with ``--no-streaming``.
Each child's peak RSS is its ``VmHWM`` (``ru_maxrss`` is kept too); the report's per-stage seconds are kept.

    python benchmarks/cli_memory.py [--shape 1b6] [--work /tmp/cli-mem] [--no-in-memory]

Writes ``benchmarks/results/cli_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scale import SHAPES, write_synthetic  # noqa: E402

CHILD = """
import resource, sys, time, json
t = time.perf_counter()
from hf_deepen.cli import main
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux keeps the parent's RSS at fork in ru_maxrss across exec, so a parent
# that has just written the checkpoint would floor it (a first run here read 1,408 MB instead of ~0.8 GB)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_bytes": hwm,
                  "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(src: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-c", CHILD, "upscale", str(src), "--out", str(out), "--no-progress",
            "--report", str(out.parent / (out.name + ".report.json")), *extra]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    rep = json.loads((out.parent / (out.name + ".report.json")).read_text())
    run_yaml = (out / "hf_deepen_run.yaml").read_text()
    r["streamed"] = "streaming: true" in run_yaml
    r["timings"] = rep.get("timings", {})
    r["flags"] = extra
    return r


def synthetic_checkpoint(work: Path, shape: str) -> tuple[Path, int]:
    """``scale.py``'s synthetic checkpoint of ``shape`` under ``work`` (written once, reused while its
    ``done`` marker is there) and its size in bytes."""
    src = work / f"src-{shape}"
    if not (src / "done").exists():
        shutil.rmtree(src, ignore_errors=True)
        write_synthetic(src, SHAPES[shape], layers_per_shard=4)
        (src / "done").write_text("")
    return src, sum(f.stat().st_size for f in src.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b6")
    ap.add_argument("--work", default="/tmp/cli-mem")
    ap.add_argument("--no-in-memory", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "cli_memory.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    src, size = synthetic_checkpoint(work, args.shape)
    runs = {"default": run(src, work / "out-default", [])}
    if not args.no_in_memory:
        runs["no_streaming"] = run(src, work / "out-mem", ["--no-streaming"])
    for r in runs.values():
        r["peak_rss_over_checkpoint"] = r["peak_rss_bytes"] / size
    doc = {"shape": args.shape, "layers": f"{SHAPES[args.shape]['num_hidden_layers']} -> default (L + L//2)",
           "checkpoint_bytes": size, "checkpoint_gib": size / 2**30,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "runs": runs}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    shutil.rmtree(work / "out-default", ignore_errors=True)
    shutil.rmtree(work / "out-mem", ignore_errors=True)
    return doc


if __name__ == "__main__":
    main()
