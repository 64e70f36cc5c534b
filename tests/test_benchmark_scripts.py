"""Every benchmark script still imports and parses its arguments.

The benchmarks need real models and minutes each, so the suite does not run them. This imports each
script the way ``python benchmarks/X.py --help`` does, in one child process (scripts set thread counts and
allocator options at import), and runs its ``--help``: it catches what breaks at import, such as a shared
helper renamed or moved. What breaks only at run time (``smollm2_stages.py`` after ``layout="auto"``
became the default) still needs the script itself run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

CHILD = r"""
import contextlib, importlib.util, io, json, sys
bench, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
out = {}
for name in names:
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", f"{bench}/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # (dataclasses look their module up there)
        spec.loader.exec_module(mod)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                mod.main(["--help"])
                out[name] = "main returned on --help"
            except SystemExit as e:
                out[name] = "ok" if e.code in (0, None) and "usage" in buf.getvalue() else f"exit {e.code!r}"
    except BaseException as e:  # noqa: BLE001 (report every script, not the first failure)
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def scripts() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if "def main(argv" in p.read_text())


def test_every_benchmark_script_imports_and_prints_its_help():
    names = scripts()
    assert len(names) >= 15  # the glob finds the scripts (a test that checks nothing cannot fail)
    r = subprocess.run([sys.executable, "-c", CHILD, str(BENCH), *names], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in got.items() if v != "ok"}
    assert not bad, bad


def test_the_script_without_main_runs_at_a_tiny_size():
    r = subprocess.run([sys.executable, str(BENCH / "mmap_ab.py"), "plain", "64"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("plain 64 cost"), r.stdout
    r = subprocess.run([sys.executable, str(BENCH / "mmap_ab.py"), "--help"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "plain" in r.stderr
