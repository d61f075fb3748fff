"""The `DataSource` every source builds, the `--dataset` names, and `build_source`, which picks the source."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Literal, Optional, Sequence, Union

import tensorflow as tf

from simclr_tf.errors import UsageError

SplitKind = Literal["train", "eval"]
# A file-order seed: a Python int, or a scalar int64 tensor (drawn per epoch inside a tf.data function).
FileSeed = Union[int, tf.Tensor]

EMBEDDED_DATASET = "mnist_5k"
DIGITS_DATASET = "digits"
# The eval splits tried, in order, when --eval_split is left at its default: the official default
# `validation`, which npz, folder and embedded sources do not have, then `test`.
DEFAULT_EVAL_SPLITS = ("validation", "test")
# An eval role request: an explicit spec, candidate split names in preference order, or None (no eval role).
EvalSplit = Union[str, Sequence[str], None]


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A labelled or unlabelled image dataset with a train and (optionally) an eval split.

    `make_dataset(split_kind, input_context)` returns the split's *records*, unbatched, unshuffled and not
    repeated, already sharded for `input_context`'s input pipeline. A record is whatever is cheap to shuffle
    and skip: for in-memory and TFDS sources the example itself, `(image uint8 [H, W, 3], label int64)`
    (`decode` None); for files a path or a serialized record, turned into an example by `decode`, a graph
    function that may fail on a corrupt file (readers then skip the record and report `describe(record)`,
    see `decoding.py`). The label is -1 where the split has none.

    `image_shape` is `(H, W, 3)` when every image of both splits is known to have that shape, else None.
    `make_file_shuffled(split_kind, input_context, seed)`, for sources stored in several files (TFDS shards,
    TFRecord shards, image files), is `make_dataset` with the files in a random order (training reads,
    `records(shuffle_files=True)`); None for the others, whose training order comes from the pipeline's
    example shuffle alone. A source made from another with `make_dataset` replaced must replace (or drop)
    this too. `eval_split` is None (and `num_eval` 0) when the source has no eval role. `class_names` names
    the labels where the data does (class folders, TFDS label names).
    """

    name: str
    train_split: str
    eval_split: Optional[str]
    num_train: int
    num_eval: int
    num_classes: int
    eval_has_labels: bool
    make_dataset: Callable[[SplitKind, Optional[tf.distribute.InputContext]], tf.data.Dataset]
    image_shape: Optional[tuple[int, int, int]] = None
    make_file_shuffled: Optional[Callable[[SplitKind, Optional[tf.distribute.InputContext], Optional[FileSeed]],
                                          tf.data.Dataset]] = None
    decode: Optional[Callable[[Any], tuple[tf.Tensor, tf.Tensor]]] = None
    describe: Optional[Callable[[Any], tf.Tensor]] = None
    class_names: Optional[tuple[str, ...]] = None

    def records(self, split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None, *,
                shuffle_files: bool = False, seed: Optional[FileSeed] = None) -> tf.data.Dataset:
        """The split's records (see the class docstring), in the source's fixed order unless `shuffle_files`.

        Args:
            split_kind: "train" or "eval".
            input_context: this input pipeline's part of the split; None: all of it.
            shuffle_files: read the files of a multi-file source in a random order (as the reference does for
                training), so that successive epochs do not walk the same files in the same order; sources
                without files to shuffle ignore it.
            seed: with `shuffle_files`, the file order: the same on every pass over the returned dataset for a
                given seed (a replayed epoch reads the files as before); None: a new order on every pass.
        """
        if split_kind == "eval" and self.eval_split is None:
            raise UsageError("--eval_split", f"{self.name} has no eval split here; name one with --eval_split")
        if shuffle_files and self.make_file_shuffled is not None:
            return self.make_file_shuffled(split_kind, input_context, seed)
        return self.make_dataset(split_kind, input_context)

    def as_dataset(self, split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None, *,
                   shuffle_files: bool = False, seed: Optional[FileSeed] = None,
                   skipped: Optional[Any] = None) -> tf.data.Dataset:
        """The split's examples `(image uint8 [H, W, 3], label int64)`; unreadable files are skipped.

        Args:
            split_kind, input_context, shuffle_files, seed: as for `records`.
            skipped: a `decoding.SkippedFiles` that counts and lists the skipped files; None: each is logged.
        """
        from simclr_tf.data.sources.decoding import decode_skipping

        records = self.records(split_kind, input_context, shuffle_files=shuffle_files, seed=seed)
        if self.decode is None:
            return records
        positions = tf.data.Dataset.counter()
        examples = decode_skipping(tf.data.Dataset.zip((records, positions)), self, skipped)
        return examples.map(lambda example, position: example)


