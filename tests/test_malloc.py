"""--tune_malloc (simclr_tf.hardware.tune_malloc): large blocks come from glibc's heap, not fresh memory maps.

Checked in fresh processes (this one is tuned by conftest) through glibc's own accounting, `mallinfo2().hblks`
(blocks currently served by a memory map) before and after a 64 MiB block like a training step's activations.
"""
import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from simclr_tf.hardware import tune_malloc
from tests.conftest import REPO

PROBE = """
import ctypes, ctypes.util, os, sys
sys.path.insert(0, {repo!r})
from simclr_tf.hardware import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


def glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)")
@pytest.mark.parametrize("env", [{}, {"MALLOC_ARENA_MAX": "4"}], ids=["default", "user_setting"])
def test_tune_malloc_serves_large_blocks_from_the_heap_unless_the_user_chose(env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO)), mode], capture_output=True,
                             text=True, env={**clean, **env}, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    applied, mapped = probe("tune")
    untouched_applied, untouched_mapped = probe("plain")
    assert not untouched_applied and untouched_mapped == 1  # glibc's default: a 64 MiB block is a memory map
    if env:
        assert not applied and mapped == 1  # the user's own MALLOC_* setting wins: nothing changed
    else:
        assert applied and mapped == 0


def test_tune_malloc_respects_each_user_setting():
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        assert tune_malloc({name: "1"}) is False, name
