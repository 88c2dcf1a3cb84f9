"""Image tensors' values: 8-bit images scaled to float32 in [0, 1], the networks' input;
and the dtype of class maps, the networks' output."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=16)
def _byte_max(device: torch.device) -> Tensor:
    """255 as a tensor on `device`, made once per device. CUDA divides by a Python number
    as a multiplication by its reciprocal, which can be an ulp off the true quotient; by a
    tensor it divides, as the CPU, NumPy and the authors' code do."""
    with torch.inference_mode(False):
        return torch.tensor(255.0, device=device)


def to_unit_float(image: Tensor) -> Tensor:
    """Scale an image tensor to float32 in [0, 1] (uint8 / 255; float images pass through)."""
    if image.dtype == torch.uint8:
        return image.float().div_(_byte_max(image.device))
    if not image.is_floating_point():
        raise TypeError(f"expected a uint8 or float image tensor, got {image.dtype}")
    return image.float()


def class_dtype(n_class: int) -> torch.dtype:
    """The dtype of class maps: one byte per pixel wherever the ids fit, which keeps the
    maps of huge images (three per image in evaluation) small."""
    return torch.uint8 if n_class <= 256 else torch.long
