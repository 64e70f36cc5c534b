"""The quality benchmark's code path (benchmarks/quality.py) on a tiny random Llama: every variant runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("hf_deepen_bench_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def quality():
    threads = torch.get_num_threads()
    try:
        yield _load()
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("hf_deepen_bench_quality", None)


def test_quality_smoke_tiny(quality, tmp_path):
    pytest.importorskip("pydoc_data.topics")
    res = quality.main(["--tiny", "--budget", "smoke", "--steps", "2", "--seeds", "0", "--out", str(tmp_path),
                        "--readme", "no", "--threads", "1"])
    saved = json.loads((tmp_path / "quality.json").read_text())
    names = [v.name for v in quality.VARIANTS]
    assert saved["finished"] and saved["variants"] == names
    assert {r["variant"] for r in saved["runs"]} == set(names)
    assert set(saved["summary"]) == set(names)
    for r in saved["runs"]:
        assert r["finite"] and r["seed"] == 0
        assert [row["step"] for row in r["curve"]][0] == 0 and r["curve"][-1]["step"] == 2
        for row in r["curve"]:
            assert all(math.isfinite(row[d]) for d in quality.DOMAINS)
        assert r["sec_per_step_median"] > 0 and r["trainable_params"] > 0
    init = {n: saved["summary"][n]["initial_docs"] for n in names}
    # zero-initialised variants are function preserving: they start exactly where the base model does
    for n in ("opt-exact", "opt-sinkhorn", "avg-zero", "copy-top", "copy-every2", "ref-script", "layout-bottom",
              "lever-restore", "lever-act", "lever-w25", "lever-copy-lr1e-3"):
        assert init[n] == pytest.approx(init["base"], abs=1e-5), n
    assert init["avg-nozero"] != pytest.approx(init["base"], abs=1e-5)
    # only the new layers train, except solar and base
    s = saved["summary"]
    assert s["solar"]["trainable_params"] > s["opt-exact"]["trainable_params"]
    assert s["base"]["trainable_params"] > s["opt-exact"]["trainable_params"]
    for f in ("quality_curves.csv", "quality_summary.csv"):
        assert (tmp_path / f).stat().st_size > 0
    assert res["summary"].keys() == saved["summary"].keys()


def test_ref_script_layers_are_half_the_upper_source(quality):
    base, _, _ = quality.load_base(tiny=True)
    model, info = quality.build_variant(base, quality.BY_NAME["ref-script"])
    assert info["new_layers"]
    for i in info["new_layers"]:
        new, upper = model.model.layers[i], model.model.layers[i + 1]  # i + 1 is the upper source f_{i+1}
        torch.testing.assert_close(new.self_attn.q_proj.weight, 0.5 * upper.self_attn.q_proj.weight)
        torch.testing.assert_close(new.mlp.up_proj.weight, 0.5 * upper.mlp.up_proj.weight)
        assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
