#!/usr/bin/env bash
# The first GPU check of the project (nbs/09_training.ipynb, "One command for the first GPU"): `mindlink bench gpu`.
#
#   bash scripts/gpu_check.sh --wheels   # once, on a machine with PyPI: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh            # on the GPU machine (carry .whl): <= 8 min, writes bench_gpu.json and bench_gpu.log
#   bash scripts/gpu_check.sh --smoke    # the same code at tiny sizes on any machine (CI runs this)
#
# The results go to $OUT if it is set (the device tool's folder), else to the current folder. `mindlink bench gpu`
# rewrites the JSON after every section, so a run cut short by the timeout still leaves the finished sections.
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the GPU image (Python 3.12, torch, transformers, accelerate, h5py, pandas, ... already there) lacks these
WHEELS="fastcore==1.14.5 nibabel==5.4.2 diffusers==0.42.1 importlib_metadata==10.2.0"

if [ "${1:-}" = "--wheels" ]; then
  exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mindlink-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/mindlink-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MINDLINK_NO_PROGRESS=1
DEST=${OUT:-.}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$DEST/bench_gpu.log"
timeout "${GPU_CHECK_TIMEOUT:-570}" $PY -m mindlink.cli bench gpu --json "$DEST/bench_gpu.json" "$@" 2>&1 | tee -a "$DEST/bench_gpu.log"
