"""Data sources: where images and labels come from (TFDS, a folder, an npz file, the embedded datasets).

Every source is a `DataSource` whose `as_dataset(split_kind, input_context)` returns an unbatched, unshuffled,
non-repeated `tf.data.Dataset` of `(image uint8 [H, W, 3], label int64)`; grayscale images are tiled to RGB and
the label is -1 when the split has none. `num_train`, `num_eval` and `num_classes` are known before any
image is read. File sources (folders, TFRecord shards) hand out cheap records (paths, serialized examples)
through `records()`, which training shuffles and skips before decoding them; files that fail to decode are
skipped when read, counted and listed (`decoding.py`). Training reads pass `shuffle_files=True` (and the
pipeline's seed): a multi-file split then reads its files in a shuffled order, seeded or new on every pass;
in-memory sources ignore it.

The eval role is optional: `build_source` takes an explicit spec, candidate split names (`DEFAULT_EVAL_SPLITS`,
when `--eval_split` is left at its default) or None; without one, `eval_split` is None and `num_eval` 0.

`--dataset` forms (see `build_source`):

* a TFDS name (`cifar10`, `imagenet2012`, `cifar10:3.0.2`, `name/config`): counts and classes come from the
  builder's info. The data must already be prepared in `--data_dir` (or TFDS's default folder): we never start a
  download implicitly, because on a machine without network TFDS retries for a long time before failing. Prepare
  it once with `tfds build NAME --data_dir=DIR` on a machine with network (or pass `download=True`).
  See `tfds.py`.
* `folder:PATH`: `PATH/<split>/<class>/*.{jpg,jpeg,png}` (extensions case-insensitive) is labelled: classes are
  the sorted class folders of the train split; the eval split must use the same names. A split folder holding
  images directly or in any other nesting is unlabelled, and so is `PATH` itself when it has no split folders
  (`PATH/**/*.jpg` is then the `train` split): pretraining needs no labels. Listing decodes nothing (a parallel
  walk, kept in an index file in the run's model_dir); files are decoded when read. Files of a split are put in
  a fixed pseudo-random order (seed 0) so that slices such as `train[:10%]` hold every class. See `folder.py`.
* `tfrecord:GLOB`: TFRecord shards of `tf.train.Example`s with `image/encoded` (and optionally
  `image/class/label`), the layout of the TPU reference pipelines; `python -m simclr_tf.make_tfrecords` writes
  them from a folder. See `tfrecord.py`.
* `npz:PATH`: arrays `x_train, y_train, x_test, y_test` (`x` uint8 NHWC RGB or NHW grayscale, `y` integers),
  read with `allow_pickle=False`; split names `train` and `test`, examples in stored order. Without `y_test`
  the eval split is unlabelled. In `y_train`, -1 marks an unlabelled example (semi-supervised data; pure
  distillation, `--distill_alpha=0`, reads no label at all, so `y_train` may be all -1). `num_classes` is the
  largest label + 1, or the scalar `num_classes` if the file has one. See `arrays.py`.
* `mnist_5k` (`EMBEDDED_DATASET`, the default): 5,000 real MNIST handwritten digits (28x28 grayscale, 500 per
  class), shipped with this package as `simclr_tf/data/embedded/mnist_5k.npz` (0.8 MB; provenance and licence
  in the README there), so it needs no download. Fixed split: the first 400 images of each class are `train`
  (4,000), the last 100 `test` (1,000); both splits are ordered round-robin over the classes, so every slice is
  class-balanced.
* `digits`: the UCI optical digits that scikit-learn bundles (1,797 images of 8x8, values 0..16 rescaled to
  0..255), shipped the same way (`embedded/digits.npz`), a tiny fallback; `train` = the first 1,500 images,
  `test` = the last 297.

Split specs follow TFDS slicing for every source: `train`, `train[:10%]`, `train[10%:]`, `train[:500]`,
`train[-500:]`, and sums such as `train+test`; percentages round to the nearest example as in TFDS (see
`splits.py`).

Sharding: with an `input_context`, each input pipeline gets its own part of the split. In-memory and folder
sources keep example `i` on pipeline `i % num_input_pipelines` (the `Dataset.shard` rule; a folder deals its
file list before reading, so each host reads only its files). TFDS and TFRecord splits with at least as many
files as pipelines are sharded by file (each host reads only its files, as the official code does); smaller
ones fall back to `Dataset.shard`.
"""
from simclr_tf.data.sources.arrays import embedded_path
from simclr_tf.data.sources.base import (DEFAULT_EVAL_SPLITS, DIGITS_DATASET, EMBEDDED_DATASET, DataSource,
                                         SplitKind, build_source)
from simclr_tf.data.sources.folder import IMAGE_EXTENSIONS
from simclr_tf.data.sources.splits import SplitSlice, resolve_split

__all__ = ["DEFAULT_EVAL_SPLITS", "DIGITS_DATASET", "EMBEDDED_DATASET", "IMAGE_EXTENSIONS", "DataSource", "SplitKind", "SplitSlice",
           "build_source", "embedded_path", "resolve_split"]
