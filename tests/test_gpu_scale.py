"""benchmarks/gpu_scale.sh (the CUDA scale benchmark) runs end to end on the CPU at the tiny shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_scale_script_tiny_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_SCALE_SHAPE="tiny", GPU_SCALE_DEVICE="cpu",
               GPU_SCALE_OUT=str(tmp_path / "out"), GPU_SCALE_WORK=str(tmp_path / "work"), GPU_SCALE_BUDGET_S="240")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_scale.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    info = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert info["finished"] is True and info["device"] == "cpu" and info["shape"] == "tiny"
    doc = json.loads((tmp_path / "out" / "scale.json").read_text())
    (res,) = doc["results"]
    runs = res["runs"]
    assert [r["method"] for r in runs] == ["opt-exact", "opt-sinkhorn"]
    assert all(r["config"]["device"] == "cpu" and r["summary"]["new_layers"] == 2 for r in runs)
    assert {"read", "write", "align+fuse"} <= set(runs[0]["timings"])
    assert not (tmp_path / "work" / "tiny").exists()  # the checkpoint is deleted


def test_gpu_scale_script_refuses_a_missing_python(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "nope"), GPU_SCALE_OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_scale.sh")], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "carry" in p.stderr
