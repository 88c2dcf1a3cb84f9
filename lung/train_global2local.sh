#!/usr/bin/env bash
# Lung X-rays, stage 2 (needs stage 1's lung_global.pth). See lung/train_global.sh.
set -euo pipefail
DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../train_deep_globe_global2local.sh" \
    --dataset folder --classes lung --n_class 2 --task_name lung_global2local \
    --path_g lung_global.pth "$@"
