"""threads= of an upscale: torch threads set for the job and restored; "auto" runs on the idle CPUs."""

import json
import os
import sys

import pytest
import torch

from hf_deepen import DepthUpscaler
from hf_deepen import threads as th
from hf_deepen.cli import main
from hf_deepen.errors import ConfigError

from conftest import tiny_model

STAT = "cpu  {t} 0 0 {i} 0 0 0 0 0 0\ncpu0 {b0} 0 0 {i0} 0 0 0 0 0 0\ncpu1 {b1} 0 0 {i1} 0 0 0 0 0 0\ncpu2 0 0 0 {i2} 0 0 0 0 0 0\nintr 1 2 3\n"


def _stat(b0, i0, b1, i1, i2):
    return STAT.format(t=b0 + b1, i=i0 + i1 + i2, b0=b0, i0=i0, b1=b1, i1=i1, i2=i2)


def test_idle_cores_sums_idle_fractions_of_the_allowed_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat(1000, 1000, 1000, 1000, 1000))
    # over the sample: cpu0 fully busy, cpu1 a quarter busy, cpu2 idle but not allowed to this process
    monkeypatch.setattr(th.time, "sleep", lambda s: stat.write_text(_stat(1100, 1000, 1025, 1075, 1100)))
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert th.idle_cores(stat=stat) == pytest.approx(0.75)
    assert th.idle_cores(stat=tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_idle_cores_reads_this_machine():
    idle = th.idle_cores(interval=0.05)
    assert idle is not None and 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-9


@pytest.mark.parametrize("files, expect", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "300000 100000", "cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 0.5),
    ({}, None),
])
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path, files, expect):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert th.cpu_quota(tmp_path) == expect


def test_auto_stays_within_the_cgroup_quota(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "cpu_quota", lambda: 1.5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(th, "idle_cores", lambda: 7.0)
        assert th.resolve_threads("auto") == (1, "auto: 7.0 of %d CPUs idle, cgroup quota 1.5 CPUs" % len(os.sched_getaffinity(0)))
        monkeypatch.setattr(th, "idle_cores", lambda: None)  # load unknown, quota known
        assert th.resolve_threads("auto") == (1, "auto: CPU load unknown, cgroup quota 1.5 CPUs")
        monkeypatch.setattr(th, "cpu_quota", lambda: 0.3)
        assert th.resolve_threads("auto")[0] == 1  # never fewer than one
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("idle, expect", [(0.2, 1), (1.4, 1), (1.6, 2), (7.0, 2)])
def test_auto_uses_the_idle_cpus_between_one_and_torchs_setting(monkeypatch, idle, expect):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "cpu_quota", lambda: None)
    monkeypatch.setattr(th, "idle_cores", lambda: idle)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, why = th.resolve_threads("auto")
    finally:
        torch.set_num_threads(before)
    assert n == expect and why.startswith("auto: ") and f"{idle:.1f} of" in why


