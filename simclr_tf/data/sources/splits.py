"""Split specs: TFDS-style `name[a:b]` slices (and `+` sums) resolved to absolute example ranges."""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

from simclr_tf.errors import UsageError

# The flag that names each split role in errors.
SPLIT_FLAG = {"train": "--train_split", "eval": "--eval_split"}
# One part of a spec: a split name and an optional `[lo:hi]` with integer or percent bounds.
SPEC_RE = re.compile(r"^([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


@dataclasses.dataclass(frozen=True)
class SplitSlice:
    """Examples `[start, stop)` of the named split."""

    split: str
    start: int
    stop: int


def resolve_split(spec: str, sizes: Mapping[str, int], flag: str) -> list[SplitSlice]:
    """TFDS-style `name[a:b]` (+ `name2[...]`) -> absolute slices; bad names or bounds name `flag`.

    Args:
        spec: the split spec, e.g. `train[:10%]+test`.
        sizes: number of examples of each available split.
        flag: the flag the spec came from, named in a `UsageError`.
    """
    slices = []
    for part in spec.split("+"):
        match = SPEC_RE.match(part.strip())
        if not match:
            raise UsageError(flag, f"cannot parse split '{spec}'; use e.g. train, train[:10%], train[-500:], "
                                   f"train+test")
        name, lo, hi = match.groups()
        if name not in sizes:
            raise UsageError(flag, f"unknown split '{name}'; available splits: {', '.join(sorted(sizes))}")
        n = sizes[name]
        start = _bound(lo, n, 0, flag, spec)
        stop = _bound(hi, n, n, flag, spec)
        if start >= stop:
            raise UsageError(flag, f"split '{spec}' selects no examples (split '{name}' has {n})")
        slices.append(SplitSlice(name, start, stop))
    return slices


def _bound(text: Optional[str], n: int, default: int, flag: str, spec: str) -> int:
    if text is None:
        return default
    if text.endswith("%"):
        percent = int(text[:-1])
        if abs(percent) > 100:
            raise UsageError(flag, f"percentage {percent}% out of range in split '{spec}'")
        value = int(round(percent * n / 100.0))  # nearest example, as TFDS's default rounding
    else:
        value = int(text)
        if abs(value) > n:
            raise UsageError(flag, f"slice bound {value} out of range in split '{spec}' ({n} examples)")
    return value + n if value < 0 else value
