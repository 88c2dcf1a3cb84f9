"""Checkpoint files: the authors' layout in and out, strict checks, atomic writes.

A GLNet weights file is a plain state dict whose keys start with `module.` (the authors
saved through DataParallel). Files with or without the prefix load; files written here
always carry it, in the container torch wrote before 1.6, so they move both ways between
this project and the authors' code (pinned to torch 0.4.1).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from utils.files import replacing_together, writing

PREFIX = "module."
FACTS_SUFFIX = ".json"
FACTS_KEY, FACTS_VERSION = "lungseg_facts", 1  # marks (and versions) a facts file
SHA256_KEY = "weights_sha256"  # ties the facts to the bytes of their weights file
OPTIONAL_SUFFIX = "num_batches_tracked"

KEY_FILTERS: dict[str, Callable[[str], bool]] = {
    "all": lambda k: True,
    # The authors' filter for stage-1 files: everything except the local branch (so the
    # ensemble conv comes along).
    "non_local": lambda k: "local" not in k,
    "global": lambda k: k.startswith(("resnet_global.", "fpn_global.")),
}


class CheckpointError(ValueError):
    """A file that cannot initialise the model it was given to; the message says why."""


def strip_prefix(state: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


class _PythonWrites:
    """A file seen without its descriptor: torch's legacy writer would write storages to
    the descriptor itself and report a failure as a RuntimeError without its errno;
    through Python's write the OSError (disk full, ...) reaches `replacing`."""

    def __init__(self, file: BinaryIO) -> None:
        self.write, self.flush = file.write, file.flush


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (utils.files.writing); a failed write is a WriteError."""
    with writing(path) as file:
        torch.save(obj, _PythonWrites(file))


def link_weights(src: str | Path, dst: str | Path) -> None:
    """Make `dst` and its facts (facts_path) name the files of `src` (hard links: no second
    copy on disk; copies where the file system has none), replaced together. Files written
    here are replaced by renaming, never rewritten in place, so the names part when `src`
    is next written."""
    src, dst = Path(src), Path(dst)
    with replacing_together([dst, facts_path(dst)]) as temporaries:
        for source, tmp in zip((src, facts_path(src)), temporaries):
            if source.exists():
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)


def facts_path(weights: str | Path) -> Path:
    """Where the facts of a weights file are: `<file>.json` beside it. The weights file stays
    a plain state dict, which the authors' strict loader requires."""
    weights = Path(weights)
    return weights.with_name(weights.name + FACTS_SUFFIX)


def read_facts(weights: str | Path) -> Optional[dict[str, Any]]:
    """The facts of the run that wrote a weights file, or None for a file without them
    (the authors' files, files of earlier versions). Facts written for other bytes than the
    file now holds (a file copied over it) are refused: they would describe another model."""
    path = facts_path(weights)
    if not Path(weights).is_file() or not path.is_file():
        return None
    try:
        facts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable facts of {Path(weights).name} ({error}); delete the file to use "
                              "the weights without them") from None
    if not isinstance(facts, dict) or facts.pop(FACTS_KEY, None) != FACTS_VERSION:
        raise CheckpointError(f"{path}: not the facts of a weights file written by this project; delete it, or move "
                              "it away from the weights")
    if facts.pop(SHA256_KEY, None) != _sha256(weights):
        raise CheckpointError(f"{path}: the facts of other weights than {Path(weights).name} holds now (it was "
                              f"replaced, or copied incompletely); if it is whole, delete {path.name} to use the "
                              "weights without facts")
    return facts


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the same for the same
    weights, whichever file (moved, copied, re-saved) they were loaded from."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning every way a file can be wrong into a
    CheckpointError that names it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpicklers raise many types on garbage
        # Some of torch's errors say nothing without their type (a KeyError of '101').
        said = str(e) if any(c.isalpha() for c in str(e)) else f"{type(e).__name__}: {e}"
        raise CheckpointError(_unreadable(path, said)) from None


def _unreadable(path: Path, error: str) -> str:
    """One line for a file torch.load(weights_only=True) refused. torch's own message
    suggests weights_only=False, which would run whatever code the file names: never
    passed on."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", error)
    if found:
        return (f"{path}: holds an object of {found.group(1)} besides tensors, which is not unpickled here (a file "
                "can run code through it); save the model's state_dict() alone")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", error, re.S)
    reason = unpickler.group(1).strip() if unpickler else error.strip().split(". ")[0].splitlines()[0]
    if path.stat().st_size == 0:
        reason = "an empty file"
    return (f"{path}: not a readable PyTorch checkpoint: incomplete (an interrupted copy?), corrupt or not a weights "
            f"file ({reason})")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model weights in a file (see state_dict_of)."""
    return state_dict_of(read_file(path), path)


def state_dict_of(obj: Any, path: str | Path) -> dict[str, Tensor]:
    """The model weights in what a file held: a plain state dict, or the `model` entry of
    a training state written by this project. Keys are returned without `module.`."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
    return strip_prefix(obj)


def mismatches(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys, and 'key: file shape vs model shape' lines."""
    # BatchNorm's step counter is unused here (momentum is fixed) and absent from files
    # written before torch 0.4.1, so its absence is not an error.
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {list(state[k].shape)} in file, {list(v.shape)} in model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, shapes


