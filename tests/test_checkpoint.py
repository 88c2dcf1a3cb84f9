"""Checkpoint I/O (utils/checkpoint.py): the authors' `module.` layout in and out, strict
loads with readable errors, partial loads, safe unpickling and atomic writes."""
from __future__ import annotations

import ast
import collections
import csv
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import utils.checkpoint as checkpoint
from conftest import FIXTURES
from models.glnet import GLNet, GlobalBranch
from utils.checkpoint import (
    KEY_FILTERS,
    PREFIX,
    CheckpointError,
    atomic_save,
    link_weights,
    load_imagenet_backbones,
    load_weights,
    read_facts,
    read_state_dict,
    save_weights,
    write_weights,
)

N_CLASS = 4


def _model(seed: int, n_class: int = N_CLASS) -> GLNet:
    """A small GLNet in which every tensor, buffers and biases included, depends on seed."""
    torch.manual_seed(seed)
    model = GLNet(n_class, backbone="resnet18")
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(seed)
            elif name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.1)
    return model.eval()


def _forward(model: GLNet) -> torch.Tensor:
    with torch.inference_mode():
        images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        return model.global_branch(images, model.global_branch(images).context()).logits


def _same_state(a, b, keys=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in (keys if keys is not None else sa))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[GLNet, Path]:
    """A small GLNet and the file save_weights wrote for it (tests must not modify either)."""
    model = _model(1)
    path = tmp_path_factory.mktemp("saved") / "weights.pth"
    save_weights(model, path)
    return model, path


# --------------------------------------------------------------------------- the authors' layout


def test_authors_key_table_loads_and_saves_back(tmp_path):
    """A file with exactly the authors' keys and shapes loads with nothing missing or
    unexpected, and what we save has the same keys, order and shapes."""
    with open(FIXTURES / "state_dict_keys.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    table = [(r["key"], ast.literal_eval(r["shape"]), r["dtype"]) for r in rows]
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    authors = {k: torch.full(shape, 0.5, dtype=dtypes[dt]) if dt == "float32" else torch.tensor(3)
               for k, shape, dt in table}
    path = tmp_path / "authors.pth"
    torch.save(authors, path)

    model = GLNet(7)
    loaded = load_weights(model, path)
    assert len(loaded) == 718
    assert all((v == 0.5).all() for k, v in model.state_dict().items() if v.is_floating_point())

    out = tmp_path / "ours.pth"
    save_weights(model, out)
    state = torch.load(out, weights_only=True)
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, shape) for k, shape, _ in table]
    assert all(k.startswith(PREFIX) for k in state)


def test_save_load_round_trip(saved):
    model, path = saved
    state = torch.load(path, weights_only=True)
    assert list(state) == [PREFIX + k for k in model.state_dict()]
    other = _model(2)
    expected = _forward(model)
    assert not torch.equal(_forward(other), expected)
    loaded = load_weights(other, path)
    assert loaded == list(model.state_dict())
    assert _same_state(other, model)
    assert torch.equal(_forward(other), expected)


# torch 0.4.1, which the authors' code pins, reads only torch's legacy container: the magic
# number and protocol version it checks, then a pickle whose globals must exist in 0.4.1 and
# whose storages follow, each as its element count (int64) and raw bytes.
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
TORCH_041_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                      "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                      "CharStorage": np.int8, "ByteStorage": np.uint8}


