"""A training run's files and what they must agree on: the checkpoints written after each
epoch (and how a kill between them is repaired), what --resume finds unchanged before it
continues a run, and the facts every weights file carries into later stages."""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import helper
from config import ConfigError, checkpoint_paths, pretrained_path
from dataset.classes import ClassTable, table_to_json
from dataset.segmentation import SegmentationDataset
from models.stages import STAGES, Stage
from utils.checkpoint import (CheckpointError, atomic_save, authors_layout, facts_path, link_weights, load_state,
                              read_facts, read_state_dict, state_dict_of, strip_prefix, write_weights)
from utils.run_log import EVENTS_PREFIX
from utils.signals import interrupts_deferred

BEST_SUFFIX = ".best.pth"
STATE_SUFFIX = ".state.pth"
LEGACY_STATE_SUFFIX = ".last.pth"  # the training state's name before the weights file held the last epoch


@dataclass(frozen=True)
class RunFiles:
    """What a training run writes into --model_path after every epoch.

    weights: <task_name>.pth, the last finished epoch's weights in the authors' layout. The
        authors' script wrote this file after every epoch and chained their stages (and made
        their released files) from it, so the stage scripts read it too.
    best: <task_name>.best.pth, the weights of the best validation epoch (ours).
    state: <task_name>.state.pth, everything --resume needs (ours).
    """

    weights: Path
    best: Path
    state: Path

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunFiles:
        return cls(*(helper.checkpoint_path(args.model_path, args.task_name + suffix)
                     for suffix in (".pth", BEST_SUFFIX, STATE_SUFFIX)))


def guard_outputs(args: argparse.Namespace, files: RunFiles) -> None:
    """Never overwrite another run's checkpoints silently, nor add a run's curves to another
    run's tensorboard events (tensorboard draws a folder's files as one run)."""
    legacy = files.state.with_name(args.task_name + LEGACY_STATE_SUFFIX)
    if legacy.exists() and not files.state.exists():
        raise ConfigError(
            f"{legacy}: a run saved by an earlier version, whose {files.weights.name} held the best epoch. To resume "
            f"it, rename {files.weights.name} to {files.best.name} and {legacy.name} to {files.state.name}; or choose "
            "another --task_name"
        )
    if args.resume:
        if not files.state.exists():
            raise ConfigError(f"--resume: {files.state} not found (nothing to resume; drop --resume to start a new run)")
        return
    existing = [p for w in (files.weights, files.best, files.state) for p in (w, facts_path(w)) if p.exists()]
    log_folder = Path(args.log_path) / args.task_name
    has_events = any(log_folder.glob(f"{EVENTS_PREFIX}*"))
    if existing:
        names = ", ".join(map(str, existing)) + (f" and the tensorboard events in {log_folder}" if has_events else "")
        raise ConfigError(f"{names} already exist from an earlier run: pass --resume to continue it, choose another "
                          "--task_name, or delete them to start over")
    if has_events:  # the run's checkpoints deleted, or in another --model_path
        raise ConfigError(f"{log_folder} holds the tensorboard events of an earlier run, which tensorboard would draw "
                          "as one run with this one: delete that folder, or choose another --task_name or --log_path")


# The flags that define a training run: resuming with other values would not continue it.
# Performance flags (--device, --num_workers, --micro_batch_size, --checkpointing, ...) and
# --num_epochs (train longer; the poly schedule stretches to the new total) may change.
RUN_FLAGS = ("mode", "batch_size", "lr", "size_g", "size_p", "sub_batch_size", "lamb_fmreg", "seed", "backbone",
             "dataset", "mask_kind")
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_score", "rng")
# Settings a message names by what they stand for, not by their values (digests, tables).
DESCRIBED_SETTINGS = {"train_ids_sha256": "other training images", "crossvali_ids_sha256": "other validation images",
                      "class_table": "another class table (colours or classes not scored)",
                      helper.FROZEN_DIGEST: "another frozen global branch (--path_g)"}


def run_settings(args: argparse.Namespace, table: ClassTable, steps_per_epoch: int, data: dict[str, Any],
                 val_set: SegmentationDataset, frozen_digest: Optional[str]) -> dict[str, Any]:
    """What a resumed run must share with the saved one, as stored in the .state.pth file:
    the flags, the data (the best epoch compares validation scores of one split), the class
    table, and stage 3's frozen context. A state saved before a setting was kept is not
    checked for it."""
    settings = {flag: list(v) if isinstance(v := getattr(args, flag), tuple) else v for flag in RUN_FLAGS}
    return {**settings, "classes": list(table.names), "class_table": table_to_json(table),
            "steps_per_epoch": steps_per_epoch, "train_ids_sha256": data["train_ids_sha256"],
            "crossvali_ids_sha256": ids_sha256(val_set), helper.FROZEN_DIGEST: frozen_digest}