def _describe(path: str | Path, missing: list[str], unexpected: list[str], shapes: list[str], hint: str) -> str:
    """One line: the file, why it does not fit, and the offending keys (the first few)."""

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
        return f"; {title} ({len(items)}): {shown}" if items else ""

    return (
        f"{path}: does not match the model{hint}"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("mis-shaped keys", shapes)
    )


def _n_class_hint(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    for key in ("fpn_global.classify.weight", "fpn_local.classify.weight"):
        if key in state and key in expected and state[key].shape[0] != expected[key].shape[0]:
            return (f" (the file was trained for {state[key].shape[0]} classes, the class table has "
                    f"{expected[key].shape[0]}: pass the table it was trained with to --classes)")
    return ""


def load_weights(
    model: nn.Module, path: str | Path, keys: str = "all", reference: nn.Module | None = None
) -> list[str]:
    """Initialise `model` from a GLNet weights file; see load_state."""
    return load_state(model, read_state_dict(path), path, keys, reference)


def load_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str | Path,
    keys: str = "all",
    reference: nn.Module | None = None,
) -> list[str]:
    """Initialise `model` from the state dict read from `source` and return the keys loaded.

    The whole state is first checked strictly against `reference` (a complete GLNet of
    the same configuration; by default `model` itself): any missing, unexpected or
    mis-shaped key raises a CheckpointError listing them. Then only the model's keys
    selected by `keys` ("all", "non_local", "global") are copied; the rest keep their values.
    """
    expected = (reference or model).state_dict()
    missing, unexpected, shapes = mismatches(state, expected)
    if missing or unexpected or shapes:
        raise CheckpointError(_describe(source, missing, unexpected, shapes, _n_class_hint(state, expected)))
    wanted, own = KEY_FILTERS[keys], model.state_dict()
    selected = {k: v for k, v in state.items() if k in own and wanted(k)}
    model.load_state_dict(selected, strict=False)
    return list(selected)


def authors_layout(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as the authors' files hold it: `module.` keys, CPU tensors."""
    return {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}


def write_weights(weights: Mapping[str, Tensor], path: str | Path, facts: Optional[Mapping[str, Any]] = None) -> None:
    """Write a state dict in the authors' layout (authors_layout) in torch's legacy
    container, which torch 0.4.1 (pinned by the authors' code) reads, and its facts as
    JSON beside it (facts_path), the two replaced together (a file without facts loses any
    old facts file)."""
    with replacing_together([path, facts_path(path)]) as (weights_tmp, facts_tmp):
        with open(weights_tmp, "xb") as file:
            torch.save(dict(weights), _PythonWrites(file), _use_new_zipfile_serialization=False)
            file.flush()
            os.fsync(file.fileno())
        if facts is not None:
            with open(facts_tmp, "x") as file:
                json.dump({FACTS_KEY: FACTS_VERSION, SHA256_KEY: _sha256(weights_tmp), **facts}, file, indent=2)
                file.flush()
                os.fsync(file.fileno())


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's weights in the authors' layout and container (write_weights)."""
    write_weights(authors_layout(model), path)


def load_imagenet_backbones(model: nn.Module, path: str | Path, backbones: Sequence[str]) -> None:
    """Load torchvision ImageNet ResNet weights (e.g. resnet50-0676ba61.pth or
    resnet50-11ad3fa6.pth) into the model's children named in `backbones`; `fc.*` is dropped."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"{path}: ImageNet weights not found. Download torchvision's ResNet-50 weights on a "
            "machine with internet (e.g. `python -c \"import torchvision; "
            "torchvision.models.resnet50(weights='IMAGENET1K_V1')\"` and copy the file from "
            "~/.cache/torch/hub/checkpoints/), then pass --pretrained PATH; or --pretrained none."
        )
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    for name in backbones:
        backbone = model.get_submodule(name)
        expected = backbone.state_dict()
        missing, unexpected, shapes = mismatches(state, expected)
        if missing or unexpected or shapes:
            raise CheckpointError(_describe(path, missing, unexpected, shapes, _imagenet_hint(state, expected, name)))
        backbone.load_state_dict(state, strict=False)


# torchvision's ImageNet ResNets by block (bottleneck or not) and blocks per layer.
_TORCHVISION_RESNETS = {(False, (2, 2, 2, 2)): "ResNet-18", (False, (3, 4, 6, 3)): "ResNet-34",
                        (True, (3, 4, 6, 3)): "ResNet-50", (True, (3, 4, 23, 3)): "ResNet-101",
                        (True, (3, 8, 36, 3)): "ResNet-152"}


def _imagenet_hint(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], name: str) -> str:
    """What an ImageNet file that does not fit a backbone is instead, where it can be told."""
    if any(key.startswith(("resnet_global.", "resnet_local.", "fpn_global.", "fpn_local.")) for key in state):
        return (" (it holds a GLNet stage's weights; --pretrained takes torchvision's ImageNet ResNet file, a "
                "stage's checkpoint goes to --path_g, --path_g2l or --path_l2g)")
    found, wanted = _resnet_of(state), _resnet_of(expected)
    if found and wanted and found != wanted:
        return f" (it holds torchvision's {found}; {name} is a {wanted}, as --backbone sets)"
    return f" ({name} expects a torchvision {wanted or 'ResNet'})"


def _resnet_of(state: Mapping[str, Tensor]) -> Optional[str]:
    """Which of torchvision's ResNets a state dict's keys lay out, if any."""
    blocks = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    return _TORCHVISION_RESNETS.get((any(".conv3." in key for key in state), blocks))
