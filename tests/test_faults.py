"""Faults and user mistakes: each ends in a one-line typed error naming the fix, leaves no output
that looks complete (nor any hidden leftover), and never touches the input.

The bad-input table in docs/errors.md lists every case here with its measured message.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_deepen.io as hio
from hf_deepen import (
    CheckpointError,
    DeepenError,
    DepthUpscaler,
    ModelNotFoundError,
    OutputError,
    PlanError,
    WeightError,
    upscale_checkpoint,
)
from hf_deepen.cli import main

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def leftovers(out: Path) -> list[str]:
    """``out`` itself and every hidden sibling of it (partial, old, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "base"
    tiny_model("gqa").save_pretrained(d, max_shard_size="100KB")  # several shards and an index
    return d


def broken_copy(base: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(base, d)
    return d


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-deepen: error: "), err
    return err[0]


# ---- the model argument -----------------------------------------------------------------------------
def test_nonexistent_path(tmp_path, capsys):
    nope = str(tmp_path / "nope")
    assert main(["upscale", nope, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "no such directory" in line and "not a Hub id" in line
    with pytest.raises(ModelNotFoundError, match="no such directory .* and not a Hub id"):
        DepthUpscaler.from_pretrained(nope)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        upscale_checkpoint(nope, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


# ---- damaged checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["memory", "streaming"])
def test_truncated_shard(base, tmp_path, path):
    d = broken_copy(base, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    before = tree_hash(d)
    run = (lambda: DepthUpscaler.from_pretrained(d)) if path == "memory" else (lambda: upscale_checkpoint(d, tmp_path / "out"))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: .* re-download it"):
        run()
    assert tree_hash(d) == before and leftovers(tmp_path / "out") == []


def test_missing_index_entry_and_missing_shard(base, tmp_path):
    d = broken_copy(base, tmp_path)
    index = d / "model.safetensors.index.json"
    before = json.loads(index.read_text())
    wm = before["weight_map"]
    dropped = "model.layers.2.mlp.up_proj.weight"
    index.write_text(json.dumps({**before, "weight_map": {k: v for k, v in wm.items() if k != dropped}}))
    h = tree_hash(d)
    for run in (lambda: DepthUpscaler.from_pretrained(d), lambda: upscale_checkpoint(d, tmp_path / "out")):
        with pytest.raises(CheckpointError, match=rf"holds '{dropped}'.*does not list.*re-download the index"):
            run()
    assert tree_hash(d) == h
    index.write_text(json.dumps(before))
    (d / wm[dropped]).unlink()
    with pytest.raises(CheckpointError, match=rf"to {wm[dropped]}, which is missing .* download the missing shard"):
        upscale_checkpoint(d, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


def test_shapes_disagree_with_config(base, tmp_path):
    d = broken_copy(base, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 4}))  # q_proj has 8 heads' rows
    h = tree_hash(d)
    for run in (lambda: DepthUpscaler.from_pretrained(d), lambda: upscale_checkpoint(d, tmp_path / "out")):
        with pytest.raises(CheckpointError, match=r"layer 0's self_attn\.q_proj\.weight has shape \[128, 64\] where"
                                                  r" config\.json \(heads=4, .*implies 64 along dim 0"):
            run()
    assert tree_hash(d) == h and leftovers(tmp_path / "out") == []


def test_hub_id_not_cached_is_one_line(tmp_path, capsys):
    assert main(["upscale", "no-such-org/no-such-model", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--debug" in one_line_error(capsys)
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("path", ["memory", "streaming"])
def test_nan_weights_name_the_tensor(tmp_path, path):
    model = tiny_model("gqa")
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "base")
    before = tree_hash(tmp_path / "base")
    match = r"NaN/inf in model\.layers\.3\.mlp\.up_proj\.weight \(layer 3\).*re-download or repair it; OT cannot align"
    with pytest.raises(WeightError, match=match):
        if path == "memory":
            up = DepthUpscaler.from_pretrained(tmp_path / "base")
            up.upscale(progress=False)
        else:
            upscale_checkpoint(tmp_path / "base", tmp_path / "out", progress=False)
    if path == "memory":
        assert len(up.model.model.layers) == 6  # refused before any change
    assert tree_hash(tmp_path / "base") == before and leftovers(tmp_path / "out") == []


# ---- the plan, from the config alone --------------------------------------------------------------
@pytest.mark.parametrize("n, match", [(4, "does not exceed"), (40, "num_layers <= 11")])
def test_num_layers_refused_before_loading(base, tmp_path, capsys, monkeypatch, n, match):
    import hf_deepen.upscaler as up

    def never(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(up.AutoModelForCausalLM, "from_pretrained", never)
    for extra in ([], ["--streaming"]):
        assert main(["upscale", str(base), "--out", str(tmp_path / "out"), "--num-layers", str(n), "--no-progress", *extra]) == 2
        assert match in one_line_error(capsys)
    assert leftovers(tmp_path / "out") == []


def test_stray_kv_heads_on_gpt2_is_ignored():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=97, n_positions=64)).eval()
    model.config.num_key_value_heads = 2  # a field GPT-2 does not have: must not be read as GQA
    DepthUpscaler(model).upscale(progress=False)
    assert model.config.num_hidden_layers == 6


# ---- the output --------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only); unmounting it checks no file handle into it was left open."""
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    assert subprocess.run(["umount", str(d)], capture_output=True).returncode == 0, "a file in the tmpfs is still open"


@pytest.mark.parametrize("path", ["memory", "streaming"])
def test_disk_full(base, small_disk, monkeypatch, path):
    out = small_disk / "out"
    h = tree_hash(base)
    run = (lambda: _save_in_memory(base, out)) if path == "memory" else (lambda: upscale_checkpoint(base, out, progress=False))
    # the free-space check refuses before writing anything
    with pytest.raises(OutputError, match=r"needs about 1\.\d MB, .* has 1\.0 MB free: free 0\.\d MB there or choose another --out"):
        run()
    # the disk fills mid-save (the check fooled): the same error class, the partial output removed
    monkeypatch.setattr(hio, "_free_bytes", lambda p: 10**12)
    with pytest.raises(OutputError, match=r"no space left on the device writing .*: free .* or choose another --out"):
        run()
    assert leftovers(out) == [] and list(small_disk.iterdir()) == []
    assert tree_hash(base) == h


def _save_in_memory(base, out):
    up = DepthUpscaler.from_pretrained(base)
    up.upscale(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny checkpoint has no tokenizer
        up.save_pretrained(out)


def test_read_only_output(base, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "out"
    with pytest.raises(OutputError, match="read-only file system .*: choose a writable --out"):
        upscale_checkpoint(base, out, progress=False)
    assert main(["upscale", str(base), "--out", str(out / "sub"), "--streaming", "--no-progress"]) == 2
    assert "choose a writable --out" in one_line_error(capsys)
    assert list(small_disk.iterdir()) == []


# ---- interrupted runs (real processes) -------------------------------------------------------------
SLOW_RUN = textwrap.dedent("""
    import signal, sys, time
    # Ctrl-C as in a terminal: a shell without job control starts background jobs (cmd &) with SIGINT
    # ignored, children inherit that, and Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import hf_deepen.pipeline as pl
    fuse = pl.build_layer_state
    def slow(*a, **k):  # hold the run in its first new layer, with shards half written
        print("building", flush=True)
        time.sleep(60)
        return fuse(*a, **k)
    pl.build_layer_state = slow
    from hf_deepen.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start(base: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "upscale", str(base), "--out", str(out), "--streaming",
                          "--no-progress", "--max-shard-size", "100KB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "building", p.stderr.read()
    partial = [q for q in out.parent.iterdir() if q.name.startswith(f".{out.name}.partial-")]
    assert len(partial) == 1 and any(partial[0].glob("*.tmp"))  # mid-write
    return p


@pytest.mark.parametrize("sig, rc, said", [(signal.SIGTERM, 143, "interrupted by SIGTERM"), (signal.SIGINT, 130, "interrupted")])
def test_signal_removes_partial_output(base, tmp_path, sig, rc, said):
    h = tree_hash(base)
    out = tmp_path / "out"
    p = _start(base, out)
    p.send_signal(sig)
    assert p.wait(timeout=60) == rc
    err = p.stderr.read().strip().splitlines()
    assert err[-1] == f"hf-deepen: {said}; partial output removed", err
    assert leftovers(out) == [] and tree_hash(base) == h


def test_second_run_then_kill_9_then_rerun(base, tmp_path, caplog):
    h = tree_hash(base)
    out = tmp_path / "out"
    p = _start(base, out)
    try:  # a second run writing the same output is refused at once, naming the first
        with pytest.raises(OutputError, match=rf"another run \(pid {p.pid}\) is writing {out}: wait for it"):
            upscale_checkpoint(base, out, progress=False)
    finally:
        p.kill()
        p.wait(timeout=60)
    # kill -9: no cleanup ran, yet nothing looks complete: only hidden siblings of out
    left = leftovers(out)
    assert out.name not in left and any(".partial-" in n for n in left)
    with caplog.at_level(logging.WARNING, logger="hf_deepen.io"):
        rep = upscale_checkpoint(base, out, progress=False, max_shard_size="100KB")
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records)
    assert leftovers(out) == ["out"] and rep.plan.num_layers == 9
    assert (out / "model.safetensors.index.json").exists() and tree_hash(base) == h


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_on_signals_raises_interrupted_and_restores(sig):
    from hf_deepen import Interrupted

    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        with hio.stop_on_signals():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert e.value.signum == sig and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(sig) is before


def test_interrupted_replace_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-12345"  # a replace killed between its two renames
    old.mkdir()
    (old / "config.json").write_text("{}")
    hio._recover_stale(out)
    assert (out / "config.json").exists() and leftovers(out) == ["out"]


def test_errors_are_deepen_errors():
    for e in (ModelNotFoundError, CheckpointError, WeightError, OutputError, PlanError):
        assert issubclass(e, DeepenError)
    assert issubclass(OutputError, OSError) and str(OutputError("x")) == "x"


def test_only_errors_about_the_output_become_output_errors(tmp_path):
    import errno

    out = tmp_path / "out"
    deny = lambda f: PermissionError(errno.EACCES, "Permission denied", str(f))  # noqa: E731
    assert hio.output_error(deny(tmp_path / "base" / "model.safetensors"), out) is None  # the input: not ours
    for f in (tmp_path / ".out.partial-x" / "a", tmp_path / ".out.lock", out / "config.json", tmp_path):
        assert "choose a writable --out" in str(hio.output_error(deny(f), out))
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left" in str(hio.output_error(rust, out, 10**6))
    assert hio.output_error(RuntimeError("code: 28"), out) is None
