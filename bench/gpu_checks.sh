#!/usr/bin/env bash
# Every GPU check of this project in one run, for a session that is lent a GPU for a few
# minutes, in the order of the speed targets (bench/README.md): mode 3 at 2448 x 2448 in bf16 in-process
# (speed, memory), predict.py over a folder end to end, the training schedule with the fast
# settings, compiled in-process, the faithful schedule; then the CUDA variants of the tests,
# the other compiled cases, the 40,000 x 40,000 image, and the wider benchmark.
#
#   bash bench/gpu_checks.sh OUT
#
# On a lent device (bench/README.md, "On a lent GPU machine"), whose copy has no .git, whose
# python lacks some pinned packages, whose command may run 10 minutes and which returns at
# most 8 files:
#
#   LUNGSEG_COMMIT=<hash> GPU_CHECKS_WHEELS=.whl GPU_CHECKS_BUDGET=540 \
#       GPU_CHECKS_ARCHIVE=$OUT/gpu_checks.tar.gz bash bench/gpu_checks.sh /tmp/gpu_checks
#
# GPU_CHECKS_BUDGET (seconds): each case runs under `timeout` for at most its own cap and
# what is left of the budget, and a case with nothing left is skipped; so the cases that
# count most are measured first and the run ends in time. GPU_CHECKS_ARCHIVE: OUT is packed
# into this tar.gz after every case, so a run cut short keeps what it measured.
# GPU_CHECKS_WHEELS: a folder of wheels (bench/device_wheels.sh) installed first.
# GPU_CHECKS_FROM=NAME: continue the run in OUT from case NAME (the one cut off, or the
# first skipped), the cases before it left as they are. OUT/timeline.txt records each
# case's exit status and seconds, or why it was skipped; its lines go to stderr too.
set -u
out=${1:?usage: bash bench/gpu_checks.sh OUT}
py=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET:-0} # 0: no limit
archive=${GPU_CHECKS_ARCHIVE:-}
wheels=${GPU_CHECKS_WHEELS:-}
from=${GPU_CHECKS_FROM:-}
fail() {
    echo "error: $*" >&2
    exit 2
}
[[ $budget =~ ^[0-9]+$ ]] || fail "GPU_CHECKS_BUDGET must be whole seconds, got '$budget'"
budget=$((10#$budget))
if [ -n "$from" ] && ! awk -v name="$from" '$1 == "check" && $2 == name { found = 1 } END { exit !found }' \
    "${BASH_SOURCE[0]}"; then
    fail "GPU_CHECKS_FROM=$from names no case of bench/gpu_checks.sh"
fi
# The benchmarks append to their JSON files: a second run into OUT would mix with the first.
if [ -e "$out/timeline.txt" ] && [ -z "$from" ]; then
    fail "$out already holds a run of bench/gpu_checks.sh; give a new folder, or GPU_CHECKS_FROM to continue it"
fi
if [ -n "$archive" ]; then
    [ -d "$(dirname "$archive")" ] || fail "GPU_CHECKS_ARCHIVE's folder does not exist: $archive"
    archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
fi
if [ -n "$wheels" ]; then
    [ -d "$wheels" ] || fail "GPU_CHECKS_WHEELS is not a folder: $wheels"
    wheels=$(cd "$wheels" && pwd)
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) || fail "cannot make $out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
bench=(bench/bench_inference.py --device cuda)
# The bf16 (speed) cases pass --cuda_math fast: any cuDNN algorithm, as torch allows by
# default; the fp32 cases keep the default true fp32 with deterministic cuDNN, the authors'.
fast=(--amp bf16 --cuda_math fast --channels_last)

note() { echo "$(date +%T) $*" | tee -a "$out/timeline.txt" >&2; }

pack() {
    [ -n "$archive" ] || return 0
    tar -czf "$archive.part" -C "$(dirname "$out")" "$(basename "$out")" && mv "$archive.part" "$archive"
}

# Ctrl-C or SIGTERM: `timeout` runs each case in a process group of its own, which the
# terminal's signal does not reach, so the case is stopped through it.
running="" current=""
stop() {
    [ -n "$running" ] && kill -TERM "$running" 2> /dev/null && wait "$running"
    note "interrupted${current:+ during $current}"
    pack
    exit 130
}
trap stop INT TERM

# check NAME CAP COMMAND...: runs COMMAND with its output in OUT/NAME.txt (its JSON goes to
# OUT/NAME.json), for at most CAP seconds and what is left of the budget (`timeout` stops
# the command's children too).
check() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$from" ]; then
        [ "$name" = "$from" ] || return
        from=""
    fi
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - SECONDS))
        if [ "$left" -le 0 ]; then
            note "$name skipped: the budget of $budget s is spent"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    rm -f "$out/$name.txt" "$out/$name.json"
    local start=$SECONDS rc cut=""
    current=$name
    timeout -k 10 "$limit" "$@" > "$out/$name.txt" 2>&1 &
    running=$!
    wait "$running"
    rc=$?
    running="" current=""
    case $rc in 124 | 137) cut=", cut off" ;; esac
    note "$name rc=$rc in $((SECONDS - start)) s (limit $limit s)$cut"
    pack
}

# The commit measured, for the results' names: the checkout's, else the caller's word.
git rev-parse HEAD > "$out/commit.txt" 2> /dev/null || echo "${LUNGSEG_COMMIT:-unknown}" > "$out/commit.txt"
note "start: commit $(cat "$out/commit.txt"), budget $budget s${from:+, from $from}"
if [ -n "$wheels" ]; then
    site=${TMPDIR:-/tmp}/gpu_checks_site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl > "$out/wheels.txt" 2>&1
    note "wheels from $wheels installed: rc=$?"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# What the cases run on: torch and the GPU, then the packages the wheels may have replaced;
