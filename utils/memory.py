"""How the process gets memory from the system, for the CPU path."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
