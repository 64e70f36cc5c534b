#!/usr/bin/env bash
# The GPU quality study (issue 14): one prepared run on one H200, <= 8 minutes, results as data.
#
#   benchmarks/gpu_quality.sh                      # on the device machine (python3 with torch + CUDA)
#   GPU_QUALITY_TINY=1 benchmarks/gpu_quality.sh   # the CPU check: tiny model, tiny budget, seconds
#
# What runs: benchmarks/study.py --budget gpu (64 steps x 64 x 512 = 2,097,152 training tokens per
# run, bf16 autocast with fp32 master weights) on the pre-tokenized corpus of make_corpus.py, both
# models, protocol `new` (base frozen) plus the `base` reference, variants opt-auto (the library
# default), copy-auto (copies at its positions), copy-every2 (LLaMA Pro), opt-uniform, copy-uniform,
# seeds 0 and 1, seed-major (every variant of both models gets seed 0 before any gets seed 1), the
# default's comparisons first. study.py stops itself, checkpointed, at GPU_QUALITY_SECONDS (default 420 s), so
# the whole call stays inside 8 minutes with whatever finished cached as JSON.
#
# Inputs that must travel to the device (it reaches nothing): the corpus
# (benchmarks/.work/corpus/corpus.npz.xz, 7.9 MB; carry `benchmarks/.work/corpus`), the gguf wheel
# (carry `.whl`, see the device README) and the two GGUF files. The GGUFs (98 MB and 253 MB) are
# larger than one call may carry (64 MiB): benchmarks/gpu_carry.sh splits them into chunks under
# benchmarks/.work/carry/NN/ to carry one per warm call; this script reassembles and checks them.
#
# Results: benchmarks/results/study/gpu/... (the study's cache layout) and, when $OUT is set (the
# device), $OUT/gpu_quality_results.tar.gz plus $OUT/gpu_quality.log. Unpack the tarball into
# benchmarks/results/study/ here and run `python benchmarks/study.py --report-only`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RESULTS="${GPU_QUALITY_RESULTS:-benchmarks/results/study}"
WORK="${GPU_QUALITY_WORK:-benchmarks/.work/study}"
LOG="${OUT:-/tmp}/gpu_quality.log"
SECONDS_LIMIT="${GPU_QUALITY_SECONDS:-420}"
if [ -n "${GPU_QUALITY_TINY:-}" ]; then
  BUDGET=tiny
  ARGS=(--budget tiny --models tiny --device cpu --dtype fp32 --threads 1
        --corpus "${GPU_QUALITY_CORPUS:-benchmarks/.work/corpus/corpus.npz.xz}")
else
  BUDGET=gpu
  if [ -d "${GPU_CARRY_DIR:-benchmarks/.work/carry}" ]; then
    export STUDY_GGUF_DIR=/tmp/gguf
    bash benchmarks/gpu_carry.sh assemble "$STUDY_GGUF_DIR"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  ARGS=(--budget gpu --models smollm2,gemma3 --device cuda --dtype bf16
        --corpus "${GPU_QUALITY_CORPUS:-benchmarks/.work/corpus/corpus.npz.xz}")
fi
"$PY" benchmarks/study.py "${ARGS[@]}" --data corpus --protocols new --seeds 0,1 \
  --variants opt-auto,copy-auto,copy-every2,base,opt-uniform,copy-uniform \
  --results "$RESULTS" --work "$WORK" --readme no --ckpt-seconds 100000 \
  --time-limit "$SECONDS_LIMIT" 2>&1 | tr "\r" "\n" | tee "$LOG" | grep -v "^study " | tail -n 40
if [ -n "${OUT:-}" ] && [ -d "$RESULTS/$BUDGET" ]; then
  tar czf "$OUT/gpu_quality_results.tar.gz" -C "$RESULTS" "$BUDGET"
  echo "results packed into $OUT/gpu_quality_results.tar.gz"
fi
