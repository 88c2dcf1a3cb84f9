#!/usr/bin/env bash
# Evaluate the full GLNet (stage 3) on the crossvali split, without test-time augmentation
# as in the paper. Add --test to predict and score the test split, --tta for test-time
# augmentation, --save_predictions DIR for colour PNGs, and
# --path_l2g <RUN_NAME>_local2global.best.pth for stage 3's best validation epoch.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
# (relative overrides are taken from the current directory). RUN_NAME=... (default fpn_deepglobe)
# names the run: its stages are <RUN_NAME>_global, <RUN_NAME>_global2local, <RUN_NAME>_local2global,
# and each script reads the files of the earlier stages of the same RUN_NAME.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python "$here/train_deep_globe.py" \
    --data_path "${DATA:-$here/data/deep_globe}" \
    --model_path "${MODELS:-$here/saved_models}" \
    --log_path "${LOGS:-$here/runs}" \
    --task_name "${RUN_NAME:-fpn_deepglobe}_local2global" \
    --mode 3 \
    --evaluation \
    --batch_size 6 \
    --sub_batch_size 6 \
    --path_g "${RUN_NAME:-fpn_deepglobe}_global.pth" \
    --path_g2l "${RUN_NAME:-fpn_deepglobe}_global2local.pth" \
    --path_l2g "${RUN_NAME:-fpn_deepglobe}_local2global.pth" \
    "$@"
