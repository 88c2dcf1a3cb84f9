"""The authors' training recipe around the forward and backward pass: where every tensor of
every stage comes from, which file the next stage reads, and fp32 that is fp32.

Every checkpoint and the ImageNet file are marker files here: random tensors of their own,
so each tensor a stage ends up with names the file it came from. The expectations are the
table of docs/authors_behaviour.md, section 1 (the authors' create_model_load_weights), written out
below, not read from models/stages.py.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
import pytest
import torch
import torchvision

import config
import helper
import train_deep_globe
from dataset.classes import NAMED_TABLES
from dataset.make_demo import make_deep_globe_demo
from models.glnet import GLNet
from models.stages import Stage
from utils.checkpoint import read_file, read_state_dict
from utils.cuda_math import set_cuda_math

N_CLASS = 7
IMAGENET, FRESH = "imagenet", "fresh"
GROUPS = ("resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv")

# (mode, phase) -> {group: source}; source is IMAGENET (the --pretrained file), a checkpoint
# flag (its file), or FRESH (initialised by the network, from no file). "frozen" is stage 3's
# frozen stage-1 global branch.
RECIPE: dict[tuple[int, str], dict[str, str]] = {
    (1, "train"): {"resnet_global": IMAGENET, "resnet_local": IMAGENET, "fpn_global": FRESH, "fpn_local": FRESH,
                   "ensemble_conv": FRESH},
    # path_g's keys without "local" over a network whose ResNets hold ImageNet.
    (2, "train"): {"resnet_global": "path_g", "fpn_global": "path_g", "ensemble_conv": "path_g",
                   "resnet_local": IMAGENET, "fpn_local": FRESH},
    (3, "train"): {**{group: "path_g2l" for group in GROUPS}, "frozen": "path_g"},
    # Mode 1 reads no local group; the authors' constructor put ImageNet in the local ResNet,
    # which no output of mode 1 depends on, so evaluation does not ask for that file.
    (1, "eval"): {"resnet_global": "path_g", "fpn_global": "path_g", "ensemble_conv": "path_g",
                  "resnet_local": FRESH, "fpn_local": FRESH},
    (2, "eval"): {group: "path_g2l" for group in GROUPS},
    (3, "eval"): {**{group: "path_l2g" for group in GROUPS}, "frozen": "path_g"},
}
FILES = {IMAGENET: "resnet18-imagenet.pth", "path_g": "g.pth", "path_g2l": "g2l.pth", "path_l2g": "l2g.pth"}


def _mark(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values of one file's own, still usable by a forward pass (positive variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = torch.randint(1, 10**6, value.shape, generator=g, dtype=value.dtype)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(value.shape, generator=g)
        else:
            out[key] = value + 0.01 * torch.randn(value.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """(folder, {source: state without "module."}): an ImageNet file in torchvision's layout
    (fc included, as torchvision ships it) and one GLNet file, saved as the authors' were
    (every key under "module."), per checkpoint flag."""
    folder = tmp_path_factory.mktemp("markers")
    torch.manual_seed(0)
    states = {IMAGENET: _mark(torchvision.models.resnet18().state_dict(), 1)}
    torch.save(states[IMAGENET], folder / FILES[IMAGENET])
    for seed, flag in enumerate(("path_g", "path_g2l", "path_l2g"), start=2):
        states[flag] = _mark(GLNet(N_CLASS, "resnet18").state_dict(), seed)
        torch.save({"module." + k: v for k, v in states[flag].items()}, folder / FILES[flag])
    return folder, states


def _source_of(key: str, value: torch.Tensor, states: dict[str, dict[str, torch.Tensor]]) -> str:
    """The marker file whose tensor `value` is (IMAGENET files are keyed without the group)."""
    found = [source for source, state in states.items()
             if torch.equal(value, state.get(key.split(".", 1)[1] if source == IMAGENET else key, torch.empty(0)))]
    assert len(found) <= 1, key
    return found[0] if found else FRESH


def _sources(state: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
             skip: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """{group: the sources of its tensors}, leaving out the keys in `skip`."""
    found: dict[str, set[str]] = {}
    for key, value in state.items():
        if key not in skip:
            found.setdefault(key.split(".")[0], set()).add(_source_of(key, value, states))
    return found


def _args(folder: Path, mode: int, evaluation: bool, *extra: str) -> list[str]:
    flags = [f"--{flag}={folder / name}" for flag, name in FILES.items() if flag != IMAGENET]
    return ["--mode", str(mode), *(["--evaluation"] if evaluation else []), "--backbone", "resnet18",
            "--pretrained", str(folder / FILES[IMAGENET]), *flags, *extra]


def _parsed(argv: list[str]):
    """The trainer's flags as a run settles them (the defaults a checkpoint's facts give)."""
    args = config.parse_args(argv)
    config.settle_flags(args)
    return args


@pytest.mark.parametrize("mode", [1, 2, 3])
@pytest.mark.parametrize("phase", ["train", "eval"])
def test_every_tensor_comes_from_the_authors_source(markers, mode, phase):
    folder, states = markers
    args = _parsed(_args(folder, mode, phase == "eval"))
    model, frozen = train_deep_globe.stage_models(args, N_CLASS)
    expected = RECIPE[(mode, phase)]
    found = _sources(model.state_dict(), states)
    assert found == {group: {expected[group]} for group in GROUPS}
    if "frozen" in expected:
        assert frozen is not None
        frozen_groups = ("resnet_global", "fpn_global")
        assert _sources(frozen.state_dict(), states) == {group: {expected["frozen"]} for group in frozen_groups}
    else:
        assert frozen is None


def test_pretrained_none_starts_stage_2s_local_resnet_from_random_weights(markers):
    folder, states = markers
    args = _parsed([*_args(folder, 2, False), "--pretrained", "none"])
    model, _ = train_deep_globe.stage_models(args, N_CLASS)
    assert _sources(model.state_dict(), states)["resnet_local"] == {FRESH}


def test_stage_2_looks_up_imagenet_weights_like_stage_1(markers, tmp_path, monkeypatch):
    folder, states = markers
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    argv = [*_args(folder, 2, False), "--pretrained", "auto"]
    with pytest.raises(helper.CheckpointError, match=f"no ImageNet resnet18 weights in {tmp_path / 'hub'}"):
        train_deep_globe.stage_models(_parsed(argv), N_CLASS)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes((folder / FILES[IMAGENET]).read_bytes())
    model, _ = train_deep_globe.stage_models(_parsed(argv), N_CLASS)
    assert _sources(model.state_dict(), states)["resnet_local"] == {IMAGENET}


def test_auto_takes_only_the_imagenet_weights_the_authors_used(tmp_path, monkeypatch):
    """torchvision's IMAGENET1K_V1 file, by the name torchvision gives it; its later V2
    weights (another training recipe) only when named."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    hub = tmp_path / "checkpoints"
    hub.mkdir()
    v1 = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name
    v2 = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url).name
    (hub / v2).touch()
    args = _parsed([])
    with pytest.raises(helper.CheckpointError, match=f"{v2}: not torchvision's IMAGENET1K_V1 resnet50 weights"):
        config.pretrained_path(args)
    (hub / v1).touch()
    assert config.pretrained_path(args) == hub / v1


