#!/usr/bin/env bash
# Evaluate the full GLNet (stage 3) on the crossvali split, without test-time augmentation
# as in the paper. Add --test to predict and score the test split, --tta for test-time
# augmentation, --save_predictions DIR for colour PNGs, and
# --path_l2g fpn_deepglobe_local2global.best.pth for stage 3's best validation epoch.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
# (relative overrides are taken from the current directory).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/train_deep_globe.py" \
    --n_class 7 \
    --data_path "${DATA:-$here/data/deep_globe}" \
    --model_path "${MODELS:-$here/saved_models}" \
    --log_path "${LOGS:-$here/runs}" \
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
