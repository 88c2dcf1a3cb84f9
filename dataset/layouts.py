"""Where a split's images and masks live on disk, and the list of samples they make.

Two layouts, one mechanism: a split folder holds an image folder and an optional mask
folder, and a sample id maps to `<image_dir>/<id><image suffix>` and `<mask_dir>/<id><mask suffix>`.

    deep_globe: <root>/<split>/Sat/<id>_sat.jpg     <root>/<split>/Label/<id>_mask.png
    folder:     <root>/<split>/images/<id>.<png|jpg|jpeg|tif|tiff>   <root>/<split>/masks/<id>.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from dataset.io import PathLike
from utils.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "crossvali", "test")  # the splits the preparation tools write
# In a data root while a preparation tool writes it, left behind when one was interrupted.
INCOMPLETE_MARK = ".incomplete"


class Sample(NamedTuple):
    id: str
    image: Path
    mask: Optional[Path]  # None: unlabelled


def refuse_incomplete(root: PathLike) -> None:
    """A data root that a preparation left half-written would train and score on part of
    its splits without a word."""
    if (Path(root) / INCOMPLETE_MARK).exists():
        raise DataError(f"{root}: an interrupted preparation left this data root incomplete ({INCOMPLETE_MARK}); run "
                        "the command that prepared it again")


def strip_suffix(name: str, suffixes: Sequence[str]) -> Optional[str]:
    """`name` without the first of `suffixes` (lower case) it ends with, ignoring case;
    None when it ends with none of them or is nothing but the suffix."""
    lowered = name.lower()
    return next((name[: -len(s)] for s in suffixes if lowered.endswith(s) and len(name) > len(s)), None)


def index_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map id -> file for the files in `folder` named `<id><suffix>` (suffix matched
    case-insensitively); other files are ignored.

    Raises:
        DataError: two files with the same id (e.g. a.png and a.jpg).
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        sample_id = strip_suffix(path.name, suffixes)
        if sample_id is None or not path.is_file():
            continue
        if sample_id in found:
            raise DataError(f"{path}: id {sample_id!r} also names {found[sample_id].name}; keep one of the two files")
        found[sample_id] = path
    return found


@dataclass(frozen=True)
class Layout:
    image_dir: str
    mask_dir: str
    image_suffixes: tuple[str, ...]  # lower case; the first is what preparation writes
    mask_suffix: str

    def image_path(self, split_dir: PathLike, sample_id: str, suffix: Optional[str] = None) -> Path:
        return Path(split_dir) / self.image_dir / f"{sample_id}{suffix or self.image_suffixes[0]}"

    def mask_path(self, split_dir: PathLike, sample_id: str) -> Path:
        return Path(split_dir) / self.mask_dir / f"{sample_id}{self.mask_suffix}"

    def id_of(self, name: str) -> str:
        """The sample id in a split-list line: a file name loses its image suffix, a bare id stays."""
        return strip_suffix(name, self.image_suffixes) or name

    def samples(self, split_dir: PathLike) -> list[Sample]:
        """The samples of one split folder (e.g. <root>/train), sorted by id; masks are None
        when the split has no mask folder.

        Raises:
            DataError: a missing or empty image folder, or an image without its mask when the
                mask folder exists.
        """
        if not Path(split_dir).is_dir():
            validation = Path(split_dir).name == "crossvali"
            why = " (training scores this validation split after every epoch)" if validation else ""
            raise DataError(f"{split_dir}: no such split folder{why}; check the data root and split name, or prepare the "
                            "data first")
        image_dir = Path(split_dir) / self.image_dir
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: no such folder; put the split's images in {self.image_dir}/")
        images = index_files(image_dir, self.image_suffixes)
        if not images:
            raise DataError(f"{image_dir}: no images named <id>{'|'.join(self.image_suffixes)}; put the split's images there")
        ids = sorted(images)
        mask_dir = Path(split_dir) / self.mask_dir
        if not mask_dir.is_dir():
            return [Sample(i, images[i], None) for i in ids]
        missing = [i for i in ids if not self.mask_path(split_dir, i).is_file()]
        if missing:
            raise DataError(
                f"{self.mask_path(split_dir, missing[0])}: no such mask ({len(missing)} of {len(ids)} images lack theirs); "
                f"add the masks or remove {mask_dir} to use the split unlabelled"
            )
        return [Sample(i, images[i], self.mask_path(split_dir, i)) for i in ids]


DEEP_GLOBE = Layout("Sat", "Label", ("_sat.jpg",), "_mask.png")
FOLDER = Layout("images", "masks", IMAGE_SUFFIXES, ".png")
LAYOUTS = {"deep_globe": DEEP_GLOBE, "folder": FOLDER}  # by --dataset


def deep_globe_samples(root: PathLike, split: str) -> list[Sample]:
    """Samples of `<root>/<split>` in the prepared DeepGlobe layout (see Layout.samples)."""
    return DEEP_GLOBE.samples(Path(root) / split)


def folder_samples(root: PathLike, split: str) -> list[Sample]:
    """Samples of `<root>/<split>` in the generic images/ + masks/ layout (see Layout.samples)."""
    return FOLDER.samples(Path(root) / split)
