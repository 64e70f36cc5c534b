"""How many torch threads an upscale runs on: by default all cores; with ``threads="auto"`` only the idle ones.

PyTorch's CPU kernels split each operation over ``torch.get_num_threads()`` OpenMP threads (one per
core by default), and every split waits for its slowest thread. When another process keeps a core
busy, the thread that shares it gets a time slice now and then, and each of the alignment's many
mid-sized operations waits for it. ``benchmarks/threads_load.py`` measured SmolLM2's align + fuse
on a 2-core machine: 5.3 s on 2 threads idle; beside one busy process 12.9-19.5 s on 2 threads and
5.3-5.9 s on 1.
``threads="auto"`` therefore samples how busy the allowed CPUs are for a fifth of a second and runs
on the idle ones (never more than torch's own setting or the container's CPU quota, never fewer
than one). Inside a container limited to fewer CPUs than the host has (``docker --cpus``, a
Kubernetes limit), torch still starts one thread per host core; the quota bounds ``auto`` too.

Written by hand: torch, OpenMP and ``os`` give the core count, not how many cores other processes
use; psutil would (``cpu_percent(percpu=True)``) but is not otherwise a dependency, and Linux's
``/proc/stat`` is all it reads there.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import ConfigError

#: seconds ``threads="auto"`` samples /proc/stat for
SAMPLE_SECONDS = 0.2


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """Per CPU: (idle jiffies incl. iowait, total jiffies) from a ``/proc/stat``-format file."""
    out = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out


def idle_cores(interval: float = SAMPLE_SECONDS, stat: str | os.PathLike = "/proc/stat") -> float | None:
    """How many of the CPUs this process may run on were idle over the next ``interval`` seconds
    (a sum of idle fractions: 1.0 = one core's worth), or None where ``/proc/stat`` is unavailable
    (not Linux). The caller should be idle meanwhile: its own busy threads count as busy."""
    path = Path(stat)
    try:
        allowed = os.sched_getaffinity(0)
        before = _cpu_times(path)
        time.sleep(interval)
        after = _cpu_times(path)
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux, or a /proc/stat we cannot read
        return None
    idle = 0.0
    for cpu in allowed:
        if cpu in before and cpu in after:
            d_idle = after[cpu][0] - before[cpu][0]
            d_total = after[cpu][1] - before[cpu][1]
            idle += d_idle / d_total if d_total > 0 else 1.0
    return idle


def cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPUs' worth of time this process's cgroup may use (a container's ``--cpus``), or None where
    there is no limit or no cgroup filesystem. cgroup v2's ``cpu.max`` (``"QUOTA PERIOD"`` or
    ``"max PERIOD"``) first, then v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no limit);
    at the root of the hierarchy and at this process's own cgroup (``/proc/self/cgroup``)."""
    root = Path(root)
    own: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    limits = []
    for base in {root, root / own.get("", "")}:
        try:
            quota, period = (base / "cpu.max").read_text().split()[:2]
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
    for base in {root / "cpu", root / "cpu" / own.get("cpu", ""), root / "cpu,cpuacct", root / "cpu,cpuacct" / own.get("cpu", "")}:
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
            if quota > 0 and period > 0:
                limits.append(quota / period)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


class Threads(NamedTuple):
    """What a :func:`torch_threads` block runs on: the count and why (``str``: ``"1 (auto: 0.9 of 2 CPUs
    idle)"``, as the report prints it). Passed back as ``threads=``, it is used as it is, not resolved again."""

    n: int
    why: str

    def __str__(self) -> str:
        return f"{self.n} ({self.why})"


def check_threads(threads: int | str | Threads | None) -> int | str | Threads | None:
    """``threads`` checked and normalised (``"4"`` -> 4) without sampling anything: a ConfigError names the fix."""
    if isinstance(threads, Threads):
        return threads
    if isinstance(threads, str) and threads.strip().isdigit():
        threads = int(threads)
    if threads is None or threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return threads
    raise ConfigError(f"threads={threads!r}: use a positive integer, 'auto' (the CPUs other processes leave idle)"
                      " or None (torch's setting)")


def resolve_threads(threads: int | str | Threads | None) -> tuple[int | None, str]:
    """``threads`` of an upscale as (the torch thread count to use, or None to leave torch alone; why).

    None: torch's current setting. An int >= 1: that many. ``"auto"``: the idle CPUs (rounded, at
    least 1, at most torch's current setting and the cgroup's CPU quota, rounded down), unless
    ``OMP_NUM_THREADS`` is set (the user chose). A :class:`Threads` (an enclosing block's): as it is.
    """
    import torch

    threads = check_threads(threads)
    if isinstance(threads, Threads):
        return threads.n, threads.why
    current = torch.get_num_threads()
    if threads is None:
        return None, "torch's setting"
    if isinstance(threads, int):
        return threads, "given"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"auto: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set, torch's setting kept"
    quota = cpu_quota()
    idle = idle_cores()
    if idle is None and quota is None:
        return None, "auto: CPU load unknown on this system, torch's setting kept"
    n = current if idle is None else min(current, int(idle + 0.5))
    why = "auto: " + ("CPU load unknown" if idle is None else f"{idle:.1f} of {len(os.sched_getaffinity(0))} CPUs idle")
    if quota is not None and quota < n:  # a container's --cpus: more threads than that only queue
        n = int(quota)
        why += f", cgroup quota {quota:g} CPUs"
    return max(1, n), why


@contextmanager
def torch_threads(threads: int | str | Threads | None) -> Iterator[Threads]:
    """Run the block on ``threads`` torch threads (see :func:`resolve_threads`), then restore torch's
    setting. Yields the :class:`Threads` used (the count and why)."""
    import torch

    n, why = resolve_threads(threads)
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield Threads(n if n is not None else before, why)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
