"""Every bad input gets one clear line and exit status 2; an interruption loses nothing."""
from __future__ import annotations

import hashlib
import importlib
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helper
import models.stages
import predict
import train_deep_globe
from models.glnet import GLNet
from utils.checkpoint import atomic_save, read_file, read_state_dict, save_weights
from utils.signals import interrupts_deferred

from conftest import ROOT, tiny_args


def _is_progress(line: str) -> bool:
    return not line.strip() or "it/s" in line or "%|" in line


def _log(tmp: Path) -> list[str]:
    return (tmp / "logs" / "fpn_deepglobe_global" / "log.txt").read_text().splitlines()


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    """Run main, expect exit status 2 and a single stderr line holding every fragment."""
    assert train_deep_globe.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if not _is_progress(line)]
    assert len(lines) == 1, lines
    err = lines[0]
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def test_colour_mask_where_ids_are_expected(data, tmp_path, capsys):
    mask = _first(data / "train" / "Label")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(mask)
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), str(mask), "--mask_kind colours")


def test_class_id_beyond_n_class(data, tmp_path, capsys):
    mask = _first(data / "train" / "Label")
    Image.fromarray(np.full((128, 128), 9, np.uint8)).save(mask)
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), str(mask), "9")


def test_image_and_mask_of_different_sizes(data, tmp_path, capsys):
    mask = _first(data / "train" / "Label")
    Image.fromarray(np.zeros((100, 128), np.uint8)).save(mask)
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), str(mask))


def test_truncated_image(data, tmp_path, capsys):
    image = _first(data / "train" / "Sat")
    image.write_bytes(image.read_bytes()[:300])
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), str(image), "truncated or corrupt")


def test_an_image_cut_in_its_pixel_data_stops_the_run_before_training(data, tmp_path, capsys, monkeypatch):
    """Its header reads: only decoding finds it, which validation would do after an epoch."""
    image = _first(data / "crossvali" / "Sat")
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])

    def train_one_epoch(*args, **kwargs):
        raise AssertionError("an epoch ran before the images were checked")

    monkeypatch.setattr(helper, "train_one_epoch", train_one_epoch)
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), str(image), "truncated or corrupt")


def test_missing_and_empty_split_folders(data, tmp_path, capsys):
    _fails(capsys, tiny_args(tmp_path / "nowhere", tmp_path, "--num_epochs", 1), "nowhere", "no such split folder")
    assert not (tmp_path / "logs" / "fpn_deepglobe_global").exists()  # a run refused at its checks leaves no log
    shutil.move(data / "crossvali", tmp_path / "aside")
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), "crossvali: no such split folder (training scores "
           "this validation split after every epoch)")
    shutil.move(tmp_path / "aside", data / "crossvali")
    for f in (data / "train" / "Sat").iterdir():
        f.unlink()
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), "Sat", "no images")


def test_errors_from_loader_workers_are_one_line_too(data, tmp_path):
    mask = _first(data / "train" / "Label")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(mask)
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    argv[argv.index("--num_workers") + 1] = "1"
    proc = subprocess.run([sys.executable, "train_deep_globe.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if not _is_progress(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(mask) in proc.stderr


def test_small_and_non_square_images_train_in_every_stage(tmp_path):
    root = tmp_path / "data"
    for split, size in (("train", (80, 150)), ("crossvali", (60, 70))):
        rng = np.random.default_rng(0)
        (root / split / "Sat").mkdir(parents=True)
        (root / split / "Label").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / "Sat" / "a_sat.jpg")
        Image.fromarray(rng.integers(0, 7, size, dtype=np.uint8)).save(root / split / "Label" / "a_mask.png")
    base = tiny_args(root, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "1", *base]) == 0
    assert train_deep_globe.main(["--mode", "2", "--path_g", "fpn_deepglobe_global.pth", *base]) == 0
    assert train_deep_globe.main(["--mode", "3", "--path_g", "fpn_deepglobe_global.pth",
                                  "--path_g2l", "fpn_deepglobe_global2local.pth", *base]) == 0


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


