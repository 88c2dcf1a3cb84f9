#!/usr/bin/env bash
# Stage 2: the local branch on full-resolution patches, with the stage-1 global branch
# (--path_g, written by train_deep_globe_global.sh) as frozen context. Its local ResNet
# starts from ImageNet (--pretrained), as in the authors' code.
# The stages chain from the last epoch's weights, as the authors' did; for stage 1's best
# validation epoch instead, add --path_g <RUN_NAME>_global.best.pth.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
# (relative overrides are taken from the current directory). RUN_NAME=... (default fpn_deepglobe)
# names the run: its stages are <RUN_NAME>_global, <RUN_NAME>_global2local, <RUN_NAME>_local2global,
# and each script reads the files of the earlier stages of the same RUN_NAME.
# Extra arguments are passed on to train_deep_globe.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python "$here/train_deep_globe.py" \
    --data_path "${DATA:-$here/data/deep_globe}" \
    --model_path "${MODELS:-$here/saved_models}" \
    --log_path "${LOGS:-$here/runs}" \
    --task_name "${RUN_NAME:-fpn_deepglobe}_global2local" \
    --mode 2 \
    --batch_size 6 \
    --sub_batch_size 6 \
    --path_g "${RUN_NAME:-fpn_deepglobe}_global.pth" \
    "$@"
