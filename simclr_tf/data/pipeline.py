"""tf.data input functions per mode (docs/design.md §1), for `strategy.distribute_datasets_from_function`.

Train modes: [cache] -> shuffle -> repeat -> per-element map (crop + bicubic resize: stage 1, ops.py) ->
batch(drop_remainder) -> per-batch map (flip, colour, blur: stage 2, augment.py, XLA-compiled) -> prefetch; from
EXAMPLE_PROGRAM_MIN_SIZE px up, stage 2 runs per example at the end of the per-element map instead.
Eval: [cache] -> centre crop -> batch keeping the remainder -> prefetch, no repeat.

Every random choice is keyed by a per-element seed from `Dataset.random`, so with `seed` set the same input
pipeline yields the same batches regardless of map parallelism; input pipelines fold their id into the seed so
their views are independent.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Literal, Optional

import tensorflow as tf

from simclr_tf.data import augment as augment_lib
from simclr_tf.data import ops
from simclr_tf.data.sources import DataSource, SplitKind
from simclr_tf.data.sources.decoding import SkippedImages, decode_skipping
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

Mode = Literal["pretrain", "finetune", "distill", "eval"]
MODES = ("pretrain", "finetune", "distill", "eval")
InputFn = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]

_AUTOTUNE = tf.data.AUTOTUNE
# From this view size up, stage 2 runs as one XLA program per example inside the per-example map; below it,
# as one program per batch. Per example, every image is indexed statically (the batch program's map_fn
# indexes dynamically, which compiles to slower loops) but each call has a fixed launch cost, which small
# views cannot amortise. Measured with bench/augment.py on 2 cores: per batch wins up to 128 px, the two
# tie at 160 px, per example is about 12% faster at 224 px.
EXAMPLE_PROGRAM_MIN_SIZE = 192
# Keeps the seeds of different input pipelines apart (a prime above any realistic pipeline count).
_PIPELINE_SEED_STRIDE = 1_000_003


def shuffle_buffer_size(per_replica_batch: int, image_size: int) -> int:
    """Examples in the training shuffle buffer: 50 batches for small (CIFAR-sized) images, 10 above.

    Args:
        per_replica_batch: the batch of one input pipeline.
        image_size: side of the views.
    """
    return per_replica_batch * (50 if image_size <= 32 else 10)


def replicas_fed(ctx: tf.distribute.InputContext) -> int:
    """How many replicas one input pipeline feeds: each training step takes that many of its batches.

    Args:
        ctx: the pipeline's input context.
    """
    return max(1, ctx.num_replicas_in_sync // ctx.num_input_pipelines)


def _check_args(mode: str, global_batch_size: int, seed: Optional[int]) -> None:
    if mode not in MODES:
        raise UsageError("--train_mode", f"must be one of {MODES}, got {mode!r}")
    batch_flag = "--eval_batch_size" if mode == "eval" else "--train_batch_size"
    if global_batch_size <= 0:
        raise UsageError(batch_flag, f"must be positive, got {global_batch_size}")
    # None = nondeterministic.
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise UsageError("--seed", f"must be a non-negative integer, got {seed!r}")


def _per_replica_batch(ctx: tf.distribute.InputContext, global_batch_size: int, mode: str) -> int:
    try:
        return ctx.get_per_replica_batch_size(global_batch_size)
    except ValueError:
        flag = "--eval_batch_size" if mode == "eval" else "--train_batch_size"
        raise UsageError(flag, f"{global_batch_size} is not divisible by the "
                               f"{ctx.num_replicas_in_sync} replicas in sync") from None


def build_input_fn(source: DataSource, *, mode: Mode, global_batch_size: int, augment: AugmentConfig,
                   cache_dataset: bool = False, seed: Optional[int] = None,
                   drop_remainder: Optional[bool] = None, start_step: int = 0,
                   skipped: Optional[SkippedImages] = None) -> InputFn:
    """Input function for `mode`; call it with the `InputContext` of `distribute_datasets_from_function`.

    Pretrain yields `(float32 [b, S, S, 6], labels)` (two independent views on the channel axis);
    finetune/distill `([b, S, S, 3], labels)` with crop + flip; eval `([b, S, S, 3], labels)` centre crop, every
    example once. `b` is the per-replica batch. `use_blur` applies to pretraining only, as in the reference.
    `drop_remainder` defaults to True for training and False for eval.

    With a `seed`, training batches are a pure function of (seed, step): `start_step` resumes the stream
    exactly where a run that started at step 0 would be (see `_replayable_stream`).

    Args:
        source: the data; training reads its train split, eval its eval split.
        mode: "pretrain", "finetune", "distill" or "eval".
        global_batch_size: batch over all replicas (`--train_batch_size` or `--eval_batch_size`).
        augment: view size S and the augmentation settings (eval uses only the size).
        cache_dataset: cache the source's (undecoded, unaugmented) examples in memory.
        seed: None: nondeterministic; else training batches depend only on (seed, step).
        drop_remainder: None: True for training, False for eval.
        start_step: with a seed, the step whose batch comes first.
        skipped: where training counts and lists the files it could not decode (and a resumed run finds how
            many it skipped before `start_step`); None: they are only logged.
    """
    _check_args(mode, global_batch_size, seed)
    image_size = augment.image_size
    training = mode != "eval"
    drop = training if drop_remainder is None else bool(drop_remainder)
    pretrain = mode == "pretrain"
    # Fine-tune and distill views are crop + flip only: no colour distortion and no blur.
    stage2_settings = augment if pretrain else dataclasses.replace(augment, use_blur=False)

    per_example = image_size >= EXAMPLE_PROGRAM_MIN_SIZE

    @functools.lru_cache(maxsize=None)
    def augmenter(input_scale: float) -> Callable:
        # One per source value range (in practice one), shared by all input pipelines so XLA compiles once.
        if per_example:
            return augment_lib.make_example_augmenter(stage2_settings, color=pretrain, input_scale=input_scale)
        return augment_lib.make_batch_augmenter(stage2_settings, color=pretrain, pairs=pretrain,
                                                input_scale=input_scale)

    def input_fn(input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        ctx = input_context or tf.distribute.InputContext()
        per_replica = _per_replica_batch(ctx, global_batch_size, mode)
        pipeline_seed = None if seed is None else seed * _PIPELINE_SEED_STRIDE + ctx.input_pipeline_id
        if not training:
            dataset = source.as_dataset("eval", ctx)
            if cache_dataset:
                dataset = dataset.cache()
            dataset = dataset.map(lambda image, label: (augment_lib.eval_view(image, image_size), label),
                                  num_parallel_calls=_AUTOTUNE)
            return dataset.batch(per_replica, drop_remainder=drop).prefetch(_AUTOTUNE)

        # Training reads the files of a multi-file source (TFDS, TFRecord shards, image files) in a shuffled
        # order, as the reference does, so that epochs do not walk the files in one order and meet the same
        # neighbours in the shuffle buffer.
        pipeline_skipped = (skipped or SkippedImages()).pipeline(ctx.input_pipeline_id)
        # A source of file records is shuffled and skipped as records (cheap) and decoded after; with a cache,
        # the decoded examples are what is kept, so they are decoded first.
        decode_late = source.decode is not None and not cache_dataset
        if decode_late:
            dataset = source.records("train", ctx, shuffle_files=True, seed=pipeline_seed)
        else:
            dataset = source.as_dataset("train", ctx, shuffle_files=True, seed=pipeline_seed,
                                        skipped=pipeline_skipped)
            if cache_dataset:
                dataset = dataset.cache()

        buffer = shuffle_buffer_size(per_replica, image_size)
        if seed is None:
            start = 0
            dataset = dataset.shuffle(buffer).repeat()
            dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        else:
            # Each step takes a batch for every replica this pipeline feeds (several when one host drives
            # several devices), so that is how far `start_step` steps moved the stream.
            start = start_step * per_replica * replicas_fed(ctx)
            if decode_late:  # records skipped before the resumed step (listed by the earlier run) count too
                start = pipeline_skipped.record_position(start)
            # Each epoch re-reads a multi-file source with a file order of its own; a cache is filled once, so
            # its file order is the one above for every epoch.
            reread = (None if source.make_file_shuffled is None or cache_dataset else
                      lambda files_seed: source.records("train", ctx, shuffle_files=True, seed=files_seed))
            dataset = _replayable_stream(dataset, buffer, pipeline_seed, start_element=start, reread=reread)
        if decode_late:
            dataset = decode_skipping(dataset, source, pipeline_skipped, first_position=start)
        if seed is None:
            dataset = tf.data.Dataset.zip((dataset.map(lambda example, position: example),
                                           tf.data.Dataset.random()))
        else:
            dataset = dataset.map(lambda example, position: (example, _position_key(pipeline_seed, position)))

        # Stage 1 leaves views in the source's value range; stage 2 rescales them in its first fused pass.
        stage2 = augmenter(ops.input_scale(dataset.element_spec[0][0].dtype))

        def per_element(example: tuple, key: tf.Tensor) -> tuple:
            image, label = example
            seeds = tf.random.experimental.stateless_split(tf.stack([key, tf.constant(0, tf.int64)]), 3)
            views = [ops.random_crop_resize(image, image_size, seeds[0], rescale=False)]
            if pretrain:
                views.append(ops.random_crop_resize(image, image_size, seeds[1], rescale=False))
            if per_example:  # [S, S, 3] or the two-view [S, S, 6], drawn from the example's own seed
                return stage2(views, seeds[2]), label
            return tuple(views) + (label, seeds[2])

        def per_batch(*batch: tf.Tensor) -> tuple:
            *views, labels, seeds = batch
            # One seed per batch drives all its per-image draws (sample_params). For pretraining the
            # augmenter returns the [b, S, S, 6] two-view layout itself (interleaved inside its XLA program).
            return stage2(views, seeds[0]), labels

        dataset = dataset.map(per_element, num_parallel_calls=_AUTOTUNE)
        dataset = dataset.batch(per_replica, drop_remainder=drop)
        if not per_example:
            # Each batch is one long single-threaded XLA program: run as many at once as there are cores (the
            # autotuner, tuned for short per-element maps, tends to leave this map at one call in flight).
            dataset = dataset.map(per_batch, num_parallel_calls=max(2, os.cpu_count() or 1))
        return dataset.prefetch(_AUTOTUNE)

    return input_fn


def _replayable_stream(dataset: tf.data.Dataset, buffer: int, seed: int, start_element: int,
                       reread: Optional[Callable[[tf.Tensor], tf.data.Dataset]] = None) -> tf.data.Dataset:
    """(element, position) pairs whose order depends only on (seed, position in the stream).

    Epoch e is shuffled with its own seed and the same order every time, and each element's random key is
    derived from its position in the stream (`_position_key`), so a resumed run skips into the current epoch
    and continues with exactly the batches (and augmentations) the uninterrupted run would have drawn. Resuming
    re-reads at most one epoch of elements: file records (paths) for file sources, nothing decoded. With `reread` (files seed -> the same examples as
    `dataset`, files in that seed's order), epoch e reads its examples through it with a files seed drawn from
    (seed, e), so the file order too changes per epoch and is the same whenever the epoch is replayed.
    """
    size = int(dataset.cardinality())
    if size <= 0:  # unknown or infinite length: fall back to a fresh stream seeded by the position
        stream = dataset.shuffle(buffer, seed=seed + start_element).repeat()
    else:
        first_epoch, offset = divmod(start_element, size)
        epochs = tf.data.Dataset.range(first_epoch, tf.int64.max)
        stream = epochs.flat_map(lambda e: _epoch(dataset, buffer, seed, e, reread)).skip(offset)
    return tf.data.Dataset.zip((stream, tf.data.Dataset.counter(start=start_element)))


def _position_key(seed: int, position: tf.Tensor) -> tf.Tensor:
    """The random key of the element at `position` of a seeded stream; it seeds all of that element's views."""
    return tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), position]), minval=None,
                                       dtype=tf.int64)


