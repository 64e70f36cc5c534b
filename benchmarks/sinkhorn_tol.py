"""Sinkhorn's stopping rule from the output dtype (issue 13): what stopping early costs and saves.

At ``sinkhorn_reg=0.01`` real weights never reach the old stopping rule (relative marginal error
1e-4) and run all 3,000 iterations: ~26 minutes per new layer at Llama-3.1-8B's size on one thread
of this CPU. A bfloat16 layer cannot hold what the last iterations change (``sinkhorn_iters.py``), so
``sinkhorn_tol=None`` now stops at the machine epsilon of the dtype the layer is written in, at
least 1e-4 (7.8e-3 for bfloat16). This script measures it on a real model, weights cast to bf16, per pair of
source layers (``layout="top"``, zero-init off so the down projection counts too) and per route: the
route these sizes take by default (POT's float64 kernel, or the in-place solver on a float64 copy)
and the 16-bit in-place route an 8B layer takes (forced). For each route, the fused gate/up/down
tensors (float32, before the final cast) at the old rule (1e-4: all 3,000 iterations) and at the
bfloat16 rule: seconds of the whole layer (align + fuse), the neuron plan's marginal error, and the
relative L2 distance between the two, against the yardstick every route ends with: casting the
fused tensor to bf16.

    python benchmarks/sinkhorn_tol.py [--model smollm2|gemma3] [--pairs N]

Written: ``benchmarks/results/sinkhorn_tol_<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from hf_deepen import UpscaleConfig
from plan_precision import add_pair_args, bf16_canons, model_pairs, write_sinkhorn_doc  # (benchmarks/ is on the path when a script there runs)
from sinkhorn16 import ROUTES, fused, rel

DEFAULT, INPLACE16 = list(ROUTES)[0], list(ROUTES)[2]  # what these sizes get; the 16-bit in-place (8B) route

RESULTS = Path(__file__).parent / "results"
ROLES = ("gate", "up", "down")
OLD_TOL = 1e-4


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_args(ap)
    ap.add_argument("--out", default=None, help="default: results/sinkhorn_tol_<model>.json")
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"sinkhorn_tol_{args.model}.json")
    new_tol = UpscaleConfig().sinkhorn_tol_for(torch.bfloat16)
    layers, spec, shape, cfg, new = model_pairs(args.model, args.pairs, solver="sinkhorn", zero_init=False)
    tols = {"old": OLD_TOL, "bf16": new_tol}
    rows = []
    for s in new:
        canons = bf16_canons(layers, spec, s.sources)
        row = {"sources": list(s.sources), "routes": {}}
        for route in (DEFAULT, INPLACE16):
            runs = {name: fused(canons, shape, dataclasses.replace(cfg, sinkhorn_tol=t), route) for name, t in tols.items()}
            ref = runs["old"][0].canon
            row["routes"][route] = {
                "bf16_rounding": {r: rel(ref[r].bfloat16(), ref[r]) for r in ROLES},
                "rel_l2_bf16_to_old": {r: rel(runs["bf16"][0].canon[r], ref[r]) for r in ROLES},
                **{f"{name}_seconds": sec for name, (_, sec) in runs.items()},
                **{f"{name}_marginal_error": res.diagnostics.get("neurons_marginal_error") for name, (res, _) in runs.items()},
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for route in (DEFAULT, INPLACE16):
        rr = [r["routes"][route] for r in rows]
        old_s, new_s = sum(x["old_seconds"] for x in rr), sum(x["bf16_seconds"] for x in rr)
        summary[route] = {
            "old_seconds": old_s, "bf16_seconds": new_s, "speedup": old_s / new_s,
            "max_rel_l2_bf16_to_old": max(max(x["rel_l2_bf16_to_old"].values()) for x in rr),
            "max_ratio_to_bf16_rounding": max(max(x["rel_l2_bf16_to_old"][r] / x["bf16_rounding"][r] for r in ROLES) for x in rr),
            "min_bf16_rounding": min(min(x["bf16_rounding"].values()) for x in rr),
            "max_bf16_marginal_error": max(x["bf16_marginal_error"] or 0.0 for x in rr),
            "max_old_marginal_error": max(x["old_marginal_error"] or 0.0 for x in rr),
        }
    return write_sinkhorn_doc(out, __doc__.split("\n")[0], args.model, cfg, summary, rows,
                              max_iter=cfg.sinkhorn_max_iter, tols=tols)


if __name__ == "__main__":
    main()
