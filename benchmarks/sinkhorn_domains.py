"""Which domain the in-place Sinkhorn takes on real weights, and whether its underflow certificate holds.

Large Sinkhorn problems (more than ``INPLACE_MIN_ENTRIES`` plan entries, i.e. Llama-3.1-8B's 14,336
neurons) run in place (``solvers._sinkhorn_inplace``) with a float32 or bfloat16 kernel. Real
weights at the default ``reg`` have a reduced cost range of 100-600 reg, where such a kernel
underflows: the solver keeps the kernel domain when the plan mass the underflowed entries could
carry is certified below ``UNDERFLOW_TOL`` of a marginal, else it rebuilds the cost and solves in
the log domain (~25x slower). This script forces the in-place routes on every neuron problem of
SmolLM2-135M-Instruct's ``layout="top"`` upscale (weights cast to bf16, ``reg`` 0.01) and records,
per pair and route (float32 cost, 16-bit compact cost): the domain, whether the cost was rebuilt,
the seconds of the solve (one thread) and the marginal error; and the domain POT takes on the same
float64 cost (the route this size takes by default). Written: ``benchmarks/results/sinkhorn_domains.json``.

    python benchmarks/sinkhorn_domains.py [--model smollm2|gemma3] [--pairs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_deepen.align import solvers
from hf_deepen.align.alignment import _neuron_parts
from hf_deepen.align.solvers import SqDistCost, solve
from plan_precision import add_pair_args, bf16_canons, model_pairs  # (benchmarks/ is on the path when a script there runs)

OUT = Path(__file__).parent / "results" / "sinkhorn_domains.json"


def forced(oracle: SqDistCost, compact: bool, reg: float) -> dict:
    """The in-place route on the alignment's own cost (overwritten, rebuilt by the oracle if needed)."""
    old = solvers.INPLACE_MIN_ENTRIES
    solvers.INPLACE_MIN_ENTRIES = 0
    matrix, calls = oracle.matrix, []

    def spy(*a, **k):
        calls.append(1)
        return matrix(*a, **k)

    try:
        C = oracle.matrix(compact=compact)
        oracle.matrix = spy
        t = time.perf_counter()
        p = solve(C, "sinkhorn", reg=reg, max_iter=3000, overwrite=True, oracle=oracle)
        sec = time.perf_counter() - t
    finally:
        oracle.matrix = matrix
        solvers.INPLACE_MIN_ENTRIES = old
    return {"domain": "kernel" if p.solver == "sinkhorn" else "log", "cost_rebuilds": len(calls),
            "seconds": round(sec, 2), "marginal_error": p.marginal_error}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_args(ap)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    layers, spec, shape, cfg, new = model_pairs(args.model, args.pairs, solver="sinkhorn")
    rows = []
    for s in new:
        canons = bf16_canons(layers, spec, s.sources)
        oracle = SqDistCost(_neuron_parts(canons[0]), _neuron_parts(canons[1]))
        row = {"sources": list(s.sources)}
        for name, compact in (("float32", False), ("16-bit", True)):
            row[name] = forced(oracle, compact, cfg.sinkhorn_reg)
        pot = solve(oracle.matrix().double(), "sinkhorn", reg=cfg.sinkhorn_reg, max_iter=3000)
        row["POT, float64"] = {"domain": "kernel" if pot.solver == "sinkhorn" else "log", "marginal_error": pot.marginal_error}
        rows.append(row)
        print(json.dumps(row), flush=True)
    routes = ("float32", "16-bit")
    summary = {r: {"pairs": len(rows), "kernel_domain": sum(x[r]["domain"] == "kernel" for x in rows),
                   "pairs_rebuilt": sum(x[r]["cost_rebuilds"] > 0 for x in rows),
                   "mean_seconds": sum(x[r]["seconds"] for x in rows) / len(rows)} for r in routes}
    summary["POT, float64"] = {"kernel_domain": sum(x["POT, float64"]["domain"] == "kernel" for x in rows)}
    doc = {"what": __doc__.split("\n")[0], "model": f"{args.model}, weights cast to bf16",
           "machine": f"{platform.machine()}, 1 thread, torch {torch.__version__}",
           "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "config": {"reg": cfg.sinkhorn_reg, "layout": "top", "underflow_tol": solvers.UNDERFLOW_TOL},
           "summary": summary, "pairs": rows}
    out = Path(args.out)
    if args.model != "smollm2" and args.out == str(OUT):
        out = OUT.with_name(f"sinkhorn_domains_{args.model}.json")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return doc


if __name__ == "__main__":
    main()
