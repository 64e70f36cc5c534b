"""The one pipeline: the run is resolved once, the read-ahead stays bounded and ordered, and a
background writer's failure ends the run in the caller's thread with nothing left behind."""

import dataclasses
import threading
import time

import pytest
import torch

from hf_deepen import DepthUpscaler, WeightError, upscale_checkpoint
from hf_deepen.pipeline.sink import ShardWriter
from hf_deepen.pipeline.source import ReadAhead

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("hf_deepen-")}


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_read_ahead_is_ordered_and_bounded(depth):
    order = [3, 4, 4, 5, 5, 6]
    done: list[int] = []
    taken = [0]
    most = [0]

    events = []

    def read(j):
        most[0] = max(most[0], len(done) - taken[0] + 1)  # layers read but not yet asked for, with this one
        done.append(j)
        events.append(("read", j))
        return {"w": torch.full((2,), float(j))}

    with ReadAhead(read, order, depth, prefetch=lambda j: events.append(("hint", j))) as ra:
        got = []
        for j in order:
            time.sleep(0.02)  # give the reader time to run ahead as far as it may
            taken[0] += 1
            got.append(int(ra.next(j)["w"][0]))
    assert got == order and done == order
    assert most[0] <= max(depth, 1)
    assert not _threads()
    if depth == 0:  # every read after the first was hinted (its I/O started) while the one before was in use
        hints = [e for e in events if e[0] == "hint"]
        assert [j for _, j in hints] == order[1:]
        for p in range(1, len(order)):
            assert events.index(("hint", order[p])) < [i for i, e in enumerate(events) if e[0] == "read"][p]


def test_read_ahead_raises_the_readers_error_in_order_and_stops():
    def read(j):
        if j == 2:
            raise WeightError(f"layer {j}")
        return {}

    with pytest.raises(WeightError, match="layer 2"):
        with ReadAhead(read, [0, 1, 2, 3], 1) as ra:
            ra.next(0)
            ra.next(1)
            ra.next(2)
    assert not _threads()


def test_zero_target_resolved_once(monkeypatch):
    model = tiny_model("gqa")
    up = DepthUpscaler(model)
    spec = type(up.spec)
    calls = []
    resolve = spec.zero_target
    monkeypatch.setattr(spec, "zero_target", lambda self, r: calls.append(r) or resolve(self, r))
    up.upscale(progress=False, method="opt")
    assert len(up.report.plan.new_layer_indices) == 3
    assert calls.count("auto") == 1  # once for the whole run; fusion and provenance read the result
    assert model.config.hf_deepen["stages"][-1]["zero_target"] == "outputs"


def test_resolved_run_is_frozen():
    from hf_deepen.pipeline import make_plan, resolve
    from hf_deepen.pipeline import options

    model = tiny_model("gqa")
    up = DepthUpscaler(model)
    cfg = options(None, {"method": "avg", "layout": "top"})
    run = resolve(cfg, up.spec, model.config, make_plan(cfg, up.spec, model.config, 6), "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.plan = None
    assert run.zero_target == "outputs" and run.fusion_cfg.zero_target == "outputs" and run.cfg.zero_target == "auto"


def test_writer_failure_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    tiny_model("gqa").save_pretrained(tmp_path / "base")

    def boom(self, name, t):
        raise RuntimeError(f"writer failed on {name}")

    monkeypatch.setattr(ShardWriter, "add", boom)
    with pytest.raises(RuntimeError, match=r"writer failed on model\.layers\.\d+\."):
        upscale_checkpoint(tmp_path / "base", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert not _threads()


def test_both_sinks_report_the_stage_breakdown(tmp_path):
    model = tiny_model("gqa")
    model.save_pretrained(tmp_path / "base")
    streamed = upscale_checkpoint(tmp_path / "base", tmp_path / "out", progress=False).timings
    up = DepthUpscaler(model)
    up.upscale(progress=False)
    mem = up.report.timings
    common = {"read", "read_wait", "align+fuse", "cost", "assign", "fuse", "build"}
    assert common | {"write", "write_wait", "plan", "total"} <= set(streamed)
    assert common | {"surgery"} <= set(mem)
    for t in (streamed, mem):
        assert 0 < t["cost"] + t["assign"] + t["fuse"] <= t["align+fuse"] <= t["build"]


def test_marginal_warning_judges_a_plan_by_the_tol_it_was_solved_to():
    """A bfloat16 layer's Sinkhorn stops at 2**-7: a 3e-3 marginal error is its rule met, not a fault;
    the same error under the float32 rule (or with no tol recorded) still warns."""
    import warnings as w

    from hf_deepen.errors import AlignmentWarning
    from hf_deepen.pipeline import check_diagnostics
    from hf_deepen.report import UpscaleReport

    for tol, warns in ((2.0 ** -7, False), (1e-4, True), (None, True)):
        d = {"neurons_marginal_error": 3e-3, **({} if tol is None else {"sinkhorn_tol": tol})}
        report = UpscaleReport(plan=None, config=None, architecture="test")  # (only its warnings are used)
        with w.catch_warnings(record=True) as got:
            w.simplefilter("always")
            check_diagnostics(d, 7, report)
        assert bool([g for g in got if issubclass(g.category, AlignmentWarning)]) == warns, tol
        assert bool(report.warnings) == warns and (not warns or "new layer 7" in report.warnings[0])
