#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one prepared run, under 8 minutes on one GPU, that prints
# throughput at fp32/bf16/fp16 with and without channels_last and compile, peak memory, an fp16
# overflow the scaler skips, sync_bn on one process and the e2e benchmark on the GPU.
#
#   bash bench/gpu_check.sh --prepare    # here: wheels the GPU machine lacks (.whl/) and a CamVid
#                                        # subset (.gpu_data/camvid) from ../shared, both git-ignored
#   bash bench/gpu_check.sh              # on the GPU machine (carry .whl and .gpu_data); tables on
#                                        # stdout and in $OUT/gpu_check.md when OUT is set
#   bash bench/gpu_check.sh --dry        # anywhere: the CPU-safe parts (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
    # the e2e section's data: 100 train and 50 val images of CamVid (about 40 MB), same layout
    src=../shared/data/camvid
    [ -d "$src" ] || { echo "error: $src not found" >&2; exit 2; }
    rm -rf .gpu_data/camvid && mkdir -p .gpu_data/camvid/{train,trainannot,val,valannot}
    head -n 100 "$src/train.txt" > .gpu_data/camvid/train.txt
    head -n 50 "$src/val.txt" > .gpu_data/camvid/val.txt
    for split in train val; do
        while read -r image label; do
            cp "$src/$split/$(basename "$image")" ".gpu_data/camvid/$split/"
            cp "$src/${split}annot/$(basename "$label")" ".gpu_data/camvid/${split}annot/"
        done < ".gpu_data/camvid/$split.txt"
    done
    # what the GPU image lacks for the e2e section's example loop (pure-Python wheels, Python 3.12)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6
    du -sh .gpu_data .whl
    exit 0
fi

if [ "${1:-}" != "--dry" ] && command -v nvidia-smi >/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
args=("$@")
if [ "${1:-}" != "--dry" ] && [ -d .gpu_data/camvid ]; then
    args+=(--camvid .gpu_data/camvid)
fi
if [ -n "${OUT:-}" ]; then
    args+=(--out "$OUT")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # seg_accel from this checkout (not installed there)
if [ -n "${OUT:-}" ]; then  # the tables on stdout; each run's own log beside them
    exec "$PY" bench/gpu_check.py "${args[@]}" 2> "$OUT/gpu_check_stderr.log"
fi
exec "$PY" bench/gpu_check.py "${args[@]}"
