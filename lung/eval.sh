#!/usr/bin/env bash
# Lung X-rays: evaluate the three-stage model (add --test for the test split). See lung/train_global.sh.
set -euo pipefail
DATA="${DATA:-$(cd "$(dirname "$0")/.." && pwd)/data/lung}" exec "$(dirname "$0")/../eval_deep_globe.sh" \
    --dataset folder --classes lung --n_class 2 --task_name lung_local2global \
    --path_g lung_global.pth --path_g2l lung_global2local.pth --path_l2g lung_local2global.pth "$@"
