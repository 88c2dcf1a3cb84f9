#!/usr/bin/env bash
# Every GPU check of this project in one run, for a session that is lent a GPU for a few
# minutes, in the order of issue 15's targets: mode 3 at 2448 x 2448 in bf16 in-process
# (speed, memory), predict.py over a folder end to end, the training schedule; then the CUDA
# variants of the tests, issue 17's 40,000 x 40,000 image, then the wider benchmark. Each
# step writes its own files under OUT as it finishes, so a run cut short keeps what it
# measured. The whole run has not been timed since the steps after the CUDA tests were
# added; it may take more than the 10 minutes one device command may run, in which case
# those last steps are the ones lost.
#
#   bash bench/gpu_checks.sh OUT
#   LUNGSEG_COMMIT=<hash> bash bench/gpu_checks.sh OUT   # where the copy has no .git (a lent device)
set -u
out=${1:?usage: bash bench/gpu_checks.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench=(bench/bench_inference.py --device cuda)
# The bf16 (speed) cases pass --cuda_math fast: any cuDNN algorithm, as torch allows by
# default; the fp32 cases keep the default true fp32 with deterministic cuDNN, the authors'.

# The commit measured, for the results' names: the checkout's, else the caller's word.
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || echo "${LUNGSEG_COMMIT:-unknown}" > "$out/commit.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$out/torch.txt" 2>&1

# 1. The targets, bf16 + channels-last. Eager: memory with 2 patches per pass (the
#    live-tensor peak beside the allocator's, to check the CPU estimate), speed with all 36
#    patches in one pass and cuDNN's autotuner, then the default 6 per pass with the
#    autotuner (the profiled cases also count operators, to set against the host time).
#    Then compiled (--compile; first_seconds is the first image, compiling included):
#    6 patches per pass as predict.py runs (speed, profiled), then 2 per pass (memory),
#    each cut off after 5 minutes so that a slow compile cannot take the steps after it.
echo "$(date +%T) step 1" >&2
"$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last --micro_batch_size 2 --tensor_peak \
    --json "$out/eval_bf16_mb2.json" > "$out/eval_bf16_mb2.txt" 2>&1
"$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last --micro_batch_size 36 \
    --cudnn_benchmark --profile --count_ops --json "$out/eval_bf16_mb36.json" > "$out/eval_bf16_mb36.txt" 2>&1
"$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last --cudnn_benchmark --profile --count_ops \
    --json "$out/eval_bf16_cudnn.json" > "$out/eval_bf16_cudnn.txt" 2>&1
timeout 300 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last --compile --profile \
    --json "$out/eval_bf16_compile_mb6.json" > "$out/eval_bf16_compile_mb6.txt" 2>&1
timeout 300 "$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last --compile --micro_batch_size 2 \
    --json "$out/eval_bf16_compile_mb2.json" > "$out/eval_bf16_compile_mb2.txt" 2>&1

# 2. End to end (target 2): predict.py over 124 JPEGs of 2448 x 2448, files in to files out,
#    beside the in-process figure of the same flags (6 patches per pass, no autotuner), and
#    the host's reading and writing alone; then compiled (its in-process figure is step 1's).
echo "$(date +%T) step 2" >&2
"$py" "${bench[@]}" --modes 3 --sizes 2448 --repeat 5 --amp bf16 --cuda_math fast --channels_last \
    --json "$out/eval_bf16_mb6.json" > "$out/eval_bf16_mb6.txt" 2>&1
"$py" bench/predict_folder.py --device cuda --json "$out/predict_folder_bf16.json" \
    -- --amp bf16 --cuda_math fast --channels_last > "$out/predict_folder_bf16.txt" 2>&1
"$py" bench/predict_folder.py --device cuda --json "$out/predict_folder_bf16_compile.json" \
    -- --amp bf16 --cuda_math fast --channels_last --compile > "$out/predict_folder_bf16_compile.txt" 2>&1

# 3. The training schedule (target 3): the three stage scripts for 2 epochs each on a small
#    demo, the last epoch scaled to DeepGlobe's split and 120 + 50 + 120 epochs; the fast
#    settings (with 8 loader workers: at the default 2, on the CPU measured in bench/README.md,
#    the loader alone would hold the schedule above 2.7 hours), then the faithful fp32 default
#    (one batch of 6, it is slower).
echo "$(date +%T) step 3" >&2
"$py" bench/train_schedule.py --json "$out/train_schedule_bf16.json" -- --amp bf16 --cuda_math fast --channels_last \
    --num_workers 8 > "$out/train_schedule_bf16.txt" 2>&1
"$py" bench/train_schedule.py --train 6 --val 3 --json "$out/train_schedule_fp32.json" > "$out/train_schedule_fp32.txt" 2>&1

# 4. Every test marked gpu: CUDA parity (the reference against the authors' arrays, the
#    engine against the reference) and device tests (TF32 off inside the parity tests).
echo "$(date +%T) step 4" >&2
"$py" -m pytest -q -p no:cacheprovider -m gpu tests > "$out/pytest_cuda.txt" 2>&1

# 5. Issue 17: predict.py on a 40,000 x 40,000 tiled, pyramidal TIFF in mode 3, the peak RSS
#    of the whole process (bench/README.md, "Very large images end to end").
echo "$(date +%T) step 5" >&2
"$py" bench/predict_large_rss.py --sizes 40000 --mode 3 --device cuda --json "$out/predict_large_40k_mode3.json" \
    -- --amp bf16 --cuda_math fast > "$out/predict_large_40k_mode3.txt" 2>&1

# 6. Evaluation per mode and size: fp32, then bf16 + channels-last (6 patches per pass,
#    with the live-tensor peak).
echo "$(date +%T) step 6" >&2
"$py" "${bench[@]}" --modes 1,2,3 --sizes 2448,5000 --repeat 3 --json "$out/eval_fp32.json" > "$out/eval_fp32.txt" 2>&1
"$py" "${bench[@]}" --modes 1,2,3 --sizes 2448,5000,8000 --repeat 3 --amp bf16 --cuda_math fast --channels_last --tensor_peak \
    --json "$out/eval_bf16.json" > "$out/eval_bf16.txt" 2>&1

# 7. One stage-2 training step on 2448 x 2448: fp32 and bf16, with and without checkpointing.
echo "$(date +%T) step 7" >&2
"$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --json "$out/train_fp32.json" > "$out/train_fp32.txt" 2>&1
"$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --amp bf16 --cuda_math fast --json "$out/train_bf16.json" \
    > "$out/train_bf16.txt" 2>&1
"$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --checkpointing --json "$out/train_fp32_ckpt.json" \
    > "$out/train_fp32_ckpt.txt" 2>&1
"$py" "${bench[@]}" --modes 2 --sizes 2448 --train --repeat 2 --amp bf16 --cuda_math fast --checkpointing \
    --json "$out/train_bf16_ckpt.json" > "$out/train_bf16_ckpt.txt" 2>&1
echo "done: $out"
