#!/usr/bin/env bash
# GPU proof in one command (issue #12 part 6), on a lent CUDA machine, from the repo root:
#   bench/gpu.sh [OUT_DIR]        (default reports/gpu; PYTHON overrides .venv/bin/python)
# 1. CUDA scores == CPU fp32 scores to bf16 tolerance (plain and W8A16, cached and reference);
# 2. cached vs reference scoring at C in {16,128,512}, n in {64,256,512}, bf16 autocast;
# 3. batched serving at n=50, C=10, B in {1,64}, bf16 and W8A16.
# Not yet here: training examples/s on CUDA (bench/training.py is CPU-only) and a worker
# replay on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-reports/gpu}
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
"$PY" bench/gpu_check.py --device cuda > "$OUT/check.json"
"$PY" bench/scoring.py --device cuda --n 64 256 512 --candidates 16 128 512 --budget 2 \
    --out "$OUT/scoring.json" > /dev/null
"$PY" bench/scoring.py --device cuda --n 50 --candidates 10 --batch 1 64 \
    --quantize none w8a16 --budget 2 --out "$OUT/scoring_batched.json" > /dev/null
echo "gpu.sh: results in $OUT (check.json ok: $("$PY" -c "import json;print(json.load(open('$OUT/check.json'))['ok'])"))"