def build_source(dataset: str, data_dir: Optional[str], train_split: str, eval_split: EvalSplit,
                 *, download: bool = False, index_dir: Optional[str] = None) -> DataSource:
    """The source named by `--dataset`.

    Args:
        dataset: a TFDS name, `folder:PATH`, `npz:PATH` or an embedded dataset's name (`EMBEDDED_DATASET`,
            `DIGITS_DATASET`), or `tfrecord:GLOB`.
        data_dir: TFDS data folder (None: TFDS's default); only TFDS names use it.
        train_split: split spec of the train role (`--train_split`), e.g. `train[:10%]`.
        eval_split: split spec of the eval role (`--eval_split`); or split names in preference order, of which
            the source takes the first it has (`DEFAULT_EVAL_SPLITS` when the flag is left at its default);
            None, or no candidate present: the source has no eval role (`eval_split` None, `num_eval` 0).
        download: let TFDS download and prepare a dataset missing from `data_dir`; by default a missing
            dataset is a `UsageError` raised before any network access.
        index_dir: a local folder where file sources keep their index (the run's model_dir): a `folder:`
            source its file listing, reused while the folder is unchanged; a `tfrecord:` source its record
            counts, reused while the shards are unchanged. None: list or count every time.
    """
    # Imported here because every source module imports DataSource from this one.
    from simclr_tf.data.sources.arrays import embedded_source, npz_source
    from simclr_tf.data.sources.folder import folder_source
    from simclr_tf.data.sources.tfds import tfds_source

    if dataset.startswith("folder:"):
        return folder_source(_path_after_prefix(dataset, "folder:"), train_split, eval_split, index_dir=index_dir)
    if dataset.startswith("tfrecord:"):
        from simclr_tf.data.sources.tfrecord import tfrecord_source

        return tfrecord_source(_path_after_prefix(dataset, "tfrecord:"), train_split, eval_split,
                               index_dir=index_dir)
    if dataset.startswith("npz:"):
        return npz_source(_path_after_prefix(dataset, "npz:"), train_split, eval_split)
    if dataset in (EMBEDDED_DATASET, DIGITS_DATASET):
        return embedded_source(dataset, train_split, eval_split)
    return tfds_source(dataset, data_dir, train_split, eval_split, download)


def _path_after_prefix(dataset: str, prefix: str) -> str:
    path = dataset[len(prefix):]
    if not path:
        raise UsageError("--dataset", f"'{prefix}' needs a path, e.g. --dataset={prefix}/data/my_images")
    return os.path.expanduser(path)


def read_shuffled(columns: Sequence[tf.Tensor], seed: Optional[FileSeed],
                  read: Callable[..., tf.data.Dataset], count: int) -> tf.data.Dataset:
    """`read(*columns)` with the rows of the (per-file) columns in a random order, the same for all columns.

    The order is drawn on every pass over the returned dataset when `seed` is None, and fixed by `seed` (a
    Python int or a scalar int64 tensor) otherwise, so that a replayed epoch reads its files as it did.

    Args:
        columns: equal-length 1-D tensors describing the files (paths, and e.g. labels or record ranges).
        seed: the order's seed, or None.
        read: columns -> the records of those files, in that order.
        count: how many records `read` yields, asserted on the result (the flat_map here hides the length,
            which the replayable training stream needs to place a resumed step).
    """
    size = tf.size(columns[0], out_type=tf.int64)
    if seed is None:
        # A new order on every pass, also under a global seed (which would make a random op inside the
        # dataset repeat its draw on every pass): tf.data's own shuffle reshuffles per iteration.
        orders = tf.data.Dataset.range(size).shuffle(size, reshuffle_each_iteration=True).batch(size)
    else:
        pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
        orders = tf.data.Dataset.from_tensors(tf.random.experimental.stateless_shuffle(tf.range(size), seed=pair))
    shuffled = orders.flat_map(lambda order: read(*(tf.gather(column, order) for column in columns)))
    return shuffled.apply(tf.data.experimental.assert_cardinality(count))


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3]."""
    if image.shape.rank == 2:
        image = image[:, :, tf.newaxis]
    if image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return image
