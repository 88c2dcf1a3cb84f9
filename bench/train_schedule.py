"""How long the three-stage training schedule takes (target 3 of bench/README.md), from epochs
of the repository's own stage scripts: data loading and validation included, writing each
epoch's checkpoints (after its line is logged) left out.

    python bench/train_schedule.py                         # the faithful fp32 default
    python bench/train_schedule.py -- --amp bf16 --cuda_math fast --channels_last

1. writes a land-cover demo in DeepGlobe's layout: --train training and --val validation
   images of --size pixels a side (bench/records.make_demo_copies);
2. runs train_deep_globe_global.sh, train_deep_globe_global2local.sh and
   train_deep_globe_local2global.sh in order, as a user does (DATA, MODELS, LOGS set; each
   stage reads the file the one before wrote), for --epochs epochs each, with
   --pretrained none (there is no ImageNet file offline, and the time does not depend on the
   starting weights) and the flags after --;
3. reads each stage's last epoch lines from its log.txt ("... (T s training, V s
   validation)", then the seconds each loop waited for its loader, the first batch apart):
   T / --train and V / --val seconds per image, scaled to an epoch of DeepGlobe's split
   (dataset/splits: 454 training and 207 validation images) and to the schedule's
   120 + 50 + 120 epochs. The last epoch leaves out the first one's warm-up. Each epoch's
   first wait (starting the loader's workers, one of them loading the first batch) is scaled
   with the images too, though a longer epoch pays its start once: the estimate errs long,
   by up to 454 / --train - 1 first training waits and 207 / --val - 1 first validation
   waits per epoch. It cannot simply be subtracted: while one worker loads the first batch
   the others load theirs, so in a short epoch the loader's pace hides inside the first
   wait. The waits are reported beside it.
Prints one JSON line per stage and one for the schedule, appended at once to --json.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402

from bench.records import (DEEPGLOBE_SIDE, add_output_flags, environment, make_demo_copies, reporter,  # noqa: E402
                           reports_failed_commands, scratch_folder)
from models.stages import STAGES, Stage  # noqa: E402

SCRIPTS = {Stage.GLOBAL: "train_deep_globe_global.sh", Stage.GLOBAL2LOCAL: "train_deep_globe_global2local.sh",
           Stage.LOCAL2GLOBAL: "train_deep_globe_local2global.sh"}
RUN_NAME = "fpn_deepglobe"  # the scripts' default
SECONDS = r"(\d+(?:\.\d+)?)"
EPOCH_LINE = re.compile(rf"^epoch \d+/\d+ .*\({SECONDS} s training, {SECONDS} s validation\)$", re.M)
WAIT_LINE = re.compile(rf"^loader waits in epoch \d+: training {SECONDS} s \({SECONDS} s for the first batch\), "
                       rf"validation {SECONDS} s \({SECONDS} s\)$", re.M)


def split_size(name: str) -> int:
    """Images in one of GLNet's DeepGlobe split lists."""
    lines = (ROOT / "dataset" / "splits" / f"deep_globe_{name}.txt").read_text().splitlines()
    return sum(1 for line in lines if line.strip())


def last_epoch(log: Path) -> dict[str, float]:
    """The last epoch's seconds in a stage's log.txt: of training and validation, and of
    their waits for the loader, in all and for the first batch."""
    text = log.read_text()
    epochs, waits = EPOCH_LINE.findall(text), WAIT_LINE.findall(text)
    if not epochs or not waits:
        raise RuntimeError(f"{log}: no epoch lines with their seconds")
    names = ("loader_wait_training_s", "first_batch_training_s", "loader_wait_validation_s", "first_batch_validation_s")
    return {"last_epoch_training_s": float(epochs[-1][0]), "last_epoch_validation_s": float(epochs[-1][1]),
            **{name: float(value) for name, value in zip(names, waits[-1])}}


def run_stage(args: argparse.Namespace, stage: Stage, folder: Path) -> dict:
    # The scripts run `python`: make it this interpreter, whatever PATH would find (or not).
    # A script, not a link, which would lose a virtual environment's packages.
    python = folder / "bin" / "python"
    if not python.exists():
        python.parent.mkdir()
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
    env = {**os.environ, "DATA": str(folder / "data"), "MODELS": str(folder / "models"),
           "LOGS": str(folder / "runs"), "RUN_NAME": RUN_NAME,
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ["bash", str(ROOT / SCRIPTS[stage]), "--num_epochs", str(args.epochs), "--pretrained", "none",
           *args.train_flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}")
    last = last_epoch(folder / "runs" / f"{RUN_NAME}_{STAGES[stage].name}" / "log.txt")
    per_train, per_val = last["last_epoch_training_s"] / args.train, last["last_epoch_validation_s"] / args.val
    epoch = per_train * split_size("train") + per_val * split_size("crossvali")
    return {"stage": int(stage), "script": SCRIPTS[stage], "epochs_run": args.epochs, "seconds": round(seconds, 1), **last,
            "training_s_per_image": round(per_train, 4), "validation_s_per_image": round(per_val, 4),
            "deepglobe_epoch_s": round(epoch, 1), "schedule_epochs": STAGES[stage].epochs,
            "deepglobe_stage_hours": round(epoch * STAGES[stage].epochs / 3600, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--train", type=int, default=24, help="training images (default: 24, four batches of the scripts' 6)")
    a("--val", type=int, default=12, help="validation images (default: 12)")
    a("--size", type=int, default=DEEPGLOBE_SIDE, help=f"image side (default: {DEEPGLOBE_SIDE}, DeepGlobe's)")
    a("--epochs", type=int, default=2, help="epochs per stage; the last is measured (default: 2)")
    add_output_flags(p)
    a("train_flags", nargs="*", help="more train_deep_globe.py flags, after --, e.g. -- --amp bf16 --channels_last")
    return p


@reports_failed_commands
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size != DEEPGLOBE_SIDE or args.epochs < 2:
        print(f"note: the estimate stands for DeepGlobe's epochs only with --size {DEEPGLOBE_SIDE} and, to leave out "
              "the first epoch's warm-up, --epochs 2 or more", file=sys.stderr)
    report = reporter(args.json)
    report(environment("cuda" if torch.cuda.is_available() else "cpu"))
    with scratch_folder(args.folder, "train_schedule_") as folder:
        make_demo_copies(folder / "data", args.train, args.val, args.size)
        stages = []
        for stage in SCRIPTS:
            stages.append(run_stage(args, stage, folder))
            report({"train_flags": list(args.train_flags), "size": args.size, **stages[-1]})
        report({"train_flags": list(args.train_flags),
                "schedule_hours": round(sum(s["deepglobe_stage_hours"] for s in stages), 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
