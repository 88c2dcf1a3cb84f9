"""torchrun with two CPU processes (gloo): evaluation shards the images and sums the
confusion matrices, so its metrics equal a single process's; training runs in step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_deep_globe
from dataset.make_demo import make_deep_globe_demo
from models.glnet import GLNet
from utils.checkpoint import read_file, save_weights
from utils.weight_rule import apply_rule_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--size_g", "64", "--size_p", "96", "--batch_size", "1",
        "--sub_batch_size", "4", "--num_workers", "0", "--device", "cpu", "--pretrained", "none"]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train_deep_globe.py", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # Three validation images: the two ranks get unequal shares.
    make_deep_globe_demo(root, n_train=2, n_val=3, n_test=0, size=128, seed=2)
    return root


def test_distributed_evaluation_equals_a_single_process(data, tmp_path):
    model = GLNet(7, "resnet18")
    apply_rule_weights(model, 0)
    save_weights(model, tmp_path / "models" / "g2l.pth")
    argv = ["--mode", "2", "--evaluation", "--path_g2l", "g2l.pth", "--data_path", str(data),
            "--model_path", str(tmp_path / "models"), *TINY]

    assert train_deep_globe.main([*argv, "--log_path", str(tmp_path / "single")]) == 0
    proc = _torchrun(*argv, "--log_path", str(tmp_path / "dist"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    (single,) = (tmp_path / "single" / "fpn_deepglobe_global2local").glob("eval-crossvali-mode2-*.json")
    (dist,) = (tmp_path / "dist" / "fpn_deepglobe_global2local").glob("eval-crossvali-mode2-*.json")
    single, dist = (json.loads(path.read_text())["scores"] for path in (single, dist))
    assert single["ensemble"]["pixels"] == 3 * 128 * 128
    assert dist == single


def _launched(*argv: str) -> subprocess.CompletedProcess:
    """train_deep_globe.py --nproc_per_node 2: the command starts torchrun itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train_deep_globe.py", "--nproc_per_node", "2", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_distributed_training_writes_one_run(data, tmp_path):
    proc = _launched("--mode", "1", "--num_epochs", "2", "--data_path", str(data),
                     "--model_path", str(tmp_path / "models"), "--log_path", str(tmp_path / "logs"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = read_file(tmp_path / "models" / "fpn_deepglobe_global.state.pth")
    assert state["epoch"] == 1
    # One optimizer step per batch of each rank's share: 2 images over 2 ranks, batch 1.
    assert state["scheduler"]["last_epoch"] == 2
    log = (tmp_path / "logs" / "fpn_deepglobe_global" / "log.txt").read_text()
    assert log.count("epoch 2/2") == 1


def test_a_users_mistake_in_several_processes_is_one_line_and_status_2(data, tmp_path):
    proc = _launched("--mode", "2", "--path_g", "missing.pth", "--data_path", str(data),
                     "--model_path", str(tmp_path / "models"), "--log_path", str(tmp_path / "logs"), *TINY)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.pth: not found" in lines[0], lines


def _average_worker(rank: int, port: int, out: str) -> None:
    import torch

    from utils.distributed import average_gradients, cleanup, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    info, _ = init_distributed("cpu")
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * rank)
    average_gradients([a, b], info)
    torch.save({"a": a.grad, "b": b.grad}, f"{out}.{rank}")
    cleanup(info)


def test_gradients_are_averaged_across_ranks(tmp_path):
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_worker, args=(port, str(tmp_path / "grads")), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads.{rank}")
        assert torch.equal(grads["a"], torch.full((3,), 1.5))
        assert torch.equal(grads["b"], torch.full((2, 2), 5.0))
