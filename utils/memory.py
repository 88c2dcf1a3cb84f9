"""How the process gets memory from the system, for the CPU path."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # bytes


def return_large_blocks_to_the_system() -> bool:
    """Have glibc map every allocation above 1 MiB on its own and unmap it when freed.

    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed,
    after which most activation tensors of a patch pass come from the heap, which
    fragments and stays resident after they are freed. Measured on a 2-core CPU
    (bench/README.md): a stage-2 training step with checkpointing peaks at 2.7 GB instead
    of 3.5 GB and takes 17 % longer; evaluation gains under 0.1 GB and is a third slower,
    so evaluation leaves glibc's default. predict.py sets it for very large images, whose
    peak otherwise grows with the width. Returns whether the setting took: False off glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_heap() -> bool:
    """Give the whole pages inside freed heap blocks back to the system (glibc's malloc_trim).

    Each patch pass on the CPU frees a few hundred MB of activations into the heap; the
    free blocks caught between live ones stay resident, and more of them pass after pass.
    Trimmed after each pass, the mode-3 evaluation of a 2448 x 2448 image on two cores peaked
    at 1566 MB instead of 1657 MB (medians of three) for 2.4 % more time (bench/README.md), where
    mapping large blocks apart (above) costs a third. Returns whether anything was trimmed:
    False off glibc.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim is not None and trim(0))


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
