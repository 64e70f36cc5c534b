#!/usr/bin/env bash
# GPU scale benchmark (issue 13): the Llama-3.1-8B-shaped streaming upscale, exact and Sinkhorn OT,
# on CUDA, within about 5 minutes on one H200. Results as data in $GPU_SCALE_OUT (scale.json,
# scale.csv: wall time, copy floor, per-stage seconds, peak RSS; gpu.json: the device, the
# budget, and whether the run finished inside it).
#
# Self-contained: no network, nothing installed. It needs only this repository and a Python with
# the project's dependencies and a CUDA build of torch, given as $PYTHON (default: .venv/bin/python
# in the repository root, so carry `.venv` to the machine; a CPU-only torch is refused with a
# message when GPU_SCALE_DEVICE is cuda). The checkpoint (16 GB of random bf16 weights for `8b`)
# is written to $GPU_SCALE_WORK and deleted afterwards; the disk needs ~45 GB there.
#
# Environment (defaults in brackets):
#   GPU_SCALE_SHAPE   8b | 1b6 | tiny (scale.py SHAPES) [8b]; `tiny` is what the test runs on CPU
#   GPU_SCALE_DEVICE  cuda | cuda:N | cpu [cuda]
#   GPU_SCALE_LAYERS  new layers per method on the 8b shape (after base layers 16, 17, ...) [4];
#                     0 = the full 32 -> 48 plan (does not fit 5 minutes with the exact solver)
#   GPU_SCALE_BUDGET_S  hard limit for the benchmark itself, seconds [285]
#   GPU_SCALE_OUT     results directory [benchmarks/results/gpu]
#   GPU_SCALE_WORK    scratch directory [/tmp/gpu-scale]
#
#   bash benchmarks/gpu_scale.sh
#   GPU_SCALE_SHAPE=tiny GPU_SCALE_DEVICE=cpu GPU_SCALE_OUT=/tmp/g bash benchmarks/gpu_scale.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
SHAPE="${GPU_SCALE_SHAPE:-8b}"
DEVICE="${GPU_SCALE_DEVICE:-cuda}"
LAYERS="${GPU_SCALE_LAYERS:-4}"
BUDGET="${GPU_SCALE_BUDGET_S:-285}"
OUT="${GPU_SCALE_OUT:-$ROOT/benchmarks/results/gpu}"
WORK="${GPU_SCALE_WORK:-/tmp/gpu-scale}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -x "$PY" ]; then
  echo "gpu_scale.sh: no Python at $PY: carry the project's .venv or set PYTHON=" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PY" - "$DEVICE" "$OUT/gpu.json" "$SHAPE" "$LAYERS" "$BUDGET" <<'PYEOF'
import json, os, sys, torch
dev, path, shape, layers, budget = sys.argv[1:]
info = {"device": dev, "shape": shape, "new_layers_per_method": int(layers), "budget_s": int(budget),
        "torch": torch.__version__, "cpus": os.cpu_count()}
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"gpu_scale.sh: torch {torch.__version__} sees no CUDA device: use a CUDA build of torch"
                 " (PYTHON=...) or GPU_SCALE_DEVICE=cpu")
    p = torch.cuda.get_device_properties(torch.device(dev))
    info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
json.dump(info, open(path, "w"), indent=1)
PYEOF

start=$(date +%s)
rc=0
timeout "$BUDGET" "$PY" benchmarks/scale.py --shapes "$SHAPE" --methods opt-exact,opt-sinkhorn \
  --exact-layers "$LAYERS" --sinkhorn-layers "$LAYERS" --no-in-memory --no-readme \
  --device "$DEVICE" --out "$OUT" --work "$WORK" || rc=$?
end=$(date +%s)
rm -rf "$WORK/$SHAPE"
"$PY" - "$OUT/gpu.json" "$rc" "$((end - start))" <<'PYEOF'
import json, sys
path, rc, sec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = json.load(open(path))
info.update(exit_code=rc, finished=rc == 0, timed_out=rc == 124, wall_s=sec)
json.dump(info, open(path, "w"), indent=1)
print(json.dumps(info))
PYEOF
exit "$rc"
