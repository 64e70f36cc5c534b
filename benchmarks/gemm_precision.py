#!/usr/bin/env python
"""What this CPU offers for the OT cost matrix's product (issue 13): bf16 inputs, which precision out.

The exact solver's cost is ``|a|^2 + |b|^2 - 2 A B^T`` over the units' features; at Llama-3.1-8B's MLP
that product is 14,336 x 14,336 x 12,288 (5.05 TFLOP per new layer) and it decides the exact run's
speed. Checkpoint weights are bf16, so a bf16 x bf16 product with float32 accumulation and a float32
result would lose nothing and keep the certificate's error bound (``SqDistCost.error_bounds``).
This script measures, in one process and one run (ratios, not absolute speeds, are what carry over
on a shared machine), every route torch 2.x offers on the CPU for ``A @ B.T`` with bf16-valued A, B:

* ``fp32``: float32 inputs, IEEE float32 (what ``SqDistCost.matrix`` runs today);
* ``fp32 bf16-internal``: ``torch.set_float32_matmul_precision("medium")`` (oneDNN may use bf16
  internally, float32 out: exact on bf16-valued inputs, float32 accumulation);
* ``mkl bf16->fp32``: MKL's ``cblas_gemm_bf16bf16f32`` (float32 out), called through ctypes from the
  MKL linked into ``libtorch_cpu.so`` (not a public torch API: measured to know, not used);
* ``bf16 -> bf16``: ``torch.mm`` on bf16 tensors (oneDNN; float32 accumulation but the result is
  rounded to bf16: 2^-9 relative per entry, far above what the certificate can absorb);
* ``aten::mm.dtype``: bf16 in, float32 out (``torch.mm(..., out_dtype=torch.float32)``), if supported.

Each route's max error against a float64 product is recorded next to its GFLOPS.

    python benchmarks/gemm_precision.py [--threads 2] [--size 2048] [--out benchmarks/results/gemm_precision.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def mkl_bf16_f32() -> object | None:
    """``cblas_gemm_bf16bf16f32`` from the MKL inside libtorch_cpu, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        f = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i, fl, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    f.restype = None
    f.argtypes = [i, i, i, i, i, i, fl, p, i, p, i, fl, p, i]

    def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # out = a @ b.T
        m, k = a.shape
        f(101, 111, 112, m, b.shape[0], k, 1.0, a.data_ptr(), k, b.data_ptr(), k, 0.0, out.data_ptr(), b.shape[0])
        return out

    return mm


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_fp16", "avx512_vnni", "avx512f")))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=2048, help="m = n; k = 2 x size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "gemm_precision.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, k = args.size, 2 * args.size
    g = torch.Generator().manual_seed(0)
    a16 = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    b16 = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    a32, b32 = a16.float(), b16.float()
    ref = a16.double() @ b16.double().T
    flops = 2.0 * n * n * k
    out32 = torch.empty(n, n)
    mkl = mkl_bf16_f32()

    def medium() -> torch.Tensor:
        prec = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            return torch.mm(a32, b32.T)
        finally:
            torch.set_float32_matmul_precision(prec)

    def mm_dtype() -> torch.Tensor:
        return torch.mm(a16, b16.T, out_dtype=torch.float32)

    routes = {
        "fp32": lambda: torch.mm(a32, b32.T),
        "fp32 bf16-internal": medium,
        "mkl bf16->fp32": (lambda: mkl(a16, b16, out32)) if mkl else None,
        "bf16 -> bf16": lambda: torch.mm(a16, b16.T),
        "aten::mm.dtype bf16 -> fp32": mm_dtype,
    }
    res: dict[str, dict] = {}
    for name, fn in routes.items():
        if fn is None:
            res[name] = {"available": False, "why": "symbol not found"}
            continue
        try:
            y = fn()
        except (RuntimeError, NotImplementedError, TypeError) as e:
            res[name] = {"available": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            continue
        err = float((y.double() - ref).abs().max())
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best = min(times)
        res[name] = {"available": True, "out_dtype": str(y.dtype), "seconds": round(best, 4),
                     "gflops": round(flops / best / 1e9, 1), "max_abs_err": err,
                     "max_abs_err_rel_to_max": err / float(ref.abs().max())}
    base = res["fp32"]["gflops"]
    for r in res.values():
        if r.get("available"):
            r["speed_vs_fp32"] = round(r["gflops"] / base, 2)
    doc = {"what": __doc__.split("\n")[0], "shape": {"m": n, "n": n, "k": k}, "threads": args.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
           "cpu_flags": cpu_flags(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "routes": res}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in res.items():
        print(f"{name:30s} " + (f"{r['gflops']:7.1f} GFLOPS ({r['speed_vs_fp32']}x fp32), out {r['out_dtype']}, "
                                f"max err {r['max_abs_err_rel_to_max']:.1e} of max" if r.get("available") else f"n/a: {r['why']}"))
    return doc


if __name__ == "__main__":
    main()
