"""Overlap against memory in the streaming pipeline (issue 13.4), A/B in one run.

The CLI default upscale of ``cli_memory.py``'s 1.56 GiB bf16 checkpoint (``scale.py``'s ``1b6``
shape), restricted to two adjacent new layers (``--positions 7,8``: the second pair shares a layer
with the first) so a run takes about two minutes, in child processes:

- ``ref``: another source tree (``--ref-src``, e.g. main before the pipeline: no overlap);
- ``read_ahead=0``: this tree's default (the next pair's I/O is started in the page cache while the
  current pair aligns, the shard writer runs in the background, nothing more held in memory);
- ``read_ahead=1``: also one source layer read ahead into memory on a thread.

Each child's peak RSS is its ``ru_maxrss``; the report's per-stage seconds are kept.

    python benchmarks/pipeline_overlap.py --ref-src /work/main/src [--work /tmp/cli-mem]

Writes ``benchmarks/results/pipeline_overlap.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_memory import synthetic_checkpoint  # noqa: E402

CHILD = """
import json, os, resource, sys, time
t = time.perf_counter()
if os.environ.get("READ_AHEAD"):
    import hf_deepen.pipeline.source as s
    s.SafetensorsSource.read_ahead = int(os.environ["READ_AHEAD"])
from hf_deepen.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(src: Path, out: Path, tree: str, env_extra: dict[str, str], positions: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    report = out.parent / (out.name + ".report.json")
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1", **env_extra}
    p = subprocess.run([sys.executable, "-c", CHILD, "upscale", str(src), "--out", str(out), "--no-progress",
                        "--positions", positions, "--report", str(report)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["timings"] = {k: round(v, 3) for k, v in json.loads(report.read_text())["timings"].items()}
    shutil.rmtree(out, ignore_errors=True)
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-src", required=True, help="the source tree to compare with (src/ of another checkout)")
    ap.add_argument("--ref-label", default="main before the pipeline")
    ap.add_argument("--work", default="/tmp/cli-mem")
    ap.add_argument("--positions", default="7,8")
    ap.add_argument("--out", default=str(HERE / "results" / "pipeline_overlap.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    src, size = synthetic_checkpoint(work, "1b6")
    variants = {"ref": (args.ref_src, {}), "read_ahead=0": (str(SRC), {"READ_AHEAD": "0"}),
                "read_ahead=1": (str(SRC), {"READ_AHEAD": "1"})}
    runs = {}
    for name, (tree, env) in variants.items():
        runs[name] = r = run(src, work / "out-overlap", tree, env, args.positions)
        r["peak_rss_over_checkpoint"] = r["peak_rss_bytes"] / size
        print(name, json.dumps(r), flush=True)
    load = os.getloadavg()
    commit = lambda d: subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"], capture_output=True,  # noqa: E731
                                      text=True).stdout.strip()
    doc = {"shape": "1b6", "positions": args.positions, "checkpoint_bytes": size,
           "ref": f"{args.ref_label} ({commit(args.ref_src)})", "this": commit(str(SRC)),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_1_5_15": load,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
