"""End to end through the real entry point: all three stages and evaluation on tiny
generated data, the files each stage writes, resume, and the shell scripts' flags."""
from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

import config
import helper
import train_deep_globe
import utils.cores
import utils.progress
from dataset.make_demo import make_deep_globe_demo
from utils.checkpoint import read_file, read_state_dict
from utils.loader_wait import LoaderWait

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--size_g", "64", "--size_p", "96", "--batch_size", "2",
        "--sub_batch_size", "4", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_deep_globe_demo(root, n_train=2, n_val=1, n_test=1, size=128, seed=0)
    return root


def _run(*args: str) -> int:
    return train_deep_globe.main([*map(str, args)])


def _common(data: Path, tmp: Path) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(tmp / "models"), "--log_path", str(tmp / "logs"), *TINY]


def _groups(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_three_stages_and_evaluation(data, tmp_path):
    """The chain of files; where each stage's tensors come from is tests/test_recipe.py's."""
    common = _common(data, tmp_path)
    models = tmp_path / "models"

    assert _run("--mode", 1, "--num_epochs", 1, "--pretrained", "none", *common) == 0
    g = read_state_dict(models / "fpn_deepglobe_global.pth")
    # One epoch, so the last is the best: one file on disk under both names.
    assert os.path.samefile(models / "fpn_deepglobe_global.pth", models / "fpn_deepglobe_global.best.pth")
    assert (models / "fpn_deepglobe_global.state.pth").is_file()
    events = list((tmp_path / "logs" / "fpn_deepglobe_global").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "epoch 1/1" in (tmp_path / "logs" / "fpn_deepglobe_global" / "log.txt").read_text()

    assert _run("--mode", 2, "--num_epochs", 1, "--path_g", "fpn_deepglobe_global.pth", "--pretrained", "none",
                *common) == 0
    g2l = read_state_dict(models / "fpn_deepglobe_global2local.pth")
    # Stage 2 starts from stage 1 and never trains the global branch.
    assert _same(_groups(g2l, "resnet_global."), _groups(g, "resnet_global."))
    assert _same(_groups(g2l, "fpn_global."), _groups(g, "fpn_global."))
    assert not _same(_groups(g2l, "fpn_local."), _groups(g, "fpn_local."))

    assert _run("--mode", 3, "--num_epochs", 1, "--path_g", "fpn_deepglobe_global.pth",
                "--path_g2l", "fpn_deepglobe_global2local.pth", *common) == 0
    # Stage 2 kept stage 1's global branch, so stage 3's frozen context is that branch.
    assert "warning" not in (tmp_path / "logs" / "fpn_deepglobe_local2global" / "log.txt").read_text()
    l2g = read_state_dict(models / "fpn_deepglobe_local2global.pth")
    # Stage 3 starts from stage 2, keeps its local branch and trains the global one.
    assert _same(_groups(l2g, "resnet_local."), _groups(g2l, "resnet_local."))
    assert _same(_groups(l2g, "fpn_local."), _groups(g2l, "fpn_local."))
    assert not _same(_groups(l2g, "fpn_global."), _groups(g2l, "fpn_global."))
    # The authors' layout: every key carries the DataParallel prefix.
    assert all(k.startswith("module.") for k in read_file(models / "fpn_deepglobe_local2global.pth"))

    predictions = tmp_path / "predictions"
    logs = tmp_path / "logs" / "fpn_deepglobe_local2global"
    events = sorted(logs.glob("events.*"))
    assert _run("--mode", 3, "--evaluation", "--test", "--path_g", "fpn_deepglobe_global.pth",
                "--path_g2l", "fpn_deepglobe_global2local.pth", "--path_l2g", "fpn_deepglobe_local2global.pth",
                "--save_predictions", predictions, *common) == 0
    (result,) = logs.glob("eval-test-mode3-*.json")
    metrics = json.loads(result.read_text())
    assert (metrics["split"], metrics["mode"], metrics["tta"]) == ("test", 3, False)
    assert metrics["checkpoints"]["--path_l2g"] == str(models / "fpn_deepglobe_local2global.pth")
    assert metrics["checkpoint_epochs"] == {"--path_l2g": 1, "--path_g": 1}
    for kind in ("global", "local", "ensemble"):
        assert len(metrics["scores"][kind]["iou"]) == 7
        assert 0.0 <= metrics["scores"][kind]["miou"] <= 1.0
    assert [p.name for p in predictions.iterdir()] == ["demotest000_mask.png"]
    # Another evaluation in the same folder writes a file of its own, and no event file.
    assert _run("--mode", 3, "--evaluation", "--test", "--path_g", "fpn_deepglobe_global.pth",
                "--path_g2l", "fpn_deepglobe_global2local.pth", "--path_l2g", "fpn_deepglobe_local2global.pth",
                *common) == 0
    assert len(list(logs.glob("eval-test-mode3-*.json"))) == 2 and result.read_text() == json.dumps(metrics, indent=2)
    assert sorted(logs.glob("events.*")) == events


def _losses(log: Path) -> list[float]:
    return [float(x) for x in re.findall(r"loss (\S+)", log.read_text())]


def test_training_lowers_the_loss_and_resume_ends_with_the_same_weights(data, tmp_path, monkeypatch):
    args = ["--mode", 1, "--num_epochs", 3, "--lr", "1e-4", "--pretrained", "none"]
    assert _run(*args, *_common(data, tmp_path / "straight")) == 0
    losses = _losses(tmp_path / "straight" / "logs" / "fpn_deepglobe_global" / "log.txt")
    assert len(losses) == 3 and losses[-1] < losses[0]

    real_epoch = helper.train_one_epoch

    def interrupted(session, loader, optimizer, scheduler, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(session, loader, optimizer, scheduler, epoch)

    monkeypatch.setattr(helper, "train_one_epoch", interrupted)
    assert _run(*args, *_common(data, tmp_path / "resumed")) == 130
    monkeypatch.setattr(helper, "train_one_epoch", real_epoch)
    assert read_file(tmp_path / "resumed" / "models" / "fpn_deepglobe_global.state.pth")["epoch"] == 1
    assert _run(*args, "--resume", *_common(data, tmp_path / "resumed")) == 0

    for name in ("fpn_deepglobe_global.pth", "fpn_deepglobe_global.best.pth", "fpn_deepglobe_global.state.pth"):
        straight = read_state_dict(tmp_path / "straight" / "models" / name)
        resumed = read_state_dict(tmp_path / "resumed" / "models" / name)
        assert _same(straight, resumed), name


def test_in_a_log_progress_is_a_line_now_and_then_not_a_bar(data, tmp_path, monkeypatch, capsys):
    """Where stderr is no terminal (a cluster's log file; pytest's capture), a bar would
    write a carriage return per batch into the file: lines come instead, here after every
    batch."""
    monkeypatch.setattr(utils.progress, "EVERY", 0.0)
    assert _run("--mode", 1, "--num_epochs", 1, "--pretrained", "none", *_common(data, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert re.fullmatch(r"train 1: 1/1 batch \(100 %\) after 0 min, loss=\d\.\d{4}, miou=0\.\d{3}", lines[0]), lines
    assert re.fullmatch(r"val 1: 1/1 batch \(100 %\) after 0 min, miou=0\.\d{3}", lines[1]), lines


def _script_args(script: Path) -> list[str]:
    """The arguments a .sh script passes to train_deep_globe.py, with the environment
    defaults it documents substituted."""
    text = script.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("exec python "))
    words = shlex.split(line.split('train_deep_globe.py"', 1)[1])
    words = [re.sub(r"\$\{\w+:-\$here/([^}]*)\}", r"\1", w) for w in words if w != "$@"]
    words = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", w) for w in words]
    return words


def test_bf16_training_on_the_cpu_keeps_fp32_weights(data, tmp_path, monkeypatch):
    """Autocast computes in bf16; the weights it updates, and the files, stay fp32. (Where
    the CPU lacks bf16 instructions, oneDNN emulates them: slower, the same values.)"""
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    seen = []
    real_run = helper.Session.run

    def run(session, batch, backward=False):
        seen.append(session.amp)
        return real_run(session, batch, backward)

    monkeypatch.setattr(helper.Session, "run", run)
    assert _run("--mode", 1, "--num_epochs", 1, "--pretrained", "none", "--amp", "bf16", *_common(data, tmp_path)) == 0
    assert seen and set(seen) == {torch.bfloat16}
    state = read_state_dict(tmp_path / "models" / "fpn_deepglobe_global.pth")
    floats = [t for t in state.values() if t.is_floating_point()]
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in floats)
    assert re.search(r"epoch 1/1  loss \d+\.\d{4}", (tmp_path / "logs" / "fpn_deepglobe_global" / "log.txt").read_text())


# The authors' scripts (docs/authors_behaviour.md, section 3): what each writes (task name) and
# trains for, at which learning rate.
@pytest.mark.parametrize(
    "script, mode, evaluation, paths, task, epochs, lr",
    [
        ("train_deep_globe_global.sh", 1, False, {}, "fpn_deepglobe_global", 120, 5e-5),
        ("train_deep_globe_global2local.sh", 2, False, {"path_g": "fpn_deepglobe_global.pth"},
         "fpn_deepglobe_global2local", 50, 2e-5),
        ("train_deep_globe_local2global.sh", 3, False,
         {"path_g": "fpn_deepglobe_global.pth", "path_g2l": "fpn_deepglobe_global2local.pth"},
         "fpn_deepglobe_local2global", 120, 5e-5),
        ("eval_deep_globe.sh", 3, True, {"path_g": "fpn_deepglobe_global.pth",
                                         "path_g2l": "fpn_deepglobe_global2local.pth",
                                         "path_l2g": "fpn_deepglobe_local2global.pth"},
         "fpn_deepglobe_local2global", None, None),
    ],
)
def test_scripts_use_the_authors_settings(script, mode, evaluation, paths, task, epochs, lr, tmp_path):
    args = config.parse_args(_script_args(ROOT / script))
    assert (args.data_path, args.model_path) == ("data/deep_globe", "saved_models")
    # Checkpoints without facts (as the authors' are): what the scripts leave out is the authors' default.
    args.model_path = str(tmp_path)
    for name in paths.values():
        (tmp_path / name).touch()
    table = config.settle_flags(args).table
    assert (args.mode, args.evaluation) == (mode, evaluation)
    assert (args.batch_size, args.sub_batch_size, args.size_g, args.size_p) == (6, 6, (508, 508), (508, 508))
    assert (table.n_class, args.backbone) == (7, "resnet50")
    for flag in ("path_g", "path_g2l", "path_l2g"):
        assert getattr(args, flag) == paths.get(flag)
    # Each training stage writes the file the next stage's script reads (paths, above).
    assert args.task_name == task
    assert (args.lamb_fmreg, args.cuda_math, args.seed) == (0.15, "strict", 0)
    if not evaluation:
        assert (args.num_epochs, args.lr, args.pretrained) == (epochs, lr, "auto")


@pytest.mark.parametrize("device, cores, processes, workers", [
    ("cpu", 64, None, 2),  # the network needs the cores
    ("cuda", 16, None, 8), ("cuda:1", 4, None, 3), ("cuda", 1, None, 1),
    ("cuda", 16, "4", 3),  # four processes under torchrun share the cores
])
def test_loader_workers_by_default_are_the_cores_a_gpus_process_leaves(device, cores, processes, workers,
                                                                        monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(utils.cores, "CPU_MAX", Path("/nonexistent/cpu.max"))
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert config.parse_args(["--device", device]).num_workers == workers
    assert config.parse_args(["--device", device, "--num_workers", "0"]).num_workers == 0


def test_loader_wait_counts_the_loops_waits_for_batches_not_its_own_work():
    class SlowLoader:
        def __len__(self):
            return 3

        def __iter__(self):
            time.sleep(0.2)  # starting the workers
            return self.batches()

        @staticmethod
        def batches():
            time.sleep(0.1)  # the first batch
            for _ in range(3):
                yield "batch"
                time.sleep(0.05)

    waits = LoaderWait(SlowLoader())
    for _ in range(2):  # each iteration counts afresh
        for _ in waits:
            time.sleep(0.3)  # the loop's own work on a batch
        assert len(waits) == 3
        assert 0.3 <= waits.first < 0.6
        assert 0.4 <= waits.total < 0.9  # 0.3 + 2 x 0.05; with the loop's 3 x 0.3 s it would exceed 1.3


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_workers_server_starts_before_the_models_load(data, tmp_path, monkeypatch, workers):
    """Its imports then overlap the model loading (bench/README.md); without workers there
    is nothing to start."""
    calls = []
    start, build = train_deep_globe.start_worker_server, train_deep_globe.stage_models
    def server(num_workers):
        if num_workers > 0:
            calls.append("server")
        start(num_workers)

    monkeypatch.setattr(train_deep_globe, "start_worker_server", server)
    monkeypatch.setattr(train_deep_globe, "stage_models", lambda *a, **k: (calls.append("models"), build(*a, **k))[1])
    common = _common(data, tmp_path)
    common[common.index("--num_workers") + 1] = str(workers)
    assert _run("--mode", 1, "--num_epochs", 1, "--pretrained", "none", *common) == 0
    assert calls == (["server", "models"] if workers else ["models"])


@pytest.mark.parametrize("cpu_max, cores", [("max 100000", 16), ("200000 100000", 2), ("150000 100000", 2),
                                            ("50000 100000", 1), ("garbled", 16)])
def test_a_containers_cpu_quota_bounds_the_cores_a_process_may_use(cpu_max, cores, tmp_path, monkeypatch):
    """Affinity shows the host's cores; a quota of 1.5 CPUs keeps a second core busy half the time."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(utils.cores, "CPU_MAX", tmp_path / "cpu.max")
    assert utils.cores.usable_cores() == cores
