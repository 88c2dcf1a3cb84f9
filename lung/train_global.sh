#!/usr/bin/env bash
# Lung X-rays, stage 1. The DeepGlobe stage script with the lung data, class table and
# run name (RUN_NAME=lung): prepare the data first (README, "Lung X-rays"). Overrides: DATA, MODELS, LOGS;
# extra arguments are passed on.
set -euo pipefail
RUN_NAME=lung DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../train_deep_globe_global.sh" \
    --dataset folder --classes lung "$@"
