#!/usr/bin/env bash
# Lung X-rays, stage 3 (needs lung_global.pth and lung_global2local.pth). See lung/train_global.sh.
set -euo pipefail
RUN_NAME=lung DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../train_deep_globe_local2global.sh" \
    --dataset folder --classes lung "$@"
