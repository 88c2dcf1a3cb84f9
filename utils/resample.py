"""Resampling rules the authors' numbers depend on, each written down once.

Feature maps: bilinear, align_corners=False. Logits for prediction: torch's legacy
nearest. Label maps for the loss: Pillow's NEAREST (the authors resized labels with PIL).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (B, C, H, W), align_corners=False; skipped when the size matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def nearest_indices(out_len: int, in_len: int, device: torch.device | None = None) -> Tensor:
    """torch's legacy nearest rule: output i reads input floor(i * in / out).

    Computed in float32 as torch does (scale = float(in) / out, then i * scale), so that
    products that are whole numbers in exact arithmetic round the way torch's do.
    """
    scale = float(np.float32(in_len) / np.float32(out_len))
    return (torch.arange(out_len, device=device, dtype=torch.float32) * scale).floor().long().clamp_(max=in_len - 1)


def pil_nearest_indices(out_len: int, in_len: int, device: torch.device | None = None) -> Tensor:
    """Pillow's NEAREST rule: output i reads input floor((i + 0.5) * in / out).

    Pillow evaluates (i + 0.5) * in / out by accumulating the step in float64, starting at
    step / 2 and adding step per output pixel, so where the exact value is a whole number
    the accumulated one can fall just below it. NumPy's cumsum adds in the same order.
    """
    step = in_len / out_len
    coords = np.full(out_len, step)
    coords[0] = step * 0.5
    idx = np.minimum(np.cumsum(coords).astype(np.int64), in_len - 1)
    return torch.from_numpy(idx).to(device)


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Resize (..., H, W) class-id maps with Pillow's NEAREST sampling."""
    rows = pil_nearest_indices(int(size[0]), labels.shape[-2], labels.device)
    cols = pil_nearest_indices(int(size[1]), labels.shape[-1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


