"""Turn a chest X-ray lung-mask collection into the generic folder layout.

    python -m dataset.prepare_lung --src DIR --dst data/lung [--layout montgomery|folder]
        [--val-fraction 0.2 --test-fraction 0.2 --seed 0] [--force]

Source layouts:
    montgomery: <src>/CXR_png/<name>.png with <src>/ManualMask/{leftMask,rightMask}/<name>.png
    folder:     <src>/images/<name>.<png|jpg|jpeg|tif|tiff> with <src>/masks/<name>.<same choices>
Any nonzero mask pixel is lung; left and right masks merge into one class. Writes
<dst>/<split>/images/<name><original suffix> (the original bytes) and
<dst>/<split>/masks/<name>.png (uint8 ids: 0 background, 1 lung), split at random but
deterministically from --seed. Samples with a missing or unusable file are named and skipped.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from dataset.classes import LUNG
from dataset.io import ID_MODES, open_image, write_label
from dataset.layouts import FOLDER, IMAGE_SUFFIXES, SPLITS, index_files, refuse_incomplete
from dataset.prepare_common import MissingSample, claimed_destination, copy_image, prepare_splits
from utils.errors import DataError, OneLineParser, reports_data_errors

MONTGOMERY_IMAGES = "CXR_png"
MONTGOMERY_MASK_DIR = "ManualMask"
MONTGOMERY_MASKS = (f"{MONTGOMERY_MASK_DIR}/leftMask", f"{MONTGOMERY_MASK_DIR}/rightMask")
LUNG_ID = LUNG.names.index("lung")


class Source(NamedTuple):
    image: Path
    masks: tuple[Path, ...]  # their union is the lung; absent ones make the sample missing


def source_images(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """name -> image file of a source folder; DataError if there are none."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; check --src and --layout")
    images = index_files(folder, suffixes)
    if not images:
        raise DataError(f"{folder}: holds no <name>{'|'.join(suffixes)} images; check --src and --layout")
    return images


def montgomery_sources(src: Path) -> dict[str, Source]:
    """The Montgomery County set: each image has a left and a right lung mask of the same name."""
    images = source_images(src / MONTGOMERY_IMAGES, (".png",))
    return {name: Source(path, tuple(src / folder / path.name for folder in MONTGOMERY_MASKS)) for name, path in images.items()}


def folder_sources(src: Path) -> dict[str, Source]:
    """images/ and masks/ folders pairing files by name (suffixes may differ)."""
    images = source_images(src / "images", IMAGE_SUFFIXES)
    masks = index_files(src / "masks", IMAGE_SUFFIXES) if (src / "masks").is_dir() else {}
    return {name: Source(path, (masks.get(name, src / "masks" / f"{name}.png"),)) for name, path in images.items()}


SOURCE_LAYOUTS: dict[str, Callable[[Path], dict[str, Source]]] = {"montgomery": montgomery_sources, "folder": folder_sources}


def read_binary_mask(path: Path) -> np.ndarray:
    """(H, W) bool: True where the mask is nonzero (0/1, 0/255, 16-bit or RGB masks alike)."""
    image = open_image(path)
    if image.mode in ID_MODES:
        return np.asarray(image) != 0
    return (np.asarray(image.convert("RGB")) != 0).any(axis=-1)  # alpha, if any, is not a mask value


def lung_label(masks: Sequence[Path]) -> np.ndarray:
    """(H, W) uint8 class ids: LUNG_ID where any of the masks is nonzero, else background."""
    union = read_binary_mask(masks[0])
    for path in masks[1:]:
        other = read_binary_mask(path)
        if other.shape != union.shape:
            raise DataError(f"{path}: mask is {other.shape} (H, W) but {masks[0].name} is {union.shape}; the masks of one image must match")
        union |= other
    return union.astype(np.uint8) * LUNG_ID


def split_names(names: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Shuffle names with `seed` and deal them into test, crossvali and train.

    A positive fraction gets at least one name; a split with fraction 0 is left out.

    Returns:
        split -> sorted names, for train and each split with a positive fraction.
    Raises:
        DataError: bad fractions, or too few names to give every split one.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be >= 0 and sum to less than 1")
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    n_test, n_val = (max(1, round(len(shuffled) * f)) if f > 0 else 0 for f in (test_fraction, val_fraction))
    dealt = {"test": shuffled[:n_test], "crossvali": shuffled[n_test : n_test + n_val], "train": shuffled[n_test + n_val :]}
    wanted = {"train": True, "crossvali": val_fraction > 0, "test": test_fraction > 0}
    empty = [split for split in SPLITS if wanted[split] and not dealt[split]]
    if empty:
        raise DataError(
            f"{len(names)} image(s) are too few to give {' and '.join(empty)} any with --val-fraction {val_fraction} "
            f"and --test-fraction {test_fraction}; add images or lower the fractions (0 leaves a split out)"
        )
    return {split: sorted(dealt[split]) for split in SPLITS if wanted[split]}


def prepare_lung(src: Path, dst: Path, layout: str = "montgomery", val_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0, force: bool = False) -> int:
    """Prepare a lung segmentation set in the folder layout.

    Args:
        src: the source tree (see the module docstring).
        dst: the data root to write.
        layout: "montgomery" or "folder".
        val_fraction, test_fraction: shares of the images for crossvali and test.
        seed: the split's seed.
        force: replace the split folders of a non-empty dst.
    Returns:
        Exit status (see dataset.prepare_common.prepare_splits).
    """
    refuse_incomplete(src)  # synthetic X-rays that dataset.make_demo did not finish
    sources = SOURCE_LAYOUTS[layout](src)
    splits = split_names(list(sources), val_fraction, test_fraction, seed)

    def prepare_one(split: str, name: str) -> None:
        source = sources[name]
        if not all(mask.is_file() for mask in source.masks):
            raise MissingSample(name)
        label = lung_label(source.masks)
        copy_image(source.image, FOLDER.image_path(dst / split, name, source.image.suffix), label.shape,
                   " + ".join(str(m) for m in source.masks))
        write_label(FOLDER.mask_path(dst / split, name), label)

    with claimed_destination(dst, force):
        return prepare_splits(splits, prepare_one, src, dst)


@reports_data_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="the collection's root, laid out as --layout says")
    parser.add_argument("--dst", type=Path, required=True, help="data root to write, e.g. data/lung")
    parser.add_argument("--layout", choices=sorted(SOURCE_LAYOUTS), default="montgomery",
                        help="montgomery: CXR_png/ and ManualMask/{leftMask,rightMask}/; folder: images/ and masks/ "
                        "(default: montgomery)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of samples for crossvali/, the "
                        "validation split (default: 0.2)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of samples for test/ (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="the split's random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace the split folders of a non-empty --dst")
    args = parser.parse_args(argv)
    return prepare_lung(args.src, args.dst, args.layout, args.val_fraction, args.test_fraction, args.seed, args.force)


if __name__ == "__main__":
    raise SystemExit(main())
