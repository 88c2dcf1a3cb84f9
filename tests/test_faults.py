"""Faults around a run: a second run on the same names, kills during writes, full disks,
tiny images, bad files found late. Each ends in one line and loses nothing written."""
from __future__ import annotations

import errno
import re
import os
import resource
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
import predict
import train_deep_globe
import utils.files
from models.glnet import GLNet
from utils.checkpoint import read_file, read_state_dict, save_weights
from utils.files import RunLock
from utils.folders import removed_if_failed

from conftest import ROOT, tiny_args

PREDICT_TINY = ["--backbone", "resnet18", "--size_g", "64", "--size_p", "96", "--device", "cpu"]
TASK = "fpn_deepglobe_global"


def _error_lines(text: str) -> list[str]:
    """stderr without progress: bars, and predict.py's line per image where there is no terminal."""
    return [line for line in text.replace("\r", "\n").splitlines()
            if line.strip() and "it/s" not in line and "%|" not in line and "s/it" not in line
            and not re.fullmatch(r"\S+: \d+\.\d s \(\d+/\d+\)", line)]


def _one_line(text: str, *fragments: str) -> str:
    lines = _error_lines(text)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# A second run on the same names.

def test_a_second_run_on_the_same_task_stops_at_once_naming_the_first(data, tmp_path, capsys):
    first = subprocess.Popen([sys.executable, "train_deep_globe.py", *tiny_args(data, tmp_path, "--num_epochs", 50)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "models" / f"{TASK}.lock"
        _wait_for(lambda: lock.exists() and lock.read_text(), first)
        assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 2
        _one_line(capsys.readouterr().err, "error: ", f"--task_name {TASK}", "in use by process", str(first.pid),
                  "choose another --task_name")
        # The same task name under another --model_path still shares the log folder.
        assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1, "--model_path", tmp_path / "m2")) == 2
        _one_line(capsys.readouterr().err, f"in --log_path {tmp_path / 'logs'}", str(first.pid))
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    # SIGTERM ends the run as Ctrl-C does: one line, the shell's status for SIGTERM, lock released.
    assert first.returncode == 128 + signal.SIGTERM
    _one_line(err, "terminated: ")
    assert not lock.exists() and not (tmp_path / "logs" / f"{TASK}.lock").exists()
    assert not _temporaries(tmp_path)


def test_one_folder_for_checkpoints_and_logs_is_one_lock(data, tmp_path):
    args = tiny_args(data, tmp_path, "--num_epochs", 1)
    args[args.index("--log_path") + 1] = str(tmp_path / "models")
    assert train_deep_globe.main(args) == 0


def _hold_lock_and_die(path: Path) -> int:
    script = (f"import sys, os, signal; sys.path.insert(0, '.'); from utils.files import RunLock;"
              f"RunLock({str(path)!r}, 'x', 'y').acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    assert proc.wait() == -signal.SIGKILL
    return proc.pid


def test_a_failed_block_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()  # the user's, empty
    made = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt):
        # x/../kept passes through a folder x the block makes: kept is still the user's.
        with removed_if_failed(made, tmp_path / "x" / ".." / "kept", None):
            made.mkdir(parents=True)
            (tmp_path / "x").mkdir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "x"]
    with pytest.raises(ValueError):
        with removed_if_failed(tmp_path / "c" / "d"):
            (tmp_path / "c" / "d").mkdir(parents=True)
            (tmp_path / "c" / "d" / "written").write_text("")
            raise ValueError
    assert (tmp_path / "c" / "d" / "written").exists()  # a folder holding anything stays, and its parents
    with removed_if_failed(tmp_path / "e"):
        (tmp_path / "e").mkdir()
    assert (tmp_path / "e").is_dir()  # nothing is removed after a block that succeeded


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    pid = _hold_lock_and_die(tmp_path / "run")
    assert (tmp_path / "run.lock").exists()  # SIGKILL left the file
    with RunLock(tmp_path / "run", "x", "y") as lock:
        assert f"process {pid} " in lock.took_over
        with pytest.raises(utils.files.InUseError, match=f"x is in use by process {os.getpid()} "):
            RunLock(tmp_path / "run", "x", "y").acquire()
    assert not (tmp_path / "run.lock").exists()


# Kills during writes.

