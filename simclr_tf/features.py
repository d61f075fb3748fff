"""Representations h of a whole split: the model in inference mode over the eval (centre-crop) view.

Shared by the kNN monitor, cached-feature linear evaluation and `predict --embed_out`. Every example of the
split is seen exactly once (the eval pipeline keeps the last partial batch); with several replicas the rows
come back grouped by replica, and labels stay aligned with their rows.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource
from simclr_tf.sections import AugmentConfig

FEATURE_KEY = "h"


def train_split_as_eval(source: DataSource) -> DataSource:
    """The same source with its train split in the eval role, so the eval pipeline reads the train split."""
    return dataclasses.replace(
        source, eval_split=source.train_split, num_eval=source.num_train, eval_has_labels=source.num_classes > 0,
        make_dataset=lambda split_kind, input_context=None: source.make_dataset("train", input_context))


def eval_input_fn(source: DataSource, split_kind: str, *, image_size: int, batch_size: int):
    """The eval pipeline's input function (centre crop, remainder kept) over `split_kind` ('train' or 'eval')."""
    if split_kind not in ("train", "eval"):
        raise ValueError(f"split_kind must be 'train' or 'eval', got {split_kind!r}")
    if split_kind == "train":
        source = train_split_as_eval(source)
    # The eval view is a centre crop: of the augmentation settings only the size applies.
    return pipeline.build_input_fn(source, mode="eval", global_batch_size=batch_size,
                                   augment=AugmentConfig(image_size))


def call_inference(model, images: tf.Tensor) -> dict:
    """`model(images, training=False)`, also for an empty batch.

    With several replicas the last eval round can leave a replica an empty batch, and TF's CPU convolution
    mishandles a batch of 0 (it returns the input unchanged, so the next BN fails on the channel count). The
    batch is padded to one row and the outputs cut back to the real rows.
    """
    n = tf.shape(images)[0]
    pad = tf.zeros(tf.concat([[tf.maximum(1 - n, 0)], tf.shape(images)[1:]], axis=0), images.dtype)
    outputs = model(tf.concat([images, pad], axis=0), training=False)
    return {k: v[:n] if isinstance(v, tf.Tensor) else [t[:n] for t in v] for k, v in outputs.items()}


def extract_features(model, source: DataSource, split_kind: str, *, image_size: int, batch_size: int,
                     strategy: Optional[tf.distribute.Strategy] = None,
                     output_key: str = FEATURE_KEY) -> Tuple[np.ndarray, np.ndarray]:
    """`(h float32 [N, d], labels int64 [N])` over every example of the split (labels -1 where absent)."""
    strategy = strategy or tf.distribute.get_strategy()
    input_fn = eval_input_fn(source, split_kind, image_size=image_size, batch_size=batch_size)
    dataset = strategy.distribute_datasets_from_function(input_fn)
    step = _step_function(model, strategy, output_key)
    features, labels = [], []
    for batch in dataset:
        h, y = step(batch)
        for h_part, y_part in zip(strategy.experimental_local_results(h), strategy.experimental_local_results(y)):
            features.append(h_part.numpy())
            labels.append(y_part.numpy())
    if not features:
        return np.zeros([0, 0], np.float32), np.zeros([0], np.int64)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)


# One traced function per (model, strategy, output): the kNN monitor calls extract_features repeatedly.
_STEP_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _step_function(model, strategy: tf.distribute.Strategy, output_key: str):
    per_model = _STEP_CACHE.setdefault(model, {})
    cached = per_model.get((id(strategy), output_key))
    if cached is not None and cached[0]() is strategy:
        return cached[1]

    model_ref = weakref.ref(model)  # a strong reference here would keep the cache key alive forever

    def replica_step(images, labels):
        h = tf.cast(call_inference(model_ref(), images)[output_key], tf.float32)
        return h, tf.cast(labels, tf.int64)

    @tf.function(reduce_retracing=True)
    def step(batch):
        return strategy.run(replica_step, args=batch)

    per_model[(id(strategy), output_key)] = (weakref.ref(strategy), step)
    return step
