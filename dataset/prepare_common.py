"""What the preparation scripts share: claiming the destination, preparing split by split
with per-sample failures reported rather than fatal, and the summary."""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from tqdm import tqdm

from dataset.io import open_image
from dataset.layouts import INCOMPLETE_MARK, SPLITS
from utils.errors import DataError
from utils.files import cannot_write, replacing, writing

EMPTY_SPLIT = 1  # exit status when a split ends up with no samples


@contextlib.contextmanager
def claimed_destination(dst: Path, force: bool, owned: Sequence[str] = SPLITS) -> Iterator[None]:
    """Make `dst` ready to be written, and mark it incomplete (INCOMPLETE_MARK) until the
    block ends normally: interrupted, it stays marked, so training and evaluation refuse it
    and the same command starts it over.

    A non-empty `dst` is only touched with `force` or when marked, and then only the folders
    the caller writes (`owned`) are removed, so a mistyped --dst cannot wipe unrelated files.

    Raises:
        DataError: `dst` is a file, or a non-empty, unmarked folder and not `force`.
    """
    mark = dst / INCOMPLETE_MARK
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: is a file, not a folder; choose another --dst")
    if dst.is_dir() and any(dst.iterdir()) and not force and not mark.exists():
        raise DataError(f"{dst}: exists and is not empty; pass --force to replace its {'/'.join(owned)} folders")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        mark.touch()  # before the old folders go: stopped while they do, the rest is marked too
    except OSError as error:
        raise cannot_write(mark, error) from None
    for folder in owned:
        if (dst / folder).exists():
            shutil.rmtree(dst / folder)
    yield
    mark.unlink()


class MissingSample(DataError):
    """A sample's source file is absent: reported with the other absent ones, not alone."""


def prepare_splits(splits: Mapping[str, Sequence[str]], prepare_one: Callable[[str, str], None], source: Path,
                   dst: Path) -> int:
    """Call `prepare_one(split, name)` for every name of every split and report.

    A DataError from `prepare_one` skips that sample and the rest go on, so one bad file
    does not cost the whole preparation. Absent samples (MissingSample) are counted in one
    warning per split and listed in `dst`/missing_<split>.txt (a partial download misses
    hundreds); other failures get one warning each, with their own message.

    Args:
        splits: split -> sample names.
        prepare_one: writes one sample; raises DataError for a missing or unusable one.
        source: the source folder, for the warnings.
        dst: the prepared dataset's folder, for the lists of missing samples.
    Returns:
        Exit status: 0, or EMPTY_SPLIT when some split has no prepared sample.
    """
    warnings: list[str] = []
    empty: list[str] = []
    for split, names in splits.items():
        missing: list[str] = []
        unusable: list[str] = []
        for name in tqdm(names, desc=split, unit="img", disable=None):  # a bar on a terminal only
            try:
                prepare_one(split, name)
            except MissingSample:
                missing.append(name)
            except DataError as error:
                unusable.append(f"{split}/{name}: {error}")
        done = len(names) - len(missing) - len(unusable)
        print(f"{split}: prepared {done} of {len(names)} ({len(missing)} missing, {len(unusable)} unusable)")
        listing = dst / f"missing_{split}.txt"
        if missing:
            with writing(listing) as file:
                file.write("".join(f"{name}\n" for name in missing).encode())
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            warnings.append(f"{split}: {len(missing)} samples missing from {source}, skipped ({shown}; all in {listing})")
        else:
            listing.unlink(missing_ok=True)  # an earlier run's list
        warnings += [f"skipped {message}" for message in unusable]
        if done == 0:
            empty.append(split if names else f"{split} (no samples assigned)")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if empty:
        # A split given no samples at all has no warning of its own to point to.
        hint = "; see the warnings above" if warnings else ""
        print(f"error: no sample could be prepared for split(s) {', '.join(empty)}{hint}", file=sys.stderr)
        return EMPTY_SPLIT
    return 0


def copy_image(src: Path, dst: Path, label_size: tuple[int, int], mask: str) -> None:
    """Copy an image's bytes unchanged (no re-encoding), after decoding it once so that
    truncated downloads are caught now rather than mid-training, and checking that it has
    the size of its label.

    Args:
        src: the image to copy.
        dst: where to put it, replaced whole (utils.files.replacing); parent folders are created.
        label_size: (H, W) of the label prepared for it.
        mask: the mask file(s) the label came from, for the message.
    Raises:
        DataError: unreadable image, or a size other than label_size.
    """
    width, height = open_image(src).size
    if (height, width) != tuple(label_size):
        raise DataError(f"{src}: image is {(height, width)} (H, W) but its mask {mask} is {tuple(label_size)}; re-export one of them")
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
