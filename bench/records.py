"""What every benchmark of bench/ prints: an environment line, then JSON lines appended to a
file as soon as each is measured, so a later case that fails keeps the earlier ones."""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

import helper
from dataset.layouts import DEEP_GLOBE, SPLITS
from dataset.make_demo import make_deep_globe_demo

DEEPGLOBE_SIDE = 2448  # the side of every DeepGlobe image


def environment(device: str, **extra: Any) -> dict:
    """The commit measured, the software and the machine."""
    cuda = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"commit": helper.code_version(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), **extra, "cuda": cuda}


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--folder (for scratch_folder) and --json (for reporter)."""
    parser.add_argument("--folder", default=None, help="where to write the files (default: the system's temporary "
                        "folder)")
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")


@contextmanager
def scratch_folder(parent: Optional[str], prefix: str) -> Iterator[Path]:
    """A new folder under `parent` (created if need be; None: the system's temporary
    folder), deleted with everything in it at the end."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def reports_failed_commands(main: Callable[..., int]) -> Callable[..., int]:
    """A benchmark's main whose RuntimeError (a command it ran failed: the error holds its
    command line and the end of its output) is printed as an error, exit status 1."""
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return wrapped


def reporter(json_path: Optional[str]) -> Callable[[dict], None]:
    """A function that prints a record as a JSON line and appends it to json_path at once."""
    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return report


def make_demo_copies(root: Path, n_train: int, n_val: int, size: int, distinct: int = 6) -> None:
    """A land-cover demo in DeepGlobe's layout (dataset/make_demo.py) with n_train training
    and n_val validation images, of which at most `distinct` per split are generated and the
    rest are copies of them under new ids: generating takes about 2 s per 2448 x 2448 image
    on a core, and times do not depend on which images repeat."""
    counts = dict(zip(SPLITS, (n_train, n_val, 0)))
    make_deep_globe_demo(root, *(min(count, distinct) for count in counts.values()), size=size)
    for split, count in counts.items():
        if not count:
            continue
        folder = root / split
        made = DEEP_GLOBE.samples(folder)
        for i in range(len(made), count):
            source = made[i % len(made)]
            copy = f"{source.id}copy{i:03d}"
            shutil.copyfile(source.image, DEEP_GLOBE.image_path(folder, copy))
            shutil.copyfile(source.mask, DEEP_GLOBE.mask_path(folder, copy))
