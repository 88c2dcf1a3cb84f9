"""Train or evaluate one GLNet stage: `--mode 1` global, `--mode 2` global-to-local,
`--mode 3` local-to-global. Flags and defaults follow the authors' script; see README."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

import helper
from config import (ONE_VALUE, RESNET_STRIDE, USER_ERRORS, ConfigError, Settled, check_args, checkpoint_paths,
                    parse_args, pretrained_path, settle_flags)
from dataset.classes import ClassTable
from dataset.io import write_png
from dataset.loader import GlobalInput, make_loader, worker_context
from dataset.segmentation import SegmentationDataset, build_dataset, check_samples, collate
from models.glnet import GLNet, GlobalBranch
from models.stages import STAGES, Stage
from run_state import (Progress, RunFiles, check_resumable, data_identity, guard_outputs, refuse_other_data, resume,
                       run_facts, run_settings, save_epoch)
from utils.checkpoint import CheckpointError, read_file
from utils.distributed import DistInfo, cleanup, init_distributed, main_by_environment, on_main, shard
from utils.errors import MESSAGES_ENV, DataError, report, reports_errors
from utils.files import RunLock, WriteError, remove_temporaries, write_new
from utils.folders import output_folder, removed_if_failed
from utils.images import to_unit_float
from utils.loader_wait import LoaderWait
from utils.memory import return_large_blocks_to_the_system
from utils.run_log import RunLog
from utils.signals import exit_status, stop_word, terminate_as_interrupt


def stage_models(args: argparse.Namespace, n_class: int,
                 device: torch.device | str = "cpu") -> tuple[GLNet, Optional[GlobalBranch]]:
    """The networks of --mode, for training or --evaluation, initialised from the files the
    flags name: checkpoints, and ImageNet weights (--pretrained) where a new training run
    wants them."""
    stage = Stage(args.mode)
    training = not args.evaluation
    # A resumed run takes every weight from its training state.
    imagenet = training and not args.resume and bool(STAGES[stage].imagenet)
    return helper.build_models(
        stage,
        n_class,
        training=training,
        paths=checkpoint_paths(args),
        pretrained=pretrained_path(args) if imagenet else None,
        backbone=args.backbone,
        device=device,
    )


def start_worker_server(num_workers: int) -> None:
    """Start the loader workers' fork server now, if there will be workers, so that its
    imports (torch) overlap the model loading instead of delaying the first batch."""
    if num_workers > 0 and worker_context() is not None:
        multiprocessing.forkserver.ensure_running()


def trainer_loader(dataset: SegmentationDataset, indices: Sequence[int],
                   args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """The loader of `indices` of a dataset with the flags' batch size, workers and global image size."""
    return make_loader(dataset, indices, batch_size=args.batch_size, num_workers=args.num_workers, size_g=args.size_g)


