"""The study runner (benchmarks/study.py) on a tiny random Llama: caching, resume, report."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("hf_deepen_bench_study", ROOT / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hf_deepen_bench_study"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("hf_deepen_bench_study", None)


def args(tmp, name, *extra):
    return ["--budget", "tiny", "--models", "tiny", "--seeds", "0", "--variants", "opt-uniform,copy-every2,base-compute",
            "--protocols", "new", "--results", str(tmp / name / "res"), "--work", str(tmp / name / "work"),
            "--readme", str(tmp / name / "README.md"), *extra]


def finals(res_dir):
    return {p.relative_to(res_dir).as_posix(): json.loads(p.read_text()) for p in sorted(res_dir.rglob("seed*.json"))}


def test_study_caches_resumes_and_reports(study, tmp_path, one_thread):
    done = study.main(args(tmp_path, "a"))
    assert [(r["protocol"], r["variant"]) for r in done] == [("new", "opt-uniform"), ("new", "copy-every2"),
                                                            ("ref", "base-compute")]
    a = finals(tmp_path / "a" / "res")
    assert len(a) == 3
    for r in a.values():
        assert r["finite"] and all(math.isfinite(r["final"][d]) for d in r["domains"])
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == r["steps"]
    by = {r["variant"]: r for r in a.values()}
    tiny = study.BUDGETS["tiny"]
    assert by["base-compute"]["steps"] == round(tiny.steps * 1.5)  # 8 -> 12 layers: 1.5x the compute
    assert by["opt-uniform"]["train_tokens"] == tiny.tokens
    # function preserving: every deep variant starts at the base model's loss
    assert by["opt-uniform"]["initial"] == pytest.approx(by["base-compute"]["initial"], abs=1e-5)
    assert by["opt-uniform"]["trainable_params"] < by["base-compute"]["trainable_params"]

    # interrupted after 4 steps (inside the first run), then resumed: the same numbers as uninterrupted
    assert study.main(args(tmp_path, "b", "--stop-after-steps", "4", "--ckpt-steps", "2")) == []
    ckpts = list((tmp_path / "b" / "work" / "ckpt").rglob("*.pt"))
    assert len(ckpts) == 1 and not list((tmp_path / "b" / "res").rglob("seed*.json"))
    study.main(args(tmp_path, "b"))
    b = finals(tmp_path / "b" / "res")
    assert set(b) == set(a)
    for k in a:
        for d in a[k]["domains"]:
            assert b[k]["final"][d] == pytest.approx(a[k]["final"][d], abs=1e-5)
    assert b["tiny/tiny/new/opt-uniform/seed0.json"]["resumed_at"] == [4]
    assert not list((tmp_path / "b" / "work" / "ckpt").rglob("*.pt"))  # removed once the run is cached

    # everything cached: nothing trains; the report lists every cached variant
    assert study.main(args(tmp_path, "b")) == []
    block = study.report(tmp_path / "b" / "res", tmp_path / "b" / "README.md")
    for name in ("opt-uniform", "copy-every2", "base-compute"):
        assert f"| `{name}` |" in block
    assert "| `opt-uniform` | `copy-every2` |" in block
    text = (tmp_path / "b" / "README.md").read_text()
    assert text.count(study.BEGIN) == 1 and text.count(study.END) == 1
    assert (tmp_path / "b" / "res" / "summary.csv").exists()


def test_time_limit_clock_and_seconds(study):
    import datetime as dt
    import time

    now = dt.datetime.now(dt.timezone.utc)
    past = (now - dt.timedelta(hours=1)).strftime("%H:%M")
    soon = (now + dt.timedelta(hours=1)).strftime("%H:%M")
    assert study.parse_deadline(past) <= time.time()  # already passed today: stop now, not tomorrow
    assert 0 < study.parse_deadline(soon) - time.time() <= 3600
    assert abs(study.parse_deadline("60") - time.time() - 60) < 5
    assert study.parse_deadline(None) is None


def test_a_budget_defined_on_the_corpus_refuses_other_data(study, capsys):
    assert study.parse([]).data == "pydoc"
    assert study.parse(["--budget", "cpu-long"]).data == "corpus"
    assert study.parse(["--budget", "cpu-long", "--data", "corpus"]).data == "corpus"
    with pytest.raises(SystemExit) as e:
        study.parse(["--budget", "cpu-long", "--data", "pydoc"])
    assert e.value.code == 2 and "defined on --data corpus" in capsys.readouterr().err


def test_variants_are_valid_configs_and_levers_are_opt_in(study):
    """Every deep variant's options make a valid UpscaleConfig (a bad combination would only fail
    hours into a study), and a lever variant runs only where asked for."""
    from hf_deepen import UpscaleConfig

    for v in study.VARIANTS:
        if v.upscale is not None:  # ("fused-*" positions are resolved from a plan at build time)
            UpscaleConfig(**{k: x for k, x in v.upscale.items() if k != "positions"})
    default = {v for _, _, v, _ in study.plan_runs(study.parse(["--models", "gemma3", "--seeds", "0"]))}
    assert "opt-auto" in default and "base" in default
    assert not default & {"opt-auto-outputs", "opt-auto-nozero", "opt-auto-gainlr"}
    asked = study.plan_runs(study.parse(["--models", "gemma3", "--protocols", "all", "--variants", "opt-auto-outputs", "--seeds", "0"]))
    assert ("gemma3", "all", "opt-auto-outputs", 0) in asked


def test_zeroed_gain_lever_finds_exactly_the_zeroed_post_norm_gains(study):
    """opt-auto-gainlr trains these at a higher lr: on a post-norm family they are the new layers' two
    post-norm gains, each at the value that makes the block output zero (Gemma: w = -1), and no base
    layer's; a pre-norm family has none (the run then refuses instead of silently equalling opt-auto)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from hf_deepen import DepthUpscaler
    from hf_deepen.provenance import new_layer_indices

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    deep = DepthUpscaler(Gemma3ForCausalLM(cfg)).upscale(layout="top", progress=False)
    new = new_layer_indices(deep)
    names = study.zeroed_gain_names(deep, new)
    params = dict(deep.named_parameters())
    assert len(names) == 2 * len(new) == 4
    assert all(int(n.split(".")[2]) in new for n in names)
    assert all(torch.equal(params[n], torch.full_like(params[n], -1.0)) for n in names)
    base_gains = [n for n in params if "post_feedforward_layernorm" in n and int(n.split(".")[2]) not in new]
    assert base_gains and not any(torch.equal(params[n], torch.full_like(params[n], -1.0)) for n in base_gains)

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1))
    deep = DepthUpscaler(llama).upscale(layout="top", progress=False)
    assert study.zeroed_gain_names(deep, new_layer_indices(deep)) == set()
