#!/usr/bin/env bash
# Stage 3: the global branch again, now fed with the local branch's merged features;
# starts from stage 2 (--path_g2l) and keeps the stage-1 global branch (--path_g) frozen
# as the local branch's context.
# Paths default to folders inside the repo; override with DATA=... MODELS=... LOGS=...
# (relative overrides are taken from the current directory).
# Extra arguments are passed on to train_deep_globe.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/train_deep_globe.py" \
    --n_class 7 \
    --data_path "${DATA:-$here/data/deep_globe}" \
    --model_path "${MODELS:-$here/saved_models}" \
    --log_path "${LOGS:-$here/runs}" \
    --task_name "fpn_deepglobe_local2global" \
    --mode 3 \
    --batch_size 6 \
    --sub_batch_size 6 \
    --size_g 508 \
    --size_p 508 \
    --path_g "fpn_deepglobe_global.pth" \
    --path_g2l "fpn_deepglobe_global2local.pth" \
    "$@"
