"""The scale benchmark's code path (benchmarks/scale.py) on a tiny Llama shape: checkpoint, I/O floor,
streaming and in-memory upscales, identical outputs, JSON/CSV."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("hf_deepen_bench_scale", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_scale_benchmark_tiny(tmp_path):
    scale = _load()
    doc = scale.main(["--shapes", "tiny", "--methods", "opt-exact", "--inline", "--no-readme",
                      "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    (res,) = doc["results"]
    stream, mem = res["runs"]
    assert stream["path"] == "streaming" and mem["path"] == "in-memory"
    assert mem["identical_to_streaming"] is True
    assert stream["num_layers"] == 6 and stream["summary"]["new_layers"] == 2
    assert {"read", "write", "align+fuse"} <= set(stream["timings"])
    assert stream["peak_rss_mb"] > 0 and res["io_floor"]["bytes"] > 0
    assert json.loads((tmp_path / "out" / "scale.json").read_text())["results"][0]["shape"] == "tiny"
    rows = list(csv.DictReader(open(tmp_path / "out" / "scale.csv")))
    assert [r["path"] for r in rows] == ["streaming", "in-memory"]
    assert not (tmp_path / "work" / "tiny").exists()  # checkpoints are deleted


def test_layer8b_benchmark_tiny(tmp_path):
    """benchmarks/layer8b.py at a tiny Llama shape: both runs certify the neuron plan and build the same layer."""
    spec = importlib.util.spec_from_file_location("hf_deepen_bench_layer8b", ROOT / "benchmarks" / "layer8b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = str(ROOT / "src")
    doc = mod.main(["--src", f"{src},{src}", "--labels", "a,b", "--shape", "64,300,4,2,16", "--out", str(tmp_path / "l.json")])
    assert doc["same_layer"] and json.loads((tmp_path / "l.json").read_text())["runs"].keys() == {"a", "b"}
    for runs in doc["runs"].values():
        assert runs[0]["fallback"] == 0.0 and runs[0]["band"] > 0 and runs[0]["assign"] >= 0