def test_auto_keeps_torchs_setting_when_the_user_chose_or_load_is_unknown(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(th, "idle_cores", lambda: pytest.fail("sampled although OMP_NUM_THREADS is set"))
    assert th.resolve_threads("auto") == (None, "auto: OMP_NUM_THREADS=3 is set, torch's setting kept")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(th, "idle_cores", lambda: None)
    monkeypatch.setattr(th, "cpu_quota", lambda: None)
    n, why = th.resolve_threads("auto")
    assert n is None and "unknown" in why
    assert th.resolve_threads(None) == (None, "torch's setting")
    assert th.resolve_threads("3") == (3, "given")


@pytest.mark.parametrize("bad", [0, -2, "x", True, 1.5, "0"])
def test_bad_threads_is_a_config_error_naming_the_choices(bad):
    with pytest.raises(ConfigError, match="positive integer, 'auto'"):
        th.check_threads(bad)


def test_torch_threads_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with th.torch_threads(1 if before != 1 else 2) as (n, why):
            assert torch.get_num_threads() == n != before and why == "given"
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_upscale_runs_on_the_threads_asked_and_records_them(monkeypatch):
    model = tiny_model("gqa")
    up = DepthUpscaler(model)
    before = torch.get_num_threads()
    seen = []
    real = th.torch_threads

    def spy(threads):  # what torch is set to while the job runs
        cm = real(threads)

        class Wrap:
            def __enter__(self):
                used = cm.__enter__()
                seen.append(torch.get_num_threads())
                return used

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Wrap()

    monkeypatch.setattr("hf_deepen.upscaler.torch_threads", spy)
    want = 1 if before != 1 else 2
    up.upscale(method="avg", layout="top", threads=want, progress=False)
    assert seen == [want] and torch.get_num_threads() == before
    assert up.report.threads == f"{want} (given)"
    assert f"threads        {want} (given)" in up.report.summary()
    assert up.report.to_dict()["threads"] == f"{want} (given)"
    with pytest.raises(ConfigError):  # refused before anything changes
        DepthUpscaler(tiny_model("gqa")).upscale(threads=0)


def test_cli_threads_flag_yaml_and_errors(tmp_path, capsys):
    tiny_model("qwen2").save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit):
        main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--threads", "0"])
    assert "--threads takes a positive integer or 'auto'" in capsys.readouterr().err
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tmp_path / 'base'}\nout: {tmp_path / 'o'}\nthreads: many\n")
    assert main(["upscale", "--config", str(run), "--no-progress"]) == 2
    assert "threads='many'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress",
               "--method", "avg", "--report", str(tmp_path / "r.json")])  # streams: the other path
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["threads"] == "1 (given)"
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o2"), "--no-progress", "--method", "avg"])
    assert rc == 0
    assert "threads" in capsys.readouterr().out  # the default, auto, reports what it chose


def test_cli_loads_and_saves_on_the_threads_too(tmp_path, monkeypatch):
    """The CLI owns its process: loading, the upscale and saving all run on --threads (restored after)."""
    from hf_deepen import upscaler

    tiny_model("gqa").save_pretrained(tmp_path / "base")
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = {}
    real_load, real_save = upscaler.DepthUpscaler.from_pretrained.__func__, upscaler.DepthUpscaler.save_pretrained

    def load(cls, *a, **k):
        seen["load"] = torch.get_num_threads()
        return real_load(cls, *a, **k)

    def save(self, *a, **k):
        seen["save"] = torch.get_num_threads()
        return real_save(self, *a, **k)

    monkeypatch.setattr(upscaler.DepthUpscaler, "from_pretrained", classmethod(load))
    monkeypatch.setattr(upscaler.DepthUpscaler, "save_pretrained", save)
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--no-streaming", "--method", "avg",
               "--threads", str(want), "--no-progress"])
    assert rc == 0
    assert seen == {"load": want, "save": want} and torch.get_num_threads() == before


def test_a_resolved_threads_value_is_used_as_it_is(tmp_path, monkeypatch):
    """The CLI resolves "auto" once for the whole command; the upscale inside reuses it (no second sample)."""
    assert str(th.Threads(1, "given")) == "1 (given)"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "cpu_quota", lambda: None)
    calls = []
    monkeypatch.setattr(th, "idle_cores", lambda: calls.append(1) or 1.0)
    assert th.resolve_threads(th.Threads(1, "auto: earlier")) == (1, "auto: earlier") and not calls
    tiny_model("gqa").save_pretrained(tmp_path / "base")
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--no-streaming", "--method", "avg",
               "--no-progress", "--report", str(tmp_path / "r.json")])
    assert rc == 0 and len(calls) == 1
    assert json.loads((tmp_path / "r.json").read_text())["threads"] == "1 (auto: 1.0 of %d CPUs idle)" % len(
        os.sched_getaffinity(0))
