#!/usr/bin/env bash
# Stage 3: the global branch again, now fed with the local branch's merged features;
# starts from stage 2 (--path_g2l) and keeps the stage-1 global branch (--path_g) frozen
# as the local branch's context.
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
    --task_name "${RUN_NAME:-fpn_deepglobe}_local2global" \
    --mode 3 \
    --batch_size 6 \
    --sub_batch_size 6 \
    --path_g "${RUN_NAME:-fpn_deepglobe}_global.pth" \
    --path_g2l "${RUN_NAME:-fpn_deepglobe}_global2local.pth" \
    "$@"
