"""The `DataSource` every source builds, the `--dataset` names, and `build_source`, which picks the source."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Literal, Optional, Union

import tensorflow as tf

from simclr_tf.errors import UsageError

SplitKind = Literal["train", "eval"]
# A file-order seed: a Python int, or a scalar int64 tensor (drawn per epoch inside a tf.data function).
FileSeed = Union[int, tf.Tensor]

EMBEDDED_DATASET = "mnist_5k"
DIGITS_DATASET = "digits"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A labelled image dataset with a train and an eval split.

    `make_dataset(split_kind, input_context)` returns an unbatched, unshuffled, non-repeated
    `tf.data.Dataset` of `(image uint8 [H, W, 3], label int64)`; label is -1 where the split has none.
    With an `input_context` the dataset is already sharded for that input pipeline.
    `image_shape` is `(H, W, 3)` when every image of both splits has that shape, else None.
    `skipped_files` lists the folder-source files that could not be decoded and were left out.
    `make_file_shuffled(split_kind, input_context, seed)`, for sources stored in several files (TFDS), is
    `make_dataset` with the files read in a random order (training reads, `as_dataset(shuffle_files=True)`);
    None for the others, whose training order comes from the pipeline's example shuffle alone. A source made
    from another with `make_dataset` replaced must replace (or drop) this too.
    """

    name: str
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    num_classes: int
    eval_has_labels: bool
    make_dataset: Callable[[SplitKind, Optional[tf.distribute.InputContext]], tf.data.Dataset]
    image_shape: Optional[tuple[int, int, int]] = None
    skipped_files: tuple[str, ...] = ()
    make_file_shuffled: Optional[Callable[[SplitKind, Optional[tf.distribute.InputContext], Optional[FileSeed]],
                                          tf.data.Dataset]] = None

    def as_dataset(self, split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None, *,
                   shuffle_files: bool = False, seed: Optional[FileSeed] = None) -> tf.data.Dataset:
        """The split's examples, in the source's fixed order unless `shuffle_files`.

        Args:
            split_kind: "train" or "eval".
            input_context: this input pipeline's part of the split; None: all of it.
            shuffle_files: read the files of a multi-file source in a random order (as the reference does for
                training), so that successive epochs do not walk the same files in the same order; sources
                without files to shuffle ignore it.
            seed: with `shuffle_files`, the file order: the same on every pass over the returned dataset for a
                given seed (a replayed epoch reads the files as before); None: a new order on every pass.
        """
        if shuffle_files and self.make_file_shuffled is not None:
            return self.make_file_shuffled(split_kind, input_context, seed)
        return self.make_dataset(split_kind, input_context)


def build_source(dataset: str, data_dir: Optional[str], train_split: str, eval_split: str,
                 *, download: bool = False) -> DataSource:
    """The source named by `--dataset`.

    Args:
        dataset: a TFDS name, `folder:PATH`, `npz:PATH` or an embedded dataset's name (`EMBEDDED_DATASET`,
            `DIGITS_DATASET`).
        data_dir: TFDS data folder (None: TFDS's default); only TFDS names use it.
        train_split: split spec of the train role (`--train_split`), e.g. `train[:10%]`.
        eval_split: split spec of the eval role (`--eval_split`).
        download: let TFDS download and prepare a dataset missing from `data_dir`; by default a missing
            dataset is a `UsageError` raised before any network access.
    """
    # Imported here because every source module imports DataSource from this one.
    from simclr_tf.data.sources.arrays import embedded_source, npz_source
    from simclr_tf.data.sources.folder import folder_source
    from simclr_tf.data.sources.tfds import tfds_source

    if dataset.startswith("folder:"):
        return folder_source(_path_after_prefix(dataset, "folder:"), train_split, eval_split)
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


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3]."""
    if image.shape.rank == 2:
        image = image[:, :, tf.newaxis]
    if image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return image