SLOW_SAVE = """
import sys, time
sys.path.insert(0, '.')
import run_state, train_deep_globe
save = run_state.atomic_save
def slow(obj, path, **kwargs):
    print("writing", path, flush=True)
    time.sleep(1.5)  # inside the epoch's deferred block, between nothing and everything written
    save(obj, path, **kwargs)
run_state.atomic_save = slow
sys.exit(train_deep_globe.main(sys.argv[1:]))
"""


def test_sigterm_during_the_checkpoint_writes_finishes_them_then_stops(data, tmp_path):
    argv = tiny_args(data, tmp_path, "--num_epochs", 3)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("writing"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    models = tmp_path / "models"
    _one_line(err, f"terminated: epochs up to 1 are saved in {models / (TASK + '.state.pth')}", "--resume")
    state = read_file(models / f"{TASK}.state.pth")
    assert state["epoch"] == 0
    assert _same(read_state_dict(models / f"{TASK}.pth"), {k[len("module."):]: v for k, v in state["model"].items()})
    assert not _temporaries(tmp_path)
    assert train_deep_globe.main(argv + ["--resume"]) == 0
    assert read_file(models / f"{TASK}.state.pth")["epoch"] == 2


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(data, tmp_path, capsys):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(argv) == 0
    left = tmp_path / "models" / f".{TASK}.state.pth.0badc0de.tmp"
    left.write_bytes(b"\0" * 3_000_000)  # what SIGKILL during a write leaves
    other = tmp_path / "models" / ".someone_else.pth.0badc0de.tmp"
    other.write_bytes(b"")
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 2, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"removed the temporary files of interrupted writes: {left} (3 MB)" in out
    assert not left.exists() and other.exists()  # another run's names are not touched


# Full disks and refused writes.

class _FullDisk:
    """open() for utils.files whose files fail with `code` once `after` bytes are written
    to files whose name contains `marker`."""

    def __init__(self, marker: str, code: int = errno.ENOSPC, after: int = 1000) -> None:
        self.marker, self.code, self.after, self.files = marker, code, after, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if self.marker not in str(path):
            return file
        self.files += 1
        written = [0]
        write = file.write

        def failing(data):
            written[0] += len(data)
            if written[0] > self.after:
                raise OSError(self.code, os.strerror(self.code))
            return write(data)

        file.write = failing
        return file


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_epoch(data, tmp_path, capsys,
                                                                                     monkeypatch):
    argv = tiny_args(data, tmp_path, "--num_epochs", 2)
    models = tmp_path / "models"
    saved_epochs = []
    original = train_deep_globe.save_epoch

    def then_fill_the_disk(*args):
        if saved_epochs:
            monkeypatch.setattr(utils.files, "open", _FullDisk(".state.pth"), raising=False)
        original(*args)
        saved_epochs.append(read_state_dict(models / f"{TASK}.pth"))

    monkeypatch.setattr(train_deep_globe, "save_epoch", then_fill_the_disk)
    assert train_deep_globe.main(argv) == 2
    _one_line(capsys.readouterr().err, f"error: {models / (TASK + '.state.pth')}: cannot write (No space left on device",
              "MB free); free some space there, or write elsewhere", "epochs up to 1 are saved", "--resume")
    assert len(saved_epochs) == 1
    assert _same(read_state_dict(models / f"{TASK}.pth"), saved_epochs[0])
    assert read_file(models / f"{TASK}.state.pth")["epoch"] == 0
    assert not _temporaries(tmp_path)


def test_a_refused_log_write_is_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils.files, "open", _FullDisk("log.txt", errno.EACCES, after=0), raising=False)
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 2
    _one_line(capsys.readouterr().err, f"{tmp_path / 'logs' / TASK / 'log.txt'}: cannot write (Permission denied)",
              "make the folder and file writable")


