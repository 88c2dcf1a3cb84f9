"""How many images one data-loading worker prepares per second (for target 3 of bench/README.md).

    python bench/loader_rate.py --images 12 --json out.jsonl

Training reads every image and mask, augments the training split and computes each global
image in the loader's workers (dataset.loader; --num_workers). This
runs the same loader in this process (no workers) with one torch thread, as each worker
has, over a land-cover demo in DeepGlobe's layout: a worker's rate. N workers on N free
cores bound a stage's pace at about N times it, however fast the GPU. The first image of
each split (imports, resampling tables) is left out.
Prints one JSON line per split, appended at once to --json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402

from bench.records import (DEEPGLOBE_SIDE, add_output_flags, environment, make_demo_copies, reporter,  # noqa: E402
                           scratch_folder)
from dataset.loader import make_loader  # noqa: E402
from dataset.segmentation import build_dataset  # noqa: E402
from models.stages import AUTHORS_SIZE  # noqa: E402
from utils.loader_wait import LoaderWait  # noqa: E402


def split_rate(data: Path, split: str, augment: bool) -> dict[str, Any]:
    """Images per second of one split's loader, from its waits after the first image."""
    dataset = build_dataset("deep_globe", str(data), split, augment=augment, seed=0)
    waits = LoaderWait(make_loader(dataset, range(len(dataset)), batch_size=1, num_workers=0, size_g=AUTHORS_SIZE))
    timed = sum(1 for _ in waits) - 1
    seconds = waits.total - waits.first
    return {"split": split, "augment": augment, "images_timed": timed,
            "s_per_image": round(seconds / timed, 4), "images_per_s": round(timed / seconds, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--images", type=int, default=12, help="images per split, the first left out (default: 12)")
    a("--size", type=int, default=DEEPGLOBE_SIDE, help=f"image side (default: {DEEPGLOBE_SIDE}, DeepGlobe's)")
    add_output_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 2:
        print("error: --images must be at least 2 (the first is left out)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    report = reporter(args.json)
    report(environment("cpu", torch_threads=1))
    with scratch_folder(args.folder, "loader_rate_") as folder:
        make_demo_copies(folder / "data", args.images, args.images, args.size)
        for split, augment in (("train", True), ("crossvali", False)):
            report({"size": args.size, **split_rate(folder / "data", split, augment)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
