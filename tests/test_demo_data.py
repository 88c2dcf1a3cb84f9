"""The synthetic land-cover demo and X-ray generators, and demo.sh's output folder."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.classes import DEEPGLOBE
from dataset.io import open_image, read_image
from dataset.make_demo import main as make_demo
from dataset.make_demo import make_deep_globe_demo, make_synthetic_xrays
from dataset.layouts import SPLITS
from dataset.segmentation import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_deep_globe_demo(root, n_train=2, n_val=1, n_test=1, size=256, seed=0)
    return root


def test_demo_writes_the_prepared_deep_globe_layout(demo):
    for split, count in zip(SPLITS, (2, 1, 1)):
        dataset = build_dataset("deep_globe", demo, split)
        assert len(dataset) == count
        item = dataset[0]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 256, 256)
        assert item["label"] is not None and item["label"].shape == (256, 256)


def test_demo_is_deterministic(demo, tmp_path):
    make_deep_globe_demo(tmp_path / "again", 2, 1, 1, size=256, seed=0)
    make_deep_globe_demo(tmp_path / "other", 2, 1, 1, size=256, seed=1)
    files = sorted(p.relative_to(demo) for p in demo.rglob("*.*"))
    assert len(files) == 8
    assert all((tmp_path / "again" / f).read_bytes() == (demo / f).read_bytes() for f in files)
    assert any((tmp_path / "other" / f).read_bytes() != (demo / f).read_bytes() for f in files)


def demo_labels(root) -> list[torch.Tensor]:
    return [build_dataset("deep_globe", root, split)[i]["label"] for split, n in zip(SPLITS, (2, 1, 1)) for i in range(n)]


def test_demo_has_thin_urban_structures_lost_at_quarter_resolution(demo):
    for label in demo_labels(demo):
        urban = (label == DEEPGLOBE.names.index("urban")).float()[None, None]
        # Opening with a 7x7 square keeps regions at least 7 px wide; what it removes is thin.
        opened = F.max_pool2d(-F.max_pool2d(-urban, 7, 1, 3), 7, 1, 3)
        thin = (urban - opened)[0, 0].bool()
        assert thin.sum() > 1000  # the smooth cells alone lose well under 100 px (corners)
        # Urban share of the 3x3 neighbourhood of each cell of the 4x-downsampled map.
        share = F.avg_pool2d(F.avg_pool2d(urban, 4), 3, 1, 1, count_include_pad=False)[0, 0]
        mostly_other = (share < 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1)
        assert (thin & mostly_other).sum() > thin.sum() / 3


def test_demo_classes_are_separable_by_colour(demo):
    labels = demo_labels(demo)
    images = [build_dataset("deep_globe", demo, split)[i]["image"] for split, n in zip(SPLITS, (2, 1, 1)) for i in range(n)]
    sums, counts = torch.zeros(7, 3, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for image, label in zip(images, labels):
        counts += torch.bincount(label.flatten(), minlength=7)
        sums += torch.stack([torch.bincount(label.flatten(), image[c].flatten().double(), minlength=7) for c in range(3)], 1)
    present = counts > 0
    assert int(present.sum()) >= 5
    means = (sums / counts[:, None])[present]
    distances = torch.cdist(means, means) + torch.eye(len(means)) * 1e3
    assert distances.min() > 10  # mean colours at least 10 grey levels apart


def test_make_demo_cli(tmp_path, capsys):
    args = ["--dst", str(tmp_path / "d"), "--n-train", "1", "--n-val", "1", "--n-test", "1", "--size", "32"]
    assert make_demo(args) == 0
    assert len(list((tmp_path / "d").rglob("*_sat.jpg"))) == 3
    assert make_demo(args) == 2 and "--force" in capsys.readouterr().err
    assert make_demo(args + ["--force"]) == 0


def test_synthetic_xrays_are_16_bit_with_two_lungs(tmp_path):
    make_synthetic_xrays(tmp_path, 2, size=(60, 48), seed=0)
    image = open_image(tmp_path / "CXR_png" / "MCUCXR_0001_0.png")
    assert image.mode == "I;16" and image.size == (48, 60)
    assert read_image(tmp_path / "CXR_png" / "MCUCXR_0001_0.png").dtype == torch.float32
    left, right = (np.asarray(Image.open(tmp_path / "ManualMask" / side / "MCUCXR_0001_0.png")) for side in ("leftMask", "rightMask"))
    assert set(np.unique(left)) == {0, 255} and set(np.unique(right)) == {0, 255}
    assert not (left & right).any()  # two separate lungs
    assert np.argwhere(left)[:, 1].mean() < 24 < np.argwhere(right)[:, 1].mean()
    pixels = np.asarray(image).astype(float)
    assert pixels[left > 0].mean() < pixels[(left | right) == 0].mean()  # lungs are dark, as on a radiograph


def test_make_demo_cli_xrays(tmp_path):
    assert make_demo(["--xrays", "2", "--dst", str(tmp_path), "--size", "40"]) == 0
    assert sorted(p.name for p in (tmp_path / "CXR_png").iterdir()) == ["MCUCXR_0000_0.png", "MCUCXR_0001_0.png"]
    with Image.open(tmp_path / "CXR_png" / "MCUCXR_0000_0.png") as image:
        assert image.size == (33, 40)


def run_demo_sh(tmp_path: Path, demo_dir: Path) -> subprocess.CompletedProcess:
    """demo.sh with a `python` first on PATH that does nothing, so that only the script's
    own handling of DEMO_DIR runs (in well under a second)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DEMO_DIR": str(demo_dir)}
    return subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True)


def test_demo_sh_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("mine")
    for demo_dir in (precious, tmp_path / "notes.txt"):
        proc = run_demo_sh(tmp_path, demo_dir)
        assert proc.returncode == 2 and f"DEMO_DIR={demo_dir} exists, is not empty and was not made by demo.sh" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work" and (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_sh_recreates_its_own_or_an_empty_folder(tmp_path):
    run = tmp_path / "run"
    assert run_demo_sh(tmp_path, run).returncode == 0  # absent: made, with its marker
    (run / "stale.txt").write_text("from an earlier run")
    proc = run_demo_sh(tmp_path, run)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".made_by_demo_sh"]  # the fake python writes nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_demo_sh(tmp_path, empty).returncode == 0 and (empty / ".made_by_demo_sh").is_file()
