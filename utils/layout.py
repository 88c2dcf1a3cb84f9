"""Memory layout of feature maps."""
from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last where t is laid out so and not also plainly contiguous (as maps with
    one channel or one pixel are), else contiguous_format. Maps built from a map in its own
    format let a channels-last network concatenate and convolve them without converting."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
