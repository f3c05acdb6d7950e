#!/usr/bin/env bash
# GPU proof in one command (issue #12 part 6), on a lent CUDA machine, from the repo root:
#   bench/gpu.sh [OUT_DIR]        (default reports/gpu)
# 1. CUDA scores == CPU fp32 scores to bf16 tolerance (plain and W8A16, cached and reference);
# 2. cached vs reference scoring at C in {16,128,512}, n in {64,256,512}, bf16 autocast;
# 3. batched serving at n=50, C=10, B in {1,64}, bf16 and W8A16;
# 4. offline training examples/s of every model kind at both sizes on CUDA;
# 5. the worker applying and scoring a replay on CUDA: `unirec demo --no-train --device cuda`
#    (the embedded broker, a suite-size model trained on CUDA, the history applied, 5,000
#    held-out events scored), with `unirec eval` on the same events beside it.
# Every step writes one JSON file to OUT_DIR. Python: $PYTHON, else .venv/bin/python, else
# python3 (a CUDA image's, with PyTorch). A machine that cannot download: gather the rest here
# with bench/gpu_bundle.sh and carry .gpu-bundle; this script installs its requirements from
# there (GPU_BUNDLE; pip keeps what is already installed) and reads MovieLens-100K from its data/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
OUT=${1:-reports/gpu}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
if [[ -f "$BUNDLE/requirements.txt" ]]; then  # pip keeps what is already there
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt"
    export UNIREC_DATA_DIR=${UNIREC_DATA_DIR:-$PWD/$BUNDLE/data}
fi
"$PY" bench/gpu_check.py --device cuda > "$OUT/check.json"
"$PY" bench/scoring.py --device cuda --n 64 256 512 --candidates 16 128 512 --budget 2 \
    --out "$OUT/scoring.json" > /dev/null
"$PY" bench/scoring.py --device cuda --n 50 --candidates 10 --batch 1 64 \
    --quantize none w8a16 --budget 2 --out "$OUT/scoring_batched.json" > /dev/null
"$PY" bench/training.py --device cuda --steps 20 > "$OUT/training.json"
UNIREC_RUN_DIR=${UNIREC_RUN_DIR:-$(mktemp -d)} "$PY" -m app.cli demo --device cuda --no-train --events 5000 --json \
    > "$OUT/replay.json" 2> "$OUT/replay.log"
echo "gpu.sh: results in $OUT (check.json ok: $("$PY" -c "import json;print(json.load(open('$OUT/check.json'))['ok'])"))"
