#!/usr/bin/env bash
# The GPU check of the project (nbs/13a_benchmarks.ipynb, "One command for a GPU"): `mindlink bench gpu`.
#
#   bash scripts/gpu_check.sh --wheels            # once, on a machine with PyPI: the wheels a bare GPU image lacks, into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh [--out DIR]         # on the GPU machine (with .whl/ beside it): <= 8 min, writes DIR/bench_gpu.json and .log
#   bash scripts/gpu_check.sh --smoke [--out DIR] # the same code at tiny sizes on any machine (CI runs this)
#
# The results go to DIR (default: the current folder). `mindlink bench gpu` rewrites the JSON after every section, so a
# run cut short by the timeout still leaves the finished sections.
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# a GPU image with Python 3.12, torch, transformers, accelerate, h5py and pandas lacks these
WHEELS="fastcore==1.14.5 nibabel==5.4.2 diffusers==0.42.1 importlib_metadata==10.2.0"

if [ "${1:-}" = "--wheels" ]; then
  exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
DEST=.
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) DEST=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mindlink-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/mindlink-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MINDLINK_NO_PROGRESS=1
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$DEST/bench_gpu.log"
timeout "${GPU_CHECK_TIMEOUT:-570}" $PY -m mindlink.cli bench gpu --json "$DEST/bench_gpu.json" "${ARGS[@]}" 2>&1 | tee -a "$DEST/bench_gpu.log"
