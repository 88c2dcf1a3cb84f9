"""prepare_deep_globe and prepare_lung on small generated downloads."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.classes import DEEPGLOBE, LUNG
from dataset.io import read_mask
from dataset.layouts import SPLITS, deep_globe_samples, folder_samples
from dataset.make_demo import make_synthetic_xrays
from dataset.prepare_common import prepare_splits
from dataset.prepare_deep_globe import main as prepare_deep_globe
from dataset.prepare_deep_globe import split_ids
from dataset.prepare_lung import main as prepare_lung
from dataset.prepare_lung import split_names
from dataset.segmentation import build_dataset
from utils.errors import DataError

RNG = np.random.default_rng(0)
SIZE = (20, 24)


def noisy_colour_mask(label: np.ndarray) -> np.ndarray:
    """The label in DeepGlobe colours with every channel pushed to within 8 of 128, from the right side."""
    on = DEEPGLOBE.colorize(label) > 0
    return np.where(on, RNG.integers(128, 136, on.shape), RNG.integers(120, 128, on.shape)).astype(np.uint8)


def write_download(src: Path, ids) -> dict[str, np.ndarray]:
    """Official-style files <id>_sat.jpg and RGB <id>_mask.png; returns id -> true label."""
    src.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in ids:
        labels[i] = RNG.integers(0, 7, SIZE)
        Image.fromarray(RNG.integers(0, 256, SIZE + (3,), dtype=np.uint8)).save(src / f"{i}_sat.jpg")
        Image.fromarray(noisy_colour_mask(labels[i])).save(src / f"{i}_mask.png")
    return labels


@pytest.fixture
def download(tmp_path):
    """Two ids of each of GLNet's splits: everything else in the shipped lists is missing."""
    ids = {split: split_ids(split)[:2] for split in SPLITS}
    return tmp_path / "src", ids, write_download(tmp_path / "src", [i for s in SPLITS for i in ids[s]])


def test_shipped_split_lists():
    counts = {split: len(split_ids(split)) for split in SPLITS}
    assert counts == {"train": 454, "crossvali": 207, "test": 142}
    assert not set(split_ids("train")) & set(split_ids("test")) and split_ids("train")[0] == "100694"


def test_prepare_deep_globe_converts_and_copies(download, tmp_path, capsys):
    src, ids, labels = download
    dst = tmp_path / "dst"
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst)]) == 0
    out, err = capsys.readouterr()
    assert "train: prepared 2 of 454 (452 missing, 0 unusable)" in out
    # A count and a file, not hundreds of ids on the terminal.
    assert f"crossvali: 205 samples missing from {src}, skipped" in err and f"all in {dst / 'missing_crossvali.txt'}" in err
    assert split_ids("crossvali")[100] not in err and len(err) < 2000
    listed = (dst / "missing_crossvali.txt").read_text().split()
    assert sorted(listed) == sorted(set(split_ids("crossvali")) - set(ids["crossvali"]))
    for split in SPLITS:
        samples = deep_globe_samples(dst, split)
        assert [s.id for s in samples] == sorted(ids[split])
        for sample in samples:
            assert sample.image.read_bytes() == (src / f"{sample.id}_sat.jpg").read_bytes()
            assert torch.equal(read_mask(sample.mask, DEEPGLOBE, "ids"), torch.from_numpy(labels[sample.id]))
    assert build_dataset("deep_globe", dst, "test")[0]["label"].shape == SIZE


def test_prepare_deep_globe_skips_unusable_masks_and_fails_on_empty_split(download, tmp_path, capsys):
    src, ids, _ = download
    bad = ids["train"][0]
    red = np.zeros(SIZE + (3,), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(src / f"{bad}_mask.png")
    for i in ids["test"]:
        (src / f"{i}_sat.jpg").unlink()
    assert prepare_deep_globe(["--src", str(src), "--dst", str(tmp_path / "dst")]) == 1
    out, err = capsys.readouterr()
    assert "train: prepared 1 of 454 (452 missing, 1 unusable)" in out
    assert f"skipped train/{bad}: {src / f'{bad}_mask.png'}" in err and "(255, 0, 0)" in err
    assert "error: no sample could be prepared for split(s) test" in err


def test_prepare_refuses_non_empty_dst_without_force(download, tmp_path, capsys):
    src, ids, _ = download
    dst = tmp_path / "dst"
    (dst / "train" / "Sat").mkdir(parents=True)
    (dst / "train" / "Sat" / "stale_sat.jpg").write_bytes(b"old")
    (dst / "notes.txt").write_text("mine")
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(dst) in err and "--force" in err
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst), "--force"]) == 0
    assert not (dst / "train" / "Sat" / "stale_sat.jpg").exists() and (dst / "notes.txt").read_text() == "mine"
    assert len(deep_globe_samples(dst, "train")) == 2


