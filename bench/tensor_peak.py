"""Peak bytes of live tensor storages, on any device.

On a GPU, `torch.cuda.max_memory_allocated` is this figure plus the caching allocator's
rounding and cuDNN's workspaces. Measured on the CPU (with CPU autocast standing in for
CUDA autocast), it tells what a change does to GPU memory on a machine without one.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """Inside `with TensorPeak() as t:`, t.peak is the most bytes that tensor storages made
    by operators in the block, plus those passed to `track`, ever held at once; t.current
    is what they hold now. A storage counts once however many views share it, until it is
    freed."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id of the storage's data -> bytes

    def track(self, tensors: Iterable[Tensor]) -> None:
        """Count tensors made before the block (weights, inputs) as live."""
        for t in tensors:
            self._add(t)

    def _add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        # Storages keep their Python object for as long as they live, so this runs when the
        # memory is released.
        weakref.finalize(storage, self._remove, key, size)

    def _remove(self, key: int, size: int) -> None:
        if self._live.get(key) == size:
            del self._live[key]
            self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._add(t)
        return out


def module_tensors(*modules: torch.nn.Module | None) -> list[Tensor]:
    """Parameters and buffers of the modules (None skipped)."""
    return [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
