#!/usr/bin/env bash
# Wheels of the pinned packages that a lent GPU machine's python lacks (tensorboardX) or may
# hold at another version (tifffile, pillow), for its Python (3.12) on x86-64 Linux, into
# DIR for bench/gpu_checks.sh's GPU_CHECKS_WHEELS (bench/README.md, "On a lent GPU
# machine"). torch and torchvision stay the machine's: their wheels are far larger than the
# 64 MiB a command may carry, and each result records the torch it ran.
#
#   bash bench/device_wheels.sh .whl
set -euo pipefail
dest=$(mkdir -p "${1:?usage: bash bench/device_wheels.sh DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
pins=()
for name in tensorboardX tifffile pillow; do
    pins+=("$(grep -i "^$name==" requirements.txt)")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dest" "${pins[@]}"
ls "$dest"
