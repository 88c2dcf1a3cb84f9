"""Lung X-rays end to end: 16-bit Montgomery-style X-rays with left/right lung masks,
prepared into the folder layout, then the lung stage scripts and evaluation."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dataset.classes import LUNG
from dataset.make_demo import make_synthetic_xrays
from dataset.prepare_lung import prepare_lung
from dataset.segmentation import build_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--size_g", "64", "--size_p", "96", "--batch_size", "2",
        "--sub_batch_size", "4", "--num_workers", "0", "--device", "cpu", "--num_epochs", "1"]


@pytest.fixture(scope="module")
def lung_data(tmp_path_factory) -> Path:
    src, dst = tmp_path_factory.mktemp("montgomery"), tmp_path_factory.mktemp("lung") / "data"
    make_synthetic_xrays(src, 5, size=(150, 124), seed=0)
    assert prepare_lung(src, dst, "montgomery", val_fraction=0.2, test_fraction=0.2, seed=0) == 0
    return dst


def test_prepared_xrays_load_as_16_bit_grey_with_one_lung_class(lung_data):
    dataset = build_dataset("folder", lung_data, "train", LUNG)
    item = dataset[0]
    image, label = item["image"], item["label"]
    assert image.dtype == torch.float32 and image.shape == (3, 150, 124)
    assert torch.equal(image[0], image[1]) and 0.0 <= image.min() and image.max() <= 1.0
    # 16-bit precision survives: far more grey levels than 8 bits could hold.
    assert image[0].unique().numel() > 256
    assert set(label.unique().tolist()) == {0, 1}
    # Left and right masks merged: lung pixels on both halves of the image.
    assert label[:, :62].any() and label[:, 62:].any()


def _script(name: str, tmp: Path, data: Path, *extra: str) -> None:
    env = {**os.environ, "DATA": str(data), "MODELS": str(tmp / "models"), "LOGS": str(tmp / "logs")}
    proc = subprocess.run(["bash", str(ROOT / "lung" / name), *TINY, *extra], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lung_scripts_train_three_stages_and_evaluate(lung_data, tmp_path):
    _script("train_global.sh", tmp_path, lung_data, "--pretrained", "none")
    _script("train_global2local.sh", tmp_path, lung_data, "--pretrained", "none")
    _script("train_local2global.sh", tmp_path, lung_data)
    _script("eval.sh", tmp_path, lung_data, "--test")
    for name in ("lung_global", "lung_global2local", "lung_local2global"):
        assert (tmp_path / "models" / f"{name}.pth").is_file()
    (result,) = (tmp_path / "logs" / "lung_local2global").glob("eval-test-mode3-*.json")
    ensemble = json.loads(result.read_text())["scores"]["ensemble"]
    assert len(ensemble["iou"]) == 2
    # No class is left out of the lung score: the mean is over background and lung.
    iou = [0.0 if v is None else v for v in ensemble["iou"]]
    assert ensemble["miou"] == pytest.approx(sum(iou) / 2)
