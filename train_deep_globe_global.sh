#!/usr/bin/env bash
# Stage 1: the global branch alone on downsampled images.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
# Extra arguments are passed on to train_deep_globe.py (e.g. --pretrained none).
set -euo pipefail
cd "$(dirname "$0")"
python train_deep_globe.py \
    --n_class 7 \
    --data_path "${DATA:-data/deep_globe}" \
    --model_path "${MODELS:-saved_models}" \
    --log_path "${LOGS:-runs}" \
    --task_name "fpn_deepglobe_global" \
    --mode 1 \
    --batch_size 6 \
    --sub_batch_size 6 \
    --size_g 508 \
    --size_p 508 \
    "$@"
