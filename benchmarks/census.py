"""Census: every causal-LM model type of the installed transformers, tiny and random, upscaled 4 -> 6.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny config is built (4 layers, hidden 64,
per-layer lists cut to 4 entries), the model is upscaled with each method (copy, avg, opt, solar)
and one status is recorded per method:

* ``fp``       upscaled, logits unchanged (function preserving) and cached == uncached generation
* ``ok``       upscaled and runs, but the logits changed (expected for solar, post-LN, ...)
* ``refused``  a typed :class:`hf_deepen.errors.DeepenError` (its message is kept as the reason)
* ``crash``    any other exception (a bug: the census exists to drive these to 0)
* ``build-failed`` the tiny model itself could not be built or run (not our problem, but counted)

The sweep runs in a worker subprocess (restarted after a crash or a hang, ``--timeout`` seconds
per type), so one bad type never stops it. Run it low-priority on one thread::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/census.py            # full sweep, writes results
    python benchmarks/census.py --types llama gpt2 --no-write           # a few types, print only

Results: ``benchmarks/results/census.json`` / ``census.csv`` and the generated table between the
``<!-- census:begin -->`` / ``<!-- census:end -->`` markers in ``docs/families.md``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "families.md"
METHODS = ("copy", "avg", "opt", "solar")
BASE_LAYERS, TARGET_LAYERS = 4, 6
BEGIN, END = "<!-- census:begin -->", "<!-- census:end -->"

#: config fields that count layers, by family
COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "decoder_layers")
#: small sizes for whatever of these fields a config has
SMALL = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "model_dim": 64,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "d_ff": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16,
    "vocab_size": 256, "max_position_embeddings": 256, "n_positions": 256,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "topk_group": 1, "n_group": 1,
    "sliding_window": 8, "attention_chunk_size": 8,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "first_k_dense_replace": 1, "rotary_dim": 16,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_headdim": 16, "mamba_d_state": 16, "state_size": 16,
}
SEED = 0
#: multimodal wrappers users ask for that are not registered as causal LMs (built as image-text-to-text)
EXTRA_TYPES = ("llava", "mistral3", "qwen2_5_vl")


# ---- tiny configs --------------------------------------------------------------------------
def _resize_lists(cfg, old_n: int, new_n: int) -> None:
    for k, v in list(vars(cfg).items()):
        if k.startswith("_") or not isinstance(v, (list, tuple)) or not v:
            continue
        if len(v) == old_n and old_n != new_n and ("layer" in k or "pattern" in k or k.endswith("s")):
            setattr(cfg, k, [v[i % len(v)] for i in range(new_n)])


def _set(cfg, k: str, v) -> None:
    try:
        setattr(cfg, k, v)
    except (AttributeError, TypeError, NotImplementedError):  # a derived property (falcon's head_dim, prophetnet)
        pass


#: what each tier of shrinking leaves out (a tier is tried when the one before cannot build or run)
_HEAD_KEYS = {"head_dim", "kv_channels", "num_heads", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
              "qk_nope_head_dim", "v_head_dim"}
TIERS = (set(SMALL), set(SMALL) - _HEAD_KEYS)
#: the largest tiny model built (parameters), so that a tier that keeps default sizes stays quick
MAX_PARAMS = 60_000_000


def _shrink(cfg, layers: int, keys: set) -> None:
    for k, v in SMALL.items():
        if k in keys and isinstance(getattr(cfg, k, None), int) and not isinstance(getattr(cfg, k), bool):
            _set(cfg, k, v)
    heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(cfg, k)), None)
    if isinstance(getattr(cfg, "num_key_value_heads", None), int) and isinstance(heads, int):
        _set(cfg, "num_key_value_heads", min(cfg.num_key_value_heads, heads))
    # Mamba-2 style mixers: heads * head_dim must be expand * hidden
    if all(isinstance(getattr(cfg, k, None), int) for k in ("expand", "num_heads", "head_dim", "hidden_size")) \
            and "num_heads" in keys:
        _set(cfg, "num_heads", cfg.expand * cfg.hidden_size // cfg.head_dim)
    _derived(cfg, keys)
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            t = getattr(cfg, k, None)
            if isinstance(t, int) and t >= vocab:
                _set(cfg, k, vocab - 1 - ("bos" in k) - 2 * ("eos" in k))
    for k in COUNT_FIELDS:
        old = getattr(cfg, k, None)
        if isinstance(old, int) and not isinstance(old, bool) and old > 0:
            _resize_lists(cfg, old, layers)
            _set(cfg, k, layers)
    if all(isinstance(vars(cfg).get(k), int) for k in ("n_input_layers", "n_recurrent_layers", "n_output_layers")):
        cfg.n_input_layers, cfg.n_recurrent_layers, cfg.n_output_layers = 1, layers - 2, 1  # dory: they add up
    het = vars(cfg).get("_heterogeneity_spec")  # per-layer overrides by index (Gemma-4): keep one, on the last layer
    if het is not None and isinstance(getattr(het, "per_layer_overrides", None), dict) and het.per_layer_overrides:
        first = het.per_layer_overrides[min(het.per_layer_overrides)]
        het.per_layer_overrides.clear()
        het.per_layer_overrides[layers - 1] = dict(first)
        lt = getattr(cfg, "layer_types", None)  # its overrides are those of a full-attention layer
        if isinstance(lt, list) and len(lt) == layers and "sliding_attention" in lt:
            cfg.layer_types = lt[:-1] + ["full_attention"]
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) != layers and lt:
        _set(cfg, "layer_types", [lt[i % len(lt)] for i in range(layers)])
    for k in ("text_config", "vision_config", "audio_config"):
        sub = getattr(cfg, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, layers if k == "text_config" else 2, keys)
    if getattr(cfg, "text_config", None) is not None and hasattr(cfg, "vocab_size"):
        _set(cfg, "vocab_size", getattr(cfg.text_config, "vocab_size", cfg.vocab_size))


def _derived(cfg, keys: set) -> None:
    """Fields a config derives from others in ``__post_init__`` (stale after shrinking)."""
    d = vars(cfg)
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and isinstance(d.get("num_attention_heads"), int):
        _set(cfg, "num_key_value_heads", cfg.num_attention_heads)  # nemotron: None means one per head
    if getattr(cfg, "model_type", "") == "lfm2_moe" and d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
        _set(cfg, "layer_types", ["conv", "full_attention"] * (cfg.num_hidden_layers // 2))  # no default: a hybrid
    if isinstance(d.get("qk_nope_head_dim"), int) and isinstance(d.get("qk_rope_head_dim"), int):
        _set(cfg, "qk_head_dim", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # MLA
        if isinstance(d.get("num_key_value_heads"), int) and isinstance(d.get("num_attention_heads"), int):
            _set(cfg, "num_key_value_heads", cfg.num_attention_heads)  # MLA expands the latent to every head
    if "head_dim" in d and d["head_dim"] is None and isinstance(d.get("hidden_size"), int) \
            and isinstance(d.get("num_attention_heads"), int):
        _set(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    if isinstance(d.get("mamba_d_ssm"), int) and isinstance(d.get("mamba_n_heads"), int) \
            and isinstance(d.get("mamba_d_head"), int):
        _set(cfg, "mamba_d_ssm", cfg.mamba_n_heads * cfg.mamba_d_head)  # falcon_h1
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "vl" in getattr(cfg, "model_type", "") and "mrope_section" not in rp:
        rp["mrope_section"] = [16, 24, 24]  # qwen2-vl family: the modeling default, sized for head_dim 128
    if isinstance(rp, dict) and isinstance(rp.get("mrope_section"), list) and isinstance(d.get("hidden_size"), int):
        half = (d.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads) // 2  # qwen2.5-vl: sums to head_dim/2
        sec = rp["mrope_section"]
        new = [max(1, v * half // sum(sec)) for v in sec]
        new[0] += half - sum(new)
        rp["mrope_section"] = new
    if isinstance(d.get("num_kv_shared_layers"), int):  # gemma3n: shares the KV of earlier layers
        _set(cfg, "num_kv_shared_layers", 0)
        for k in ("vocab_size_per_layer_input", "hidden_size_per_layer_input"):
            if isinstance(d.get(k), int):
                _set(cfg, k, 256 if k.startswith("vocab") else 16)


def tiny_config(model_type: str, tier: int = 0):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    het = [c for c in (cfg, getattr(cfg, "text_config", None)) if c is not None and vars(c).get("_heterogeneity_spec")]
    for c in het:  # Gemma-4: per-layer attributes are read (and set) globally while shrinking
        c.allow_global_per_layer_attribute_access = True
    _shrink(cfg, BASE_LAYERS, TIERS[tier])
    for c in het:
        c.allow_global_per_layer_attribute_access = False
    if hasattr(cfg, "use_cache"):
        _set(cfg, "use_cache", True)
    _repair(cfg, AutoConfig.for_model(model_type))
    return cfg


def _repair(cfg, default) -> None:
    """A tiny config that does not validate (save/reload would fail on it, not on the upscale): the
    shrunk fields its validation error names go back to their defaults (ZAYA: ``num_experts_per_tok=1``)."""
    for _ in range(4):
        try:
            type(cfg).from_dict(cfg.to_dict())
            return
        except Exception as e:  # noqa: BLE001
            msg = str(e)
        keys = [k for k in SMALL if k in msg and hasattr(default, k) and getattr(cfg, k, None) != getattr(default, k)]
        if not keys:
            return
        for k in keys:
            _set(cfg, k, getattr(default, k))


def build(model_type: str, tier: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, tier)
    torch.manual_seed(SEED)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except ValueError as e:  # multimodal wrappers registered only as image-text-to-text (llava, ...)
        if "Unrecognized configuration class" not in str(e):
            raise
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager")
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"tiny model too large ({n:,} parameters)")
    model.eval()
    _randomize(model)
    return model


def build_tiny(model_type: str):
    """The first tier of :data:`TIERS` whose model builds and runs: ``(model, ids, logits, tier)``."""
    import torch

    errors = []
    for tier in range(len(TIERS)):
        try:
            model = build(model_type, tier)
            torch.manual_seed(SEED)
            ids = torch.randint(0, vocab(model), (1, 7))
            return model, ids, logits(model, ids), tier
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError(errors[0])


def _randomize(model) -> None:
    """Nudge every parameter (zero biases and unit norm gains included) so that no zero-init is
    hidden by a tensor that happens to start at zero."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def vocab(model) -> int:
    cfg = model.config
    v = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None) or 256
    return min(int(v), 256)


def logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits.float()


def cache_consistent(model, ids) -> bool:
    """Greedy step with the KV cache gives the logits of a full recomputation."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        past = getattr(out, "cache", None)  # transformers >= 5.25 (past_key_values goes in 5.40)
        past = out.past_key_values if past is None else past
        if past is None:
            return True
        import inspect

        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(input_ids=ids[:, -1:], use_cache=True, **{kw: past}).logits[:, -1].float()
        full = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    return bool(torch.allclose(step, full, atol=1e-4, rtol=1e-3))


def base_cache_ok(model, ids) -> bool:
    try:
        return cache_consistent(model, ids)
    except Exception:  # noqa: BLE001
        return False


def close(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-5, rtol=1e-4))


def reload_logits(model, ids):
    """Logits of ``model`` saved and loaded again (its own class)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = type(model).from_pretrained(d, attn_implementation="eager").eval()
        return logits(again, ids), type(again).__name__


def base_reload_ok(model, ids, ref) -> bool:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return close(reload_logits(model, ids)[0], ref)
    except Exception:  # noqa: BLE001
        return False


def run_method(base, ids, ref, method: str, save: bool, base_cache: bool = True, base_reload: bool = True) -> dict:
    import torch
    from hf_deepen import DepthUpscaler
    from hf_deepen.errors import DeepenError

    model = copy.deepcopy(base)
    rec_note = None
    t0 = time.perf_counter()
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            up = DepthUpscaler(model)
            kw = {"layout": "solar"} if method == "solar" else {}
            up.upscale(method="solar" if method == "solar" else method, num_layers=TARGET_LAYERS, progress=False, **kw)
        n = len(list(_stack(up)))
        if n != TARGET_LAYERS:
            return {"status": "crash", "reason": f"{n} layers after upscaling, expected {TARGET_LAYERS}"}
        new = logits(model, ids)
        fp = close(new, ref)
        if base_cache:
            cache = cache_consistent(model, ids)
        else:  # the base model itself does not step with a cache this way (or not to 1e-4): not checked
            cache = None
            rec_note = "cache not checked: the base model is not cache-consistent in this test either"
        rec = {"status": "fp" if fp else "ok", "cache": cache, "spec": up.spec.name,
               "max_logit_diff": float((new - ref).abs().max()) if new.shape == ref.shape else None}
        if up.report is not None:
            ot = [d.get("diagnostics", {}).get("ot_units") for d in up.report.layers]
            if any(ot):
                rec["ot_units"] = ot[0]
        if rec_note:
            rec["note"] = rec_note
        if not fp and method != "solar":
            rec["why"] = why_not_fp(up, caught)
        if cache is False:
            rec["status"] = "crash"
            rec["reason"] = "cached and uncached generation logits differ"
        elif save and not base_reload:  # the tiny base model itself does not save and reload to its logits
            rec["note"] = "; ".join(filter(None, [rec.get("note"), "reload not checked: the base model does not"
                                                  " save/reload to the same logits either"]))
        elif save:
            again, rec["reload"] = reload_logits(model, ids)
            if not close(again, new):
                rec["status"] = "crash"
                rec["reason"] = "save/reload changed the logits"
        return rec
    except DeepenError as e:
        return {"status": "refused", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    except Exception as e:  # noqa: BLE001 - the census records every failure
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {"status": "crash", "reason": f"{type(e).__name__}: {str(e)[:240]} ({Path(tb.filename).name}:{tb.lineno})"}
    finally:
        _ = time.perf_counter() - t0


def why_not_fp(up, caught) -> str:
    """Why an upscale that asked for zero-init did not preserve the logits: what the library said."""
    from hf_deepen.arch.spec import ArchitectureWarning

    said = [str(w.message) for w in caught if issubclass(w.category, ArchitectureWarning)]
    if said:
        return said[0][:300]
    if up.report is not None and not up.report.function_preserving:
        return ("zero-init cannot make this block the identity (no set of its tensors does: a norm after the residual"
                " add (post-LN), or a residual that is scaled or normed)")
    return "logits changed although zero-init applies (unexplained)"


def _stack(up):
    from hf_deepen.arch import get_module

    return get_module(up.model, up.spec.layers_path)


def census_one(model_type: str, save: bool = True) -> dict:
    import torch

    t0 = time.perf_counter()
    rec: dict = {"model_type": model_type}
    try:
        base, ids, ref, rec["tier"] = build_tiny(model_type)
        rec["class"] = type(base).__name__
    except Exception as e:  # noqa: BLE001
        rec.update(status="build-failed", reason=str(e)[:240])
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        return rec
    rec["status"] = "built"
    rec["base_cache"] = base_cache_ok(base, ids)
    rec["base_reload"] = base_reload_ok(base, ids, ref) if save else None
    for m in METHODS:
        rec[m] = run_method(base, ids, ref, m, save and m == "copy", rec["base_cache"], rec["base_reload"] is not False)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# ---- the sweep (a worker subprocess, restarted after a crash or a hang) -------------------------
def worker(types: list[str], out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    with out.open("a") as f:
        for t in types:
            f.write(json.dumps({"start": t}) + "\n")
            f.flush()
            f.write(json.dumps(census_one(t)) + "\n")
            f.flush()


def sweep(types: list[str], timeout: float) -> list[dict]:
    done: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "census.jsonl"
        out.touch()
        todo = list(types)
        seen = 0
        while todo:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(out), *todo], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            current, since = None, time.monotonic()
            while True:
                lines = out.read_text().splitlines()
                for line in lines[seen:]:
                    r = json.loads(line)
                    if "start" in r:
                        current = r["start"]
                        since = time.monotonic()
                    else:
                        done[r["model_type"]] = r
                        current = None
                        print(f"{r['model_type']:28s} {r.get('status'):12s} "
                              + " ".join(f"{m}={r[m]['status']}" for m in METHODS if m in r), flush=True)
                seen = len(lines)
                rc = proc.poll()
                if rc is not None and seen == len(out.read_text().splitlines()):
                    break
                if current is not None and time.monotonic() - since > timeout:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.2)
            if current is not None and current not in done:
                why = "timeout" if proc.returncode not in (0, None) and time.monotonic() - since > timeout else "worker died"
                done[current] = {"model_type": current, "status": "crash", "reason": f"{why} (rc={proc.returncode})",
                                 **{m: {"status": "crash", "reason": why} for m in METHODS}}
                print(f"{current:28s} {why}", flush=True)
            todo = [t for t in types if t not in done]
    return [done[t] for t in types]


