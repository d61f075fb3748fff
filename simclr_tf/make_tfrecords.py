"""Convert an image folder into sharded TFRecord files for `--dataset=tfrecord:GLOB`.

    python -m simclr_tf.make_tfrecords folder:PATH OUTDIR [--shards N | --images_per_shard N]
                                       [--train_split NAME] [--splits a,b] [--overwrite]

writes `OUTDIR/<split>-00000-of-000NN.tfrecord` for every split folder of PATH (or `train` alone for a folder
without split folders; the layouts are those of `--dataset=folder:PATH`), and `OUTDIR/dataset_info.json`
(examples and shards per split, num_classes, class_names, the skipped files). Then train with
`--dataset=tfrecord:OUTDIR/*`.

Each example holds the image file's original bytes (no re-encoding) in `image/encoded`, with `image/format`
(`JPEG` or `PNG`), `image/filename` (relative to PATH) and, in labelled splits, `image/class/label` (0-based,
classes numbered in sorted class-folder order of the train split, as the folder source numbers them) and
`image/class/text` (the class folder). Files that do not decode are left out and listed. Examples keep the
folder source's fixed pseudo-random order (seed 0), shard after shard, so every shard and every slice such as
`train[:10%]` mixes the classes. Each shard is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from simclr_tf.data.sources.base import build_source
from simclr_tf.data.sources.folder import IMAGE_EXTENSIONS
from simclr_tf.data.sources.splits import names_are_splits
from simclr_tf.data.sources.tfrecord import (CLASS_TEXT_KEY, FILENAME_KEY, FORMAT_KEY, IMAGE_KEY, INFO_FILE,
                                             INFO_FORMAT, LABEL_KEY)
from simclr_tf.errors import UsageError
from simclr_tf.files import write_text_atomically

DEFAULT_IMAGES_PER_SHARD = 1024
_SHARD_RE = re.compile(r"^(?P<split>[\w.]+)-\d{5}-of-\d{5}\.tfrecord$")
_PROGRESS_SECONDS = 2.0
_SKIPPED_SHOWN = 20


def make_tfrecords(dataset: str, out_dir: str, *, shards: Optional[int] = None,
                   images_per_shard: Optional[int] = None, train_split: str = "train",
                   splits: Optional[Sequence[str]] = None, overwrite: bool = False, threads: Optional[int] = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes the shards and `dataset_info.json` of an image folder into `out_dir`; returns the info written.

    Args:
        dataset: `folder:PATH`.
        out_dir: where the shards go (created when missing).
        shards: shards per split (at most one per image); exclusive with `images_per_shard`.
        images_per_shard: images per shard (the shard count rounds up); default `DEFAULT_IMAGES_PER_SHARD`.
        train_split: the split folder whose class folders number the labels (as `--train_split` names it);
            also what marks PATH as holding split folders when their names are unusual.
        splits: the split folders to convert; None: all of them.
        overwrite: replace shards of these splits already in `out_dir`; otherwise they are an error.
        threads: images read and checked at once; None: one per CPU core.
        log: where the progress lines go.
    """
    if not dataset.startswith("folder:") or not dataset[len("folder:"):]:
        raise UsageError("DATASET", f"expected folder:PATH, got '{dataset}'")
    root = os.path.abspath(os.path.expanduser(dataset[len("folder:"):]))
    if not os.path.isdir(root):
        raise UsageError(root, "is not a folder")
    if shards is not None and images_per_shard is not None:
        raise UsageError("--shards", "give --shards or --images_per_shard, not both")
    if shards is not None and shards < 1:
        raise UsageError("--shards", f"must be positive, got {shards}")
    if images_per_shard is not None and images_per_shard < 1:
        raise UsageError("--images_per_shard", f"must be positive, got {images_per_shard}")
    if not re.fullmatch(r"[\w.]+", train_split):
        raise UsageError("--train_split", f"must be a split folder name (no slices), got '{train_split}'")

    names = _split_names(root, train_split)
    if splits is not None:
        unknown = sorted(set(splits) - set(names))
        if unknown:
            raise UsageError("--splits", f"unknown split '{unknown[0]}'; split folders: {', '.join(names)}")
        names = [n for n in names if n in splits]
    listed, num_classes, class_names = _list_splits(dataset, root, train_split, names, log)
    if not listed:
        raise UsageError(root, f"holds no {'/'.join(IMAGE_EXTENSIONS)} images to convert")

    os.makedirs(out_dir, exist_ok=True)
    stale = [f for f in sorted(os.listdir(out_dir))
             if (m := _SHARD_RE.match(f)) and m.group("split") in listed]
    if stale and not overwrite:
        raise UsageError(out_dir, f"already holds shards of these splits ({stale[0]}, ...); pass --overwrite to "
                                  f"replace them, or choose another folder")

    info: dict[str, Any] = {"format": INFO_FORMAT, "source": f"folder:{root}", "num_classes": num_classes,
                            "class_names": class_names, "splits": {}, "skipped_files": []}
    written: list[str] = []
    workers = threads or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for name, (paths, labels, labelled) in listed.items():
            count = shards if shards is not None else math.ceil(
                len(paths) / (images_per_shard or DEFAULT_IMAGES_PER_SHARD))
            count = max(1, min(count, len(paths)))
            split_info, files, skipped = _write_split(
                pool, root, out_dir, name, paths, labels if labelled else None, class_names, count, log)
            info["splits"][name] = split_info
            info["skipped_files"] += skipped
            written += files
    # Shards of an earlier conversion with another shard count would be matched by the same glob.
    for old in stale:
        if old not in written:
            os.remove(os.path.join(out_dir, old))
    write_text_atomically(os.path.join(out_dir, INFO_FILE), json.dumps(info, indent=1))

    skipped = info["skipped_files"]
    total = sum(s["num_examples"] for s in info["splits"].values())
    log(f"{total} images in {len(written)} shards -> {out_dir} (train with --dataset=tfrecord:"
        f"{os.path.join(out_dir, '*')})")
    if skipped:
        shown = ", ".join(skipped[:_SKIPPED_SHOWN])
        more = f" and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
        log(f"skipped {len(skipped)} file(s) that do not decode: {shown}{more} (all listed in "
            f"{os.path.join(out_dir, INFO_FILE)})")
    return info