def epoch_order(n: int, seed: int, epoch: int, info: DistInfo) -> list[int]:
    """This rank's sample order for an epoch: a permutation fixed by (seed, epoch), so
    a resumed run sees the same order, cut into equal shares so every rank takes the same
    number of optimizer steps (the order wraps around to fill the last share)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    per_rank = math.ceil(n / info.world_size)
    order = (order * (1 + per_rank * info.world_size // max(1, n)))[: per_rank * info.world_size]
    return shard(order, info)


def format_table(scores: dict[str, dict[str, Any]], table: ClassTable) -> str:
    kinds = list(scores)
    width = max(len(n) for n in table.names) + 2
    lines = ["class".ljust(width) + "".join(k.rjust(10) for k in kinds)]
    for c, name in enumerate(table.names):
        mark = " *" if c in table.ignore_in_metric else ""
        lines.append((name + mark).ljust(width) + "".join(_cell(scores[k]["iou"][c]) for k in kinds))
    lines.append("mIoU".ljust(width) + "".join(_cell(scores[k]["miou"]) for k in kinds))
    if table.ignore_in_metric:
        lines.append("(* not counted in the mIoU)")
    if any(math.isnan(score) for k in kinds for score in scores[k]["iou"]):
        lines.append("(- absent from both truth and prediction; a class the mIoU counts scores 0 there)")
    return "\n".join(lines)


def _cell(score: float) -> str:
    return f"{'-':>10}" if math.isnan(score) else f"{score:10.4f}"


def prediction_panel(session: helper.Session, samples: dict[str, list[Any]], max_side: int = 512) -> np.ndarray:
    """Image | label | predictions of the first image of a batch, in the class colours."""
    image = samples["image"][0]
    preds = helper.predict(session, {k: v[:1] for k, v in samples.items()})[0]
    label = samples["label"][0]
    tiles = [(to_unit_float(image) * 255).byte().permute(1, 2, 0).numpy()]
    maps = ([label] if label is not None else []) + [preds[k].cpu() for k in session.predictions]
    tiles += [session.table.colorize(m) for m in maps]
    h, w = tiles[0].shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.concatenate([np.asarray(Image.fromarray(t).resize(size, Image.NEAREST)) for t in tiles], axis=1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def labelled_split(args: argparse.Namespace, split: str, table: ClassTable, augment: bool) -> SegmentationDataset:
    """A split training needs masks for: the train split to learn, the validation split to
    choose the best weights."""
    dataset = build_dataset(args.dataset, args.data_path, split, table, args.mask_kind, augment=augment, seed=args.seed)
    if any(sample.mask is None for sample in dataset.samples):
        raise DataError(f"{Path(args.data_path) / split}: no masks (see README, 'Your own data'); training needs "
                        f"labelled train and crossvali splits: add the split's masks")
    return dataset


def refuse_tiny_images(dataset: SegmentationDataset, sizes: list[tuple[int, int]], mode: int) -> None:
    """A training local ResNet sees an image of at most 32 x 32 px as one patch that small."""
    tiny = [f"{sample.image} ({h} x {w} px)" for sample, (h, w) in zip(dataset.samples, sizes)
            if max(h, w) <= RESNET_STRIDE]
    if tiny:
        raise DataError(f"{tiny[0]}: training --mode {mode} trains the local branch on each image's patches, and "
                        f"{ONE_VALUE}; remove the image from the train split or enlarge it"
                        + (f" (and {len(tiny) - 1} more: {', '.join(tiny[1:])})" if len(tiny) > 1 else ""))


def train(args: argparse.Namespace, session: helper.Session, settled: Settled, log: RunLog,
          frozen_digest: Optional[str]) -> None:
    """Train --mode's stage. frozen_digest: stage 3's frozen global branch (helper.frozen_digest),
    which the run's facts record and a resumed run must keep."""
    table = settled.table
    train_set = labelled_split(args, "train", table, augment=True)
    val_set = labelled_split(args, "crossvali", table, augment=False)
    files = RunFiles.of(args)
    guard_outputs(args, files)
    sizes = check_samples(train_set, str(Path(args.data_path) / "train"), args.num_workers)
    check_samples(val_set, str(Path(args.data_path) / "crossvali"), args.num_workers)
    if "resnet_local" in STAGES[session.stage].trains:
        refuse_tiny_images(train_set, sizes, args.mode)
    data = data_identity(args, train_set)
    refuse_other_data(data, settled.facts, checkpoint_paths(args))

    steps_per_epoch = math.ceil(math.ceil(len(train_set) / session.dist.world_size) / args.batch_size)
    optimizer = helper.build_optimizer(session.model, session.stage, args.lr)
    scheduler = helper.poly_schedule(optimizer, args.num_epochs * steps_per_epoch)
    settings = run_settings(args, table, steps_per_epoch, data, val_set, frozen_digest)
    progress = Progress()
    facts = run_facts(args, table, data, frozen_digest)
    if args.resume:
        state = read_file(files.state)
        planned = check_resumable(state, files.state, settings, args.num_epochs)
        progress = resume(state, session, optimizer, scheduler, files)
        # The files it started from, read when it started (a resumed run reads no ImageNet file).
        facts["initialised_from"] = state.get("facts", {}).get("initialised_from", facts["initialised_from"])
        log.line(f"resuming {args.task_name} after epoch {progress.epoch + 1} (best val mIoU {progress.best_score:.4f})")
        if planned not in (None, args.num_epochs):
            log.line(f"note: training for --num_epochs {args.num_epochs}, where the run was started for {planned}: the "
                     "poly schedule stretches to the new total")
    log.begin()
    main_kind = session.predictions[-1]
    val_loader = trainer_loader(val_set, shard(range(len(val_set)), session.dist), args)
    for epoch in range(progress.epoch + 1, args.num_epochs):
        train_set.set_epoch(epoch)
        order = epoch_order(len(train_set), args.seed, epoch, session.dist)
        train_wait, val_wait = LoaderWait(trainer_loader(train_set, order, args)), LoaderWait(val_loader)
        start = time.perf_counter()
        stats = helper.train_one_epoch(session, train_wait, optimizer, scheduler, epoch)
        trained = time.perf_counter()
        val = helper.evaluate(session, val_wait, desc=f"val {epoch + 1}")
        validated = time.perf_counter()
        values = {"loss/train": stats.loss, "lr": max(g["lr"] for g in optimizer.param_groups)}
        values.update({f"miou_train/{k}": s["miou"] for k, s in stats.scores.items()})
        values.update({f"miou_val/{k}": s["miou"] for k, s in val.items()})
        log.line(
            f"epoch {epoch + 1}/{args.num_epochs}  loss {stats.loss:.4f}  "
            + "  ".join(f"{k} train {stats.scores[k]['miou']:.4f} val {val[k]['miou']:.4f}" for k in val)
            + f"  ({trained - start:.1f} s training, {validated - trained:.1f} s validation)"
        )
        # Where the loader holds the network back, --num_workers is the remedy.
        log.line(f"loader waits in epoch {epoch + 1}: training {train_wait.total:.1f} s ({train_wait.first:.1f} s for "
                 f"the first batch), validation {val_wait.total:.1f} s ({val_wait.first:.1f} s)")
        progress.epoch = epoch
        if val[main_kind]["miou"] > progress.best_score:
            progress.best_score, progress.best_epoch = val[main_kind]["miou"], epoch
        epoch_facts = {**facts, "epoch": epoch + 1, "val_miou": {k: s["miou"] for k, s in val.items()}}

        def write_epoch() -> None:
            save_epoch(session, optimizer, scheduler, progress, settings, files, epoch_facts)
            # After the state: an epoch that a resume repeats is not drawn twice, and events
            # are never in the log folder without a state to resume.
            log.scalars(values, epoch + 1)
            if progress.best_epoch == epoch:
                log.line(f"  new best {main_kind} val mIoU {progress.best_score:.4f}: saved {files.best}")
            log.panel("predictions", prediction_panel(session, collate([GlobalInput(val_set, args.size_g)[0]])),
                      epoch + 1)

        # Rank 0 writes; a failure there (a full disk) stops every rank, none left waiting.
        on_main(write_epoch, session.dist)
    log.line(f"done: the last epoch's weights are in {files.weights} (the next stage's scripts read this file); "
             f"the best {main_kind} val mIoU, {progress.best_score:.4f} at epoch {(progress.best_epoch or 0) + 1}, "
             f"in {files.best}")


