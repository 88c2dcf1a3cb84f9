"""Image tensors, the downsampled global image, and paired image/label augmentation.

Images travel as (3, H, W) tensors: uint8 for 8-bit sources, float32 in [0, 1] for deeper
ones. Inputs are only scaled to [0, 1]; GLNet uses no mean/std normalisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_unit_float(image: Tensor) -> Tensor:
    """Scale an image tensor to float32 in [0, 1] (uint8 / 255; float images pass through)."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise TypeError(f"expected a uint8 or float image tensor, got {image.dtype}")
    return image.float()


def global_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """The global branch's input: the whole image resized to `size` (H, W), float in [0, 1].

    Pillow's BILINEAR (antialiased when shrinking) as in the authors' code; for uint8 images
    its rounding to 8 bits is reproduced exactly, which torch's own resize does not.
    """
    h, w = int(size[0]), int(size[1])
    array = image.detach().cpu().numpy()
    if image.dtype == torch.uint8:
        pil = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
        out = np.asarray(pil.resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)
        return torch.from_numpy(out.copy()).float().div_(255.0)
    channels = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)) for c in array]
    return torch.from_numpy(np.stack(channels)).clamp_(0.0, 1.0)


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
