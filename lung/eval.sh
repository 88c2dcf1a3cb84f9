#!/usr/bin/env bash
# Lung X-rays: evaluate the three-stage model (add --test for the test split). See lung/train_global.sh.
set -euo pipefail
RUN_NAME=lung DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../eval_deep_globe.sh" \
    --dataset folder --classes lung "$@"
