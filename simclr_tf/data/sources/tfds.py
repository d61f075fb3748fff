"""TFDS sources: datasets already prepared in `--data_dir`, read through their builder, never downloaded
implicitly (on a machine without network TFDS retries for a long time before failing)."""
from __future__ import annotations

import os
from typing import Optional

import tensorflow as tf

from simclr_tf.data.sources.base import (DIGITS_DATASET, EMBEDDED_DATASET, DataSource, EvalSplit, FileSeed,
                                         SplitKind, to_rgb)
from simclr_tf.data.sources.splits import SPLIT_FLAG, choose_eval_split, resolve_split
from simclr_tf.errors import UsageError, first_line


def tfds_source(name: str, data_dir: Optional[str], train_split: str, eval_split: EvalSplit,
                download: bool) -> DataSource:
    """The source over TFDS dataset `name`; counts and classes come from the builder's info.

    Args:
        name: TFDS name, optionally with config and version (`cifar10:3.0.2`, `name/config`).
        data_dir: TFDS data folder (None: TFDS's default).
        train_split: spec of the train role.
        eval_split: the eval role (see `build_source`).
        download: download and prepare the dataset when it is not prepared; otherwise that is a `UsageError`.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = f"{EMBEDDED_DATASET}, {DIGITS_DATASET}, folder:PATH or npz:PATH"
        raise UsageError("--dataset", f"unknown dataset '{name}': not a TFDS dataset{_close_tfds_names(name)}, "
                                      f"nor {known}") from None
    except Exception as err:  # noqa: BLE001 -- e.g. a bad version or config in the name
        raise UsageError("--dataset", f"cannot load TFDS builder '{name}': {first_line(err)}") from None
    if not builder.is_prepared():
        if not download:
            raise UsageError("--dataset", _not_prepared_message(name, builder, data_dir))
        try:
            builder.download_and_prepare()
        except Exception as err:  # noqa: BLE001 -- network or manual-download failures
            raise UsageError("--dataset", f"downloading '{name}' failed: {first_line(err)}; "
                                          f"{_not_prepared_message(name, builder, data_dir)}") from None

    info = builder.info
    image_key, label_key = _tfds_keys(name, info)
    split_sizes = {split: info.splits[split].num_examples for split in info.splits.keys()}
    eval_split = choose_eval_split(eval_split, split_sizes)
    counts, num_files = {"eval": 0}, {"eval": 0}
    for kind, spec in (("train", train_split), ("eval", eval_split)):
        if spec is None:
            continue
        resolve_split(spec, split_sizes, SPLIT_FLAG[kind])  # one-line errors naming the flag
        split_info = info.splits[spec]
        counts[kind] = split_info.num_examples
        num_files[kind] = len(split_info.file_instructions)

    feature_shape = tuple(info.features[image_key].shape)
    image_shape = None
    if len(feature_shape) == 3 and None not in feature_shape:
        image_shape = (int(feature_shape[0]), int(feature_shape[1]), 3)

    # Not converted by AutoGraph: the pipeline may call this inside a tf.data function (one read per epoch), and
    # there is no tensor control flow here, only TFDS's reader, which AutoGraph cannot convert (wrapt).
    @tf.autograph.experimental.do_not_convert
    def read(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext], shuffle_files: bool,
             seed: Optional[FileSeed]) -> tf.data.Dataset:
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        by_file = pipelines > 1 and num_files[split_kind] >= pipelines
        # Dataset.shard below takes every n-th example of one stream in every pipeline, which needs the same
        # file order everywhere: only a pipeline that reads files of its own may shuffle them.
        shuffle_files = shuffle_files and (pipelines == 1 or by_file)
        read_config = tfds.ReadConfig(
            input_context=input_context if by_file else None,
            shuffle_seed=seed if shuffle_files else None,
            # Seeded: one order for every pass over this dataset, so a replayed epoch reads the files as it did
            # (the pipeline varies the seed per epoch). Unseeded: TF's default, a new order on every pass.
            shuffle_reshuffle_each_iteration=False if shuffle_files and seed is not None else None)
        ds = builder.as_dataset(split=train_split if split_kind == "train" else eval_split,
                                shuffle_files=shuffle_files, read_config=read_config)
        if pipelines > 1 and not by_file:
            ds = ds.shard(pipelines, input_context.input_pipeline_id)
        return ds.map(lambda example: (to_rgb(example[image_key]), tf.cast(example[label_key], tf.int64)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    def make_dataset(split_kind: SplitKind,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        return read(split_kind, input_context, shuffle_files=False, seed=None)

    def make_file_shuffled(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None,
                           seed: Optional[FileSeed] = None) -> tf.data.Dataset:
        return read(split_kind, input_context, shuffle_files=True, seed=seed)

    return DataSource(
        name=name, train_split=train_split, eval_split=eval_split, num_train=counts["train"],
        num_eval=counts["eval"], num_classes=info.features[label_key].num_classes,
        eval_has_labels=eval_split is not None, make_dataset=make_dataset, make_file_shuffled=make_file_shuffled,
        image_shape=image_shape, class_names=tuple(info.features[label_key].names))


def _tfds_keys(name: str, info) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    features = info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise UsageError("--dataset", f"TFDS dataset '{name}' is not an image classification dataset (no image "
                                      f"feature '{image_key}')")
    if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise UsageError("--dataset", f"TFDS dataset '{name}' has no class label feature '{label_key}'")
    return image_key, label_key


def _not_prepared_message(name: str, builder, data_dir: Optional[str]) -> str:
    where = data_dir if data_dir else os.fspath(builder.data_dir_root)
    found = ""
    dataset_dir = os.path.dirname(os.fspath(builder.data_dir))
    if os.path.isdir(dataset_dir):
        versions = sorted(v for v in os.listdir(dataset_dir)
                          if os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json")))
        if versions:
            found = f" (found other prepared versions: {', '.join(versions)}; select one with --dataset={name}:V)"
    return (f"TFDS dataset '{name}' version {builder.version} is not prepared in --data_dir={where}{found} and "
            f"will not be downloaded here; prepare it on a machine with network with "
            f"`tfds build {name.split(':')[0]} --data_dir={where}` and copy it over, or point --data_dir at a "
            f"folder that holds it")


def _close_tfds_names(name: str) -> str:
    import difflib

    import tensorflow_datasets as tfds

    try:  # community datasets are listed from GCS, which needs network
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
    except Exception:  # noqa: BLE001 -- suggestions are a courtesy
        close = []
    return f" (did you mean {', '.join(close)}?)" if close else ""
