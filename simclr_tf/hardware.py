"""What the machine's processors compute natively, read without TensorFlow (the JAX-backend tools use it too),
and the C allocator settings TensorFlow's CPU tensors run fastest with."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Mapping, Optional

__all__ = ["HeapTrimmer", "MALLOC_ENV_VARS", "MIXED_PRECISION_DTYPES", "cpu_has_native_bfloat16", "keep_jax_out",
           "tune_malloc"]

# What `--mixed_precision_dtype` may ask for: "auto" (what the devices compute in natively) or a 16-bit type.
MIXED_PRECISION_DTYPES = ("auto", "bfloat16", "float16")

# x86 flags (Intel Cooper Lake / Sapphire Rapids and AMD Zen 4 on) and the aarch64 feature (Armv8.6-A) that
# name bfloat16 arithmetic. Without them TF's CPU kernels emulate bfloat16: a convolution's forward and
# backward ran 23x slower than in float32 on an AVX2-only CPU.
_CPU_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bfloat16(cpuinfo: Optional[str] = None) -> bool:
    """Whether the CPU computes in bfloat16 natively, from the flags / features lines of /proc/cpuinfo.

    Args:
        cpuinfo: the text of /proc/cpuinfo; None: read it (False where there is none, e.g. macOS).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _CPU_BFLOAT16_FLAGS & set(value.split()):
            return True
    return False


# glibc's mallopt parameters (malloc.h) and the environment variables that set the same ones at start-up.
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
MALLOC_ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "GLIBC_TUNABLES", "LD_PRELOAD")


def tune_malloc(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Serve TensorFlow's CPU tensors from glibc's heap instead of fresh memory maps, in one arena.

    TensorFlow allocates each CPU tensor with malloc. glibc hands every block above its mmap threshold (at most
    32 MiB) a fresh memory map and unmaps it on free, so a training step's large activations are page-faulted
    and zeroed by the kernel again on every step; the faults serialise on the process's address-space lock.
    Measured on a 2-core AVX2 CPU (ResNet-50, 64 px, batch 64): 20.5 s -> 10.3 s per step, a third of the
    process's CPU time was in the kernel before. With maps off, memory freed by a step is reused by the next;
    one arena keeps the threads' freed blocks in one pool, so the peak resident size is that of the largest
    step, not the sum of each arena's own peak (ResNet-50 compute only: 16 arenas 3202 MiB, one 2523, the maps 2730).

    Does nothing where the C library is not glibc (macOS, musl), or where the user already chose: any of
    `MALLOC_ENV_VARS` set (glibc reads them at start-up; a preloaded allocator such as tcmalloc replaces it).
    Call it before TensorFlow starts its threads: arenas made before stay.

    Args:
        environ: the environment to look for the user's own settings in (None: `os.environ`).

    Returns:
        Whether the settings were applied.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in MALLOC_ENV_VARS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_ARENA_MAX, 1))


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library where it is glibc (other C libraries' mallopt take other parameters), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version
        libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return libc


class HeapTrimmer:
    """While entered, returns the C heap's free pages to the system every `interval_s` seconds (glibc's
    `malloc_trim(0)`, from a daemon thread).

    Why: with maps off (`tune_malloc`), the blocks a training step frees stay resident as holes in the heap
    until something of their size is allocated again, and the order in which TensorFlow's threads allocate
    differs from step to step, so the holes do not always fit and the heap grows past what is ever live at
    once. Trimming gives the holes' pages back (they are zero-filled again when reused), so the peak follows
    the live memory; the price is those page faults (with `--recompute`, every 0.2 s, a 2-core AVX2 CPU,
    bench/vs_official.py: ResNet-18 32 px batch 256 peak RSS 4564 -> 3133 MiB, ResNet-50 64 px batch 64
    2431 -> 1988 MiB, the latter also without JAX loaded; ResNet-50 7% fewer img/s, measured alone). Rarer
    trims cost less: ResNet-18 `--recompute` with the fused BN, no trimming 9.66 img/s at 3397 MiB, every 2 s
    (and `--recompute_groups=2`) 9.56 at 2485, every 0.2 s 8.04 at 2275 (one run each).
    Nothing happens where the C library is not glibc.

    Args:
        interval_s: seconds between trims; 0: off.

    Raises:
        ValueError: interval_s is negative.
    """

    def __init__(self, interval_s: float) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s: must be >= 0 seconds, got {interval_s}")
        self.interval_s = float(interval_s)
        self.trims = 0  # how many times the heap was trimmed (for tests and logs)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> "HeapTrimmer":
        libc = _glibc() if self.interval_s > 0 else None
        if libc is not None:
            trim = libc.malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

            def run() -> None:
                while not self._stop.wait(self.interval_s):
                    trim(0)
                    self.trims += 1

            self._stop.clear()
            self._thread = threading.Thread(target=run, name="heap-trimmer", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def keep_jax_out(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Keeps JAX out of a process whose Keras backend is TensorFlow: `import tensorflow` otherwise imports
    `jax` where it is installed (TFLite's converter, which goes without it when the import fails), about
    100 MiB resident and a second of start-up that a TensorFlow training run never uses.

    Call it before TensorFlow is imported. Does nothing where JAX is already imported or KERAS_BACKEND names
    another backend.

    Args:
        environ: where to read KERAS_BACKEND (None: `os.environ`).

    Returns:
        Whether JAX is now kept out (an `import jax` in this process raises ImportError).
    """
    environ = os.environ if environ is None else environ
    if "jax" in sys.modules:
        return sys.modules["jax"] is None
    if environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return False
    sys.modules["jax"] = None  # the import system's "not importable" marker
    return True