def run_evaluation(args: argparse.Namespace, session: helper.Session, settled: Settled, log: RunLog) -> dict[str, Any]:
    """Score the split, print the table and write the scores to a file of their own:
    <log_path>/<task_name>/eval-<split>-mode<M>[-tta]-<date>-<time>.json."""
    table = settled.table
    split = "test" if args.test else "crossvali"
    dataset = build_dataset(args.dataset, args.data_path, split, table, args.mask_kind, augment=False, seed=args.seed)
    loader = trainer_loader(dataset, shard(range(len(dataset)), session.dist), args)
    log.begin()
    save_dir = Path(args.save_predictions) if args.save_predictions else None
    main_kind = session.predictions[-1]

    def save(sample_id: str, preds: dict[str, Any]) -> None:
        if save_dir is not None:
            write_png(save_dir / f"{sample_id}_mask.png", table.colorize(preds[main_kind].cpu()))

    start = time.perf_counter()
    scores = helper.evaluate(session, loader, tta=args.tta, on_prediction=save, desc=f"eval {split}")
    if session.dist.is_main:
        log.line(f"{split}: {len(dataset)} images in {time.perf_counter() - start:.1f} s")
        if scores[main_kind]["pixels"]:
            log.line(format_table(scores, table))
        else:
            log.line(f"{split} has no labels: nothing to score")
        paths = checkpoint_paths(args)
        result = {"split": split, "mode": args.mode, "tta": args.tta, "data_path": str(Path(args.data_path).resolve()),
                  "checkpoints": {f"--{flag}": str(paths[flag].resolve())  # type: ignore[union-attr]
                                  for flag in STAGES[session.stage].reads(training=False)},
                  "checkpoint_epochs": {f"--{flag}": found.get("epoch") for flag, found in settled.facts.items()},
                  "scores": _json_safe(scores)}
        name = f"eval-{split}-mode{args.mode}{'-tta' if args.tta else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        written = write_new(log.folder / name, json.dumps(result, indent=2).encode())
        log.line(f"scores written to {written}")
        if save_dir is not None:
            log.line(f"predictions written to {save_dir}")
    return scores