# without a GPU torch can use, no case could run: stop, not fail each in turn.
"$py" - > "$out/torch.txt" 2>&1 << 'PYTHON'
import importlib
import sys
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")
for name in ("PIL", "tifffile", "tensorboardX", "pynvml"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "(no version)"))
    except ImportError as error:
        print(name, "missing:", error)
sys.exit(0 if torch.cuda.is_available() else 3)
PYTHON
if [ $? -ne 0 ]; then
    note "stopped: $py cannot use torch or sees no CUDA GPU (torch.txt says what it found)"
    pack
    exit 2
fi

# 1. Target 1, bf16 + channels-last, one 2448 x 2448 image in-process, eager: speed at the
#    default 6 patches per pass with cuDNN's autotuner (profiled, operators counted, to set
#    against the host's time); memory at 2 per pass (the live-tensor peak beside the
#    allocator's, to check the CPU estimate); 6 per pass without the autotuner, as
#    predict.py runs, the in-process figure of target 2.
check eval_bf16_cudnn 120 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" --cudnn_benchmark \
    --profile --count_ops --json "$out/eval_bf16_cudnn.json"
check eval_bf16_mb2 90 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" --micro_batch_size 2 \
    --tensor_peak --json "$out/eval_bf16_mb2.json"
check eval_bf16_mb6 90 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" \
    --json "$out/eval_bf16_mb6.json"

# 2. Target 2: predict.py over 124 JPEGs of 2448 x 2448, files in to files out, and the
#    host's reading and writing alone.
check predict_folder_bf16 180 "$py" bench/predict_folder.py --device cuda --json "$out/predict_folder_bf16.json" \
    -- "${fast[@]}"

# 3. Target 3: the three stage scripts for 2 epochs each on a small demo, the last epoch
#    scaled to DeepGlobe's split and 120 + 50 + 120 epochs, with the fast settings and 8
#    loader workers (at 2, on the CPU measured in bench/README.md, the loader
#    alone would hold the schedule above 2.7 hours).
check train_schedule_bf16 240 "$py" bench/train_schedule.py --json "$out/train_schedule_bf16.json" \
    -- "${fast[@]}" --num_workers 8

# 4. Target 1 compiled (--compile; first_seconds is the first image, compiling included) at
#    6 patches per pass as predict.py runs, profiled; then target 3's faithful fp32 schedule
#    (one batch of 6, it is slower).
check eval_bf16_compile_mb6 180 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" --compile \
    --profile --json "$out/eval_bf16_compile_mb6.json"
check train_schedule_fp32 180 "$py" bench/train_schedule.py --train 6 --val 3 --json "$out/train_schedule_fp32.json"

# 5. Every test marked gpu: CUDA parity (the reference against the authors' arrays, the
#    engine against the reference) and device tests (TF32 off inside the parity tests). A
#    module that needs a package the machine lacks (rasterio, openslide) fails to collect
#    and the others run; none of those holds a test marked gpu. Then the other cases of
#    targets 1 and 2: compiled end to end (its in-process figure is step 4's), compiled at 2
#    patches per pass (memory), all 36 patches in one pass.
check pytest_cuda 240 "$py" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests
check predict_folder_bf16_compile 240 "$py" bench/predict_folder.py --device cuda \
    --json "$out/predict_folder_bf16_compile.json" -- "${fast[@]}" --compile
check eval_bf16_compile_mb2 180 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" --compile \
    --micro_batch_size 2 --json "$out/eval_bf16_compile_mb2.json"
check eval_bf16_mb36 90 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 "${fast[@]}" --micro_batch_size 36 \
    --cudnn_benchmark --profile --count_ops --json "$out/eval_bf16_mb36.json"

# 6. Very large images: predict.py on a 40,000 x 40,000 tiled, pyramidal TIFF in mode 3, the peak RSS
#    of the whole process (bench/README.md, "Very large images end to end").
check predict_large_40k_mode3 900 "$py" bench/predict_large_rss.py --sizes 40000 --mode 3 --device cuda \
    --json "$out/predict_large_40k_mode3.json" -- --amp bf16 --cuda_math fast

# 7. Evaluation per mode and size: fp32, then bf16 + channels-last (6 patches per pass,
#    with the live-tensor peak).
check eval_fp32 600 "$py" "${bench[@]}" --modes 1,2,3 --sizes 2448,5000 --repeat 3 --json "$out/eval_fp32.json"
check eval_bf16 600 "$py" "${bench[@]}" --modes 1,2,3 --sizes 2448,5000,8000 --repeat 3 "${fast[@]}" --tensor_peak \
    --json "$out/eval_bf16.json"

# 8. One stage-2 training step on 2448 x 2448: fp32 and bf16, with and without checkpointing.
check train_fp32 300 "$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --json "$out/train_fp32.json"
check train_bf16 300 "$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --amp bf16 --cuda_math fast \
    --json "$out/train_bf16.json"
check train_fp32_ckpt 300 "$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --checkpointing \
    --json "$out/train_fp32_ckpt.json"
check train_bf16_ckpt 300 "$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --amp bf16 --cuda_math fast \
    --checkpointing --json "$out/train_bf16_ckpt.json"
note "done"
pack
