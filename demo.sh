#!/usr/bin/env bash
# The whole GLNet pipeline on generated data, on the CPU, in a few minutes: make a small
# DeepGlobe-style dataset, train stage 1, 2 and 3 briefly, evaluate on its test split and
# print the metrics table. Sizes are reduced (512 px images, 256 px global image and
# patches, a few epochs) so it runs on a laptop; the network is the real GLNet (ResNet-50),
# started from random weights, so expect modest scores.
# Outputs go to DEMO_DIR (default: demo_run/), recreated on every run.
set -euo pipefail
cd "$(dirname "$0")"
out="${DEMO_DIR:-demo_run}"
marker="$out/.made_by_demo_sh"
# DEMO_DIR may name any folder: delete only one this script made (it holds the marker) or
# an empty one, so that a mistyped DEMO_DIR cannot wipe unrelated files.
if [ -e "$out" ] && [ ! -e "$marker" ]; then
    if [ ! -d "$out" ] || [ -n "$(ls -A "$out")" ]; then
        echo "error: DEMO_DIR=$out exists, is not empty and was not made by demo.sh (no $marker); choose another DEMO_DIR or delete it yourself" >&2
        exit 2
    fi
fi
rm -rf "$out"
mkdir -p "$out"
touch "$marker"
python -m dataset.make_demo --dst "$out/data" --size 512 --n-train 2 --n-val 1 --n-test 1

export DATA="$out/data" MODELS="$out/models" LOGS="$out/logs"
# No ImageNet file here: stages 1 and 2 start their backbones from random weights.
common=(--size_g 256 --size_p 256 --batch_size 2 --sub_batch_size 9 --num_workers 0 --device cpu --pretrained none)
./train_deep_globe_global.sh "${common[@]}" --num_epochs 4 --lr 1e-4
./train_deep_globe_global2local.sh "${common[@]}" --num_epochs 1 --lr 1e-4
./train_deep_globe_local2global.sh "${common[@]}" --num_epochs 1 --lr 1e-4
./eval_deep_globe.sh "${common[@]}" --test --save_predictions "$out/predictions"
echo "Logs: tensorboard --logdir $LOGS    Predictions: $out/predictions"