def _json_safe(value: Any) -> Any:
    """NaN (a class absent from truth and prediction) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def claim_run(args: argparse.Namespace, held: contextlib.ExitStack) -> list[str]:
    """Lock the run's names in --model_path and --log_path for as long as `held` is open,
    so that no second run writes them meanwhile, and remove the temporary files of
    interrupted writes an earlier run left. Returns lines for the log."""
    notes = []
    folders: dict[Path, tuple[str, str]] = {}
    for flag, folder in (("--model_path", args.model_path), ("--log_path", args.log_path)):
        folders.setdefault(Path(folder).resolve(), (flag, folder))  # one lock per folder
    for resolved, (flag, folder) in folders.items():
        lock = held.enter_context(RunLock(resolved / args.task_name, f"--task_name {args.task_name} in {flag} {folder}",
                                          "choose another --task_name (RUN_NAME with the stage scripts)"))
        if lock.took_over:
            notes.append(f"took over {lock.path}, left by a run that ended without releasing it ({lock.took_over})")
    files = RunFiles.of(args)
    removed = remove_temporaries(files.weights.parent, [p.name for p in (files.weights, files.best, files.state)])
    if removed:
        notes.append(f"removed the temporary files of interrupted writes: {', '.join(removed)}")
    return notes


def run(args: argparse.Namespace) -> int:
    settled = settle_flags(args)
    table = settled.table
    check_args(args, table)
    # The run's own log folder too: the user may have made an old one read-only.
    run_logs = Path(args.log_path) / args.task_name
    outputs = [("--log_path", args.log_path), ("--log_path", run_logs),
               ("--model_path", None if args.evaluation else args.model_path),
               ("--save_predictions", args.save_predictions)]
    # A refused run leaves no empty folders behind. Rank 0 alone removes them: a rank that fails
    # first must not remove a folder another is about to write into.
    with removed_if_failed(*(folder for _, folder in outputs if main_by_environment())):
        for flag, folder in outputs:
            if folder is not None:
                output_folder(folder, flag)
        run_session(args, settled, run_logs)
    return 0


def run_session(args: argparse.Namespace, settled: Settled, run_logs: Path) -> None:
    """Train or evaluate, the flags checked and the output folders made."""
    table = settled.table
    info, device = init_distributed(args.device)
    try:
        with contextlib.ExitStack() as held:
            notes = [] if args.evaluation else on_main(lambda: claim_run(args, held), info) or []
            seed_everything(args.seed)
            stage = Stage(args.mode)
            start_worker_server(args.num_workers)
            model, frozen = stage_models(args, table.n_class, device)
            digest = helper.frozen_digest(frozen)
            session = helper.make_session(stage, model, frozen, table, args, device, dist=info,
                                          inference=args.evaluation)
            log = held.enter_context(RunLog(run_logs, info.is_main))
            for note in settled.notes + notes:
                log.line(note)
            log.line(f"{'evaluating' if args.evaluation else 'training'} mode {args.mode} ({STAGES[stage].name}) "
                     f"with {helper.environment_summary(device)}")
            if args.compile:
                log.line(helper.COMPILE_NOTE)
            if frozen is None:
                warning = None
            elif args.evaluation:
                warning = helper.frozen_context_warning(settled.facts, digest, checkpoint_paths(args))
            else:
                warning = helper.frozen_training_warning(model, frozen, checkpoint_paths(args))
            if warning is not None:
                log.line(warning)
            if args.evaluation:
                run_evaluation(args, session, settled, log)
            else:
                train(args, session, settled, log, digest)
    finally:
        cleanup(info)


@reports_errors(*USER_ERRORS)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv, description=__doc__)
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return launch(args.nproc_per_node, [str(word) for word in (sys.argv[1:] if argv is None else argv)])
    terminate_as_interrupt()
    if not args.evaluation:
        return_large_blocks_to_the_system()
    try:
        return run(args)
    except KeyboardInterrupt as interrupt:
        if main_by_environment():  # every process is stopped; one says what is saved
            report(f"{stop_word(interrupt)}: {interruption_note(args)}")
        return exit_status(interrupt)
    except WriteError as error:
        raise WriteError(f"{error}; {interruption_note(args)}") from None


def launch(processes: int, argv: list[str]) -> int:
    """Run this command in `processes` processes under torchrun on this machine. Their
    one-line messages (a user's mistake, an interruption) are printed once, not once per
    process followed by torchrun's report of failed workers, and the exit status is theirs."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if processes < 1:
        raise ConfigError(f"--nproc_per_node must be at least 1, got {processes}")
    # torchrun's own log lines repeat what the processes say, or what a crash's report says.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as folder:
        os.environ[MESSAGES_ENV] = folder
        failure: Optional[ChildFailedError] = None
        try:
            torchrun(["--standalone", "--nproc_per_node", str(processes), __file__, *argv])
            status = 0
        except ChildFailedError as error:
            failure, status = error, max(f.exitcode for f in error.failures.values())
        except KeyboardInterrupt:
            status = exit_status(KeyboardInterrupt())
        except SignalException as signalled:
            status = 128 + int(signalled.sigval)
        finally:
            del os.environ[MESSAGES_ENV]
        messages = list(dict.fromkeys(path.read_text() for path in sorted(Path(folder).iterdir())))
    for line in messages:
        print(line, file=sys.stderr)
    if failure is not None and not messages:
        raise failure  # a crash: torchrun's report names the process and its traceback
    return status


def interruption_note(args: argparse.Namespace) -> str:
    if args.evaluation:
        return "evaluation stopped; run it again to score the split"
    last = RunFiles.of(args).state
    try:
        epoch = read_file(last)["epoch"]
    except (CheckpointError, KeyError, TypeError):
        return f"no epoch had finished, nothing to resume ({last} was not written); start the run again"
    return f"epochs up to {epoch + 1} are saved in {last}; continue with the same command and --resume"


if __name__ == "__main__":
    sys.exit(main())
