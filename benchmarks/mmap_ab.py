"""A/B in one run: the streaming path's glibc mmap threshold (1 MiB) vs glibc's default, on the float32 cost
matrix and the certified exact assignment of random bf16 features (n x 1024), 1 thread.
Usage: python benchmarks/mmap_ab.py {plain|mmap} N  (one process per arm: mallopt cannot be undone)."""
import sys, time, ctypes, torch
if len(sys.argv) != 3 or sys.argv[1] not in ("plain", "mmap") or not sys.argv[2].isdigit():
    sys.exit(__doc__)  # (also for --help)
torch.set_num_threads(1)
if sys.argv[1] == "mmap":
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
from hf_deepen.align.solvers import SqDistCost, solve_exact
g = torch.Generator().manual_seed(0)
n, d = int(sys.argv[2]), 1024
A = torch.randn(n, d, generator=g).to(torch.bfloat16)
B = (A[torch.randperm(n, generator=g)].float() + 0.8 * torch.randn(n, d, generator=g)).to(torch.bfloat16)
o = SqDistCost([A], [B])
t = time.perf_counter(); M = o.matrix(); tc = time.perf_counter() - t
t = time.perf_counter(); p = solve_exact(M, o); ta = time.perf_counter() - t
print(sys.argv[1], n, f"cost {tc:.1f}s assign {ta:.1f}s")
