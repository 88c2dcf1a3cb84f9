"""Image tensors, the downsampled global image, and paired image/label augmentation.

Images travel as (3, H, W) tensors: uint8 for 8-bit sources, float32 in [0, 1] for deeper
ones. Inputs are only scaled to [0, 1]; GLNet uses no mean/std normalisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from utils.images import to_unit_float
from utils.resample import pil_bilinear


def global_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """The global branch's input: the whole image resized to `size` (H, W), float in [0, 1].

    Pillow's BILINEAR (antialiased when shrinking) as in the authors' code, reproduced bit
    for bit by utils.resample.pil_bilinear on the image's own device: uint8 images go
    through Pillow's 8-bit path and are then scaled by 1 / 255 (torch's own resize does
    not round like Pillow), float images through its mode "F" path and are then clamped
    to [0, 1]. Returns float32 (C, H, W) on the input's device.
    """
    out = pil_bilinear(image, size)
    if image.dtype == torch.uint8:
        return to_unit_float(out)
    return out.clamp_(0.0, 1.0)


def augment(image: Tensor, label: Optional[Tensor], generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
    """GLNet's training augmentation, applied to image and label together.

    A horizontal flip with probability 0.5; then, with probability 0.5, a rotation by 90,
    180 or 270 degrees chosen uniformly. Non-square inputs come out with H and W swapped
    after odd rotations.

    Args:
        image: (C, H, W), any dtype.
        label: (H, W) class ids, or None for unlabelled images.
        generator: the only source of randomness, so a seeded generator replays the draw.
    Returns:
        (image, label) transformed alike, contiguous.
    """
    flip = bool(torch.rand((), generator=generator) < 0.5)
    quarter_turns = int(torch.randint(1, 4, (), generator=generator)) if torch.rand((), generator=generator) < 0.5 else 0

    def apply(x: Tensor) -> Tensor:
        if flip:
            x = x.flip(-1)
        return torch.rot90(x, quarter_turns, dims=(-2, -1)).contiguous()

    return apply(image), None if label is None else apply(label)