def test_a_file_size_limit_of_the_kernel_is_one_line_and_leaves_no_temporary_file(data, tmp_path):
    """A real failing write(2): the kernel refuses bytes beyond RLIMIT_FSIZE (EFBIG), in
    every writer (torch's, Pillow's, the logs)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = subprocess.run([sys.executable, "train_deep_globe.py", *tiny_args(data, tmp_path, "--num_epochs", 1)],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, f"error: {tmp_path / 'models' / TASK}", "File too large", "ulimit -f")
    assert not _temporaries(tmp_path)
    assert not list((tmp_path / "models").glob("*.pth"))


# Images the README says are handled.

def _one_image_data(root: Path, side: tuple[int, int]) -> Path:
    for split in ("train", "crossvali"):
        (root / split / "Sat").mkdir(parents=True)
        (root / split / "Label").mkdir(parents=True)
        Image.fromarray(np.full((*side, 3), 100, np.uint8)).save(root / split / "Sat" / "a_sat.jpg")
        Image.fromarray(np.full(side, 1, np.uint8)).save(root / split / "Label" / "a_mask.png")
    return root


def test_one_pixel_images_train_where_batchnorm_can_and_are_refused_at_once_where_not(tmp_path, capsys,
                                                                                       monkeypatch):
    root = _one_image_data(tmp_path / "data", (1, 1))
    models = tmp_path / "models"
    torch.manual_seed(0)
    save_weights(GLNet(7, "resnet18"), tmp_path / "g.pth")
    save_weights(GLNet(7, "resnet18"), tmp_path / "g2l.pth")
    base = tiny_args(root, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "1", *base]) == 0
    assert train_deep_globe.main(["--mode", "3", "--path_g", str(tmp_path / "g.pth"),
                                  "--path_g2l", str(tmp_path / "g2l.pth"), *base]) == 0
    capsys.readouterr()
    # Stage 2 trains the local ResNet's BatchNorm on the image's one patch: at 1 x 1 its
    # last stage holds one value per channel, from which BatchNorm cannot learn (torch raises).
    monkeypatch.setattr(helper, "train_one_epoch", lambda *args: pytest.fail("trained before refusing"))
    assert train_deep_globe.main(["--mode", "2", "--path_g", str(tmp_path / "g.pth"), *base]) == 2
    _one_line(capsys.readouterr().err, str(root / "train" / "Sat" / "a_sat.jpg"), "1 x 1", "--mode 2")
    assert not (models / "fpn_deepglobe_global2local.pth").exists()
    # Evaluation and prediction in every mode.
    for mode, flags in ((1, ["--path_g", "g.pth"]), (2, ["--path_g2l", "g2l.pth"]),
                        (3, ["--path_g", "g.pth", "--path_l2g", "g2l.pth"])):
        assert train_deep_globe.main(["--mode", str(mode), "--evaluation", *tiny_args(root, tmp_path),
                                      "--model_path", str(tmp_path), *flags]) == 0
        out = tmp_path / f"predicted{mode}"
        assert predict.main(["--mode", str(mode), "--input", str(root / "train" / "Sat"), "--output", str(out),
                             "--model_path", str(tmp_path), *flags, *PREDICT_TINY]) == 0
        assert np.asarray(Image.open(out / "a_sat_ids.png")).shape == (1, 1)


def test_thin_images_train_in_every_stage(tmp_path):
    root = _one_image_data(tmp_path / "data", (1, 40))
    torch.manual_seed(0)
    save_weights(GLNet(7, "resnet18"), tmp_path / "g2l.pth")
    base = tiny_args(root, tmp_path, "--num_epochs", 1)
    assert train_deep_globe.main(["--mode", "1", *base]) == 0
    assert train_deep_globe.main(["--mode", "2", "--path_g", "fpn_deepglobe_global.pth", *base]) == 0
    assert train_deep_globe.main(["--mode", "3", "--path_g", "fpn_deepglobe_global.pth",
                                  "--path_g2l", str(tmp_path / "g2l.pth"), *base]) == 0


def test_a_global_size_batchnorm_cannot_train_on_is_refused(data, tmp_path, capsys):
    argv = tiny_args(data, tmp_path, "--num_epochs", 1)
    argv[argv.index("--size_g") + 1] = "32"
    assert train_deep_globe.main(argv) == 2
    _one_line(capsys.readouterr().err, "--size_g must be larger than 32")


@pytest.mark.parametrize("split", ["train", "crossvali"])
def test_every_mask_is_checked_before_the_first_epoch(data, tmp_path, capsys, monkeypatch, split):
    masks = sorted((data / split / "Label").iterdir())
    Image.fromarray(np.full((128, 128), 9, np.uint8)).save(masks[-1])
    monkeypatch.setattr(helper, "train_one_epoch", lambda *args: pytest.fail("trained before checking masks"))
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 2
    _one_line(capsys.readouterr().err, str(masks[-1]), "class ids 9..9")


def test_the_split_check_names_every_bad_file(data, tmp_path, capsys):
    masks = sorted((data / "train" / "Label").iterdir())
    for mask in masks:
        Image.fromarray(np.zeros((100, 128), np.uint8)).save(mask)
    assert train_deep_globe.main(tiny_args(data, tmp_path, "--num_epochs", 1)) == 2
    line = _one_line(capsys.readouterr().err, str(masks[0]), f"and 1 more in {data / 'train'}", str(masks[1]))
    assert line.count("must match the image") == 1


# predict.py

@pytest.fixture
def weights(tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    save_weights(GLNet(7, "resnet18"), tmp_path / "a.pth")
    save_weights(GLNet(7, "resnet18"), tmp_path / "b.pth")
    return tmp_path / "a.pth", tmp_path / "b.pth"


def _predict(weights: Path, images: Path, output: Path) -> list[str]:
    return ["--mode", "1", "--path_g", str(weights), "--input", str(images), "--output", str(output), *PREDICT_TINY]


def _images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


SLOW_PREDICT = """
import sys, time
sys.path.insert(0, '.')
import predict
from dataset import prediction_files
save = prediction_files.save_png
def slow(target, array):
    if "_mask.png." in str(target):
        print("writing", flush=True)
        time.sleep(1.5)
    save(target, array)
