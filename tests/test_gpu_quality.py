"""benchmarks/gpu_quality.sh and its inputs on CPU: tiny corpus, tiny model, tiny budget (the env var)."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(**kw):
    e = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update({k: str(v) for k, v in kw.items()})
    return e


def test_corpus_and_gpu_script_tiny(tmp_path):
    src = tmp_path / "src"
    for pkg, ext in (("python3.11-doc", ".rst.txt"), ("perl-doc", ".pod")):
        (src / pkg).mkdir(parents=True)
        for i in range(6):
            body = f"=head1 Part {i}\n\n" if ext == ".pod" else f"Section {i}\n=========\n\n"
            (src / pkg / f"doc{i}{ext}").write_text(body + f"Document {i} of {pkg}. " * 60)
    corpus = tmp_path / "corpus.npz.xz"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_corpus.py"), "--models", "tiny", "--src", str(src),
                    "--out", str(corpus), "--held-every", "4"], check=True, env=env(), capture_output=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_corpus import load

    z = load(corpus)
    meta = json.loads(str(z["meta"]))
    assert meta["documents"] == {"train": 9, "heldout": 3}
    assert "=head1" not in bytes(z["tiny_train"][z["tiny_train"] < 256].astype("uint8")).decode()
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_quality.sh")], env=env(
        GPU_QUALITY_TINY=1, GPU_QUALITY_CORPUS=corpus, GPU_QUALITY_RESULTS=tmp_path / "res",
        GPU_QUALITY_WORK=tmp_path / "work", OUT=out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with tarfile.open(out / "gpu_quality_results.tar.gz") as t:
        names = [n for n in t.getnames() if n.endswith(".json")]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("seed*.json")]
    # 5 deep variants + the base reference, 2 seeds, protocol new; all on the corpus
    assert len(runs) == len(names) == 12
    assert {(r["variant"], r["seed"]) for r in runs} == {(v, s) for v in ("opt-auto", "copy-auto", "copy-every2", "base",
                                                                         "opt-uniform", "copy-uniform") for s in (0, 1)}
    assert all(r["data"]["name"] == "corpus" and r["domains"] == ["heldout", "license"] for r in runs)


def test_gguf_chunks_reassemble_and_are_checked(tmp_path):
    carry = tmp_path / "carry"
    blob = os.urandom(300_000)
    (carry / "00").mkdir(parents=True)
    (carry / "01").mkdir()
    (carry / "00" / "m.gguf.part00").write_bytes(blob[:200_000])
    (carry / "01" / "m.gguf.part01").write_bytes(blob[200_000:])
    (carry / "00" / "SHA256SUMS").write_text(f"{hashlib.sha256(blob).hexdigest()}  m.gguf\n")
    script = str(ROOT / "benchmarks" / "gpu_carry.sh")
    subprocess.run(["bash", script, "assemble", str(tmp_path / "g")], check=True, env=env(GPU_CARRY_DIR=carry))
    assert (tmp_path / "g" / "m.gguf").read_bytes() == blob
    (carry / "01" / "m.gguf.part01").unlink()  # a chunk that never arrived
    r = subprocess.run(["bash", script, "assemble", str(tmp_path / "h")], env=env(GPU_CARRY_DIR=carry), capture_output=True)
    assert r.returncode != 0
