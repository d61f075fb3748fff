"""--tune_malloc (simclr_tf.hardware.tune_malloc): large blocks come from glibc's heap, not fresh memory maps;
--malloc_trim_secs (HeapTrimmer): the heap's free holes go back to the system; JAX kept out of TF processes.

Checked in fresh processes (this one is tuned by conftest) through glibc's own accounting, `mallinfo2().hblks`
(blocks currently served by a memory map) before and after a 64 MiB block like a training step's activations,
and through the kernel's count of the process's resident pages.
"""
import ctypes
import ctypes.util
import importlib.util
import os
import subprocess
import sys

import pytest

from simclr_tf.hardware import HeapTrimmer, keep_jax_out, tune_malloc
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


def environment_without_malloc_settings() -> dict:
    """This process's environment less the user's own allocator settings (which tune_malloc would respect)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)")
@pytest.mark.parametrize("env", [{}, {"MALLOC_ARENA_MAX": "4"}], ids=["default", "user_setting"])
def test_tune_malloc_serves_large_blocks_from_the_heap_unless_the_user_chose(env):
    clean = environment_without_malloc_settings()

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


# A 256 MiB hole in the heap: a block written through, a 1 MiB block allocated after it (carved from the heap's
# top, so the hole is not at the top, which glibc gives back by itself), the big one freed. Resident MiB before and after.
HOLE_PROBE = """
import ctypes, ctypes.util, sys, time
sys.path.insert(0, {repo!r})
from simclr_tf.hardware import HeapTrimmer, tune_malloc
assert tune_malloc()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
with HeapTrimmer(float(sys.argv[1])) as trimmer:
    big = libc.malloc(256 << 20)
    ctypes.memset(big, 1, 256 << 20)
    above = libc.malloc(1 << 20)
    held = resident_mib()
    libc.free(big)
    time.sleep(0.5)
    print(held, resident_mib(), trimmer.active, trimmer.trims)
"""


@pytest.mark.skipif(not glibc_with_mallinfo2() or not os.path.exists("/proc/self/statm"),
                    reason="glibc and Linux only")
def test_heap_trimmer_gives_freed_holes_back_and_is_off_at_zero():
    clean = environment_without_malloc_settings()

    def probe(interval):
        out = subprocess.run([sys.executable, "-c", HOLE_PROBE.format(repo=str(REPO)), str(interval)],
                             capture_output=True, text=True, env=clean, check=True).stdout.split()
        return float(out[0]), float(out[1]), out[2] == "True", int(out[3])

    held, after, active, trims = probe(0.05)
    assert active and trims >= 1
    assert held - after > 200  # the hole's 256 MiB left the resident set
    held, after, active, trims = probe(0)
    assert not active and trims == 0
    assert held - after < 50  # untrimmed, the hole stays resident: the trimmer is what released it


def test_heap_trimmer_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(-1)


JAX_PROBE = """
import sys
sys.path.insert(0, {repo!r})
from simclr_tf.hardware import keep_jax_out
kept = keep_jax_out()
import tensorflow as tf
print(kept, "jax" in sys.modules and sys.modules["jax"] is not None, float(tf.reduce_sum(tf.ones([3]))))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="only matters where JAX is installed")
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_keep_jax_out_of_a_tensorflow_process(backend):
    out = subprocess.run([sys.executable, "-c", JAX_PROBE.format(repo=str(REPO))], capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
                         check=True).stdout.split()
    kept, jax_imported, total = out[0] == "True", out[1] == "True", float(out[2])
    assert total == 3.0  # TensorFlow works without it
    if backend == "tensorflow":
        assert kept and not jax_imported
    else:
        assert not kept and jax_imported  # a JAX-backend process keeps it (TensorFlow's import loads it)


def test_keep_jax_out_leaves_an_imported_jax_alone(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "jax", sentinel)
    assert keep_jax_out({}) is False and sys.modules["jax"] is sentinel