def test_an_interrupted_preparation_is_refused_by_training_and_started_over_by_the_same_command(
        download, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first split: one line and 130, and a data root whose crossvali and
    test splits are missing or partial must not train or score silently."""
    import dataset.prepare_deep_globe as module

    src, ids, _ = download
    dst = tmp_path / "dst"
    real = module.prepare_splits

    def interrupted(splits, prepare_one, source, destination):
        real({"train": splits["train"]}, prepare_one, source, destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "prepare_splits", interrupted)
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst)]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1:] == ["interrupted: a data folder it was writing, if any, is marked incomplete (training refuses "
                        "it); the same command starts it over"]
    with pytest.raises(DataError, match="an interrupted preparation left this data root incomplete"):
        build_dataset("deep_globe", dst, "train")
    monkeypatch.undo()
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst)]) == 0  # no --force needed
    assert [len(deep_globe_samples(dst, split)) for split in SPLITS] == [2, 2, 2]
    assert len(build_dataset("deep_globe", dst, "crossvali")) == 2
    assert not list(dst.glob(".*"))


def test_a_preparation_stopped_while_it_removes_the_old_splits_leaves_them_marked(download, tmp_path, monkeypatch):
    import dataset.prepare_common as module

    src, ids, _ = download
    dst = tmp_path / "dst"
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst)]) == 0

    def stopped(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.shutil, "rmtree", stopped)
    assert prepare_deep_globe(["--src", str(src), "--dst", str(dst), "--force"]) == 130
    with pytest.raises(DataError, match="incomplete"):
        build_dataset("deep_globe", dst, "train")


def test_prepare_deep_globe_rejects_a_source_without_tiles(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert prepare_deep_globe(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 2
    assert "holds no <id>_sat.jpg" in capsys.readouterr().err and not (tmp_path / "dst").exists()


# --- lungs ------------------------------------------------------------------------------

def test_split_names_is_deterministic_and_complete():
    names = [f"n{i}" for i in range(10)]
    splits = split_names(names, 0.2, 0.3, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "crossvali": 2, "test": 3}
    assert sorted(sum(splits.values(), [])) == sorted(names)
    assert split_names(list(reversed(names)), 0.2, 0.3, seed=0) == splits
    assert any(split_names(names, 0.2, 0.3, seed=s) != splits for s in range(1, 4))
    assert set(split_names(names, 0.0, 0.2, seed=0)) == {"train", "test"}


def test_prepare_lung_montgomery(tmp_path, capsys):
    src, dst = tmp_path / "mc", tmp_path / "lung"
    make_synthetic_xrays(src, 5, size=(40, 32), seed=1)
    (src / "ManualMask" / "rightMask" / "MCUCXR_0003_0.png").unlink()
    assert prepare_lung(["--src", str(src), "--dst", str(dst)]) == 0
    out, err = capsys.readouterr()
    assert "MCUCXR_0003_0" in err and "missing" in err
    prepared = {s.id: s for split in SPLITS for s in folder_samples(dst, split)}
    assert len(prepared) == 4 and "MCUCXR_0003_0" not in prepared
    for name, sample in prepared.items():
        assert sample.image.read_bytes() == (src / "CXR_png" / f"{name}.png").read_bytes()
        left, right = (np.asarray(Image.open(src / "ManualMask" / side / f"{name}.png")) > 0 for side in ("leftMask", "rightMask"))
        label = read_mask(sample.mask, LUNG, "ids")
        assert torch.equal(label, torch.from_numpy((left | right).astype(np.uint8))) and label.sum() > 0
    item = build_dataset("folder", dst, "train", table=LUNG)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 40, 32)


def test_prepare_lung_folder_layout_and_force(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "lung"
    masks = {}
    for i, suffix in enumerate([".png", ".jpg", ".png", ".tif", ".png"]):
        (src / "images").mkdir(parents=True, exist_ok=True)
        (src / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (9, 13), dtype=np.uint8)).save(src / "images" / f"x{i}{suffix}")
        masks[f"x{i}"] = RNG.integers(0, 2, (9, 13)).astype(np.uint8)  # 0/1 masks: nonzero is lung
        Image.fromarray(masks[f"x{i}"]).save(src / "masks" / f"x{i}.png")
    args = ["--src", str(src), "--dst", str(dst), "--layout", "folder", "--seed", "3"]
    assert prepare_lung(args) == 0
    prepared = {s.id: s for split in SPLITS for s in folder_samples(dst, split)}
    assert set(prepared) == set(masks) and prepared["x1"].image.name == "x1.jpg"
    assert all(torch.equal(read_mask(s.mask, LUNG, "ids"), torch.from_numpy(masks[n])) for n, s in prepared.items())
    capsys.readouterr()
    assert prepare_lung(args) == 2 and "--force" in capsys.readouterr().err
    assert prepare_lung(args + ["--force"]) == 0


def test_prepare_lung_rejects_bad_fractions_and_sources(tmp_path, capsys):
    make_synthetic_xrays(tmp_path / "mc", 2, size=(16, 12), seed=0)
    assert prepare_lung(["--src", str(tmp_path / "mc"), "--dst", str(tmp_path / "d"), "--val-fraction", "0.6", "--test-fraction", "0.5"]) == 2
    assert "--val-fraction 0.6" in capsys.readouterr().err
    assert prepare_lung(["--src", str(tmp_path / "mc"), "--dst", str(tmp_path / "d"), "--layout", "folder"]) == 2
    assert f"{tmp_path / 'mc' / 'images'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_prepare_deep_globe_names_grey_source_masks(download, tmp_path, capsys):
    """Id masks (e.g. an already prepared Label folder) are not the download's colour masks."""
    src, ids, labels = download
    bad = ids["train"][0]
    Image.fromarray(labels[bad].astype(np.uint8)).save(src / f"{bad}_mask.png")
    assert prepare_deep_globe(["--src", str(src), "--dst", str(tmp_path / "dst")]) == 0
    out, err = capsys.readouterr()
    assert "train: prepared 1 of 454 (452 missing, 1 unusable)" in out
    assert f"{src / f'{bad}_mask.png'}: a grey or class-id mask; --src must hold the RGB <id>_mask.png masks" in err
    assert "--mask_kind" not in err  # prepare_deep_globe has no such flag


def test_prepare_lung_rejects_too_few_images_for_the_splits(tmp_path, capsys):
    make_synthetic_xrays(tmp_path / "mc", 2, size=(16, 12), seed=0)
    args = ["--src", str(tmp_path / "mc"), "--dst", str(tmp_path / "d")]
    assert prepare_lung(args) == 2  # 2 images: one each for test and crossvali, none for train
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 image(s) are too few to give train any" in err and "see the warnings" not in err
    assert not (tmp_path / "d").exists()
    assert prepare_lung(args + ["--val-fraction", "0"]) == 0


def test_empty_split_error_points_to_warnings_only_when_there_are_some(capsys, tmp_path):
    def prepare_one(split: str, name: str) -> None:
        raise DataError(f"{name}: unusable")

    assert prepare_splits({"train": [], "test": []}, prepare_one, Path("src"), tmp_path) == 1
    err = capsys.readouterr().err
    assert "error: no sample could be prepared for split(s) train (no samples assigned), test (no samples assigned)\n" in err
    assert "warning" not in err
    assert prepare_splits({"train": ["a"]}, prepare_one, Path("src"), tmp_path) == 1
    warnings, error = capsys.readouterr().err.split("error: ")
    assert "skipped train/a: a: unusable" in warnings and error.endswith("split(s) train; see the warnings above\n")