prediction_files.save_png = slow
sys.exit(predict.main(sys.argv[1:]))
"""


def test_sigterm_during_predict_leaves_whole_pairs_from_one_run(tmp_path, weights):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert predict.main(_predict(weights[0], images, out)) == 0
    old = {p.name: p.read_bytes() for p in out.glob("*.png")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREDICT, *_predict(weights[1], images, out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    _one_line(err, "terminated: ")
    assert not _temporaries(tmp_path)
    assert predict.main(_predict(weights[1], images, tmp_path / "new")) == 0
    new = {p.name: p.read_bytes() for p in (tmp_path / "new").glob("*.png")}
    assert old != new
    for stem in ("im0", "im1"):
        pair = [f"{stem}_ids.png", f"{stem}_mask.png"]
        now = [(out / name).read_bytes() if (out / name).exists() else None for name in pair]
        # Both from the earlier run, or both from the killed one (a missing one at most).
        assert all(b in (old[n], None) for b, n in zip(now, pair)) or all(b in (new[n], None) for b, n in zip(now, pair))
        assert any(b is not None for b in now)


def test_predict_on_a_full_disk_is_one_line_and_leaves_no_empty_file(tmp_path, weights, capsys, monkeypatch):
    images = _images(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert predict.main(_predict(weights[0], images, out)) == 0
    old = {p.name: p.read_bytes() for p in out.glob("*.png")}
    monkeypatch.setattr("dataset.io.open", _FullDisk("_mask.png", after=10), raising=False)
    assert predict.main(_predict(weights[1], images, out)) == 2
    _one_line(capsys.readouterr().err, f"error: {out / 'im0_mask.png'}: cannot write (No space left on device")
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == old
    assert not _temporaries(tmp_path)


def test_a_second_predict_into_the_same_folder_is_refused_before_loading_models(tmp_path, weights, capsys,
                                                                                 monkeypatch):
    images = _images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(predict, "build_session", lambda *args: pytest.fail("loaded the models"))
    with RunLock(tmp_path / "out" / ".predict", "x", "y"):
        assert predict.main(_predict(weights[0], images, tmp_path / "out")) == 2
    _one_line(capsys.readouterr().err, f"--output {tmp_path / 'out'} is in use by process {os.getpid()}",
              "choose another --output")


def test_an_event_file_that_cannot_be_written_is_one_error_and_closes_quietly(tmp_path):
    from utils.run_log import EventFile

    events = EventFile(tmp_path)
    events.path = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(utils.files.WriteError, match="/dev/full: cannot write \\(No space left on device"):
        events.add([], 1)
    events.close()


# The event file

def test_tensorboard_reads_the_event_file_which_appears_with_its_first_event(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.run_log import RunLog

    log = RunLog(tmp_path, True)
    log.line("text only")
    assert not list(tmp_path.glob("events.*"))
    log.scalars({"loss/train": 0.5, "lr": 1e-3}, 3)
    log.panel("predictions", np.zeros((4, 6, 3), np.uint8), 3)
    log.close()
    # tensorboard's own reader, as `tensorboard --logdir` uses it.
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss/train", "lr"] and events.Tags()["images"] == ["predictions"]
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(3, 0.5)]
    assert (events.Images("predictions")[0].width, events.Images("predictions")[0].height) == (6, 4)
