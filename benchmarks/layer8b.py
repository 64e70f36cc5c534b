"""One Llama-3.1-8B-shaped new layer (issue 13): align + fuse by stage, code versions and solvers side by side.

Two random bf16 decoder layers of the 8B shape (hidden 4,096, 32 / 8 heads, MLP 14,336, std 0.02, as
``scale.py`` writes them) are fused into one new layer by ``fuse.build_layer_state`` (the streaming
path's call, ``consume=True``) with glibc's mmap threshold at 1 MiB as ``streaming`` sets it, one
torch thread. Each code version (``--src`` list) runs in its own child process, alternating
``--rounds`` times; recorded per run: stage seconds (heads, neuron cost, assign = assignment +
certificate, fuse; wall, from the diagnostics), CPU seconds of the whole layer, peak RSS of the
child, the certificate's band and fallback, and a digest of the fused tensors (equal across
versions = the same plan and layer).

    python benchmarks/layer8b.py --src OLD/src,NEW/src [--labels before,after] [--rounds 1] [--out FILE]
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
import ctypes, json, resource, sys, time, torch
torch.set_num_threads(1)
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, as streaming._return_freed_memory sets it
from transformers import LlamaConfig
from hf_deepen.arch.registry import _SPECS
from hf_deepen.config import UpscaleConfig
from hf_deepen.fuse import build_layer_state
h, inter, nh, nkv, hd = (int(x) for x in sys.argv[1:6])
solver = sys.argv[6] if len(sys.argv) > 6 else "exact"
cfg_hf = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=nh, num_key_value_heads=nkv,
                     head_dim=hd, num_hidden_layers=2, vocab_size=256)
spec = _SPECS["llama"].bind(cfg_hf)
shape = spec.head_shape(cfg_hf)
g = torch.Generator().manual_seed(0)
def rnd(*s):
    return (torch.randn(*s, generator=g) * 0.02).bfloat16()
def layer():
    return {"self_attn.q_proj.weight": rnd(nh * hd, h), "self_attn.k_proj.weight": rnd(nkv * hd, h),
            "self_attn.v_proj.weight": rnd(nkv * hd, h), "self_attn.o_proj.weight": rnd(h, nh * hd),
            "mlp.gate_proj.weight": rnd(inter, h), "mlp.up_proj.weight": rnd(inter, h), "mlp.down_proj.weight": rnd(h, inter),
            "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16), "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
src = [layer(), layer()]
c0, w0 = time.process_time(), time.perf_counter()
res = build_layer_state(spec, UpscaleConfig(solver=solver), shape, src, "bench", consume=True)
cpu, wall = time.process_time() - c0, time.perf_counter() - w0
d = res.diagnostics
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # (ru_maxrss: floored by the parent)
out = {"cpu_s": cpu, "wall_s": wall, "peak_rss_mb": hwm / 1024,
       "heads": d.get("seconds_heads"), "cost": d.get("seconds_neuron_cost"), "assign": d.get("seconds_neuron_solve"),
       "fuse": d.get("seconds_fuse"), "band": d.get("neurons_certificate_band"), "fallback": d.get("neurons_float64_fallback"), "re_solved": d.get("neurons_re_solved"),
       "digest": float(sum(v.double().sum() for v in res.canon.values()))}
print("RESULT " + json.dumps(out))
"""

SHAPE_8B = (4096, 14336, 32, 8, 128)


def run(src: str, shape: tuple, solver: str = "exact") -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-c", CHILD, *map(str, shape), solver], env=env, capture_output=True,
                       text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"child failed (rc {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="comma list of src directories (code versions)")
    ap.add_argument("--labels", default="")
    ap.add_argument("--solvers", default="exact", help="comma list: exact, sinkhorn (each version runs each)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shape", default=",".join(map(str, SHAPE_8B)), help="hidden,intermediate,heads,kv_heads,head_dim")
    ap.add_argument("--out", default=str(HERE / "results" / "layer8b.json"))
    args = ap.parse_args(argv)
    srcs = args.src.split(",")
    labels = args.labels.split(",") if args.labels else srcs
    shape = tuple(int(x) for x in args.shape.split(","))
    solvers = args.solvers.split(",")
    keys = [(lb, src, sv) for sv in solvers for lb, src in zip(labels, srcs)]
    name = {k: k[0] if solvers == ["exact"] else f"{k[0]} {k[2]}" for k in keys}
    runs: dict[str, list] = {name[k]: [] for k in keys}
    loads = []
    for _ in range(args.rounds):
        for k in keys:
            loads.append(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}")
            runs[name[k]].append(run(k[1], shape, k[2]))
            print(name[k], json.dumps(runs[name[k]][-1]), flush=True)
    doc = {"what": __doc__.split("\n")[0], "shape": dict(zip(("hidden", "intermediate", "heads", "kv_heads", "head_dim"), shape)),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, 1 torch thread; load: " + "; ".join(loads),
           "runs": runs,
           "same_layer": {sv: len({r["digest"] for k in keys if k[2] == sv for r in runs[name[k]]}) == 1
                          for sv in solvers}}
    if solvers == ["exact"]:
        doc["same_layer"] = doc["same_layer"]["exact"]
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
