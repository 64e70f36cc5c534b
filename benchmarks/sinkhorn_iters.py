"""How many Sinkhorn iterations does a fused layer need (issue 13)?

At ``sinkhorn_reg=0.01`` the neuron problems of real weights do not meet the stopping rule
(marginal error below 1e-4 of a marginal) within the default 3,000 iterations (their error stays at
3-7e-4, ``sinkhorn_domains.py``), so every problem runs all 3,000. On an 8B layer (14,336 neurons)
one kernel product costs ~0.26 s on one thread of this CPU: ~26 minutes of Sinkhorn per new layer.
This script asks what the later iterations buy: per pair of source layers of a real model (weights
cast to bf16, the 16-bit in-place route that 8B-sized problems take, forced), the new layer's fused
gate/up/down tensors (float32, before the final cast) after ``--iters`` iterations, against the
same route at the largest count and against the float64 route these sizes take by default at
3,000 (POT; since dd71bab the in-place solver on a float64 copy where POT would have run its log
domain: the committed results predate that change). The yardstick is the rounding every route ends with: casting the
fused tensor to bf16. Also reported: how far the exact solver's fused layer is from Sinkhorn's (the
size of a difference the choice of solver makes).

    python benchmarks/sinkhorn_iters.py [--model smollm2|gemma3] [--pairs N] [--iters 100,300,1000,3000]

Written: ``benchmarks/results/sinkhorn_iters_<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from plan_precision import add_pair_args, bf16_canons, model_pairs, write_sinkhorn_doc  # (benchmarks/ is on the path when a script there runs)
from sinkhorn16 import ROUTES, fused, rel

POT, INPLACE16 = list(ROUTES)[0], list(ROUTES)[2]  # POT's float64 route; the 16-bit in-place (8B) route

RESULTS = Path(__file__).parent / "results"
ROLES = ("gate", "up", "down")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_args(ap)
    ap.add_argument("--iters", default="100,300,1000,3000", help="iteration counts, comma-separated")
    ap.add_argument("--out", default=None, help="default: results/sinkhorn_iters_<model>.json")
    args = ap.parse_args(argv)
    iters = sorted(int(x) for x in args.iters.split(","))
    out = Path(args.out or RESULTS / f"sinkhorn_iters_{args.model}.json")
    layers, spec, shape, cfg, new = model_pairs(args.model, args.pairs, solver="sinkhorn", zero_init=False)
    exact_cfg = dataclasses.replace(cfg, solver="exact")
    rows = []
    for s in new:
        canons = bf16_canons(layers, spec, s.sources)
        pot, pot_sec = fused(canons, shape, cfg, POT)
        exact, _ = fused(canons, shape, exact_cfg, POT)
        runs = {n: fused(canons, shape, dataclasses.replace(cfg, sinkhorn_max_iter=n), INPLACE16) for n in iters}
        last = runs[iters[-1]][0].canon
        ref = pot.canon
        row = {"sources": list(s.sources), "pot_seconds": pot_sec,
               "pot_marginal_error": pot.diagnostics.get("neurons_marginal_error"),
               "bf16_rounding_of_pot": {r: rel(ref[r].bfloat16(), ref[r]) for r in ROLES},
               "exact_vs_pot": {r: rel(exact.canon[r], ref[r]) for r in ROLES}, "iters": {}}
        for n, (res, sec) in runs.items():
            dg = res.diagnostics
            row["iters"][str(n)] = {
                "seconds": sec,
                "marginal_error": dg.get("neurons_marginal_error"),
                "kernel_domain": dg.get("neurons_kernel_domain"),
                "rel_l2_to_last": {r: rel(res.canon[r], last[r]) for r in ROLES},
                "rel_l2_to_pot": {r: rel(res.canon[r], ref[r]) for r in ROLES},
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {str(n): {"max_rel_l2_to_last": max(max(r["iters"][str(n)]["rel_l2_to_last"].values()) for r in rows),
                        "max_rel_l2_to_pot": max(max(r["iters"][str(n)]["rel_l2_to_pot"].values()) for r in rows),
                        "max_marginal_error": max(r["iters"][str(n)]["marginal_error"] or 0.0 for r in rows),
                        "mean_seconds": sum(r["iters"][str(n)]["seconds"] for r in rows) / len(rows)}
               for n in iters}
    summary["min_bf16_rounding_of_pot"] = min(min(r["bf16_rounding_of_pot"].values()) for r in rows)
    summary["min_exact_vs_pot"] = min(min(r["exact_vs_pot"].values()) for r in rows)
    return write_sinkhorn_doc(out, __doc__.split("\n")[0], args.model, cfg, summary, rows, iters=iters)


if __name__ == "__main__":
    main()
