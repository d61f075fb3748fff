"""Data sources: counts, shapes, dtypes and labels of every source form, sharding, and the one-line errors."""
import io
import logging
import os
import re
import time
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_tf.data import pipeline, sources
from simclr_tf.data.sources import EMBEDDED_DATASET, build_source
from simclr_tf.data.sources.decoding import SkippedFiles
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

tfds.disable_progress_bar()


def _items(source, kind, input_context=None):
    return list(source.as_dataset(kind, input_context).as_numpy_iterator())


def _contexts(n):
    return [tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i, num_replicas_in_sync=n)
            for i in range(n)]


# ------------------------------------------------------------------------------------------------ folder source


def _save(path, array, fmt, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, format=fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder dataset whose every image has a unique size, so a decoded image tells which file it was.

    Returns the root and {(height, width): (split, label or -1, expected RGB pixel, tolerance)}.
    """
    root = tmp_path_factory.mktemp("folder")
    expected = {}
    size = iter(range(6, 60))

    def add(split, cls, label, name, kind):
        h = next(size)
        w = h + 1
        path = root / split / cls / name if cls else root / split / name
        if kind == "rgb_png":
            pixel = (10 * h % 256, 20, 200)
            _save(path, np.full((h, w, 3), pixel, np.uint8), "PNG")
            expected[(h, w)] = (split, label, pixel, 0)
        elif kind == "jpeg":
            pixel = (200, 100, 50)
            _save(path, np.full((h, w, 3), pixel, np.uint8), "JPEG")
            expected[(h, w)] = (split, label, pixel, 6)  # lossy, but a flat colour survives within a few levels
        elif kind == "gray_png":
            _save(path, np.full((h, w), 77, np.uint8), "PNG")
            expected[(h, w)] = (split, label, (77, 77, 77), 0)
        elif kind == "rgba_png":
            _save(path, np.full((h, w, 4), (30, 60, 90, 128), np.uint8), "PNG", "RGBA")
            expected[(h, w)] = (split, label, (30, 60, 90), 0)
        elif kind == "png16":
            _save(path, np.full((h, w), 0xAB12, np.uint16), "PNG")  # 16-bit keeps the high byte
            expected[(h, w)] = (split, label, (0xAB, 0xAB, 0xAB), 0)

    add("train", "cat", 0, "a.png", "rgb_png")
    add("train", "cat", 0, "b.JPG", "jpeg")
    add("train", "cat", 0, "c.png", "gray_png")
    add("train", "cat", 0, "d.jpeg", "jpeg")
    add("train", "dog", 1, "e.PNG", "rgba_png")
    add("train", "dog", 1, "f.png", "png16")
    add("train", "dog", 1, "g.jpg", "jpeg")
    add("train", "dog", 1, "h.png", "rgb_png")
    add("train", "eel", 2, "i.png", "rgb_png")
    add("train", "eel", 2, "j.jpg", "jpeg")
    (root / "train" / "eel" / "corrupt.jpg").write_bytes(b"this is not a jpeg at all")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(full, format="JPEG")
    (root / "train" / "dog" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "train" / "dog" / "notes.txt").write_text("not an image, and not an image extension either")
    add("val", "cat", 0, "k.png", "rgb_png")
    add("val", "eel", 2, "l.jpg", "jpeg")
    add("val", "eel", 2, "m.png", "gray_png")
    add("unlabelled", None, -1, "n.png", "rgb_png")
    add("unlabelled", None, -1, "o.jpg", "jpeg")
    (root / "empty" / "cat").mkdir(parents=True)
    (root / "strange" / "cow").mkdir(parents=True)
    _save(root / "strange" / "cow" / "p.png", np.zeros((4, 4, 3), np.uint8), "PNG")
    return root, expected


def _check_decoded(items, expected):
    for image, label in items:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        _, want_label, pixel, tolerance = expected[image.shape[:2]]
        assert label == want_label
        diff = np.abs(image.astype(int) - np.array(pixel)[None, None, :]).max()
        assert diff <= tolerance, (image.shape, pixel, image[0, 0])


def test_folder_source_counts_labels_and_skipped_files(image_folder, caplog, tmp_path):
    root, expected = image_folder
    source = build_source(f"folder:{root}", None, "train", "val")
    # Nothing is decoded at start: the two unreadable train files are listed, and skipped when read.
    assert (source.num_train, source.num_eval, source.num_classes) == (12, 3, 3)
    assert source.eval_has_labels and source.class_names == ("cat", "dog", "eel")
    assert source.image_shape is None  # every image has its own size
    skipped = SkippedFiles(str(tmp_path / "skipped.tsv"))
    with caplog.at_level(logging.WARNING):
        train = list(source.as_dataset("train", skipped=skipped).as_numpy_iterator())
    assert skipped.count == 2
    listed = (tmp_path / "skipped.tsv").read_text().splitlines()[1:]
    assert sorted(os.path.basename(line.split("\t")[1]) for line in listed) == ["corrupt.jpg", "truncated.jpg"]
    assert sum("corrupt.jpg" in r.getMessage() for r in caplog.records) == 1

    assert len(train) == 10
    assert sorted(im.shape[:2] for im, _ in train) == sorted(k for k, v in expected.items() if v[0] == "train")
    _check_decoded(train, expected)
    assert sorted(label for _, label in train) == [0] * 4 + [1] * 4 + [2] * 2
    assert all(isinstance(label, np.int64) for _, label in train)
    evaluation = _items(source, "eval")
    _check_decoded(evaluation, expected)
    assert sorted(label for _, label in evaluation) == [0, 2, 2]


def test_folder_source_unlabelled_eval_slices_and_errors(image_folder):
    root, expected = image_folder
    source = build_source(f"folder:{root}", None, "train[:30%]", "unlabelled")
    # 30% of the 12 listed train files (2 of them unreadable, skipped when read).
    assert (source.num_train, source.num_eval, source.eval_has_labels) == (4, 2, False)
    evaluation = _items(source, "eval")
    assert [label for _, label in evaluation] == [-1, -1]
    _check_decoded(evaluation, expected)
    head = _items(source, "train")
    tail = _items(build_source(f"folder:{root}", None, "train[30%:]", "val"), "train")
    assert len(head) + len(tail) == 10
    assert sorted(im.shape for im, _ in head + tail) == sorted(im.shape for im, _ in _items(
        build_source(f"folder:{root}", None, "train", "val"), "train"))

    with pytest.raises(UsageError, match=r"^--eval_split: .*holds no readable"):
        build_source(f"folder:{root}", None, "train", "empty")
    with pytest.raises(UsageError, match=r"^--eval_split: .*not in the train split: cow"):
        build_source(f"folder:{root}", None, "train", "strange")
    with pytest.raises(UsageError, match=r"^--train_split: unknown split 'tran'; available splits: empty, "
                                         r"strange, train, unlabelled, val"):
        build_source(f"folder:{root}", None, "tran", "val")
    with pytest.raises(UsageError, match=r"^--dataset: folder .* does not exist"):
        build_source(f"folder:{root}/nope", None, "train", "val")


def test_folder_order_mixes_classes(image_folder):
    # Files are listed class by class; a fixed shuffle keeps slices like train[:10%] from holding one class.
    root, _ = image_folder
    labels = [int(label) for _, label in _items(build_source(f"folder:{root}", None, "train", "val"), "train")]
    assert labels != sorted(labels)
    assert labels == [int(label) for _, label in _items(build_source(f"folder:{root}", None, "train", "val"),
                                                          "train")]


def test_split_slicing_matches_tfds():
    specs = ["train", "train[:10%]", "train[7%:]", "train[:7%]", "train[33%:67%]", "train[-5:]", "train[:-3]",
             "train[3:9]", "train[-50%:]", "train[:2]+test[1:]", "test[:50%]+train[50%:]"]
    for n_train, n_test in ((50, 7), (1001, 3), (3, 11)):
        sizes = {"train": n_train, "test": n_test}
        infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
        for spec in specs:
            try:
                theirs = [(a.splitname, a.from_ or 0, sizes[a.splitname] if a.to is None else a.to)
                          for a in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)]
            except ValueError:  # out of range for this size
                with pytest.raises(UsageError, match="^--train_split: .*out of range"):
                    sources.resolve_split(spec, sizes, "--train_split")
                continue
            if any(start >= stop for _, start, stop in theirs):  # an empty selection is refused
                with pytest.raises(UsageError, match="^--train_split: .*selects no examples"):
                    sources.resolve_split(spec, sizes, "--train_split")
                continue
            ours = [(s.split, s.start, s.stop) for s in sources.resolve_split(spec, sizes, "--train_split")]
            assert ours == theirs, (spec, n_train)


def test_folder_source_shards_are_disjoint_and_cover(image_folder):
    root, _ = image_folder
    source = build_source(f"folder:{root}", None, "train", "val")
    everything = sorted(im.shape for im, _ in _items(source, "train"))
    shards = [sorted(im.shape for im, _ in _items(source, "train", ctx)) for ctx in _contexts(3)]
    # The 12 listed files are sharded 4/4/4 before reading; the 2 unreadable ones drop out of their shards.
    assert sum(len(s) for s in shards) == 10 and all(2 <= len(s) <= 4 for s in shards)
    assert sorted(sum(shards, [])) == everything  # shapes are unique, so this is disjoint and covering


# ------------------------------------------------------------------------------------------------ npz source


def _npz_arrays():
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (50, 5, 4), dtype=np.uint8)  # grayscale NHW
    x_train[:, 0, 0] = np.arange(50)  # an id per example
    y_train = (np.arange(50) % 4).astype(np.int32)
    x_test = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    y_test = np.array([0, 1, 2, 3, 6, 0, 1], np.int64)  # the largest label lives in the test split
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_npz_source_counts_tiling_labels_and_slices(tmp_path):
    arrays = _npz_arrays()
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    source = build_source(f"npz:{path}", None, "train", "test")
    assert (source.num_train, source.num_eval, source.num_classes) == (50, 7, 7)
    assert source.image_shape == (5, 4, 3) and source.eval_has_labels
    train = _items(source, "train")
    images = np.stack([im for im, _ in train])
    assert images.dtype == np.uint8 and images.shape == (50, 5, 4, 3)
    np.testing.assert_array_equal(images, np.repeat(arrays["x_train"][..., None], 3, axis=-1))
    assert [label for _, label in train] == list(arrays["y_train"])
    assert all(isinstance(label, np.int64) for _, label in train)
    assert [label for _, label in _items(source, "eval")] == list(arrays["y_test"])

    # TFDS slicing semantics: percentages round to the nearest example; negative bounds count from the end.
    for spec, expect in (("train[:10%]", slice(0, 5)), ("train[-6:]", slice(44, 50)), ("train[33%:]",
                                                                                       slice(16, 50))):
        sliced = build_source(f"npz:{path}", None, spec, "test[:3]")
        assert sliced.num_train == len(range(50)[expect]) and sliced.num_eval == 3
        ids = [int(im[0, 0, 0]) for im, _ in _items(sliced, "train")]
        assert ids == list(range(50)[expect])
    both = build_source(f"npz:{path}", None, "train[:2]+test[-1:]", "test")
    assert [int(label) for _, label in _items(both, "train")] == [0, 1, 1]


def test_npz_source_shards_are_disjoint_and_cover(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **_npz_arrays())
    source = build_source(f"npz:{path}", None, "train", "test")
    shards = [[int(im[0, 0, 0]) for im, _ in _items(source, "train", ctx)] for ctx in _contexts(3)]
    assert [len(s) for s in shards] == [17, 17, 16]
    assert sorted(sum(shards, [])) == list(range(50))


def test_npz_source_rgb_and_unlabelled_eval(tmp_path):
    arrays = _npz_arrays()
    rgb = np.random.default_rng(2).integers(0, 256, (9, 3, 3, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=rgb, y_train=np.arange(9) % 2, x_test=arrays["x_test"][:, :3, :3].copy())
    source = build_source(f"npz:{path}", None, "train", "test")
    assert (source.num_classes, source.eval_has_labels) == (2, False)
    np.testing.assert_array_equal(np.stack([im for im, _ in _items(source, "train")]), rgb)
    assert {int(label) for _, label in _items(source, "eval")} == {-1}


@pytest.mark.parametrize("change, pattern", [
    (lambda a: a.pop("y_train"), r"key 'y_train' is missing"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)),
     r"key 'x_train' has dtype float32, expected uint8"),
    (lambda a: a.update(x_test=a["x_test"][:, :, :, None, None]), r"key 'x_test' has ndim 5"),
    (lambda a: a.update(y_train=a["y_train"] - 2), r"key 'y_train' has label -2 outside"),
    (lambda a: a.update(y_test=a["y_test"][:3]), r"key 'y_test' has 3 labels for 7 images"),
    (lambda a: a.update(num_classes=np.int64(5)), r"key 'y_test' has label 6 outside \[0, num_classes=5\)"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), r"key 'y_train' has dtype float32"),
])
def test_npz_source_errors_name_file_and_key(tmp_path, change, pattern):
    arrays = _npz_arrays()
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError) as err:
        build_source(f"npz:{path}", None, "train", "test")
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert re.search(pattern, message), message


def test_npz_source_refuses_pickles_and_missing_files(tmp_path):
    arrays = _npz_arrays()
    arrays["y_train"] = np.array([object()] * 50, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError, match="without pickle"):
        build_source(f"npz:{path}", None, "train", "test")
    with pytest.raises(UsageError, match=r"^--dataset: npz file .*missing.npz does not exist"):
        build_source(f"npz:{tmp_path / 'missing.npz'}", None, "train", "test")
    np.savez(tmp_path / "ok.npz", **_npz_arrays())
    with pytest.raises(UsageError, match=r"^--eval_split: unknown split 'validation'; available splits: test, "
                                         r"train"):
        build_source(f"npz:{tmp_path / 'ok.npz'}", None, "train", "validation")
    with pytest.raises(UsageError, match=r"^--train_split: slice bound 51 out of range"):
        build_source(f"npz:{tmp_path / 'ok.npz'}", None, "train[:51]", "test")


def test_cifar10_dev_npz(cifar10_dev_path):
    source = build_source(f"npz:{cifar10_dev_path}", None, "train", "test")
    assert (source.num_train, source.num_eval, source.num_classes) == (10000, 2000, 10)
    assert source.image_shape == (32, 32, 3)
    with np.load(cifar10_dev_path) as raw:
        x_test, y_test = raw["x_test"], raw["y_test"]
    first = list(source.as_dataset("eval").take(3).as_numpy_iterator())
    for i, (image, label) in enumerate(first):
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, x_test[i])
        assert label == y_test[i]
    assert build_source(f"npz:{cifar10_dev_path}", None, "train[:10%]", "test").num_train == 1000


# ------------------------------------------------------------------------------------------------ embedded data


def test_embedded_default_is_real_mnist_with_a_fixed_split():
    assert EMBEDDED_DATASET == "mnist_5k"
    source = build_source(EMBEDDED_DATASET, None, "train", "test")
    assert (source.num_train, source.num_eval, source.num_classes) == (4000, 1000, 10)
    assert source.image_shape == (28, 28, 3)
    train = _items(source, "train")
    evaluation = _items(source, "eval")
    assert len(train) == 4000 and len(evaluation) == 1000
    assert all(im.dtype == np.uint8 and im.shape == (28, 28, 3) for im, _ in train[:50])
    assert np.bincount([label for _, label in train]).tolist() == [400] * 10
    assert np.bincount([label for _, label in evaluation]).tolist() == [100] * 10
    assert [label for _, label in train[:20]] == list(range(10)) * 2  # round-robin: slices stay balanced
    image = train[0][0]
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grayscale tiled to RGB

    # Independently of the module: the eval split is the last 100 images of each class of the shipped file,
    # read as the table of the original csv (one row per image: 784 pixels, then the label).
    with np.load(sources.embedded_path(EMBEDDED_DATASET)) as shipped:
        table = np.concatenate([shipped["images"].reshape(-1, 28 * 28), shipped["labels"][:, None]], axis=1)
    last = np.concatenate([table[table[:, -1] == c][-100:] for c in range(10)])
    want = sorted((row[-1], row[:-1].tobytes()) for row in last)
    got = sorted((label, im[..., 0].reshape(-1).tobytes()) for im, label in evaluation)
    assert got == want
    again = build_source(EMBEDDED_DATASET, None, "train[:10%]", "test")
    assert again.num_train == 400
    assert np.bincount([label for _, label in _items(again, "train")]).tolist() == [40] * 10


def test_digits_fallback():
    source = build_source(sources.DIGITS_DATASET, None, "train", "test")
    assert (source.num_train, source.num_eval, source.num_classes, source.image_shape) == (1500, 297, 10,
                                                                                           (8, 8, 3))
    images = np.stack([im for im, _ in _items(source, "eval")])
    assert images.dtype == np.uint8 and images.max() == 255 and images.min() == 0


# ------------------------------------------------------------------------------------------------ TFDS


def test_tfds_without_prepared_data_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(UsageError) as err:
        build_source("cifar10", str(tmp_path), "train", "test")
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    message = str(err.value)
    assert message.startswith("--dataset: ") and "\n" not in message
    assert f"--data_dir={tmp_path}" in message and f"tfds build cifar10 --data_dir={tmp_path}" in message


def test_tfds_unknown_name():
    with pytest.raises(UsageError, match=r"^--dataset: unknown dataset 'cifar11'.*did you mean.*cifar10"):
        build_source("cifar11", None, "train", "test")


class SimclrSourcesTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """30 train / 9 test grayscale 6x5 images whose pixel value is the example id; 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                     features=tfds.features.FeaturesDict({
                                         "image": tfds.features.Image(shape=(6, 5, 1)),
                                         "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(100, 9)}

    def _generate_examples(self, start, count):
        for i in range(count):
            yield str(start + i), {"image": np.full((6, 5, 1), start + i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Prepared TFDS data without registered code, as when data prepared elsewhere is copied over."""
    data_dir = tmp_path_factory.mktemp("tfds")
    SimclrSourcesTiny(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=2))
    return str(data_dir)


def _ids(items):
    return [int(im[0, 0, 0]) for im, _ in items]


def test_tfds_prepared_dataset(tfds_dir):
    source = build_source("simclr_sources_tiny", tfds_dir, "train", "test")
    assert (source.num_train, source.num_eval, source.num_classes) == (30, 9, 3)
    assert source.image_shape == (6, 5, 3) and source.eval_has_labels
    train = _items(source, "train")
    assert sorted(_ids(train)) == list(range(30))
    for image, label in train:
        assert image.dtype == np.uint8 and image.shape == (6, 5, 3) and label == image[0, 0, 0] % 3
        assert isinstance(label, np.int64)
    assert sorted(_ids(_items(source, "eval"))) == list(range(100, 109))

    sliced = build_source("simclr_sources_tiny", tfds_dir, "train[:50%]", "test[-3:]")
    assert (sliced.num_train, sliced.num_eval) == (15, 3)
    assert len(_items(sliced, "train")) == 15 and len(_items(sliced, "eval")) == 3

    with pytest.raises(UsageError, match=r"^--eval_split: unknown split 'validation'; available splits: test, "
                                         r"train"):
        build_source("simclr_sources_tiny", tfds_dir, "train", "validation")


@pytest.mark.parametrize("spec, pipelines", [("train", 2), ("train[:50%]", 2), ("train", 3)])
def test_tfds_shards_are_disjoint_and_cover(tfds_dir, spec, pipelines):
    # 2 files for 2 pipelines shard by file; a one-file slice or more pipelines than files shard by example.
    source = build_source("simclr_sources_tiny", tfds_dir, spec, "test")
    everything = sorted(_ids(_items(source, "train")))
    shards = [_ids(_items(source, "train", ctx)) for ctx in _contexts(pipelines)]
    assert all(shards)
    assert sorted(sum(shards, [])) == everything and len(everything) == source.num_train


class SimclrSourcesShards(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """240 train examples in 24 files of 10 (more files than TFDS reads at once, 16), 24 test; label = id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                     features=tfds.features.FeaturesDict({
                                         "image": tfds.features.Image(shape=(4, 4, 1)),
                                         "label": tfds.features.ClassLabel(num_classes=240)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(240), "test": self._generate_examples(24)}

    def _generate_examples(self, count):
        for i in range(count):
            yield str(i), {"image": np.full((4, 4, 1), i, np.uint8), "label": i}


@pytest.fixture(scope="module")
def tfds_shards(tmp_path_factory):
    """(data_dir, {label: file index} of the train split)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_shards"))
    builder = SimclrSourcesShards(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=24))
    assert builder.info.splits["train"].shard_lengths == [10] * 24
    examples = builder.as_dataset(split="train", read_config=tfds.ReadConfig(add_tfds_id=True))
    file_of = {int(ex["label"]): int(re.search(rb"-(\d+)-of-\d+__", ex["tfds_id"]).group(1))
               for ex in examples.as_numpy_iterator()}
    return data_dir, file_of


def test_tfds_train_files_shuffled_by_seed_eval_in_order(tfds_shards):
    """Training reads (`shuffle_files`) take the files in an order fixed by the seed: the same on every pass and
    for the same seed, another for another seed, a new one on every pass without a seed. Plain reads and the
    eval split keep the stored order."""
    data_dir, file_of = tfds_shards
    source = build_source("simclr_sources_shards", data_dir, "train", "test")

    def file_order(dataset):
        labels = [int(y) for _, y in dataset.as_numpy_iterator()]
        assert sorted(labels) == list(range(240))
        # Files hold 10 < 16 (TFDS's interleave block) examples, so each file is read in one go.
        return list(dict.fromkeys(file_of[y] for y in labels))

    stored = list(range(24))
    assert file_order(source.as_dataset("train")) == stored
    orders = {}
    for seed in (1, 2):
        dataset = source.as_dataset("train", shuffle_files=True, seed=seed)
        orders[seed] = file_order(dataset)
        assert orders[seed] != stored
        assert file_order(dataset) == orders[seed]  # a second pass over the same dataset (a replayed epoch)
        assert file_order(source.as_dataset("train", shuffle_files=True, seed=seed)) == orders[seed]
    assert orders[1] != orders[2]
    unseeded = source.as_dataset("train", shuffle_files=True)
    assert file_order(unseeded) != file_order(unseeded)  # equal with probability 1/24!

    eval_labels = [int(y) for _, y in source.as_dataset("eval").as_numpy_iterator()]
    assert eval_labels == [int(y) for _, y in source.as_dataset("eval").as_numpy_iterator()]
    input_fn = pipeline.build_input_fn(source, mode="eval", global_batch_size=5, augment=AugmentConfig(8), seed=1)
    assert np.concatenate([y for _, y in input_fn(None).as_numpy_iterator()]).tolist() == eval_labels


def test_tfds_training_pipeline_shuffles_files_per_epoch_and_replays_them(tfds_shards):
    """Seeded training on TFDS: the files each epoch starts with depend on the seed and the epoch (not always
    the first files, as with files in stored order), and a run resumed in epoch 1 reads it exactly as before."""
    data_dir, file_of = tfds_shards
    source = build_source("simclr_sources_shards", data_dir, "train", "test")

    def labels(seed, start_step, steps):
        # Batch 1 at 8 px: a shuffle buffer of 50 examples, so the first 10 come from the first 6 files read.
        input_fn = pipeline.build_input_fn(source, mode="finetune", global_batch_size=1, augment=AugmentConfig(8),
                                           seed=seed, start_step=start_step)
        return [int(y[0]) for _, y in input_fn(None).take(steps).as_numpy_iterator()]

    def first_files(stream):
        return {file_of[y] for y in stream[:10]}

    full = labels(0, 0, 250)
    assert sorted(full[:240]) == list(range(240))
    epoch0, epoch1 = first_files(full[:240]), first_files(full[240:])
    assert not epoch0 <= set(range(6)) and not epoch1 <= set(range(6))
    assert epoch0 != epoch1
    assert first_files(labels(1, 0, 10)) != epoch0
    assert labels(0, 240, 10) == full[240:250]  # resumed at the start of epoch 1
    assert labels(0, 243, 7) == full[243:250]   # and within it
