"""Is a Sinkhorn plan of real weights sparse enough to fuse sparsely (issue 13)?

At 8B the Sinkhorn layer's fusion is a dense product with the plan (14,336^2 x 4,096 per role, ~5
TFLOP), about as slow as the cost matrix. If each aligned neuron drew on a few lower neurons, a
truncated plan would make it cheap. Per model (one neuron problem of the ``layout="top"`` upscale,
fp32 weights, default ``reg``), this sorts every column of the plan, keeps the fewest entries that
hold ``1 - eps`` of its mass, and reports how many that is (mean and max over columns) and how far
the truncated barycentric map moves the lower layer's ``up`` rows (relative L2).

    python benchmarks/plan_sparsity.py [--out FILE]

Written: ``benchmarks/results/plan_sparsity.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_deepen.align import align_layers
from plan_precision import model_pairs  # (benchmarks/ is on the path when a script there runs)

OUT = Path(__file__).parent / "results" / "plan_sparsity.json"
PAIRS = {"smollm2": (14, 15), "gemma3": (8, 9)}
EPS = (1e-3, 1e-4, 1e-6, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for model, want in PAIRS.items():
        layers, spec, shape, cfg, new = model_pairs(model, 0, solver="sinkhorn", zero_init=False)
        s = next(s for s in new if tuple(s.sources) == want)
        canon = [spec.to_canonical(layers[j].state_dict())[0] for j in s.sources]
        plan = align_layers(*canon, shape, "sinkhorn").neurons
        P = plan.matrix.double()
        n = P.shape[0]
        x = canon[0]["up"].double()
        full = (n * P).T @ x
        vals, idx = P.sort(dim=0, descending=True)
        cum = vals.cumsum(0) / vals.sum(0, keepdim=True)
        for eps in EPS:
            k = (cum < 1 - eps).sum(0) + 1
            mask = torch.arange(n)[:, None] < k[None, :]
            kept = torch.zeros_like(P).scatter_(0, idx, vals * mask)
            err = float(((n * kept).T @ x - full).norm() / full.norm())
            rows.append({"model": model, "sources": list(want), "n": n, "eps": eps,
                         "entries_per_column_mean": float(k.double().mean()), "entries_per_column_max": int(k.max()),
                         "fraction_kept": float(k.double().mean()) / n, "rel_l2_up": err,
                         "sharpness": plan.sharpness})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"what": __doc__.split("\n")[0], "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "config": {"solver": "sinkhorn", "reg": cfg.sinkhorn_reg, "weights": "fp32"}, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
