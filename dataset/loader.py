"""The trainer's data loader: samples with their downsampled global images, computed in the
loader's workers, which start from a fork server that imports only this layer."""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
from typing import Any, Optional, Sequence

import torch

from dataset.segmentation import SegmentationDataset, collate
from dataset.transforms import global_image


class GlobalInput(torch.utils.data.Dataset):
    """Adds each sample's downsampled global image, so DataLoader workers compute it."""

    def __init__(self, dataset: torch.utils.data.Dataset, size_g: Sequence[int]) -> None:
        self.dataset, self.size_g = dataset, tuple(size_g)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["global"] = global_image(sample["image"], self.size_g)
        return sample


def make_loader(dataset: SegmentationDataset, indices: Sequence[int], *, batch_size: int, num_workers: int,
                size_g: Sequence[int]) -> torch.utils.data.DataLoader:
    """The loader of `indices` of a dataset, in that order: batch_size samples a batch, each
    with its global image of size_g (GlobalInput), num_workers workers started afresh each
    time it is iterated."""
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(GlobalInput(dataset, size_g), list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


def worker_context() -> Optional[multiprocessing.context.BaseContext]:
    """Where available, loader workers start from a fork server that has imported only what
    loading needs. Forked from the trainer instead, each would inherit its pages (networks
    and optimizer state): shared copy-on-write, yet counted in the worker's resident set
    and copied wherever Python touches the objects on them."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