_EPOCH_GRAPH_SEED = 20200213  # any non-zero constant


def _epoch(dataset: tf.data.Dataset, buffer: int, seed: int, epoch: tf.Tensor,
           reread: Optional[Callable[[tf.Tensor], tf.data.Dataset]] = None) -> tf.data.Dataset:
    """One pass over `dataset` (read through `reread`, files in this epoch's order, if given) in the order
    fixed by (seed, epoch)."""
    epoch_seed = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
                                             minval=None, dtype=tf.int64)
    # tf.data pairs a tensor op seed with the graph seed and then compares the pair with (0, 0) in Python,
    # which fails for a graph seed of 0 (tf.random.set_seed(0)). The order must depend on `seed` only, so
    # this function graph gets a fixed graph seed of its own.
    graph = tf.compat.v1.get_default_graph()
    if not tf.executing_eagerly():
        graph.seed = _EPOCH_GRAPH_SEED
    if reread is not None:  # after the graph seed: the file shuffle is seeded by a tensor too
        # A key apart from the example shuffle's, so the two shuffles draw independent numbers.
        files_seed = tf.random.stateless_uniform([], seed=tf.stack([epoch_seed, tf.constant(1, tf.int64)]),
                                                 minval=None, dtype=tf.int64)
        dataset = reread(files_seed)
    return dataset.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)


