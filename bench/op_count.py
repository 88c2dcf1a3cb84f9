"""How many ATen operators a block of code calls.

On a GPU each operator costs the host some microseconds to dispatch, and each one that is
not a view launches at least one kernel. When the network's work per call is small, that
host time, not the GPU, sets the pace. The count is the same on any device, so it can be
measured and lowered without one.
"""
from __future__ import annotations

import re
from typing import Any

import torch
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


# Inductor's generated kernels as the profiler names them: C++ on the CPU (once
# torch._inductor.config.cpp.enable_kernel_profile is set before compiling), Triton on a GPU.
_KERNEL_NAME = re.compile(r"^(graph_\d+_cpp_fused|triton_)")


class KernelCount:
    """Inside `with KernelCount() as c:`, c.calls counts the host's calls that each stand
    for a kernel, in eager and compiled code alike (where OpCount cannot see into compiled
    code, which a dispatch mode makes run eager): the outermost ATen operators (one per
    call from Python or from a compiled graph, such as its convolutions) and inductor's
    generated kernels; c.views those operators that only make a view; c.compiled the calls
    made inside compiled code. From the profiler's CPU events, so on a GPU it counts
    launches, not the kernels that ran."""

    def __init__(self) -> None:
        self.calls = 0
        self.views = 0
        self.compiled = 0
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def __enter__(self) -> KernelCount:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        for event in self._profile.events():
            kernel = bool(_KERNEL_NAME.match(event.name))
            if kernel or (event.name.startswith("aten::") and not _within(event, "aten::")):
                self.calls += 1
                self.views += not kernel and _only_views(event)
                self.compiled += _within(event, "Torch-Compiled Region")


def show_compiled_kernels() -> None:
    """Have inductor record each C++ kernel it generates from now on, for KernelCount."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def _within(event: Any, prefix: str) -> bool:
    """Whether an enclosing event's name starts with prefix."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def _only_views(event: Any) -> bool:
    """Whether an operator's call made views only: a view operator none of whose inner
    calls made anything else (a reshape that cannot view copies)."""
    return _is_view(event.name) and all(_only_views(child) for child in event.cpu_children
                                        if child.name.startswith("aten::"))


def _is_view(name: str) -> bool:
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return False
    return any(getattr(packet, overload).is_view for overload in packet.overloads())
