"""Encoder census: every masked-LM model type of the installed transformers, tiny and random, 4 -> 6.

The companion of ``census.py`` (causal LMs) for encoders: each type in
``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` is built with ``AutoModelForMaskedLM`` from the same tiny
config (``census.tiny_config``, every parameter nudged), upscaled with each method, and recorded as
``fp`` (logits unchanged), ``ok`` (runs, logits changed), ``refused`` (a typed error, with its
reason), ``crash`` (anything else) or ``build-failed``. ``copy`` is also saved and reloaded with the
same class (a changed logit or a missing key is a crash). Encoder-decoder types in that mapping
(BART, ...) are swept too: the stack discovery picks one of their stacks.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/encoder_census.py [--types bert ...] [--no-write]

Results: ``benchmarks/results/encoder_census.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census  # noqa: E402

OUT = census.RESULTS / "encoder_census.json"
SEQ = 9


def build(model_type: str):
    import torch
    from transformers import AutoModelForMaskedLM

    errors = []
    for tier in range(len(census.TIERS)):
        try:
            cfg = census.tiny_config(model_type, tier)
            torch.manual_seed(census.SEED)
            try:
                model = AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager")
            except (ValueError, TypeError):
                model = AutoModelForMaskedLM.from_config(cfg)
            if sum(p.numel() for p in model.parameters()) > census.MAX_PARAMS:
                raise RuntimeError("tiny model too large")
            census._randomize(model)
            model.eval()
            ids = torch.randint(3, census.vocab(model), (2, SEQ), generator=torch.Generator().manual_seed(1))
            return model, ids, logits(model, ids)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError(errors[0])


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run(base, ids, ref, method: str) -> dict:
    from hf_deepen import DepthUpscaler
    from hf_deepen.errors import DeepenError

    model = copy.deepcopy(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            up = DepthUpscaler(model)
            up.upscale(method=method, num_layers=None if method == "solar" else census.TARGET_LAYERS, progress=False)
        new = logits(model, ids)
        rec = {"status": "fp" if census.close(new, ref) else "ok", "spec": up.spec.name,
               "reported_fp": up.report.function_preserving,
               "max_logit_diff": float((new - ref).abs().max()) if new.shape == ref.shape else None}
        if rec["reported_fp"] and rec["status"] != "fp":
            rec.update(status="crash", reason="reported function preserving, but the logits changed")
        if method == "copy":
            with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(d)
                again, info = type(model).from_pretrained(d, output_loading_info=True)
                if info["missing_keys"] or not census.close(logits(again.eval(), ids), new):
                    rec.update(status="crash", reason=f"save/reload changed the model (missing {sorted(info['missing_keys'])[:3]})")
        return rec
    except DeepenError as e:
        return {"status": "refused", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {"status": "crash", "reason": f"{type(e).__name__}: {str(e)[:240]} ({Path(tb.filename).name}:{tb.lineno})"}


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def main(argv: list[str] | None = None) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="*")
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    types = a.types or sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    signal.signal(signal.SIGALRM, _alarm)
    records = []
    t0 = time.perf_counter()
    for mt in types:
        rec: dict = {"model_type": mt}
        signal.alarm(a.timeout)
        try:
            base, ids, ref = build(mt)
            rec["class"] = type(base).__name__
            rec["status"] = "built"
            for m in census.METHODS:
                rec[m] = run(base, ids, ref, m)
        except _Timeout:
            rec.update(status="timeout")
        except Exception as e:  # noqa: BLE001
            rec.update(status="build-failed", reason=str(e)[:240])
        finally:
            signal.alarm(0)
        records.append(rec)
        print(f"{mt:28s} {rec['status']:12s} " + " ".join(f"{m}={rec[m]['status']}" for m in census.METHODS if m in rec),
              flush=True)
    built = [r for r in records if r["status"] == "built"]
    summary = {"types": len(records), "built": len(built)}
    for m in census.METHODS:
        summary[m] = {s: sum(1 for r in built if r[m]["status"] == s) for s in ("fp", "ok", "refused", "crash")}
    out = {"summary": summary, "seconds": round(time.perf_counter() - t0, 1), "records": records}
    print(json.dumps(summary, indent=1))
    if not a.no_write:
        OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