def view_sample(source: DataSource, augment: AugmentConfig, n: int, seed: Optional[int] = None) -> tf.Tensor:
    """The pretraining view pairs `float32 [n, S, S, 6]` of the first `n` training examples, for a look at what
    the model sees.

    They go through the training pipeline itself, but restricted to those `n` examples (read once and cached)
    with a batch of `n`, so time and memory do not depend on the training batch or its shuffle buffer.

    Args:
        source: the data; its train split's first examples, in the source's fixed order, are drawn.
        augment: view size and augmentation settings of pretraining.
        n: how many examples (repeated when the train split has fewer).
        seed: seed of the views; None: nondeterministic.
    """
    def make_dataset(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None
                     ) -> tf.data.Dataset:
        return source.as_dataset("train").take(n)

    sample = DataSource(name=source.name, train_split=source.train_split, eval_split=source.train_split,
                        num_train=min(n, source.num_train), num_eval=0, num_classes=source.num_classes,
                        eval_has_labels=False, make_dataset=make_dataset)
    input_fn = build_input_fn(sample, mode="pretrain", global_batch_size=n, augment=augment, cache_dataset=True,
                              seed=seed)
    for images, _ in input_fn(None).take(1):
        return images
    raise ValueError(f"view_sample: the train split of {source.name} has no examples")


def view_grid(images: tf.Tensor, n: int) -> tf.Tensor:
    """A `[1, n*S, k*S, 3]` float32 grid for `tf.summary.image`: row i holds example i's views side by side
    (k = 2 for pretraining's 6-channel input, 1 for 3-channel input)."""
    images = tf.convert_to_tensor(images)
    channels = images.shape[-1]
    if channels is None or channels % 3:
        raise ValueError(f"view_grid: expected 3 or 6 channels, got shape {images.shape}")
    images = tf.cast(images[:n], tf.float32)
    views = tf.split(images, channels // 3, axis=-1)
    rows = tf.concat(views, axis=2)                       # [n, S, k*S, 3]
    grid = tf.reshape(rows, [-1, tf.shape(rows)[2], 3])   # [n*S, k*S, 3]
    return tf.clip_by_value(grid, 0.0, 1.0)[tf.newaxis]