def _read_as_torch_041_would(path: Path) -> dict[str, np.ndarray]:
    """An independent reader of the legacy container, accepting only what torch 0.4.1 has."""
    storages: dict[str, list] = {}

    def rebuild(*args):
        assert len(args) == 6, "torch 0.4.1's _rebuild_tensor_v2 takes six arguments"
        return args[:4]  # storage key, offset, size, stride

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            assert module == "torch" and name in TORCH_041_STORAGES, f"{module}.{name} is not in torch 0.4.1"
            return np.dtype(TORCH_041_STORAGES[name])

        def persistent_load(self, saved_id):
            typename, dtype, key, _location, numel, view_metadata = saved_id
            assert typename == "storage" and view_metadata is None
            storages.setdefault(key, [dtype, numel, None])
            return key

    with open(path, "rb") as f:
        assert (pickle.load(f), pickle.load(f)) == (LEGACY_MAGIC, LEGACY_PROTOCOL)
        pickle.load(f)  # system information
        tensors = Unpickler(f).load()
        for key in pickle.load(f):
            dtype, numel, _ = storages[key]
            assert int.from_bytes(f.read(8), "little") == numel
            storages[key][2] = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
        assert f.read() == b"", "bytes after the last storage"
    out = {}
    for name, (key, offset, size, stride) in tensors.items():
        data = storages[key][2]
        out[name] = np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride])
    return out


def test_weights_files_are_readable_by_the_authors_torch(saved):
    model, path = saved
    assert not zipfile.is_zipfile(path)
    arrays = _read_as_torch_041_would(path)
    state = model.state_dict()
    assert arrays.keys() == {PREFIX + k for k in state}
    for key, value in state.items():
        assert np.array_equal(arrays[PREFIX + key], value.numpy()), key


def test_files_without_prefix_or_inside_a_training_state_load(tmp_path, saved):
    model = saved[0]
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "state.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"model": {PREFIX + k: v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        other = _model(2)
        load_weights(other, path)
        assert _same_state(other, model), path.name


def test_file_without_num_batches_tracked_loads(tmp_path, saved):
    model = saved[0]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(model.state_dict())
    path = tmp_path / "torch040.pth"
    torch.save(state, path)
    other = _model(2)
    load_weights(other, path)
    assert _same_state(other, model, keys=state)


# --------------------------------------------------------------------------- strict checks


def test_mismatched_file_lists_every_problem(tmp_path, saved):
    model = saved[0]
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    del state[PREFIX + "fpn_local.classify.bias"]
    state[PREFIX + "extra.weight"] = torch.zeros(3)
    state[PREFIX + "ensemble_conv.weight"] = torch.zeros(N_CLASS, 7, 3, 3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    other = _model(2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(other, path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): fpn_local.classify.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "ensemble_conv.weight: [4, 7, 3, 3] in file, [4, 1024, 3, 3] in model" in message
    # Nothing was loaded.
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_n_class_hint(tmp_path):
    path = tmp_path / "seven.pth"
    save_weights(_model(1, n_class=7), path)
    with pytest.raises(CheckpointError, match=r"trained for 7 classes, the class table has 4: pass the table it was trained with to --classes"):
        load_weights(_model(2), path)


def test_long_key_lists_are_shortened(tmp_path):
    branch = GlobalBranch(N_CLASS, backbone="resnet18").state_dict()
    path = tmp_path / "global_only.pth"
    torch.save(branch, path)
    model = _model(2)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path)
    missing = [k for k in model.state_dict() if k not in branch and not k.endswith("num_batches_tracked")]
    message = str(err.value)
    assert len(missing) > 8
    assert f"missing keys ({len(missing)}): {missing[0]}, {missing[1]}" in message
    assert f"({len(missing)} in all)" in message
    assert missing[-1] not in message  # the list is cut short, the count is not


class _Marker:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    files = {}

    def add(name: str, write) -> None:
        files[name] = tmp_path / f"{name}.pth"
        write(files[name])

    add("text", lambda p: p.write_text("this is not a checkpoint\n"))
    add("random_bytes", lambda p: p.write_bytes(os.urandom(4096)))
    add("truncated", lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]))
    add("empty", lambda p: p.write_bytes(b""))
    add("legacy_pickle", lambda p: p.write_bytes(pickle.dumps({"a": 1})))
    add("non_tensor_object", lambda p: torch.save({"epoch": 3, "note": "no weights"}, p))
    add("list_of_tensors", lambda p: torch.save([torch.zeros(1)], p))
    add("empty_dict", lambda p: torch.save({}, p))
    return files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_files_raise_checkpoint_error_naming_the_file(tmp_path, saved):
    model = _model(2)
    for name, path in _bad_files(tmp_path, saved[1]).items():
        with pytest.raises(CheckpointError) as err:
            load_weights(model, path)
        assert str(path) in str(err.value), name
        # One line, and never torch's advice to unpickle with weights_only=False.
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value), name
        if name in ("text", "random_bytes", "truncated", "empty"):
            assert "not a readable PyTorch checkpoint: incomplete" in str(err.value), name
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path)  # a folder


