"""A checkpoint knows what it is: the facts written beside every weights file, what
predict.py, evaluation and the next stage take from them, and what they refuse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import predict
import train_deep_globe
from conftest import tiny_args
from dataset.classes import DEEPGLOBE, ClassTable
from utils.checkpoint import read_facts, read_file
from utils.metrics import ConfusionMatrix

TASKS = {1: "fpn_deepglobe_global", 2: "fpn_deepglobe_global2local", 3: "fpn_deepglobe_local2global"}
# What every run of this file passes explicitly: the facts must say the same.
SIZE_G, SIZE_P, SUB_BATCH, BACKBONE = [64, 64], [96, 96], 4, "resnet18"


def _error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if l.strip() and "it/s" not in l and "%|" not in l and "s/it" not in l]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory) -> Path:
    """Stages 1 and 2 trained for an epoch on the demo data (folder/models, folder/logs)."""
    folder = tmp_path_factory.mktemp("trained")
    args = tiny_args(pristine, folder, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "1", *args]) == 0
    assert train_deep_globe.main(["--mode", "2", "--path_g", "fpn_deepglobe_global.pth", *args]) == 0
    return folder


def test_every_weights_file_carries_its_runs_facts(trained, pristine):
    models = trained / "models"
    facts = read_facts(models / "fpn_deepglobe_global.pth")
    assert (facts["stage"], facts["stage_name"], facts["epoch"]) == (1, "global", 1)
    assert (facts["size_g"], facts["size_p"], facts["sub_batch_size"], facts["backbone"]) == \
        (SIZE_G, SIZE_P, SUB_BATCH, BACKBONE)
    assert facts["class_table"]["classes"][1] == {"id": 1, "name": "urban", "colour": [0, 255, 255]}
    assert facts["class_table"]["ignore_in_metric"] == [0]
    assert (facts["data"]["dataset"], facts["data"]["train_images"]) == ("deep_globe", 2)
    assert facts["data"]["data_path"] == str(pristine.resolve())
    assert facts["initialised_from"] == {"--pretrained": "none"}
    assert facts["training"]["batch_size"] == 2 and facts["code_version"]
    stage2 = read_facts(models / "fpn_deepglobe_global2local.pth")
    assert stage2["stage"] == 2
    assert stage2["initialised_from"] == {"--path_g": str(models / "fpn_deepglobe_global.pth"), "--pretrained": "none"}
    # The best epoch's file and the training state carry the same facts.
    assert read_facts(models / "fpn_deepglobe_global.best.pth") == facts
    assert read_file(models / "fpn_deepglobe_global.state.pth")["facts"] == facts
    # The weights file itself stays a plain state dict of tensors, as the authors' loader needs.
    weights = read_file(models / "fpn_deepglobe_global.pth")
    assert all(isinstance(v, torch.Tensor) and k.startswith("module.") for k, v in weights.items())


def _predict(trained: Path, out: Path, images: Path, *extra: str) -> list[str]:
    return ["--mode", "2", "--model_path", str(trained / "models"), "--input", str(images), "--output", str(out),
            "--device", "cpu", *extra]


def test_predict_takes_sizes_backbone_and_classes_from_the_checkpoint(trained, pristine, tmp_path, capsys):
    images = pristine / "test" / "Sat"
    # No --backbone, --size_g, --size_p: without the facts this would build a ResNet-50 and fail to load.
    assert predict.main(_predict(trained, tmp_path / "a", images)) == 0
    assert "note:" not in capsys.readouterr().err
    assert predict.main(_predict(trained, tmp_path / "b", images, "--backbone", BACKBONE, "--size_g", "64",
                                 "--size_p", "96")) == 0
    for name in ("demotest000_sat_ids.png", "demotest000_sat_mask.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # A flag that disagrees wins, with one line that says so.
    assert predict.main(_predict(trained, tmp_path / "c", images, "--size_p", "128")) == 0
    err = capsys.readouterr().err
    assert (f"note: --size_p 128 is used; {trained / 'models' / 'fpn_deepglobe_global2local.pth'} was trained "
            "with 96") in err


def test_evaluation_takes_them_too(trained, pristine, capsys):
    argv = ["--mode", "2", "--evaluation", "--data_path", str(pristine), "--model_path", str(trained / "models"),
            "--log_path", str(trained / "logs"), "--path_g2l", "fpn_deepglobe_global2local.pth",
            "--num_workers", "0", "--device", "cpu"]
    assert train_deep_globe.main(argv) == 0
    assert "note:" not in capsys.readouterr().err
    (result,) = (trained / "logs" / TASKS[2]).glob("eval-crossvali-mode2-*.json")
    assert json.loads(result.read_text())["checkpoint_epochs"] == {"--path_g2l": 1}


def test_a_class_absent_from_truth_and_prediction_prints_as_a_dash_and_counts_0():
    """The README: such a class is "counted as 0" in the mean; the table must not say nan."""
    table = ClassTable(("a", "b", "c"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]))  # prediction, truth; class c absent
    text = train_deep_globe.format_table({"global": {"iou": matrix.iou(), "miou": matrix.miou()}}, table)
    rows = dict(line.split(None, 1) for line in text.splitlines()[1:4])
    assert rows == {"a": "0.5000", "b": "0.5000", "c": "-"}
    assert "mIoU" in text and "0.3333" in text and "nan" not in text
    assert "(- absent from both truth and prediction" in text


def test_a_checkpoint_of_another_stage_is_refused(trained, pristine, tmp_path, capsys):
    args = tiny_args(pristine, tmp_path, "--num_epochs", 1)
    wrong = trained / "models" / "fpn_deepglobe_global2local.pth"
    assert train_deep_globe.main(["--mode", "2", "--path_g", str(wrong), *args]) == 2
    assert f"{wrong}: a stage-2 checkpoint, but --path_g takes a stage-1 (global) one" in _error_line(capsys)


def test_a_stage_does_not_chain_from_another_class_table(trained, pristine, tmp_path, capsys):
    table = tmp_path / "classes.json"
    names = ["u", "urban", "agriculture", "rangeland", "forest", "water", "barren"]
    table.write_text(json.dumps({"classes": [{"id": i, "name": n, "colour": list(c)}
                                             for i, (n, c) in enumerate(zip(names, DEEPGLOBE.colours))]}))
    args = tiny_args(pristine, tmp_path, "--num_epochs", 1, "--classes", table)
    assert train_deep_globe.main(["--mode", "2", "--path_g", str(trained / "models" / f"{TASKS[1]}.pth"), *args]) == 2
    line = _error_line(capsys)
    assert "was trained for the classes unknown, urban" in line and "this run has u, urban" in line
    assert "drop --classes" in line


def test_a_stage_does_not_chain_from_another_datasets_file(trained, pristine, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(pristine, other)
    for folder in ("Sat", "Label"):
        first = sorted((other / "train" / folder).iterdir())[0]
        first.rename(first.with_name(first.name.replace("demotrain000", "mine000")))
    args = tiny_args(other, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "2", "--path_g", str(trained / "models" / f"{TASKS[1]}.pth"), *args]) == 2
    line = _error_line(capsys)
    assert f"was trained on other data (2 training images in {pristine.resolve()}; this run has 2 in" in line
    # The same data moved elsewhere is the same data.
    moved = tmp_path / "moved"
    shutil.copytree(pristine, moved)
    args = tiny_args(moved, tmp_path / "m", "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "2", "--path_g", str(trained / "models" / f"{TASKS[1]}.pth"), *args]) == 0


def test_own_data_chains_its_class_table_through_the_stages(tmp_path, capsys):
    """Only stage 1 names the layout and class table; stages 2 and 3 take them from the file
    they start from."""
    rng = np.random.default_rng(0)
    for split in ("train", "crossvali"):
        for k in range(2):
            (tmp_path / "d" / split / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(tmp_path / "d" / split / "images" / f"{k}.png")
            Image.fromarray(rng.integers(0, 2, (80, 100), dtype=np.uint8)).save(tmp_path / "d" / split / "masks" / f"{k}.png")
    table = tmp_path / "classes.json"
    table.write_text(json.dumps({"classes": [{"id": 0, "name": "ground", "colour": [0, 0, 0]},
                                             {"id": 1, "name": "roof", "colour": [255, 0, 0]}]}))
    args = tiny_args(tmp_path / "d", tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "1", "--dataset", "folder", "--classes", str(table), "--task_name",
                                  "r_global", *args]) == 0
    assert train_deep_globe.main(["--mode", "2", "--path_g", "r_global.pth", "--task_name", "r_global2local",
                                  *args]) == 0
    assert train_deep_globe.main(["--mode", "3", "--path_g", "r_global.pth", "--path_g2l", "r_global2local.pth",
                                  "--task_name", "r_local2global", *args]) == 0
    facts = read_facts(tmp_path / "models" / "r_local2global.pth")
    assert facts["class_table"]["classes"] == [{"id": 0, "name": "ground", "colour": [0, 0, 0]},
                                               {"id": 1, "name": "roof", "colour": [255, 0, 0]}]
    assert "--classes" not in capsys.readouterr().err
    assert read_facts(tmp_path / "models" / "r_global2local.pth")["data"]["dataset"] == "folder"


def test_a_weights_file_without_facts_takes_the_flags_or_the_authors_defaults(trained, pristine, tmp_path):
    """The authors' released files have no facts: the flags, or their defaults, decide."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(trained / "models" / f"{TASKS[2]}.pth", models / "g2l.pth")
    argv = ["--mode", "2", "--evaluation", "--path_g2l", "g2l.pth", "--model_path", str(models), "--data_path",
            str(pristine), "--log_path", str(tmp_path / "logs"), "--num_workers", "0", "--device", "cpu"]
    args = config.parse_args(argv)
    settled = config.settle_flags(args)
    assert (args.size_g, args.size_p, args.backbone, settled.table) == ((508, 508), (508, 508), "resnet50", DEEPGLOBE)
    assert settled.facts == {} and settled.notes == []
    assert train_deep_globe.main([*argv, "--backbone", BACKBONE, "--size_g", "64", "--size_p", "96"]) == 0


def test_a_backbone_flag_other_than_the_checkpoints_is_one_line(trained, pristine, tmp_path, capsys):
    assert predict.main(_predict(trained, tmp_path, pristine / "test" / "Sat", "--backbone", "resnet50")) == 2
    line = _error_line(capsys)
    assert f"--backbone resnet50: {trained / 'models' / TASKS[2]}.pth was trained with resnet18; drop --backbone" in line
