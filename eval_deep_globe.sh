#!/usr/bin/env bash
# Evaluate the full GLNet (stage 3) on the crossvali split, without test-time augmentation
# as in the paper. Add --test to predict and score the test split, --tta for test-time
# augmentation, --save_predictions DIR for colour PNGs.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
set -euo pipefail
cd "$(dirname "$0")"
python train_deep_globe.py \
    --n_class 7 \
    --data_path "${DATA:-data/deep_globe}" \
    --model_path "${MODELS:-saved_models}" \
    --log_path "${LOGS:-runs}" \
    --task_name "fpn_deepglobe_local2global" \
    --mode 3 \
    --evaluation \
    --batch_size 6 \
    --sub_batch_size 6 \
    --size_g 508 \
    --size_p 508 \
    --path_g "fpn_deepglobe_global.pth" \
    --path_g2l "fpn_deepglobe_global2local.pth" \
    --path_l2g "fpn_deepglobe_local2global.pth" \
    "$@"
