"""The `folder:PATH` source: image files, labelled by class folders or unlabelled, listed fast, decoded when read.

Layouts:

* `PATH/<split>/<class>/*.jpg`: split folders holding class folders (ImageNet's layout): labelled.
* `PATH/<split>/...`: a split folder holding images directly or in any nesting of folders other than exactly
  one level of class folders: unlabelled (label -1), for pretraining.
* `PATH/...` without split folders (none named by `--train_split`, nor a usual split name): `PATH` itself is the
  one split, `train`, labelled or unlabelled by the same rule. `photos/**/*.jpg` pretrains as it is.

Start-up lists files and decodes nothing: directories are walked in parallel (`os.scandir` in threads), and with
an `index_dir` the listing is kept in an index file there, reused while every listed directory keeps its
modification time (adding, removing or renaming a file changes its directory's). Files are decoded in the
tf.data graph when read; the ones that fail are skipped and reported then (`decoding.py`), after a check at
build time that each split has at least one readable image.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data.sources.base import DataSource, EvalSplit, FileSeed, SplitKind, read_shuffled
from simclr_tf.data.sources.splits import SPLIT_FLAG, names_are_splits, resolve_split, role_names, spec_names
from simclr_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The split PATH itself becomes when it has no split folders.
_WHOLE_FOLDER_SPLIT = "train"
_INDEX_VERSION = "simclr_tf folder index v1"
_WALK_THREADS = 16


def folder_source(root: str, train_split: str, eval_split: EvalSplit, *,
                  index_dir: Optional[str] = None) -> DataSource:
    """The source over an image folder (see the module docstring for layouts).

    Args:
        root: the image folder.
        train_split: spec of the train role.
        eval_split: the eval role (see `build_source`).
        index_dir: a local folder where the file index is kept and reused (the run's model_dir); None: none.
    """
    if not os.path.isdir(root):
        raise UsageError("--dataset", f"folder {root} does not exist (expected PATH/<split>/<class>/*.jpg|png, "
                                      f"or images in any folders under PATH)")
    root = os.path.abspath(root)
    files = _listing(root, index_dir)
    top_dirs = sorted({f.split("/", 1)[0] for f in files if "/" in f} | set(_subdirs(root)))
    train_names = spec_names(train_split, "--train_split")
    if names_are_splits(top_dirs, train_names):
        splits = {name: [f for f in files if f.startswith(name + "/")] for name in top_dirs}
        prefix = {name: name + "/" for name in top_dirs}
    else:  # PATH itself is the one split
        splits = {_WHOLE_FOLDER_SPLIT: files}
        prefix = {_WHOLE_FOLDER_SPLIT: ""}
    eval_split, names = role_names(train_split, eval_split, splits)

    # Class folders: the train split's, when it is labelled; the eval split must use the same names.
    layouts = {name: _classes_of([f[len(prefix[name]):] for f in splits[name]]) for name in splits}
    train_classes = [layouts[name] for name in names["train"]]
    classes = sorted(set().union(*train_classes)) if all(c is not None for c in train_classes) else []
    labelled = {}
    for name in set(names["train"]) | set(names.get("eval", ())):
        found = layouts[name]
        labelled[name] = bool(classes) and found is not None
        if labelled[name] and set(found) - set(classes):
            flag = SPLIT_FLAG["eval" if name in names.get("eval", ()) else "train"]
            raise UsageError(flag, f"{os.path.join(root, name)} has class folders not in the train split: "
                                   f"{', '.join(sorted(set(found) - set(classes))[:5])}")
    label_of = {c: i for i, c in enumerate(classes)}

    ordered = {}
    for name in labelled:
        listed = splits[name]
        if not listed:
            kind = "eval" if name in names.get("eval", ()) and name not in names["train"] else "train"
            raise UsageError(SPLIT_FLAG[kind], f"{os.path.join(root, prefix[name])} holds no readable "
                                               f"{'/'.join(IMAGE_EXTENSIONS)} images")
        # Fixed pseudo-random order so that slices like train[:10%] hold every class.
        listed = [listed[i] for i in np.random.default_rng(0).permutation(len(listed))]
        labels = ([label_of[f[len(prefix[name]):].split("/", 1)[0]] for f in listed] if labelled[name]
                  else [-1] * len(listed))
        ordered[name] = ([os.path.join(root, f) for f in listed], labels)

    selected = {}
    for kind, spec in (("train", train_split), ("eval", eval_split)):
        if spec is None:
            continue
        paths, labels = [], []
        for piece in resolve_split(spec, {n: len(v[0]) for n, v in ordered.items()}, SPLIT_FLAG[kind]):
            split_paths, split_labels = ordered[piece.split]
            paths += split_paths[piece.start:piece.stop]
            labels += split_labels[piece.start:piece.stop]
        _check_readable(paths, SPLIT_FLAG[kind], os.path.join(root, spec))
        selected[kind] = (paths, labels, all(labelled[n] for n in names[kind]))

    parts: dict = {}

    def pipeline_part(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext]
                      ) -> tuple[tf.Tensor, tf.Tensor]:
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        first = input_context.input_pipeline_id if input_context is not None else 0
        key = (split_kind, pipelines, first)
        if key not in parts:
            paths, labels, _ = selected[split_kind]
            # Sharded as a Python list, before any tensor exists: each pipeline holds and reads only its files.
            paths, labels = paths[first::pipelines], labels[first::pipelines]
            # Made eagerly even when first asked for inside a tf.data function (a reshuffled epoch), so the
            # function captures the tensors instead of embedding a million paths in its graph.
            with tf.init_scope():
                parts[key] = (tf.constant(paths, tf.string), tf.constant(labels, tf.int64))
        return parts[key]

    def make_dataset(split_kind: SplitKind,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(pipeline_part(split_kind, input_context))

    def make_file_shuffled(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None,
                           seed: Optional[FileSeed] = None) -> tf.data.Dataset:
        # Every image is a file: a whole-epoch permutation of the (cheap) paths, before anything is read.
        paths, labels = pipeline_part(split_kind, input_context)
        return read_shuffled((paths, labels), seed, lambda *columns: tf.data.Dataset.from_tensor_slices(columns),
                             int(paths.shape[0]))

    unlabelled_train = not selected["train"][2]
    if unlabelled_train:
        logging.info("folder:%s: the train split has no class folders; its images are unlabelled (-1)", root)
    return DataSource(
        name=f"folder:{root}", train_split=train_split, eval_split=eval_split,
        num_train=len(selected["train"][0]), num_eval=len(selected["eval"][0]) if "eval" in selected else 0,
        num_classes=len(classes), eval_has_labels="eval" in selected and selected["eval"][2],
        make_dataset=make_dataset, make_file_shuffled=make_file_shuffled, decode=decode_image_file,
        describe=lambda record: record[0], class_names=tuple(classes) or None)


def decode_image_file(record: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """`(path, label)` -> `(image uint8 [H, W, 3], label)`; fails on a missing, corrupt or non-image file."""
    path, label = record
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _classes_of(relative: Iterable[str]) -> Optional[list[str]]:
    """The class folders when every file sits exactly one folder deep, else None (unlabelled)."""
    classes = set()
    for f in relative:
        parts = f.split("/")
        if len(parts) != 2:
            return None
        classes.add(parts[0])
    return sorted(classes) or None


def _check_readable(paths: Sequence[str], flag: str, where: str) -> None:
    """One clear error when a split has no readable image; decodes files until one works (usually the first)."""
    for path in paths:
        try:
            decode_image_file((tf.constant(path), tf.constant(0, tf.int64)))
            return
        except (tf.errors.OpError, ValueError):
            continue
    raise UsageError(flag, f"{where} holds no readable image: all {len(paths)} "
                           f"{'/'.join(IMAGE_EXTENSIONS)} files fail to decode")


# ---------------------------------------------------------------------------------------------------------------
# Listing: a parallel walk, and the index file that saves it on the next start


def _listing(root: str, index_dir: Optional[str]) -> list[str]:
    """Sorted image paths relative to `root` ('/'-separated), from the index file when it is still valid."""
    index_path = _index_path(root, index_dir)
    if index_path is not None:
        files = _read_index(index_path, root)
        if files is not None:
            return files
    files, dirs = _walk(root)
    if index_path is not None:
        _write_index(index_path, root, files, dirs)
    return files


def _walk(root: str) -> tuple[list[str], dict[str, int]]:
    """(image files, {directory: mtime_ns}) under `root`, relative; each level's directories scanned in threads."""
    files: list[str] = []
    dirs: dict[str, int] = {}
    seen = {os.path.realpath(root)}
    level = [""]
    with concurrent.futures.ThreadPoolExecutor(_WALK_THREADS) as pool:  # scandir releases the GIL
        while level:
            following = []
            for rel, (mtime, found, subdirs) in zip(level, pool.map(lambda r: _scan(root, r), level)):
                dirs[rel] = mtime
                files += found
                for sub in subdirs:  # symlinked folders are followed once (a link loop ends here)
                    real = os.path.realpath(os.path.join(root, sub))
                    if real not in seen:
                        seen.add(real)
                        following.append(sub)
            level = following
    return sorted(files), dirs


def _scan(root: str, rel: str) -> tuple[int, list[str], list[str]]:
    path = os.path.join(root, rel) if rel else root
    found, subdirs = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints, ...)
            if entry.is_dir():
                subdirs.append(name)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                found.append(name)
    return os.stat(path).st_mtime_ns, found, subdirs