def check_resumable(state: Any, path: Path, settings: dict[str, Any], num_epochs: int) -> Optional[int]:
    """Refuse a .state.pth that is not a training state, whose run had other settings, or
    that would train for fewer epochs than planned (the poly schedule would jump ahead).
    Returns the epochs planned when the run started, where its facts say."""
    if not isinstance(state, dict) or any(key not in state for key in TRAINING_STATE_KEYS):
        raise CheckpointError(f"{path}: not a training state (it holds no optimizer and epoch); --resume needs the "
                              f"{STATE_SUFFIX} file a training run writes")
    planned = state.get("facts", {}).get("training", {}).get("num_epochs")
    if planned is not None and num_epochs < planned:
        raise ConfigError(f"--resume: {path} belongs to a run of {planned} epochs, and --num_epochs {num_epochs} would "
                          f"cut its poly schedule short; pass --num_epochs {planned} (or more) as it was started")
    saved = dict(state.get("run", {}))
    if "class_table" in saved:
        saved.pop("classes", None)  # within the table; kept for states saved before it was
    changed = [DESCRIBED_SETTINGS.get(key, f"{key} {saved[key]} (now {value})") for key, value in settings.items()
               if key in saved and saved[key] != value]
    if changed:
        raise ConfigError(
            f"--resume: {path} belongs to a run with other settings: {'; '.join(changed)}. Resume with the run's "
            "flags, or start a new run under another --task_name (steps_per_epoch follows --batch_size, the "
            "training split and the number of processes)"
        )
    return planned


@dataclass
class Progress:
    """Where a run stands after its last finished epoch (-1: none yet)."""

    epoch: int = -1
    best_score: float = -1.0
    best_epoch: Optional[int] = None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(state: dict[str, Any], session: helper.Session, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, files: RunFiles) -> Progress:
    """Restore the model, optimizer, schedule and random state of a checked training state."""
    if session.dist.is_main:
        restore_weights(state["model"], files.weights, state.get("facts"))
        if state.get("best_epoch") == state["epoch"]:
            restore_weights(state["model"], files.best, state.get("facts"))
    load_state(session.model, state_dict_of(state, files.state), files.state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(int(state["epoch"]), float(state["best_score"]), state.get("best_epoch"))


def restore_weights(weights: dict[str, torch.Tensor], path: Path, facts: Optional[dict[str, Any]]) -> None:
    """Write the weights of a training state, and their facts, to `path` unless it holds
    them already: a kill between an epoch's writes leaves an older file (or none) behind
    the state."""
    wanted = strip_prefix(weights)
    try:
        held, held_facts = read_state_dict(path), read_facts(path)
    except CheckpointError:
        held, held_facts = {}, None
    if held_facts != facts or held.keys() != wanted.keys() or not all(torch.equal(held[k], wanted[k]) for k in held):
        write_weights(weights, path, facts)


def save_epoch(session: helper.Session, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, settings: dict[str, Any],
               files: RunFiles, facts: dict[str, Any]) -> None:
    """The training state, then the epoch's weights, then the best weights if this epoch is
    the best, each weights file with its facts, with Ctrl-C held until all are on disk.
    After a kill between the writes, the state lets --resume rewrite the weights files."""
    weights = authors_layout(session.model)
    with interrupts_deferred():
        atomic_save(
            {
                "model": weights,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": progress.epoch,
                "best_score": progress.best_score,
                "best_epoch": progress.best_epoch,
                "rng": rng_state(),
                "run": settings,
                "facts": facts,
            },
            files.state,
        )
        write_weights(weights, files.weights, facts)
        if progress.best_epoch == progress.epoch:
            link_weights(files.weights, files.best)


def data_identity(args: argparse.Namespace, train_set: SegmentationDataset) -> dict[str, Any]:
    """What identifies a run's data in its facts: the training images by id (a moved
    folder is the same data, another dataset is not)."""
    return {"dataset": args.dataset, "data_path": str(Path(args.data_path).resolve()), "mask_kind": args.mask_kind,
            "train_images": len(train_set), "train_ids_sha256": ids_sha256(train_set)}


def ids_sha256(dataset: SegmentationDataset) -> str:
    return hashlib.sha256("\n".join(sorted(sample.id for sample in dataset.samples)).encode()).hexdigest()


def refuse_other_data(data: dict[str, Any], facts: dict[str, dict[str, Any]], paths: dict[str, Optional[Path]]) -> None:
    """A stage chains only from files trained on the same training images."""
    for flag, found in facts.items():
        theirs = found.get("data", {})
        if theirs.get("train_ids_sha256") not in (None, data["train_ids_sha256"]):
            raise ConfigError(
                f"{paths[flag]} was trained on other data ({theirs.get('train_images')} training images in "
                f"{theirs.get('data_path')}; this run has {data['train_images']} in {data['data_path']}): chain from "
                f"a file trained on this data (--{flag})"
            )


def run_facts(args: argparse.Namespace, table: ClassTable, data: dict[str, Any],
              frozen_digest: Optional[str]) -> dict[str, Any]:
    """The facts every weights file of this run carries (utils.checkpoint.write_weights);
    save_epoch adds the epoch and its validation scores. Stage 3's record its frozen global
    branch, which evaluation and predict.py compare with the --path_g they are given."""
    stage = Stage(args.mode)
    paths = checkpoint_paths(args)
    initialised = {f"--{flag}": str(paths[flag].resolve()) for flag in STAGES[stage].reads(training=True)}  # type: ignore[union-attr]
    if STAGES[stage].imagenet and not args.resume:
        initialised["--pretrained"] = str(path.resolve()) if (path := pretrained_path(args)) else "none"
    return {
        "stage": int(stage), "stage_name": STAGES[stage].name, "task_name": args.task_name,
        "size_g": list(args.size_g), "size_p": list(args.size_p), "sub_batch_size": args.sub_batch_size,
        "backbone": args.backbone, "class_table": table_to_json(table), "data": data,
        "training": {"lr": args.lr, "batch_size": args.batch_size, "num_epochs": args.num_epochs,
                     "seed": args.seed, "lamb_fmreg": args.lamb_fmreg},
        "initialised_from": initialised, "code_version": helper.code_version(),
        **({helper.FROZEN_DIGEST: frozen_digest} if frozen_digest is not None else {}),
    }