def test_checkpoint_of_another_n_class(data, tmp_path, models_dir, capsys):
    save_weights(GLNet(2, "resnet18"), models_dir / "g.pth")
    _fails(capsys, tiny_args(data, tmp_path, "--mode", 2, "--path_g", "g.pth"), "g.pth", "trained for 2 classes")


def test_checkpoint_of_another_architecture(data, tmp_path, models_dir, capsys):
    save_weights(GLNet(7, "resnet18"), models_dir / "g.pth")
    argv = tiny_args(data, tmp_path, "--mode", 2, "--path_g", "g.pth")
    argv[argv.index("--backbone") + 1] = "resnet50"
    _fails(capsys, argv, "g.pth", "does not match the model", "mis-shaped keys")


def test_a_refused_run_leaves_no_empty_folders(data, tmp_path, capsys):
    """Refused after its output folders were made (the ImageNet file is read with the
    models), a run removes them again; folders that were there stay."""
    missing = tmp_path / "nope.pth"
    before = sorted(tmp_path.iterdir())
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--pretrained", missing), str(missing))
    assert sorted(tmp_path.iterdir()) == before  # neither --model_path nor --log_path
    (tmp_path / "logs").mkdir()
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--pretrained", missing), str(missing))
    assert sorted(tmp_path.iterdir()) == sorted([*before, tmp_path / "logs"])


def test_not_a_checkpoint(data, tmp_path, models_dir, capsys):
    models_dir.mkdir()
    (models_dir / "g.pth").write_text("hello")
    _fails(capsys, tiny_args(data, tmp_path, "--mode", 2, "--path_g", "g.pth"), "g.pth", "not a readable PyTorch checkpoint")


def test_stage_started_without_the_previous_stage(data, tmp_path, capsys):
    _fails(capsys, tiny_args(data, tmp_path, "--mode", 2), "needs --path_g", "stage 1")
    _fails(capsys, tiny_args(data, tmp_path, "--mode", 2, "--path_g", "fpn_deepglobe_global.pth"),
           "fpn_deepglobe_global.pth: not found", "run that stage first")
    _fails(capsys, tiny_args(data, tmp_path, "--mode", 3, "--evaluation", "--path_g", "a.pth", "--path_g2l", "b.pth"),
           "needs --path_l2g")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--size_g", "510"], "--size_g 510 must be a multiple of 4"),
        (["--sub_batch_size", "0"], "--sub_batch_size must be at least 1"),
        (["--micro_batch_size", "0"], "--micro_batch_size must be at least 1"),
        (["--size_p", "48"], "--size_p must be larger than 50"),
        (["--test"], "--test selects the split to evaluate; add --evaluation"),
        (["--n_class", "3"], "--n_class 3 does not match the class table (7 classes)"),
        (["--lamb_fmreg", "nan"], "--lamb_fmreg must be a number of at least 0, got nan"),
        (["--lamb_fmreg", "-0.15"], "--lamb_fmreg must be a number of at least 0, got -0.15"),
        (["--task_name", "runs/x"], "--task_name 'runs/x': it names files and a folder"),
        (["--task_name", ".."], "--task_name '..': it names files and a folder"),
        (["--num_workers", "100000"], "--num_workers 100000 is more than 4 per core this process may use"),
    ],
)
def test_flags_that_cannot_work(data, tmp_path, capsys, flags, fragment):
    _fails(capsys, tiny_args(data, tmp_path, *flags), fragment)


@pytest.mark.parametrize("module", ["train_deep_globe", "predict", "dataset.prepare_deep_globe", "dataset.prepare_lung",
                                    "dataset.make_demo"])
