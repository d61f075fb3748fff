"""What the machine's processors compute natively, read without TensorFlow (the JAX-backend tools use it too)."""
from __future__ import annotations

from typing import Optional

__all__ = ["MIXED_PRECISION_DTYPES", "cpu_has_native_bfloat16"]

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
