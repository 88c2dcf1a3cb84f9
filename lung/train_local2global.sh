#!/usr/bin/env bash
# Lung X-rays, stage 3 (needs lung_global.pth and lung_global2local.pth). See lung/train_global.sh.
set -euo pipefail
DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../train_deep_globe_local2global.sh" \
    --dataset folder --classes lung --n_class 2 --task_name lung_local2global \
    --path_g lung_global.pth --path_g2l lung_global2local.pth "$@"