def _split_names(root: str, train_split: str) -> list[str]:
    """The split folders under `root`, by the folder source's rule; `["train"]` when `root` is the one split."""
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if names_are_splits(folders, [train_split]):
        return folders
    return ["train"]


def _list_splits(dataset: str, root: str, train_split: str, names: Sequence[str], log: Callable[[str], None]
                 ) -> tuple[dict, int, Optional[list[str]]]:
    """{split: (absolute paths, labels, labelled)} in the folder source's order, num_classes, class_names.

    The folder source lists them: the train split as the train role (its class folders number the labels),
    every other split as the eval role of the same source, so its labels use the train split's numbering.
    """
    def records(source, kind):
        pairs = list(source.records(kind).as_numpy_iterator())
        return [p.decode("utf-8") for p, _ in pairs], [int(y) for _, y in pairs]

    train_name = train_split if train_split in names or len(names) != 1 else names[0]
    try:
        train = build_source(dataset, None, train_name, None)
    except UsageError as e:
        raise _as_folder_error(e, os.path.join(root, train_name)) from None
    class_names = list(train.class_names) if train.class_names else None
    listed = {}
    for name in names:
        if name == train_name:
            paths, labels = records(train, "train")
            listed[name] = (paths, labels, train.num_classes > 0)
            continue
        try:
            source = build_source(dataset, None, train_name, name)
        except UsageError as e:
            if "no readable" in str(e):  # an empty split folder: nothing to convert there
                log(f"{name}: skipped ({_message(e)})")
                continue
            raise _as_folder_error(e, os.path.join(root, name)) from None
        paths, labels = records(source, "eval")
        listed[name] = (paths, labels, source.eval_has_labels)
    return listed, train.num_classes, class_names


def _message(e: UsageError) -> str:
    return str(e)[len(e.where) + 2:]


