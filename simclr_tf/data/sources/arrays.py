"""In-memory sources: npz files and the embedded datasets, sliced and sharded as NumPy arrays."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from simclr_tf.data.sources.base import (DIGITS_DATASET, EMBEDDED_DATASET, DataSource, EvalSplit, SplitKind,
                                         to_rgb)
from simclr_tf.data.sources.splits import SPLIT_FLAG, choose_eval_split, resolve_split
from simclr_tf.errors import UsageError

# The embedded datasets ship with the package as compressed arrays (`images` uint8, `labels` uint8, in their
# original order); provenance and licences are in the README of that folder.
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedded")

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Arrays:
    """The images and labels of one split."""

    images: np.ndarray  # uint8 [N, H, W] or [N, H, W, C], C in (1, 3)
    labels: Optional[np.ndarray]  # int64 [N], None when the split is unlabelled


def in_memory_source(name: str, splits: Mapping[str, Arrays], train_split: str, eval_split: EvalSplit,
                     num_classes: Optional[int] = None,
                     class_names: Optional[tuple[str, ...]] = None) -> DataSource:
    """A source over arrays already in memory.

    Args:
        name: the source's name.
        splits: the arrays of each split name the specs may use.
        train_split: spec of the train role; it must select labelled splits only.
        eval_split: the eval role (see `build_source`); unlabelled when any split it selects is.
        num_classes: None: the largest label of any split + 1.
        class_names: the name of each label, where known.
    """
    sizes = {key: len(arrays.images) for key, arrays in splits.items()}
    eval_split = choose_eval_split(eval_split, sizes)
    empty = Arrays(np.zeros((0,) + splits[next(iter(splits))].images.shape[1:], np.uint8), None)
    selected = {"eval": empty}
    for kind, spec in (("train", train_split), ("eval", eval_split)):
        if spec is None:
            continue
        slices = resolve_split(spec, sizes, SPLIT_FLAG[kind])
        images = _concat([splits[s.split].images[s.start:s.stop] for s in slices])
        label_parts = [splits[s.split].labels for s in slices]
        if any(part is None for part in label_parts):
            if kind == "train":
                raise UsageError("--train_split", f"split '{spec}' of {name} has no labels")
            labels = None
        else:
            labels = _concat([part[s.start:s.stop] for part, s in zip(label_parts, slices)])
        selected[kind] = Arrays(images, labels)
    if num_classes is None:
        num_classes = 1 + max(int(arrays.labels.max()) for arrays in splits.values()
                              if arrays.labels is not None and len(arrays.labels))

    def make_dataset(split_kind: SplitKind,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        arrays = selected[split_kind]
        images, labels = arrays.images, arrays.labels
        if labels is None:
            labels = np.full(len(images), -1, np.int64)
        if input_context is not None and input_context.num_input_pipelines > 1:
            # Same rule as Dataset.shard, applied before the arrays become tensors so each pipeline copies
            # only its own part.
            step, first = input_context.num_input_pipelines, input_context.input_pipeline_id
            images, labels = images[first::step], labels[first::step]
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds.map(lambda image, label: (to_rgb(image), label))

    train_shape = _rgb_shape(selected["train"].images)
    return DataSource(
        name=name, train_split=train_split, eval_split=eval_split,
        num_train=len(selected["train"].images), num_eval=len(selected["eval"].images),
        num_classes=num_classes, eval_has_labels=selected["eval"].labels is not None,
        make_dataset=make_dataset, class_names=class_names,
        image_shape=train_shape if train_shape == _rgb_shape(selected["eval"].images) else None)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _rgb_shape(images: np.ndarray) -> tuple[int, int, int]:
    return (int(images.shape[1]), int(images.shape[2]), 3)


# ---------------------------------------------------------------------------------------------------------------
# npz files


def npz_source(path: str, train_split: str, eval_split: EvalSplit) -> DataSource:
    """The `npz:PATH` source: splits `train` and `test` from arrays `x_train, y_train, x_test[, y_test]`.

    Args:
        path: the .npz file; errors about its content name it.
        train_split: spec of the train role.
        eval_split: the eval role (see `build_source`).
    """
    if not os.path.isfile(path):
        raise UsageError("--dataset", f"npz file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError("--dataset", f"cannot read {path} as an .npz archive: {err}") from None
    with archive:
        missing = [key for key in _NPZ_KEYS if key not in archive.files and key != "y_test"]
        if missing:
            raise UsageError(path, f"key '{missing[0]}' is missing; an npz dataset needs arrays "
                                   f"{', '.join(_NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})")
        try:
            raw = {key: archive[key] for key in _NPZ_KEYS + ("num_classes",) if key in archive.files}
        except ValueError as err:  # object arrays need pickle, which we refuse
            raise UsageError(path, f"cannot load arrays without pickle: {err}") from None
    num_classes = None
    if "num_classes" in raw:
        if raw["num_classes"].ndim != 0 or raw["num_classes"].dtype.kind not in "iu":
            raise UsageError(path, "key 'num_classes' must be an integer scalar")
        num_classes = int(raw["num_classes"])
    splits = {}
    for split, x_key, y_key in (("train", "x_train", "y_train"), ("test", "x_test", "y_test")):
        images = _check_npz_images(path, x_key, raw[x_key])
        labels = (_check_npz_labels(path, y_key, raw[y_key], len(images), allow_unlabelled=split == "train")
                  if y_key in raw else None)
        splits[split] = Arrays(images, labels)
    max_label = max(int(a.labels.max()) for a in splits.values() if a.labels is not None and len(a.labels))
    if num_classes is None:
        num_classes = max_label + 1
    for split, y_key in (("train", "y_train"), ("test", "y_test")):
        labels = splits[split].labels
        if labels is not None and len(labels) and int(labels.max()) >= num_classes:
            raise UsageError(path, f"key '{y_key}' has label {int(labels.max())} outside "
                                   f"[0, num_classes={num_classes})")
    return in_memory_source(f"npz:{path}", splits, train_split, eval_split, num_classes=num_classes)


def _check_npz_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise UsageError(path, f"key '{key}' has dtype {images.dtype}, expected uint8")
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise UsageError(path, f"key '{key}' has {images.shape[-1]} channels, expected 1 or 3 (NHWC)")
    if images.ndim not in (3, 4):
        raise UsageError(path, f"key '{key}' has ndim {images.ndim} (shape {images.shape}), expected 4 (NHWC "
                               f"RGB) or 3 (NHW grayscale)")
    if len(images) == 0:
        raise UsageError(path, f"key '{key}' holds no images")
    return images


def _check_npz_labels(path: str, key: str, labels: np.ndarray, count: int, *,
                      allow_unlabelled: bool = False) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise UsageError(path, f"key '{key}' has dtype {labels.dtype}, expected integer labels")
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras' cifar10.load_data() gives [N, 1]
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UsageError(path, f"key '{key}' has ndim {labels.ndim} (shape {labels.shape}), expected 1")
    if len(labels) != count:
        raise UsageError(path, f"key '{key}' has {len(labels)} labels for {count} images")
    lowest = -1 if allow_unlabelled else 0  # -1 = "no label", the DataSource convention
    if len(labels) and int(labels.min()) < lowest:
        hint = " (-1 marks an unlabelled example)" if allow_unlabelled else ""
        raise UsageError(path, f"key '{key}' has label {int(labels.min())} outside [0, num_classes){hint}")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The embedded datasets


def embedded_path(name: str) -> str:
    """The file that holds embedded dataset `name` (`images` and `labels` in their original order).

    Args:
        name: `EMBEDDED_DATASET` or `DIGITS_DATASET`.
    """
    return os.path.join(EMBEDDED_DIR, f"{name}.npz")


def embedded_source(name: str, train_split: str, eval_split: EvalSplit) -> DataSource:
    """An embedded dataset (splits `train` and `test`, see the package docstring); it needs no download.

    Args:
        name: `EMBEDDED_DATASET` or `DIGITS_DATASET`.
        train_split: spec of the train role.
        eval_split: the eval role (see `build_source`).
    """
    splits = _mnist_5k_splits() if name == EMBEDDED_DATASET else _digits_splits()
    return in_memory_source(name, splits, train_split, eval_split, class_names=tuple(str(d) for d in range(10)))


def _load_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = embedded_path(name)
    if not os.path.isfile(path):
        raise UsageError("--dataset", f"the embedded dataset '{name}' should ship with simclr_tf as {path}, "
                                      f"which is missing; reinstall simclr_tf")
    with np.load(path, allow_pickle=False) as archive:
        return archive["images"], archive["labels"].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_5k_splits() -> dict[str, Arrays]:
    images, labels = _load_embedded(EMBEDDED_DATASET)
    return _per_class_split(images, labels, test_per_class=100)


def _per_class_split(images: np.ndarray, labels: np.ndarray, test_per_class: int) -> dict[str, Arrays]:
    """Last `test_per_class` images of each class -> test; both splits ordered round-robin over classes."""
    rank = np.zeros(len(labels), np.int64)  # position of each image within its class, in file order
    counts = np.bincount(labels)
    for label in range(len(counts)):
        rank[labels == label] = np.arange(counts[label])
    is_test = rank >= counts[labels] - test_per_class
    splits = {}
    for name, mask in (("train", ~is_test), ("test", is_test)):
        index = np.flatnonzero(mask)
        within = rank[index] - np.where(is_test[index], counts[labels[index]] - test_per_class, 0)
        order = index[np.lexsort((labels[index], within))]
        splits[name] = Arrays(images[order], labels[order])
    return splits


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, Arrays]:
    images, labels = _load_embedded(DIGITS_DATASET)
    # The file keeps UCI's 0..16 intensities; rescaled to the 0..255 of every other source.
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    return {"train": Arrays(images[:1500], labels[:1500]), "test": Arrays(images[1500:], labels[1500:])}
