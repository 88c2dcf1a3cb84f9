"""utils.memory: glibc serves large blocks from their own mappings once it is told to."""
from __future__ import annotations

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