def test_a_resumed_run_needs_no_imagenet_file(markers):
    folder, _ = markers
    argv = [*_args(folder, 2, False), "--pretrained", str(folder / "missing.pth"), "--resume"]
    model, _ = train_deep_globe.stage_models(_parsed(argv), N_CLASS)
    assert isinstance(model, GLNet)  # its weights come from the training state, loaded later


# --------------------------------------------------------------------------- through the command line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_deep_globe_demo(root, n_train=2, n_val=1, n_test=0, size=128, seed=0)
    return root


def _train(data: Path, out: Path, *args: str) -> int:
    return train_deep_globe.main([*args, "--data_path", str(data), "--model_path", str(out), "--log_path",
                                  str(out / "logs"), "--size_g", "64", "--size_p", "96", "--batch_size", "2",
                                  "--sub_batch_size", "4", "--num_workers", "0", "--device", "cpu"])


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_each_stage_trains_from_the_authors_sources(markers, data, tmp_path, capsys, mode):
    """One epoch at a learning rate that moves no weight (Adam's step is about the learning
    rate): the weights file written holds the initial parameters. BatchNorm statistics of
    the branch being trained move with every batch, so they alone are left out."""
    folder, states = markers
    assert _train(data, tmp_path, *_args(folder, mode, False), "--num_epochs", "1", "--lr", "1e-30") == 0
    # The marker path_g is not the file the marker path_g2l was trained from.
    assert ("warning: --path_g" in capsys.readouterr().out) == (mode == 3)
    name = config.default_task_name(Stage(mode))
    written = read_state_dict(tmp_path / f"{name}.pth")
    trained = {1: "resnet_global", 2: "resnet_local", 3: "resnet_global"}[mode]
    moving = frozenset(k for k in written if k.startswith(trained + ".") and (".running_" in k or "num_batches" in k))
    expected = RECIPE[(mode, "train")]
    assert _sources(written, states, skip=moving) == {group: {expected[group]} for group in GROUPS}