def test_a_mistyped_flag_is_one_line_too(module, capsys):
    """Not argparse's usage block above the error (for the trainer, a screen of flags)."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stopped:
        main(["--sizeg", "128", "--src", "s", "--dst", "d", "--input", "i", "--output", "o"])
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert "error: unrecognized arguments: --sizeg 128" in lines[0] and "--help lists every flag" in lines[0]


def test_predictions_are_not_saved_into_the_datas_image_or_mask_folders(data, tmp_path, capsys):
    """Their names are DeepGlobe's mask names: in test/Label they would replace the truth.
    Beside those folders they harm nothing."""
    save_weights(GLNet(7, "resnet18"), tmp_path / "g.pth")
    argv = tiny_args(data, tmp_path, "--evaluation", "--test", "--path_g", tmp_path / "g.pth", "--save_predictions",
                     data / "test" / "Label")
    before = {p.name: _digest(p) for p in (data / "test" / "Label").iterdir()}
    _fails(capsys, argv, f"is inside {data / 'test' / 'Label'}, a folder of the data")
    assert {p.name: _digest(p) for p in (data / "test" / "Label").iterdir()} == before
    argv[-1] = str(data / "test" / "preds")
    assert train_deep_globe.main(argv) == 0 and len(list((data / "test" / "preds").iterdir())) == 1


@pytest.mark.parametrize("module, typed, meant", [
    ("train_deep_globe", ["--num-epochs", "3"], "--num_epochs"),  # the data tools' spelling
    ("dataset.make_demo", ["--n_train", "3"], "--n-train"),  # the trainer's
    ("predict", ["--inptu", "x"], "--input"),
])
def test_a_mistyped_flag_is_named_with_the_flag_meant(module, typed, meant, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(typed)
    assert f"; did you mean {meant}? (--help lists every flag)" in capsys.readouterr().err


def test_flags_are_taken_whole_not_abbreviated(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_deep_globe.main(tiny_args(data, tmp_path, "--eval"))
    assert "unrecognized arguments: --eval" in capsys.readouterr().err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(argv) == 0
    files = [tmp_path / "models" / f"fpn_deepglobe_global{suffix}" for suffix in (".pth", ".best.pth", ".state.pth")]
    before = [_digest(f) for f in files]

    monkeypatch.setattr(models.stages, "focal_loss", lambda logits, target: logits.sum() * math.nan)
    _fails(capsys, argv[:-2] + ["--num_epochs", "3", "--resume"], "loss became nan at epoch 2, batch 1",
           "checkpoints from earlier epochs are untouched")
    assert [_digest(f) for f in files] == before
    assert _log(tmp_path)[-1].startswith("stopped: TrainingDiverged: loss became nan at epoch 2, batch 1")


def test_existing_run_is_never_overwritten_silently(data, tmp_path, capsys):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(argv) == 0
    log = _log(tmp_path)
    _fails(capsys, argv, "fpn_deepglobe_global.pth", "fpn_deepglobe_global.pth.json", "already exist", "--resume",
           "--task_name", "and the tensorboard events in", "delete them to start over")
    assert _log(tmp_path) == log  # the refused run's lines are not mixed into the log of the run in its way
    _fails(capsys, tiny_args(data, tmp_path, "--task_name", "other", "--resume"), "other.state.pth not found")


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "state.pth"
    script = (
        "import sys, torch; sys.path.insert(0, '.');"
        "from utils.checkpoint import atomic_save;"
        "t = torch.arange(8_000_000, dtype=torch.float32);"
        f"atomic_save(t, {str(path)!r}); print('ready', flush=True)\n"
        f"while True: atomic_save(t, {str(path)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    for delay in (0.05, 0.13, 0.21):
        time.sleep(delay)
        assert torch.equal(read_file(path), torch.arange(8_000_000, dtype=torch.float32))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.equal(read_file(path), torch.arange(8_000_000, dtype=torch.float32))


def test_sigkilled_training_resumes_to_the_uninterrupted_weights(data, tmp_path):
    args = ["--num_epochs", "4", "--lr", "1e-3"]
    straight = tmp_path / "straight"
    assert train_deep_globe.main(tiny_args(data, straight, *args)) == 0

    killed = tmp_path / "killed"
    last = killed / "models" / "fpn_deepglobe_global.state.pth"
    proc = subprocess.Popen([sys.executable, "train_deep_globe.py", *tiny_args(data, killed, *args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    # Somewhere in epoch 2, possibly while its checkpoints are being written.
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_file(last)["epoch"] in (0, 1, 2)
    assert train_deep_globe.main(tiny_args(data, killed, *args, "--resume")) == 0
    for name in ("fpn_deepglobe_global.pth", "fpn_deepglobe_global.best.pth", "fpn_deepglobe_global.state.pth"):
        a, b = read_state_dict(straight / "models" / name), read_state_dict(killed / "models" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_a_run_of_another_architecture(data, tmp_path, capsys):
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 0
    argv = tiny_args(data, tmp_path, "--num_epochs", 2, "--resume")
    argv[argv.index("--backbone") + 1] = "resnet50"
    _fails(capsys, argv, "fpn_deepglobe_global.state.pth", "backbone resnet18 (now resnet50)")


def test_class_tables_that_cannot_work(data, tmp_path, capsys):
    _fails(capsys, tiny_args(data, tmp_path, "--classes", tmp_path), str(tmp_path), "is a folder")
    mask = _first(data / "train" / "Label")
    _fails(capsys, tiny_args(data, tmp_path, "--classes", mask), str(mask), "not a text file")
    table = tmp_path / "all_ignored.json"
    table.write_text('{"classes": [{"id": 0, "name": "a", "colour": [0, 0, 0]}, '
                     '{"id": 1, "name": "b", "colour": [255, 255, 255]}], "ignore_in_metric": [0, 1]}')
    _fails(capsys, tiny_args(data, tmp_path, "--classes", table), str(table), "mean IoU would be undefined")


def test_id_masks_read_as_colours(data, tmp_path, capsys):
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--mask_kind", "colours"), "single grey channel", "--mask_kind ids")


def _training_state(path: Path) -> dict:
    state = read_file(path)
    assert isinstance(state, dict)
    return state


def test_resuming_with_other_run_settings_is_refused(data, tmp_path, capsys):
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 0
    argv = tiny_args(data, tmp_path, "--num_epochs", 2, "--resume", "--lr", "0.1")
    argv[argv.index("--batch_size") + 1] = "1"
    _fails(capsys, argv, "fpn_deepglobe_global.state.pth", "other settings", "batch_size 2 (now 1)", "lr 5e-05 (now 0.1)",
           "steps_per_epoch 1 (now 2)")


def test_resuming_on_other_data_is_refused(data, tmp_path, capsys):
    """Same flags, same number of images, other ids: the run's best epoch would compare the
    scores of two validation splits, and its facts would name only the last data."""
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 0
    other = tmp_path / "other"
    shutil.copytree(data, other)
    for split in ("train", "crossvali"):
        old = next((other / split / "Sat").iterdir()).name.removesuffix("_sat.jpg")
        (other / split / "Sat" / f"{old}_sat.jpg").rename(other / split / "Sat" / "renamed_sat.jpg")
        (other / split / "Label" / f"{old}_mask.png").rename(other / split / "Label" / "renamed_mask.png")
    argv = tiny_args(other, tmp_path, "--num_epochs", 2, "--resume")
    _fails(capsys, argv, "other settings", "other training images; other validation images")


def test_resume_says_when_num_epochs_grows_and_refuses_it_shrinking(data, tmp_path, capsys):
    """A .sh script's default is the paper's schedule: a run started with --num_epochs 1 and
    resumed without it would train for 120, so that is said; fewer would cut the schedule.
    The state here is made as one saved before the data were recorded, which still resumes."""
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 0
    path = tmp_path / "models" / "fpn_deepglobe_global.state.pth"
    state = _training_state(path)
    for key in ("train_ids_sha256", "crossvali_ids_sha256", "class_table", "frozen_global_sha256"):
        del state["run"][key]
    atomic_save(state, path)
    capsys.readouterr()
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 2, "--resume")) == 0
    assert ("note: training for --num_epochs 2, where the run was started for 1: the poly schedule stretches to the "
            "new total") in capsys.readouterr().out
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--resume"), "belongs to a run of 2 epochs",
           "pass --num_epochs 2 (or more)")


def test_stage_3_keeps_the_frozen_global_branch_it_started_from(data, tmp_path, models_dir, capsys):
    """Resumed with another --path_g, stage 3 is refused; started with a --path_g other than
    its --path_g2l's, or evaluated or predicted with another (not a copy), it warns, naming
    the file its facts record."""
    models_dir.mkdir()
    torch.manual_seed(0)
    save_weights(GLNet(7, "resnet18"), models_dir / "g.pth")
    save_weights(GLNet(7, "resnet18"), models_dir / "other_g.pth")
    stage_3 = ["--mode", 3, "--path_g", "g.pth", "--path_g2l", "g.pth"]
    assert train_deep_globe.main(tiny_args(data, tmp_path, *stage_3, "--num_epochs", 1)) == 0
    assert "warning" not in capsys.readouterr().out
    resumed = ["--mode", 3, "--path_g", "other_g.pth", "--path_g2l", "g.pth", "--num_epochs", 2, "--resume"]
    _fails(capsys, tiny_args(data, tmp_path, *resumed), "another frozen global branch (--path_g)")
    # A new run whose --path_g2l was not trained from its --path_g trains, as the authors' did, but says so.
    mixed = ["--mode", 3, "--path_g", "other_g.pth", "--path_g2l", "g.pth", "--num_epochs", 1, "--task_name", "mixed"]
    assert train_deep_globe.main(tiny_args(data, tmp_path, *mixed)) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert (f"--path_g {models_dir / 'other_g.pth'} is not the stage-1 file that --path_g2l {models_dir / 'g.pth'} "
            "was trained with (") in line and " of its global-branch tensors differ); " in line

    def warnings(path_g: str) -> list[str]:
        argv = ["--evaluation", "--mode", 3, "--path_g", path_g, "--path_l2g", "fpn_deepglobe_local2global.pth"]
        assert train_deep_globe.main(tiny_args(data, tmp_path, *argv)) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]

    assert warnings("g.pth") == []
    shutil.copy(models_dir / "g.pth", tmp_path / "moved_g.pth")
    assert warnings(str(tmp_path / "moved_g.pth")) == []  # the weights count, not where they lie
    [line] = warnings("other_g.pth")
    assert f"--path_g {models_dir / 'other_g.pth'} is not the stage-1 file that " in line
    assert f"trained with ({(models_dir / 'g.pth').resolve()}, by its facts)" in line
    out = tmp_path / "preds"
    assert predict.main(["--mode", "3", "--model_path", str(models_dir), "--path_g", "other_g.pth", "--input",
                         str(data / "test" / "Sat"), "--output", str(out), "--device", "cpu"]) == 0
    assert "is not the stage-1 file that" in capsys.readouterr().err


def test_a_new_run_does_not_add_its_curves_to_another_runs_tensorboard_events(data, tmp_path, capsys):
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 0
    shutil.rmtree(tmp_path / "models")  # or another --model_path, with the same --log_path
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), "fpn_deepglobe_global holds the tensorboard events "
           "of an earlier run", "delete that folder, or choose another --task_name or --log_path")


def test_resuming_from_a_weights_file_is_refused(data, tmp_path, capsys):
    save_weights(GLNet(7, "resnet18"), tmp_path / "models" / "fpn_deepglobe_global.state.pth")
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--resume"), "not a training state")


def test_resume_rewrites_the_weights_files_a_kill_left_behind(data, tmp_path):
    # The best epoch's training state was written, its weights files were not.
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(argv) == 0
    state = _training_state(tmp_path / "models" / "fpn_deepglobe_global.state.pth")
    assert state["best_epoch"] == state["epoch"] == 0
    files = [tmp_path / "models" / f"fpn_deepglobe_global{suffix}" for suffix in (".pth", ".best.pth")]
    for path in files:
        save_weights(GLNet(7, "resnet18"), path)
    assert train_deep_globe.main([*argv, "--resume"]) == 0
    for path in files:
        weights = read_state_dict(path)
        assert all(torch.equal(weights[k.removeprefix("module.")], v) for k, v in state["model"].items()), path


def test_resume_repairs_the_last_epochs_file_and_keeps_an_older_best(data, tmp_path, monkeypatch):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(argv) == 0
    real_evaluate = helper.evaluate
    monkeypatch.setattr(helper, "evaluate", lambda *a, **k: {kind: {**s, "miou": -1.0}
                                                               for kind, s in real_evaluate(*a, **k).items()})
    argv = tiny_args(data, tmp_path, "--num_epochs", 2)
    assert train_deep_globe.main([*argv, "--resume"]) == 0
    state = _training_state(tmp_path / "models" / "fpn_deepglobe_global.state.pth")
    assert (state["epoch"], state["best_epoch"]) == (1, 0)
    weights, best = (tmp_path / "models" / f"fpn_deepglobe_global{suffix}" for suffix in (".pth", ".best.pth"))
    save_weights(GLNet(7, "resnet18"), weights)  # as if killed before epoch 2's weights were written
    best_before = _digest(best)
    assert train_deep_globe.main([*argv, "--resume"]) == 0
    restored = read_state_dict(weights)
    assert all(torch.equal(restored[k.removeprefix("module.")], v) for k, v in state["model"].items())
    assert _digest(best) == best_before


def test_a_run_saved_by_an_earlier_version_says_how_to_resume_it(data, tmp_path, capsys):
    save_weights(GLNet(7, "resnet18"), tmp_path / "models" / "fpn_deepglobe_global.last.pth")
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1, "--resume"), "fpn_deepglobe_global.last.pth",
           "earlier version", "rename fpn_deepglobe_global.pth to fpn_deepglobe_global.best.pth")


def test_ctrl_c_is_held_until_the_block_ends():
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            finished = True
    assert finished and signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_in_the_first_epoch_leaves_nothing_to_resume(data, tmp_path, capsys, monkeypatch):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(helper, "train_one_epoch", interrupted)
    assert train_deep_globe.main(argv) == 130
    assert "no epoch had finished, nothing to resume" in capsys.readouterr().err
    assert _log(tmp_path)[-1] == "stopped: interrupted"
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    monkeypatch.undo()
    assert train_deep_globe.main(argv) == 0


def test_ctrl_c_in_evaluation_does_not_advise_resume(data, tmp_path, capsys, monkeypatch):
    save_weights(GLNet(7, "resnet18"), tmp_path / "g.pth")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(helper, "evaluate", interrupted)
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--evaluation", "--path_g", tmp_path / "g.pth")) == 130
    err = capsys.readouterr().err
    assert "evaluation stopped" in err and "--resume" not in err


@pytest.mark.parametrize("flag", ["--model_path", "--log_path"])
def test_output_folders_are_checked_before_training(data, tmp_path, capsys, flag, monkeypatch):
    monkeypatch.setattr(helper, "train_one_epoch", lambda *args: pytest.fail("trained before checking outputs"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    argv[argv.index(flag) + 1] = str(blocker)
    _fails(capsys, argv, f"{flag} {blocker}: a file is in the way")
    argv[argv.index(flag) + 1] = str(blocker / "below")
    _fails(capsys, argv, f"{flag} {blocker / 'below'}: cannot create this folder")


@pytest.mark.parametrize("split", ["train", "crossvali"])
def test_training_needs_labelled_splits(data, tmp_path, capsys, split):
    shutil.rmtree(data / split / "Label")
    _fails(capsys, tiny_args(data, tmp_path, "--num_epochs", 1), f"{split}: no masks", "training needs labelled")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "inf"], "--lr must be a positive number, got inf"),
        (["--seed", "-1"], "--seed must be in 0..2**32-1"),
        (["--device", "gpu"], "--device gpu: not a device"),
        (["--device", "mps"], "--device mps: only cpu and cuda are supported"),
        (["--tta"], "--tta applies to --evaluation"),
        (["--path_g", "."], "a folder, not a file"),
    ],
)
def test_more_flags_that_cannot_work(data, tmp_path, capsys, flags, fragment):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1, *flags)
    if "--path_g" in flags:
        argv = ["--mode", "2", *argv]
        (tmp_path / "models").mkdir()  # "." inside it: a folder where a file should be
    _fails(capsys, argv, fragment)
