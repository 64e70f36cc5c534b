"""Sinkhorn's default route on real weights, two versions of the library (issue 13).

Every neuron problem of a real model's ``layout="top"`` upscale (weights cast to bf16, Sinkhorn,
zero-init off so that the down projection is compared too) is fused by each version's *default*
route, one thread, one version after the other; per pair of source layers: seconds for the whole
layer, whether the neuron problem ran in the kernel domain, its marginal error, and the relative L2
distance between the versions' fused gate / up / down tensors (float32, before the final cast).
Written for the change that hands small problems out of the kernel's range to the in-place solver
(which reduces the cost first) instead of POT's log domain.

    python benchmarks/sinkhorn_route.py --src OLD/src,src --model gemma3      # both versions, compare
    python benchmarks/sinkhorn_route.py --src SRC --model gemma3 --save F.pt  # one version (a child)
    python benchmarks/sinkhorn_route.py --compare OLD.pt,NEW.pt --labels a,b --model gemma3

Written: ``benchmarks/results/sinkhorn_route_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROLES = ("gate", "up", "down")


def run_one(src: str, model: str, save: str) -> None:
    """Child: fuse every pair with the library found at ``src``; save seconds, diagnostics, tensors."""
    sys.path.insert(0, str(Path(src).resolve()))
    sys.path.insert(1, str(Path(__file__).parent))
    import torch

    import hf_deepen
    from hf_deepen.fuse import make_layer
    from plan_precision import model_pairs

    assert Path(hf_deepen.__file__).resolve().is_relative_to(Path(src).resolve()), hf_deepen.__file__
    torch.set_num_threads(1)
    layers, spec, shape, cfg, new = model_pairs(model, 0, solver="sinkhorn", zero_init=False)
    res = {}
    for s in new:
        canons = [spec.to_canonical({k: v.to(torch.bfloat16) for k, v in layers[j].state_dict().items()})[0]
                  for j in s.sources]
        t = time.perf_counter()
        r = make_layer("opt", canons, shape, cfg, dtype=torch.float32)
        sec = time.perf_counter() - t
        res[str(list(s.sources))] = {"seconds": sec, "kernel": r.diagnostics.get("neurons_kernel_domain"),
                                     "marginal_error": r.diagnostics.get("neurons_marginal_error"),
                                     "canon": {k: r.canon[k] for k in ROLES}}
        print(s.sources, f"{sec:.1f} s", flush=True)
    torch.save(res, save)


def compare(files: list[str], labels: list[str], model: str, out: Path) -> dict:
    import torch

    old, new = (torch.load(f) for f in files)
    rows = []
    for k in old:
        o, n = old[k], new[k]
        rows.append({"sources": json.loads(k),
                     **{f"{lab}_{f}": d[f] for lab, d in zip(labels, (o, n)) for f in ("seconds", "kernel", "marginal_error")},
                     "rel_l2": {r: float((n["canon"][r].double() - o["canon"][r].double()).norm()
                                         / o["canon"][r].double().norm()) for r in ROLES}})
    summary = {f"{lab}_seconds_total": sum(r[f"{lab}_seconds"] for r in rows) for lab in labels}
    summary.update({f"{lab}_kernel_domain": sum(1 for r in rows if r[f"{lab}_kernel"] == 1.0) for lab in labels})
    summary["problems"] = len(rows)
    summary["max_rel_l2"] = max(max(r["rel_l2"].values()) for r in rows)
    doc = {"what": __doc__.split("\n")[0], "model": f"{model}, weights cast to bf16", "labels": labels,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread",
           "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "summary": summary, "pairs": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3", choices=("smollm2", "gemma3"))
    ap.add_argument("--src", help="one src directory (with --save), or OLD,NEW")
    ap.add_argument("--save", help="child mode: save this version's results here")
    ap.add_argument("--compare", help="OLD.pt,NEW.pt: compare saved results")
    ap.add_argument("--labels", default="before,after")
    ap.add_argument("--out", default=None, help="default: results/sinkhorn_route_<model>.json")
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"sinkhorn_route_{args.model}.json")
    labels = args.labels.split(",")
    if args.save:
        return run_one(args.src, args.model, args.save)
    if args.compare:
        compare(args.compare.split(","), labels, args.model, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, src in enumerate(args.src.split(",")):
            files.append(f"{tmp}/{i}.pt")
            subprocess.run([sys.executable, __file__, "--src", src, "--model", args.model, "--save", files[-1]],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        compare(files, labels, args.model, out)


if __name__ == "__main__":
    main()