def _index_path(root: str, index_dir: Optional[str]) -> Optional[str]:
    if not index_dir or "://" in index_dir:
        return None  # remote model_dirs (gs://...) get no index; listing a local folder is fast anyway
    digest = hashlib.sha1(root.encode("utf-8")).hexdigest()[:16]
    return os.path.join(index_dir, f"folder_index-{digest}.tsv")


def _read_index(path: str, root: str) -> Optional[list[str]]:
    """The indexed files, or None when the index is missing, foreign, damaged or out of date."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.readline().rstrip("\n") != f"{_INDEX_VERSION}\t{root}":
                return None
            files = []
            for line in f:
                kind, _, rest = line.rstrip("\n").partition("\t")
                if kind == "D":
                    mtime, _, rel = rest.partition("\t")
                    if os.stat(os.path.join(root, rel) if rel else root).st_mtime_ns != int(mtime):
                        return None
                elif kind == "F":
                    files.append(rest)
                elif kind == "END":
                    return files
    except (OSError, ValueError):
        pass
    return None  # no END line: a partial file (should not happen with the atomic write) is not trusted


def _write_index(path: str, root: str, files: Sequence[str], dirs: dict[str, int]) -> None:
    """Writes the index atomically (a temporary file renamed over it); a failure only costs the next start."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".folder_index-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{_INDEX_VERSION}\t{root}\n")
            f.writelines(f"D\t{mtime}\t{rel}\n" for rel, mtime in sorted(dirs.items()))
            f.writelines(f"F\t{rel}\n" for rel in files)
            f.write("END\n")
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not write the folder index %s (%s); the folder will be listed again next time",
                        path, e)