def summarize(rows: list[dict]) -> dict:
    built = [r for r in rows if r.get("status") == "built"]
    s = {"types": len(rows), "built": len(built), "build_failed": len(rows) - len(built)}
    for m in METHODS:
        st = [r[m]["status"] for r in built if m in r]
        s[m] = {k: st.count(k) for k in ("fp", "ok", "refused", "crash")}
        s[m]["upscaled"] = s[m]["fp"] + s[m]["ok"]
        if m != "solar":  # ok (not fp) with the library's reason, against ok with none
            s[m]["ok_unexplained"] = sum(1 for r in built if m in r and r[m]["status"] == "ok"
                                         and "unexplained" in r[m].get("why", "unexplained"))
    return s


def write(rows: list[dict], summary: dict, seconds: float, merged: dict | None = None) -> None:
    """``merged`` (``--merge``): ``{"transformers": the sweep's version, "rerun": {version: [types]}}``."""
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"transformers": (merged or {}).get("transformers", transformers.__version__), "base_layers": BASE_LAYERS,
            "target_layers": TARGET_LAYERS, "seconds": round(seconds, 1), "summary": summary}
    if merged and merged.get("rerun"):
        meta["rerun"] = merged["rerun"]
    (RESULTS / "census.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with (RESULTS / "census.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model_type", "class", "build", *METHODS, "spec", "reason"])
        for r in rows:
            reasons = "; ".join(f"{m}: {r[m].get('reason') or 'not fp: ' + r[m]['why']}" for m in METHODS
                                if m in r and (r[m].get("reason") or r[m].get("why")))
            spec = next((r[m].get("spec") for m in METHODS if m in r and r[m].get("spec")), "")
            w.writerow([r["model_type"], r.get("class", ""), r["status"],
                        *[r[m]["status"] if m in r else "" for m in METHODS], spec, reasons or r.get("reason", "")])
    write_doc(rows, summary, meta)


def write_doc(rows: list[dict], summary: dict, meta: dict) -> None:
    rerun = "".join(f"; {', '.join(ts)} rerun on {v}" for v, ts in meta.get("rerun", {}).items())
    lines = [BEGIN, "", f"Generated by `benchmarks/census.py` (transformers {meta['transformers']}{rerun}, tiny random"
             f" configs, {BASE_LAYERS} -> {TARGET_LAYERS} layers, {meta['seconds']:.0f} s); do not edit by hand.",
             "`fp` = upscaled and the logits unchanged (function preserving), `ok` = upscaled and runs"
             " (logits changed: expected for SOLAR and post-LN blocks), `refused` = a typed error (reason"
             " below), `crash` = anything else.", ""]
    lines.append(f"Totals: {summary['built']} of {summary['types']} types build; " + "; ".join(
        f"{m}: {summary[m]['upscaled']} upscale ({summary[m]['fp']} fp), {summary[m]['refused']} refused,"
        f" {summary[m]['crash']} crash" for m in METHODS) + ".")
    lines.append("")
    lines.append("An `ok` for copy / avg / opt says why the logits changed (reason column: `not fp: ...`): a block"
                 " that no zero-init makes the identity (post-LN, a scaled or normed residual), or per-layer"
                 " constants computed from the layer index that no fold settles."
                 " Unexplained: " + ", ".join(f"{m} {summary[m].get('ok_unexplained', '?')}"
                                                    for m in METHODS if m != "solar") + ".")
    lines += ["", "| `model_type` | spec | copy | avg | opt | solar | reason (first refusal or crash) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "built":
            lines.append(f"| `{r['model_type']}` | | build failed | | | | {_cell(r.get('reason', ''))} |")
            continue
        spec = next((r[m].get("spec") for m in METHODS if r[m].get("spec")), "")
        reason = next((f"{m}: {r[m]['reason']}" for m in ("opt", "copy", "avg", "solar") if r[m].get("reason")), "") \
            or next((f"{m} not fp: {r[m]['why']}" for m in ("copy", "avg", "opt") if r[m].get("why")), "")
        lines.append(f"| `{r['model_type']}` | {spec} | " + " | ".join(r[m]["status"] for m in METHODS)
                     + f" | {_cell(reason)} |")
    lines += ["", END]
    text = DOC.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Census: every causal-LM type of the installed transformers\n\n" + block + "\n"
    DOC.write_text(text)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:200]


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [t for t in EXTRA_TYPES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="*", help="model types (default: all causal-LM types)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per type before the worker is killed")
    p.add_argument("--no-write", action="store_true", help="print only; do not write results or docs")
    p.add_argument("--merge", action="store_true",
                   help="with --types: rerun those types and replace their rows in the existing census.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.rest, Path(a.worker))
        return
    types = a.types or all_types()
    t0 = time.perf_counter()
    rows = sweep(types, a.timeout)
    secs = time.perf_counter() - t0
    version = None
    if a.merge:
        import transformers

        old = json.loads((RESULTS / "census.json").read_text())
        new = {r["model_type"]: r for r in rows}
        rows = [new.pop(r["model_type"], r) for r in old["rows"]] + list(new.values())
        secs = old["meta"]["seconds"]
        version = old["meta"]["transformers"].split(";")[0]  # the sweep's; the rerun types are named
        rerun = dict(old["meta"].get("rerun", {}))
        if transformers.__version__ != version:
            rerun.setdefault(transformers.__version__, [])
            rerun[transformers.__version__] = sorted(set(rerun[transformers.__version__]) | set(types))
        version = {"transformers": version, "rerun": rerun}
    s = summarize(rows)
    print(json.dumps(s, indent=1))
    print(f"{secs:.0f} s")
    if not a.no_write:
        write(rows, s, secs, version)


if __name__ == "__main__":
    main()
