"""utils.memory: glibc serves large blocks from their own mappings once it is told to."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# After an 8 MiB block is freed, glibc's default raises its mmap threshold to 8 MiB, so a
# 4 MiB block then comes from the heap; with the fixed 1 MiB threshold it is mapped apart.
PROBE = """
import ctypes, sys
from utils.memory import return_large_blocks_to_the_system
took = return_large_blocks_to_the_system() if sys.argv[1] == "set" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
block = libc.malloc(4 << 20)
heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split()[0].split("-")) if heap else (0, 0)
print(took, lo <= block < hi)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_get_their_own_mappings():
    def probe(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert probe("default") == "None True"  # the heap: it stays resident, fragmenting
    assert probe("set") == "True False"


# 3,000 blocks of 64 KiB come from the heap (below glibc's 128 KiB mmap threshold), a small
# block above them keeps the heap's top in use, and every page is written. Freed, they stay
# resident; trimmed, their pages go back. Resident MB: after freeing, then after trimming.
TRIM_PROBE = """
import ctypes, os
from utils.memory import release_free_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [libc.malloc(64 << 10) for _ in range(3000)]
for b in blocks:
    libc.memset(b, 1, 64 << 10)
guard = libc.malloc(64)
for b in blocks:
    libc.free(b)
freed = rss()
print(release_free_heap(), freed - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_release_free_heap_returns_freed_pages_inside_the_heap():
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    trimmed, released_mb = done.stdout.split()
    assert trimmed == "True"
    assert float(released_mb) > 150  # of the 187.5 MB written and freed
