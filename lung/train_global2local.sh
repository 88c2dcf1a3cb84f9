#!/usr/bin/env bash
# Lung X-rays, stage 2 (needs stage 1's lung_global.pth). See lung/train_global.sh.
set -euo pipefail
RUN_NAME=lung DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../train_deep_globe_global2local.sh" \
    --dataset folder --classes lung "$@"
