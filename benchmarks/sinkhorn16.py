"""Sinkhorn in 16 bits (issue 13): what the compact route does to fused layers of real weights.

Large Sinkhorn problems on 16-bit weights (more than ``INPLACE_MIN_ENTRIES`` plan entries, i.e.
Llama-3.1-8B's 14,336 neurons) run on the float16 compact cost, with a bfloat16 kernel and a
column-scaled float16 plan written over it (``solvers._sinkhorn_inplace``): 0.4 GB instead of
0.8 GB at 8B. This script forces that route (and, for comparison, the float32 in-place route) on
SmolLM2-135M-Instruct's 1,536-neuron problems, weights cast to bf16, and compares each new layer's
fused tensors, computed in float32 before the final cast, with the reference: POT's float64
Sinkhorn, the route those problems take by default. The yardstick is the rounding every route
ends with anyway: casting the reference's fused tensor to bf16.

Per pair of source layers (``layout="top"``, the 15 pairs of ``plan_precision.py``; zero-init off, so
that the down projection is compared too), per route:
relative L2 distance of the gate/up/down tensors to the reference, the fraction of their bf16
elements that differ from the reference's, plan diagnostics; and the reference's own bf16 rounding.
Written: ``benchmarks/results/sinkhorn16.json``.

    python benchmarks/sinkhorn16.py [--pairs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_deepen.align import alignment, solvers
from hf_deepen.fuse import make_layer
from plan_precision import bf16_canons, smollm2_pairs  # (benchmarks/ is on the path when a script there runs)

OUT = Path(__file__).parent / "results" / "sinkhorn16.json"
ROLES = ("gate", "up", "down")
#: route -> (INPLACE_MIN_ENTRIES, COMPACT_SINKHORN)
ROUTES = {"reference (POT, float64)": (solvers.INPLACE_MIN_ENTRIES, True),
          "in place, float32 cost and plan": (0, False),
          "in place, 16-bit (compact cost, bf16 kernel, float16 plan)": (0, True)}


def fused(canons, shape, cfg, route):
    inplace, compact = ROUTES[route]
    old = solvers.INPLACE_MIN_ENTRIES, alignment.COMPACT_SINKHORN
    solvers.INPLACE_MIN_ENTRIES, alignment.COMPACT_SINKHORN = inplace, compact
    try:
        t = time.perf_counter()
        res = make_layer("opt", [dict(c) for c in canons], shape, cfg, dtype=torch.float32)
        return res, time.perf_counter() - t
    finally:
        solvers.INPLACE_MIN_ENTRIES, alignment.COMPACT_SINKHORN = old


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=0, help="only the first N pairs (0: all)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    layers, spec, shape, cfg, new = smollm2_pairs(args.pairs, solver="sinkhorn", zero_init=False)
    rows = []
    for s in new:
        canons = bf16_canons(layers, spec, s.sources)
        out = {}
        for route in ROUTES:
            out[route] = fused(canons, shape, cfg, route)
        ref = out["reference (POT, float64)"][0].canon
        row = {"sources": list(s.sources),
               "reference_bf16_rounding": {r: rel(ref[r].bfloat16(), ref[r]) for r in ROLES}}
        for route, (res, sec) in out.items():
            dg = res.diagnostics
            row[route] = {
                "seconds": sec,
                "rel_l2_to_reference": {r: rel(res.canon[r], ref[r]) for r in ROLES},
                "bf16_elements_differing": {r: float((res.canon[r].bfloat16() != ref[r].bfloat16()).float().mean())
                                            for r in ROLES},
                "neurons_marginal_error": dg.get("neurons_marginal_error"),
                "neurons_sharpness": dg.get("neurons_sharpness"),
                "neurons_kernel_domain": dg.get("neurons_kernel_domain"),
                "neurons_cost_ratio": dg.get("neurons_cost_ratio"),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    routes = list(ROUTES)[1:]
    summary = {route: {"max_rel_l2_to_reference": max(max(r[route]["rel_l2_to_reference"].values()) for r in rows),
                       "max_bf16_elements_differing": max(max(r[route]["bf16_elements_differing"].values()) for r in rows)}
               for route in routes}
    summary["min_reference_bf16_rounding"] = min(min(r["reference_bf16_rounding"].values()) for r in rows)
    doc = {"what": __doc__.split("\n")[0], "model": "SmolLM2-135M-Instruct, weights cast to bf16",
           "machine": f"{platform.machine()}, {torch.__version__}", "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "config": {"solver": "sinkhorn", "reg": cfg.sinkhorn_reg, "layout": "top", "zero_init": False,
                      "restore_norm": cfg.restore_norm},
           "summary": summary, "pairs": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return doc


if __name__ == "__main__":
    main()