def _as_folder_error(e: UsageError, folder: str) -> UsageError:
    # The folder source names the eval role's flag, which the converter has not: the split folder is at fault.
    if e.where == "--eval_split":
        return UsageError(folder, _message(e))
    return e


def _write_split(pool: concurrent.futures.Executor, root: str, out_dir: str, name: str, paths: Sequence[str],
                 labels: Optional[Sequence[int]], class_names: Optional[Sequence[str]], count: int,
                 log: Callable[[str], None]) -> tuple[dict, list[str], list[str]]:
    """Writes one split's shards; returns its info entry, the shard names and the skipped files."""
    bounds = [len(paths) * i // count for i in range(count + 1)]
    files, skipped, examples, last_report = [], [], 0, time.monotonic()
    for shard in range(count):
        lo, hi = bounds[shard], bounds[shard + 1]
        filename = f"{name}-{shard:05d}-of-{count:05d}.tfrecord"
        tmp = os.path.join(out_dir, f".{filename}.tmp")
        with tf.io.TFRecordWriter(tmp) as writer:
            # Images of a shard are read and checked in parallel, and written in order.
            for i, loaded in zip(range(lo, hi), pool.map(_load, paths[lo:hi])):
                relative = os.path.relpath(paths[i], root)
                if loaded is None:
                    skipped.append(relative)
                    continue
                data, image_format = loaded
                features = {IMAGE_KEY: _bytes(data), FORMAT_KEY: _bytes(image_format.encode()),
                            FILENAME_KEY: _bytes(relative.encode("utf-8"))}
                if labels is not None:
                    features[LABEL_KEY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[labels[i]]))
                    features[CLASS_TEXT_KEY] = _bytes(class_names[labels[i]].encode("utf-8"))
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
                examples += 1
        os.replace(tmp, os.path.join(out_dir, filename))
        files.append(filename)
        if shard + 1 == count or time.monotonic() - last_report >= _PROGRESS_SECONDS:
            last_report = time.monotonic()
            log(f"{name}: {shard + 1}/{count} shards, {hi}/{len(paths)} images read, {len(skipped)} skipped")
    if examples == 0:
        raise UsageError(os.path.join(root, name), f"none of its {len(paths)} images decode")
    return ({"num_examples": examples, "num_shards": count, "labelled": labels is not None,
             "skipped": len(skipped)}, files, skipped)


def _load(path: str) -> Optional[tuple[bytes, str]]:
    """(file bytes, "JPEG" or "PNG") when the file decodes as the reader will decode it, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    except (OSError, tf.errors.OpError, ValueError):
        return None
    if data.startswith(b"\x89PNG"):
        return data, "PNG"
    if data.startswith(b"\xff\xd8"):
        return data, "JPEG"
    return data, os.path.splitext(path)[1].lstrip(".").upper()  # another format decode_image reads (GIF, BMP)


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); returns the exit status.

    Args:
        argv: the arguments; None: `sys.argv[1:]`.
    """
    parser = argparse.ArgumentParser(prog="python -m simclr_tf.make_tfrecords",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dataset", metavar="folder:PATH", help="the image folder (the layouts of folder:PATH)")
    parser.add_argument("out_dir", metavar="OUTDIR", help="where the shards and dataset_info.json go")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shards", type=int, default=None, help="shards per split")
    size.add_argument("--images_per_shard", type=int, default=None,
                      help=f"images per shard (default {DEFAULT_IMAGES_PER_SHARD})")
    parser.add_argument("--train_split", default="train",
                        help="the split folder whose class folders number the labels")
    parser.add_argument("--splits", default=None, help="comma-separated split folders to convert (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUTDIR")
    parser.add_argument("--threads", type=int, default=None, help="images read at once (default: CPU cores)")
    args = parser.parse_args(argv)
    try:
        make_tfrecords(args.dataset, args.out_dir, shards=args.shards, images_per_shard=args.images_per_shard,
                       train_split=args.train_split, overwrite=args.overwrite, threads=args.threads,
                       splits=[s.strip() for s in args.splits.split(",")] if args.splits else None)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
