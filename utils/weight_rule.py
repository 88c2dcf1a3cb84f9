"""The deterministic weights the reference fixtures were made with (docs/authors_behaviour.md,
section 7.2): each state-dict key seeds its own generator. The parity tests and the benchmark
use them, the benchmark's networks thus having realistic BatchNorm statistics and weight
scales without a checkpoint. Kept free of heavy imports: the benchmark measures resident memory.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor


def rule_tensor(key: str, like: Tensor, seed: int) -> Tensor:
    """The fixture rule's value for one state-dict key (no `module.` prefix)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros_like(like)
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + seed) % 2**31)
    shape = tuple(like.shape)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) == 4:
        return torch.randn(shape, generator=g) * math.sqrt(1.0 / (shape[1] * shape[2] * shape[3]))
    if key.endswith("weight"):
        return 0.5 + 0.1 * torch.randn(shape, generator=g)
    if key.endswith("bias"):
        return 0.05 * torch.randn(shape, generator=g)
    raise ValueError(f"the weight rule does not cover {key!r}")


def apply_rule_weights(model: torch.nn.Module, seed: int) -> None:
    model.load_state_dict({k: rule_tensor(k, v, seed) for k, v in model.state_dict().items()})
