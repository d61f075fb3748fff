"""The paper's augmentation as public tf.data functions, for `fit()` (see models/contrastive.py).

`pretraining_dataset` is the CLI's pretraining input pipeline (the same crops, colour jitter, grayscale and
blur programs, seeded streams, file sources decoded when read) behind one call; `eval_dataset` is its
centre-crop evaluation pipeline. Both feed any Keras backend: tf.data yields tensors that Keras converts.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource, build_source
from simclr_tf.data.sources.arrays import Arrays, in_memory_source
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

# Images (optionally with labels), a DataSource, or a --dataset string (folder:PATH, tfrecord:GLOB, npz:PATH,
# a TFDS name, an embedded dataset).
Data = Union[np.ndarray, Tuple[np.ndarray, Optional[np.ndarray]], DataSource, str]


def as_source(data: Data, *, eval_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
              name: str = "arrays") -> DataSource:
    """A DataSource over `data` (its train split; `eval_data` arrays become its eval split).

    Args:
        data: uint8 images [N, H, W(, C)] (unlabelled), an (images, labels) pair (labels -1 where unknown),
            a DataSource (returned as is), or a `--dataset` string read with its `train` split (and `test` /
            `validation` for evaluation when present).
        eval_data: (images, labels) of a held-out split, for arrays.
        name: the name in messages.
    """
    if isinstance(data, DataSource):
        return data
    if isinstance(data, str):
        return build_source(data, None, "train", ("validation", "test"))
    images, labels = data if isinstance(data, tuple) else (data, None)
    images = np.asarray(images)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise UsageError("data", f"images must be a non-empty [N, H, W] or [N, H, W, C] array, got shape "
                                 f"{images.shape}")
    labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (len(images),):
        raise UsageError("data", f"{len(images)} images but labels of shape {labels.shape}")
    splits = {"train": Arrays(images, labels)}
    if eval_data is not None:
        splits["test"] = Arrays(np.asarray(eval_data[0]), np.asarray(eval_data[1], np.int64))
    # in_memory_source counts the classes from the largest label (0 classes when every label is -1).
    return in_memory_source(name, splits, "train", "test" if eval_data is not None else None)


def pretraining_dataset(data: Data, *, image_size: int, batch_size: int, seed: Optional[int] = None,
                        color_jitter_strength: float = 1.0, use_blur: bool = True, brightness: str = "v2",
                        cache: bool = False) -> tf.data.Dataset:
    """Endless stream of `(view pairs float32 [batch_size, S, S, 6] in [0, 1], labels int64 [batch_size])`.

    The two views of each image are on the channel axis (`SimCLR` splits them). The stream never ends: pass
    `steps_per_epoch` to `fit()` (e.g. `len(images) // batch_size`); Keras then keeps one iterator across
    epochs, so every epoch sees new images and views. With a `seed` the whole stream (order and views) is a
    function of the seed.

    Args:
        data: images, (images, labels), a DataSource or a `--dataset` string (see `as_source`).
        image_size: S, the side of the square views.
        batch_size: the global batch (Keras splits it across a strategy's replicas).
        seed: None: nondeterministic.
        color_jitter_strength, use_blur, brightness: the augmentation (see sections.AugmentConfig).
        cache: keep decoded examples in memory (file sources).
    """
    source = as_source(data)
    if batch_size < 2:
        raise UsageError("batch_size", f"must be >= 2 (NT-Xent needs negatives), got {batch_size}")
    augment = AugmentConfig(image_size, color_jitter_strength=color_jitter_strength, use_blur=use_blur,
                            brightness=brightness)
    input_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=batch_size, augment=augment,
                                       cache_dataset=cache, seed=seed)
    return input_fn(None)


def eval_dataset(data: Data, *, image_size: int, batch_size: int, split: str = "train") -> tf.data.Dataset:
    """`(centre crops float32 [b, S, S, 3], labels)` over one split once (the last batch may be smaller).

    Args:
        data: as for `pretraining_dataset`.
        image_size: S.
        batch_size: rows per batch.
        split: "train" or "eval" (the source's eval split).
    """
    from simclr_tf.features import eval_input_fn

    return eval_input_fn(as_source(data), split, image_size=image_size, batch_size=batch_size)(None)


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Full batches in one pass over `data`'s train split: the `steps_per_epoch` to give `fit()`."""
    return max(1, as_source(data).num_train // batch_size)

