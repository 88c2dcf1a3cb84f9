"""How many ATen operators a block of code calls.

On a GPU each operator costs the host some microseconds to dispatch, and each one that is
not a view launches at least one kernel. When the network's work per call is small, that
host time, not the GPU, sets the pace. The count is the same on any device, so it can be
measured and lowered without one.
"""
from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OpCount(TorchDispatchMode):
    """Inside `with OpCount() as c:`, c.calls counts every operator call of the block and
    c.views those that only make a view (no kernel, no new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))
