"""Split specs: TFDS-style `name[a:b]` slices (and `+` sums) resolved to absolute example ranges."""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

from simclr_tf.errors import UsageError

# Names that mark folders (or shard name prefixes) as splits even when the train split is not among them.
USUAL_SPLIT_NAMES = ("train", "training", "val", "validation", "valid", "test", "eval")
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


def spec_names(spec: str, flag: str) -> list[str]:
    """The split names a spec uses, in order (`train[:10%]+test` -> `[train, test]`), before any size is known.

    Args:
        spec: the split spec.
        flag: the flag the spec came from, named in a `UsageError`.
    """
    names = []
    for part in spec.split("+"):
        match = SPEC_RE.match(part.strip())
        if not match:
            raise UsageError(flag, f"cannot parse split '{part}'; use e.g. train, train[:10%], train+test")
        names.append(match.group(1))
    return names


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


def choose_eval_split(eval_split: Union[str, Sequence[str], None], available: Iterable[str]) -> Optional[str]:
    """The eval role's spec: `eval_split` itself when it is a spec, the first candidate name the source has
    when it is a sequence of names, None (no eval role) when it is None or no candidate is present.

    Args:
        eval_split: a spec (`--eval_split` given explicitly), candidate split names, or None.
        available: the split names the source has.
    """
    if eval_split is None or isinstance(eval_split, str):
        return eval_split
    names = set(available)
    return next((name for name in eval_split if name in names), None)


def names_are_splits(found: Iterable[str], wanted: Iterable[str]) -> bool:
    """Whether names found in the data (sub-folders, shard prefixes) are split names rather than, say, class
    folders: every wanted split is among them, or one of them is a usual split name.

    Args:
        found: the names found.
        wanted: the split names the specs ask for.
    """
    found = set(found)
    return all(name in found for name in wanted) or bool(found & set(USUAL_SPLIT_NAMES))


def role_names(train_split: str, eval_split: Union[str, Sequence[str], None], available: Iterable[str],
               where: str = "") -> tuple[Optional[str], dict[str, list[str]]]:
    """The eval role's spec (`choose_eval_split`) and the split names each role uses, all checked to exist.

    Args:
        train_split: spec of the train role.
        eval_split: the eval role (see `choose_eval_split`).
        available: the split names the source has.
        where: named in the unknown-split error, e.g. ` in tfrecord:/data/*`.

    Returns:
        `(eval spec or None, {"train": names[, "eval": names]})`.
    """
    available = sorted(available)
    eval_split = choose_eval_split(eval_split, available)
    names = {"train": spec_names(train_split, SPLIT_FLAG["train"])}
    if eval_split is not None:
        names["eval"] = spec_names(eval_split, SPLIT_FLAG["eval"])
    for kind, used in names.items():
        for name in used:
            if name not in available:
                raise UsageError(SPLIT_FLAG[kind], f"unknown split '{name}'{where}; available splits: "
                                                   f"{', '.join(available)}")
    return eval_split, names