def test_the_weights_file_holds_the_last_epoch_and_the_best_lies_beside_it(data, tmp_path, monkeypatch):
    """The authors' script wrote <task_name>.pth after every epoch and chained the next stage
    from it; the best validation epoch is ours, in <task_name>.best.pth."""
    snapshots: list[dict[str, torch.Tensor]] = []
    real_epoch, real_evaluate = helper.train_one_epoch, helper.evaluate

    def epoch(session, *args, **kwargs):
        stats = real_epoch(session, *args, **kwargs)
        snapshots.append({k: v.clone() for k, v in session.model.state_dict().items()})
        return stats

    def evaluate(session, loader, **kwargs):
        scores = real_evaluate(session, loader, **kwargs)
        return {kind: {**s, "miou": 0.9 if len(snapshots) == 1 else 0.1} for kind, s in scores.items()}

    monkeypatch.setattr(helper, "train_one_epoch", epoch)
    monkeypatch.setattr(helper, "evaluate", evaluate)
    assert _train(data, tmp_path, "--mode", "1", "--backbone", "resnet18", "--pretrained", "none",
                  "--num_epochs", "2", "--lr", "1e-3") == 0
    last, best = (read_state_dict(tmp_path / f"fpn_deepglobe_global{suffix}") for suffix in (".pth", ".best.pth"))
    state = read_file(tmp_path / "fpn_deepglobe_global.state.pth")
    assert (state["epoch"], state["best_epoch"]) == (1, 0)
    for written, snapshot in ((last, snapshots[1]), (best, snapshots[0])):
        assert written.keys() == snapshot.keys()
        assert all(torch.equal(written[k], snapshot[k]) for k in written)
    assert not all(torch.equal(last[k], best[k]) for k in last)
    # Weights files in the container the authors' torch 0.4.1 reads (tests/test_checkpoint.py).
    assert not any(zipfile.is_zipfile(tmp_path / f"fpn_deepglobe_global{s}") for s in (".pth", ".best.pth"))


# --------------------------------------------------------------------------- fp32 that is fp32


@pytest.fixture
def cuda_flags():
    """Put back the process-wide flags a test changes."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


def _flags() -> tuple[bool, bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic


@pytest.mark.parametrize("argv, flags", [
    ([], (False, False, True)),  # TF32 off, deterministic cuDNN: the authors' numerics
    (["--evaluation"], (False, False, True)),
    (["--cuda_math", "fast"], (True, True, False)),
])
def test_sessions_run_true_fp32_unless_asked_for_speed(cuda_flags, argv, flags):
    set_cuda_math("fast" if flags[2] else "strict")  # start from the other setting
    args = config.parse_args([*argv, "--size_g", "64", "--size_p", "96", "--backbone", "resnet18"])
    helper.make_session(Stage(1), GLNet(N_CLASS, "resnet18"), None, NAMED_TABLES["deep_globe"], args,
                        torch.device("cpu"), inference=args.evaluation)
    assert _flags() == flags
    if not flags[0]:  # torch's newer per-operator settings agree: nothing runs in TF32
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        assert torch.backends.cuda.matmul.fp32_precision != "tf32"


def test_predict_defaults_to_true_fp32(cuda_flags):
    import predict

    args = predict.as_trainer_args(predict.parse_args(["--input", "x", "--output", "y"]))
    assert args.cuda_math == "strict"
