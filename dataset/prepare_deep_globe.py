"""Turn the official DeepGlobe land-cover download into GLNet's layout.

    python -m dataset.prepare_deep_globe --src <folder of <id>_sat.jpg and <id>_mask.png> --dst data/deep_globe [--force]

Uses GLNet's split lists (dataset/splits/deep_globe_{train,crossvali,test}.txt) and writes
<dst>/<split>/Sat/<id>_sat.jpg (the downloaded bytes) and <dst>/<split>/Label/<id>_mask.png
(class ids, from the RGB masks binarised at 128). Ids missing from the download are
counted, listed in <dst>/missing_<split>.txt and skipped; the exit status is 1 if a whole split ends up empty, 2 for unusable arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from dataset.classes import DEEPGLOBE
from dataset.io import NotAColourMask, read_mask, write_label
from dataset.layouts import DEEP_GLOBE, SPLITS, index_files
from dataset.prepare_common import MissingSample, claimed_destination, copy_image, prepare_splits
from utils.errors import DataError, OneLineParser, reports_data_errors

SPLIT_LIST_DIR = Path(__file__).resolve().parent / "splits"
SOURCE_IMAGE, SOURCE_MASK = "_sat.jpg", "_mask.png"  # the official download's names


def split_ids(split: str) -> list[str]:
    """GLNet's ids of one split (the shipped lists hold `<id>_sat.jpg` lines)."""
    lines = (SPLIT_LIST_DIR / f"deep_globe_{split}.txt").read_text().splitlines()
    return [DEEP_GLOBE.id_of(line.strip()) for line in lines if line.strip()]


def prepare_deep_globe(src: Path, dst: Path, force: bool = False) -> int:
    """Prepare all three splits of GLNet's DeepGlobe split.

    Args:
        src: folder holding `<id>_sat.jpg` and the RGB `<id>_mask.png` of the download.
        dst: the data root to write.
        force: replace the split folders of a non-empty dst.
    Returns:
        Exit status (see dataset.prepare_common.prepare_splits).
    """
    if not src.is_dir():
        raise DataError(f"{src}: no such folder; pass the unzipped download as --src")
    images, masks = index_files(src, (SOURCE_IMAGE,)), index_files(src, (SOURCE_MASK,))
    if not images:
        raise DataError(f"{src}: holds no <id>{SOURCE_IMAGE} files; pass the folder that directly contains the tiles as --src")

    def prepare_one(split: str, sample_id: str) -> None:
        image, mask = images.get(sample_id), masks.get(sample_id)
        if image is None or mask is None:
            raise MissingSample(sample_id)
        try:
            label = read_mask(mask, DEEPGLOBE, "colours")
        except NotAColourMask:
            # This script has no --mask_kind: the advice read_mask gives does not apply here.
            raise DataError(f"{mask}: a grey or class-id mask; --src must hold the RGB <id>_mask.png masks of the DeepGlobe download") from None
        copy_image(image, DEEP_GLOBE.image_path(dst / split, sample_id), tuple(label.shape), str(mask))
        write_label(DEEP_GLOBE.mask_path(dst / split, sample_id), label)

    with claimed_destination(dst, force):
        return prepare_splits({split: split_ids(split) for split in SPLITS}, prepare_one, src, dst)


@reports_data_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="folder of <id>_sat.jpg and RGB <id>_mask.png files")
    parser.add_argument("--dst", type=Path, required=True, help="data root to write, e.g. data/deep_globe")
    parser.add_argument("--force", action="store_true", help="replace the split folders of a non-empty --dst")
    args = parser.parse_args(argv)
    return prepare_deep_globe(args.src, args.dst, args.force)


if __name__ == "__main__":
    raise SystemExit(main())