def test_files_are_unpickled_with_weights_only(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"fpn_global.classify.weight": torch.zeros(1), "payload": _Marker(str(marker))}, path)
    with pytest.raises(CheckpointError, match=str(path)) as err:
        read_state_dict(path)
    assert not marker.exists()
    assert "holds an object of test_checkpoint._touch besides tensors, which is not unpickled here" in str(err.value)


# --------------------------------------------------------------------------- partial loads


@pytest.mark.parametrize("keys", sorted(KEY_FILTERS))
def test_key_filters(saved, keys):
    source, path = saved
    model = _model(2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = set(load_weights(model, path, keys=keys))
    expected = {
        "all": lambda k: True,
        "non_local": lambda k: not k.startswith(("resnet_local.", "fpn_local.")),
        "global": lambda k: k.startswith(("resnet_global.", "fpn_global.")),
    }[keys]
    source_state = source.state_dict()
    for key, value in model.state_dict().items():
        if expected(key):
            assert key in loaded and torch.equal(value, source_state[key]), key
        else:
            assert key not in loaded and torch.equal(value, original[key]), key
    if keys == "non_local":
        assert any(k.startswith("ensemble_conv.") for k in loaded)


def test_global_branch_from_a_full_file(saved):
    source, path = saved
    branch = GlobalBranch(N_CLASS, backbone="resnet18")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_weights(branch, path, keys="global")  # checked against itself by default
    loaded = load_weights(branch, path, keys="global", reference=GLNet(N_CLASS, backbone="resnet18"))
    assert set(loaded) == set(branch.state_dict())
    branch.eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(branch.global_branch(images).logits, source.global_branch(images).logits)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pth"
    atomic_save({"w": torch.arange(4)}, path)
    old_bytes = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial data " * 100)
        raise error("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(error):
        atomic_save({"w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_atomic_save_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "dir" / "w.pth"
    atomic_save({"w": torch.ones(2)}, path)
    atomic_save({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["w.pth"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_link_weights_names_the_same_weights_and_facts_until_the_source_is_rewritten(tmp_path, monkeypatch,
                                                                                     hard_links):
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    src, dst = tmp_path / "w.pth", tmp_path / "w.best.pth"
    write_weights({"w": torch.ones(2)}, src, {"epoch": 1})
    write_weights({"w": torch.zeros(2)}, dst, {"epoch": 0})
    link_weights(src, dst)
    assert os.path.samefile(src, dst) == hard_links
    write_weights({"w": torch.full((2,), 2.0)}, src, {"epoch": 2})
    assert torch.equal(torch.load(dst, weights_only=True)["w"], torch.ones(2))
    assert read_facts(dst)["epoch"] == 1 and read_facts(src)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.best.pth", "w.best.pth.json", "w.pth", "w.pth.json"]


def test_weights_written_without_facts_lose_the_old_facts(tmp_path):
    path = tmp_path / "w.pth"
    write_weights({"w": torch.ones(2)}, path, {"epoch": 1})
    write_weights({"w": torch.zeros(2)}, path)
    assert read_facts(path) is None and not (tmp_path / "w.pth.json").exists()


def test_facts_of_weights_that_were_replaced_since_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    write_weights({"w": torch.ones(2)}, path, {"size_g": [64, 64]})
    save_weights(_model(1), tmp_path / "other.pth")
    (tmp_path / "other.pth").replace(path)  # someone's file copied over ours; our facts stay
    with pytest.raises(CheckpointError, match="w.pth.json: the facts of other weights than w.pth holds now"):
        read_facts(path)
    write_weights({"w": torch.ones(2)}, path, {"size_g": [64, 64]})
    path.write_bytes(path.read_bytes()[:100])  # a copy that stopped part way
    with pytest.raises(CheckpointError, match="copied incompletely"):
        read_facts(path)


def test_facts_that_are_not_ours_are_refused_in_one_line(tmp_path):
    path = tmp_path / "w.pth"
    write_weights({"w": torch.ones(2)}, path)
    (tmp_path / "w.pth.json").write_text('{"something": "else"}')
    with pytest.raises(CheckpointError, match="w.pth.json: not the facts of a weights file"):
        read_facts(path)
    (tmp_path / "w.pth.json").write_text("{")
    with pytest.raises(CheckpointError, match="w.pth.json: unreadable facts"):
        read_facts(path)


# --------------------------------------------------------------------------- ImageNet backbones


def test_load_imagenet_backbones(tmp_path):
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet, path)
    model = _model(2)
    fpn_before = {k: v.clone() for k, v in model.fpn_global.state_dict().items()}
    load_imagenet_backbones(model, path, ["resnet_global", "resnet_local"])
    for name in ("resnet_global", "resnet_local"):
        state = getattr(model, name).state_dict()
        assert set(state) == {k for k in imagenet if not k.startswith("fc.")}
        assert all(torch.equal(v, imagenet[k]) for k, v in state.items()), name
    assert all(torch.equal(v, fpn_before[k]) for k, v in model.fpn_global.state_dict().items())
    # Only the backbones named are touched.
    model = _model(2)
    global_before = {k: v.clone() for k, v in model.resnet_global.state_dict().items()}
    load_imagenet_backbones(model, path, ["resnet_local"])
    assert all(torch.equal(v, imagenet[k]) for k, v in model.resnet_local.state_dict().items())
    assert all(torch.equal(v, global_before[k]) for k, v in model.resnet_global.state_dict().items())


def test_load_imagenet_backbones_errors(tmp_path):
    model = _model(2)
    with pytest.raises(CheckpointError, match="ImageNet weights not found") as err:
        load_imagenet_backbones(model, tmp_path / "nothing.pth", ["resnet_global"])
    assert "nothing.pth" in str(err.value)
    # A ResNet-34 file has blocks a ResNet-18 backbone lacks.
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"holds torchvision's ResNet-34; resnet_global is a ResNet-18, as "
                       r"--backbone sets\); unexpected keys .*layer1.2"):
        load_imagenet_backbones(model, path, ["resnet_global"])
    # A stage's checkpoint given as ImageNet weights.
    save_weights(_model(2), tmp_path / "stage.pth")
    with pytest.raises(CheckpointError, match="holds a GLNet stage's weights; --pretrained takes torchvision's"):
        load_imagenet_backbones(model, tmp_path / "stage.pth", ["resnet_global"])


def test_weights_digest_follows_the_values_not_the_order_or_the_file(tmp_path):
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor(3, dtype=torch.int64)}
    reordered = {"a": state["a"].clone(), "b": state["b"].t().contiguous().t()}  # another layout, the same values
    assert checkpoint.weights_digest(state) == checkpoint.weights_digest(reordered)
    torch.save(state, tmp_path / "w.pth")
    assert checkpoint.weights_digest(torch.load(tmp_path / "w.pth", weights_only=True)) == checkpoint.weights_digest(state)
    nudged = dict(state, b=torch.nextafter(state["b"], torch.tensor(math.inf)))
    assert checkpoint.weights_digest(nudged) != checkpoint.weights_digest(state)
    assert checkpoint.weights_digest(dict(state, b=state["b"].double())) != checkpoint.weights_digest(state)
    assert checkpoint.weights_digest({"c": state["b"], "a": state["a"]}) != checkpoint.weights_digest(state)
