"""The `folder:PATH` source: `PATH/<split>/<class>/*.{jpg,jpeg,png}`, every file checked once at build time."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data.sources.base import DataSource, SplitKind
from simclr_tf.data.sources.splits import SPEC_RE, SPLIT_FLAG, resolve_split
from simclr_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Formats tf.io.decode_image reads; a file PIL opens in another format (say a WebP named .jpg) would fail later.
_TF_DECODABLE = {"JPEG", "PNG", "GIF", "BMP"}
_MAX_REPORTED = 5


def folder_source(root: str, train_split: str, eval_split: str) -> DataSource:
    """The source over an image folder; unreadable files are left out and listed in `skipped_files`.

    Args:
        root: the folder holding one sub-folder per split.
        train_split: spec of the train role; its split folders must have class sub-folders.
        eval_split: spec of the eval role; a split folder holding images directly is unlabelled.
    """
    if not os.path.isdir(root):
        raise UsageError("--dataset", f"folder {root} does not exist (expected PATH/<split>/<class>/*.jpg|png)")
    available = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not available:
        raise UsageError("--dataset", f"folder {root} has no split sub-folders (expected PATH/<split>/<class>/"
                                      f"*.jpg|png)")
    # The spec names the split folders before we know their sizes: resolve names first, sizes after listing.
    names = {kind: [_split_name(part, available, SPLIT_FLAG[kind]) for part in spec.split("+")]
             for kind, spec in (("train", train_split), ("eval", eval_split))}
    classes = sorted({c for split in names["train"] for c in _subdirs(os.path.join(root, split))})
    if not classes:
        raise UsageError("--train_split", f"{os.path.join(root, names['train'][0])} has no class sub-folders")

    listed: dict[str, tuple[list[str], Optional[list[int]]]] = {}
    for kind in ("train", "eval"):
        for split in names[kind]:
            if split not in listed:
                listed[split] = _list_split(os.path.join(root, split), classes, SPLIT_FLAG[kind])
    if any(listed[split][1] is None for split in names["train"]):
        raise UsageError("--train_split", f"the train split of {root} needs class sub-folders")

    all_files = sorted({f for files, _ in listed.values() for f in files})
    checked = _check_images(all_files)
    skipped = tuple(f for f in all_files if checked[f] is None)
    if skipped:
        shown = ", ".join(os.path.relpath(f, root) for f in skipped[:_MAX_REPORTED])
        more = f" and {len(skipped) - _MAX_REPORTED} more" if len(skipped) > _MAX_REPORTED else ""
        logging.warning("folder:%s: skipped %d unreadable or corrupt image file(s): %s%s",
                        root, len(skipped), shown, more)

    ordered: dict[str, tuple[list[str], Optional[list[int]]]] = {}
    for split, (files, labels) in listed.items():
        keep = [i for i, f in enumerate(files) if checked[f] is not None]
        # Fixed pseudo-random order so that slices like train[:10%] hold every class.
        keep = [keep[i] for i in np.random.default_rng(0).permutation(len(keep))]
        ordered[split] = ([files[i] for i in keep], None if labels is None else [labels[i] for i in keep])
    sizes = {split: len(files) for split, (files, _) in ordered.items()}

    selected = {}
    shapes = set()
    for kind, spec in (("train", train_split), ("eval", eval_split)):
        for split in names[kind]:
            if sizes[split] == 0:
                raise UsageError(SPLIT_FLAG[kind], f"{os.path.join(root, split)} holds no readable "
                                                   f"{'/'.join(IMAGE_EXTENSIONS)} images")
        files, labels = [], []
        unlabelled = False
        for piece in resolve_split(spec, sizes, SPLIT_FLAG[kind]):
            split_files, split_labels = ordered[piece.split]
            files += split_files[piece.start:piece.stop]
            if split_labels is None:
                unlabelled = True
            else:
                labels += split_labels[piece.start:piece.stop]
        selected[kind] = (files, None if unlabelled else labels)
        shapes.update(checked[f] for f in files)

    def make_dataset(split_kind: SplitKind,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        files, labels = selected[split_kind]
        labels = [-1] * len(files) if labels is None else labels
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string), tf.constant(labels, tf.int64)))
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        ds = ds.map(_read_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Every file decoded at build time; this only guards against one changing on disk since then.
        return ds.ignore_errors(log_warning=True)

    return DataSource(
        name=f"folder:{root}", train_split=train_split, eval_split=eval_split,
        num_train=len(selected["train"][0]), num_eval=len(selected["eval"][0]), num_classes=len(classes),
        eval_has_labels=selected["eval"][1] is not None, make_dataset=make_dataset,
        image_shape=shapes.pop() if len(shapes) == 1 else None, skipped_files=skipped)


def _split_name(part: str, available: Sequence[str], flag: str) -> str:
    match = SPEC_RE.match(part.strip())
    if not match:
        raise UsageError(flag, f"cannot parse split '{part}'; use e.g. train, train[:10%], train+test")
    if match.group(1) not in available:
        raise UsageError(flag, f"unknown split '{match.group(1)}'; available splits: {', '.join(available)}")
    return match.group(1)


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def _image_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))


def _list_split(path: str, classes: Sequence[str], flag: str) -> tuple[list[str], Optional[list[int]]]:
    """Files and labels of one split folder; labels None for a flat (unlabelled) folder."""
    subdirs = _subdirs(path)
    if not subdirs:
        return _image_files(path), None
    unknown = sorted(set(subdirs) - set(classes))
    if unknown:
        raise UsageError(flag, f"{path} has class folders not in the train split: {', '.join(unknown[:5])}")
    files, labels = [], []
    for label, name in enumerate(classes):
        if name in subdirs:
            found = _image_files(os.path.join(path, name))
            files += found
            labels += [label] * len(found)
    return files, labels


def _check_images(files: Sequence[str]) -> dict[str, Optional[tuple[int, int, int]]]:
    """path -> (H, W, 3) when PIL decodes the whole file in a format TF reads, else None."""
    if not files:
        return {}
    workers = min(8, (os.cpu_count() or 1) + 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        return dict(zip(files, pool.map(_check_image, files, chunksize=64)))


def _check_image(path: str) -> Optional[tuple[int, int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format not in _TF_DECODABLE:
                return None
            width, height = image.size
            # Decoding at 1/8 scale still parses every byte of the JPEG stream, so truncation shows.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Exception:  # noqa: BLE001 -- any failure to decode means the file is skipped and reported
        return None
    return (height, width, 3)


def _read_image(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label
