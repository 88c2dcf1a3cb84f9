"""One segmentation dataset over (id, image, mask) samples, and the presets that build it.

DeepGlobe is not a separate code path: it is the "deep_globe" preset (its layout, its
class table, class-id masks).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, TypedDict

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset.classes import DEEPGLOBE, ClassTable
from dataset.io import MaskKind, PathLike, decoded_size, read_image, read_mask
from dataset.layouts import Sample, deep_globe_samples, folder_samples, refuse_incomplete
from dataset.transforms import augment as paired_augment
from utils.errors import DataError


class Item(TypedDict):
    id: str
    image: Tensor  # (3, H, W) uint8, or float32 in [0, 1] for 16-bit sources
    label: Optional[Tensor]  # (H, W) class ids (uint8 up to 256 classes); None for unlabelled samples


class SegmentationDataset(Dataset):
    """Images with optional class-id labels, read from disk per item.

    Augmentation (dataset.transforms.augment) draws from a generator seeded by
    (seed, epoch, index), so an item is the same whichever worker loads it and in whatever
    order. Call set_epoch before each epoch; DataLoader workers see the new epoch as long as
    they are not persistent (the default), since they copy the dataset when an epoch starts.

    Args:
        samples: (id, image path, mask path or None) triples, e.g. from dataset.layouts.
        table: the classes; mask ids must be below table.n_class.
        mask_kind: "ids" (single-channel class ids) or "colours" (RGB in the table's colours).
        augment: apply GLNet's training augmentation.
        seed: non-negative augmentation seed.
    Items are dicts {"id": str, "image": (3, H, W) uint8 or float32, "label": (H, W) class ids or None}.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        table: ClassTable,
        mask_kind: MaskKind = "ids",
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.samples = list(samples)
        self.table = table
        self.mask_kind = mask_kind
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of `epoch` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def generator(self, index: int) -> torch.Generator:
        """The augmentation generator of item `index` in the current epoch."""
        state = np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __getitem__(self, index: int) -> Item:
        sample = self.samples[index]
        image = read_image(sample.image)
        label = None if sample.mask is None else read_mask(sample.mask, self.table, self.mask_kind)
        if label is not None and tuple(label.shape) != tuple(image.shape[-2:]):
            raise DataError(mismatch_message(sample, tuple(label.shape), tuple(image.shape[-2:])))
        if self.augment:
            image, label = paired_augment(image, label, self.generator(index))
        return {"id": sample.id, "image": image, "label": label}


def mismatch_message(sample: Sample, mask: tuple[int, ...], image: tuple[int, ...]) -> str:
    return (f"{sample.mask}: mask is {mask} (H, W) but its image {sample.image} is {image}; the mask must match "
            "the image pixel for pixel")


def collate(items: Sequence[Item]) -> dict[str, list[Any]]:
    """Batch items as lists per key: images differ in size, so nothing is stacked. Keys
    added by wrappers (e.g. the global image) are batched the same way."""
    return {key: [item[key] for item in items] for key in items[0]}


@dataclass(frozen=True)
class Preset:
    samples: Callable[[PathLike, str], list[Sample]]
    table: Optional[ClassTable]  # None: the caller must give one
    mask_kind: MaskKind


PRESETS: dict[str, Preset] = {
    "deep_globe": Preset(deep_globe_samples, DEEPGLOBE, "ids"),
    "folder": Preset(folder_samples, None, "ids"),
}


def build_dataset(
    kind: Literal["deep_globe", "folder"],
    root: PathLike,
    split: str,
    table: Optional[ClassTable] = None,
    mask_kind: Optional[MaskKind] = None,
    augment: bool = False,
    seed: int = 0,
) -> SegmentationDataset:
    """The dataset of one split.

    Args:
        kind: the layout preset, "deep_globe" or "folder" (see dataset.layouts).
        root: the data root holding one folder per split.
        split: e.g. "train", "crossvali", "test".
        table: class table; defaults to the preset's (DEEPGLOBE for deep_globe; folder has none).
        mask_kind: "ids" or "colours"; defaults to the preset's ("ids").
        augment: apply GLNet's training augmentation.
        seed: augmentation seed.
    Returns:
        The SegmentationDataset.
    """
    if kind not in PRESETS:
        raise ValueError(f"dataset kind must be one of {sorted(PRESETS)}, got {kind!r}")
    preset = PRESETS[kind]
    table = table or preset.table
    if table is None:
        raise DataError(f"{root}: the {kind!r} layout has no default class table; give one (e.g. a JSON file read by load_class_table)")
    refuse_incomplete(root)
    samples = preset.samples(root, split)
    return SegmentationDataset(samples, table, mask_kind or preset.mask_kind, augment, seed)


def check_samples(dataset: SegmentationDataset, where: str, threads: int = 1) -> list[tuple[int, int]]:
    """Read every image and mask of `dataset` as a run reads them (a truncated image fails
    only once decoded), and return the images' (H, W): a bad file found before a run starts
    costs seconds, found during it an epoch.

    Raises:
        DataError: one line naming the first bad file, and how many others `where` (the
            split's folder, for the message) holds.
    """
    def check(index: int) -> tuple[int, int]:
        sample = dataset.samples[index]
        size = decoded_size(sample.image)
        if sample.mask is not None:
            label = read_mask(sample.mask, dataset.table, dataset.mask_kind)
            if tuple(label.shape) != size:
                raise DataError(mismatch_message(sample, tuple(label.shape), size))
        return size

    sizes, errors, culprits = [], [], []
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        futures = [pool.submit(check, index) for index in range(len(dataset))]
        for sample, future in zip(dataset.samples, tqdm(futures, desc=f"check {where}", unit="file",
                                                           dynamic_ncols=True, disable=None, leave=False)):
            try:
                sizes.append(future.result())
            except DataError as error:
                errors.append(str(error))
                # Every message starts with the file it is about.
                culprits.append(str(sample.mask if errors[-1].startswith(f"{sample.mask}:") else sample.image))
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C, the files not yet checked are not
    if errors:
        more = f" (and {len(errors) - 1} more in {where}: {', '.join(culprits[1:])})" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    return sizes
