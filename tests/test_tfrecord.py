"""The `tfrecord:GLOB` source and the `make_tfrecords` converter: counts, images and labels checked against the
original files (their bytes, and their pixels as PIL decodes them), slices, sharding, seeded file orders, the
record-count index, one-line errors, and an exact resume of the training pipeline over a corrupt record."""
import gzip
import io
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging
from PIL import Image

from simclr_tf import make_tfrecords
from simclr_tf.data import pipeline
from simclr_tf.data.sources import build_source
from simclr_tf.data.sources.decoding import SkippedImages
from simclr_tf.data.sources.tfrecord import count_records, crc32c
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

CLASSES = ("cat", "dog", "eel")
TRAIN_SHARDS = 6
# JPEG decoders may differ by a level or two (TF's IDCT vs PIL's); PNGs must match exactly.
JPEG_TOLERANCE = 3


def _contexts(n):
    return [tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i, num_replicas_in_sync=n)
            for i in range(n)]


def _png(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An image folder (train: 3 classes x 6 images + 2 unreadable files; validation: 2 classes x 3) and its
    conversion with 6 shards per split.

    Every image has a size of its own, so a decoded image tells which file it was. Returns (folder, out_dir,
    {(h, w): (split, label, relative path)}, the converter's output lines).
    """
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    expected = {}
    size = iter(range(4, 40))
    for split, classes, per_class in (("train", CLASSES, 6), ("validation", CLASSES[:2], 3)):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                h = next(size)
                relative = f"{split}/{cls}/{i}.{('png', 'jpg', 'png')[i % 3]}"
                pixels = rng.integers(0, 256, (h, h + 1, 3), np.uint8)
                if i % 3 == 0:
                    Image.fromarray(pixels).save(root / relative, format="PNG")
                elif i % 3 == 1:  # smooth, so the JPEG decoders agree closely
                    Image.fromarray(np.full((h, h + 1, 3), pixels[0, 0], np.uint8)).save(root / relative, "JPEG")
                else:
                    Image.fromarray(pixels[:, :, 0]).save(root / relative, format="PNG")  # grayscale
                expected[(h, h + 1)] = (split, label, relative)
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"not an image at all")
    whole = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "dog" / "truncated.png").write_bytes(whole[:len(whole) // 2])

    out_dir = tmp_path_factory.mktemp("shards")
    lines = []
    make_tfrecords.make_tfrecords(f"folder:{root}", str(out_dir), shards=TRAIN_SHARDS, log=lines.append)
    return root, out_dir, expected, lines


def _pil(root, relative):
    return np.asarray(Image.open(root / relative).convert("RGB"))


def _check_images(items, root, expected, split):
    """Each image of `split` exactly once, with its label, pixels equal to PIL's decoding of the file."""
    shapes = sorted(image.shape[:2] for image, _ in items)
    assert shapes == sorted(k for k, v in expected.items() if v[0] == split)
    for image, label in items:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        _, want_label, relative = expected[image.shape[:2]]
        assert label == want_label and isinstance(label, np.int64)
        diff = np.abs(image.astype(int) - _pil(root, relative).astype(int)).max()
        assert diff <= (JPEG_TOLERANCE if relative.endswith(".jpg") else 0), relative


def _shards(out_dir, split):
    return sorted(str(p) for p in out_dir.glob(f"{split}-*-of-*.tfrecord"))


def _stored(paths):
    """Independently of the source: (file, index, serialized) of every record, files in the given order."""
    return [(path, i, r) for path in paths
            for i, r in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator())]


def _records(dataset):
    return [(f.decode(), int(i), s) for s, f, i in dataset.as_numpy_iterator()]


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_converter_writes_original_bytes_labels_info_and_skips(converted):
    root, out_dir, expected, lines = converted
    assert sorted(os.listdir(out_dir)) == sorted(
        ["dataset_info.json"] + [f"train-{i:05d}-of-00006.tfrecord" for i in range(6)]
        + [f"validation-{i:05d}-of-00006.tfrecord" for i in range(6)])  # no temporary file left
    info = json.loads((out_dir / "dataset_info.json").read_text())
    assert info["num_classes"] == 3 and info["class_names"] == list(CLASSES)
    assert {k: (v["num_examples"], v["num_shards"], v["labelled"]) for k, v in info["splits"].items()} == {
        "train": (18, 6, True), "validation": (6, 6, True)}
    assert sorted(info["skipped_files"]) == ["train/cat/corrupt.jpg", "train/dog/truncated.png"]
    assert any(line.startswith("skipped 2 file(s) that do not decode: ") for line in lines)

    by_name = {v[2]: v for v in expected.values()}
    seen = []
    for split in ("train", "validation"):
        for path, _, serialized in _stored(_shards(out_dir, split)):
            features = tf.train.Example.FromString(serialized).features.feature
            name = features["image/filename"].bytes_list.value[0].decode()
            assert name.startswith(split + "/")
            assert features["image/encoded"].bytes_list.value[0] == (root / name).read_bytes()  # not re-encoded
            assert features["image/format"].bytes_list.value[0] == (b"JPEG" if name.endswith(".jpg") else b"PNG")
            label = features["image/class/label"].int64_list.value[0]
            assert label == by_name[name][1]
            assert features["image/class/text"].bytes_list.value[0].decode() == CLASSES[label]
            seen.append(name)
    assert sorted(seen) == sorted(by_name)  # every readable image once
    # Shards follow the folder source's fixed shuffle: the first shard is not one class.
    first = [tf.train.Example.FromString(s).features.feature["image/class/label"].int64_list.value[0]
             for _, _, s in _stored(_shards(out_dir, "train")[:2])]
    assert len(set(first)) > 1


def test_source_counts_images_labels_and_classes(converted, tmp_path, caplog):
    root, out_dir, expected, _ = converted
    source = build_source(f"tfrecord:{out_dir}/*", None, "train", "validation")
    assert (source.num_train, source.num_eval, source.num_classes) == (18, 6, 3)
    assert source.class_names == CLASSES and source.eval_has_labels and source.image_shape is None
    for _ in range(2):  # every epoch
        _check_images(list(source.as_dataset("train").as_numpy_iterator()), root, expected, "train")
    _check_images(list(source.as_dataset("eval").as_numpy_iterator()), root, expected, "validation")
    # The default eval role picks `validation`; a folder path stands for the files in it.
    assert build_source(f"tfrecord:{out_dir}", None, "train", ("validation", "test")).eval_split == "validation"

    # Without the converter's dataset_info.json the labels are read: 3 classes, no names.
    bare = tmp_path / "bare"
    shutil.copytree(out_dir, bare, ignore=shutil.ignore_patterns("*.json"))
    for scans in (True, False):  # the largest labels are kept in the index: read once
        with caplog.at_level(logging.INFO):
            caplog.clear()
            unnamed = build_source(f"tfrecord:{bare}/train-*", None, "train", None, index_dir=str(tmp_path / "run"))
        assert (unnamed.num_train, unnamed.num_classes, unnamed.class_names, unnamed.eval_split) == (
            18, 3, None, None)
        assert any("reading the labels of 6 TFRecord file(s)" in r.getMessage() for r in caplog.records) == scans
    # A hand-written dataset_info.json (for shards from elsewhere) gives the class count without a label scan.
    (bare / "dataset_info.json").write_text(json.dumps({"format": "simclr_tf tfrecords v1", "num_classes": 5}))
    assert build_source(f"tfrecord:{bare}/*", None, "train", None).num_classes == 5


def test_slices_follow_the_files_and_partition_the_split(converted):
    _, out_dir, _, _ = converted
    stored = _stored(_shards(out_dir, "train"))
    assert len(stored) == 18

    def sliced(spec):
        source = build_source(f"tfrecord:{out_dir}/*", None, spec, None)
        records = _records(source.records("train"))
        assert source.num_train == len(records) == int(source.records("train").cardinality())
        return records

    head, tail = sliced("train[:50%]"), sliced("train[50%:]")
    assert sorted(head) == sorted(stored[:9]) and sorted(tail) == sorted(stored[9:])
    # The files hold 2, 2, 4, 3, 3, 4 records (shards of 3 or 4 files, less the 2 unreadable ones): [3:12] is
    # the last record of file 1, files 2 and 3, and the first record of file 4.
    assert [sum(1 for r in stored if r[0] == f) for f in _shards(out_dir, "train")] == [2, 2, 4, 3, 3, 4]
    assert sorted(sliced("train[3:12]")) == sorted(stored[3:12])
    assert sorted(sliced("train[-2:]+validation[:1]")) == sorted(
        stored[-2:] + _stored(_shards(out_dir, "validation"))[:1])


@pytest.mark.parametrize("pipelines", [2, 3])
def test_pipelines_read_their_own_files_disjoint_and_covering(converted, pipelines):
    _, out_dir, _, _ = converted
    source = build_source(f"tfrecord:{out_dir}/*", None, "train", None)
    files = _shards(out_dir, "train")
    everything = sorted(_records(source.records("train")))
    parts = []
    for ctx in _contexts(pipelines):
        for shuffled in (False, True):
            records = _records(source.records("train", ctx, shuffle_files=shuffled, seed=5))
            assert len(records) == int(source.records("train", ctx).cardinality())
            # By file: each pipeline reads only files i, i + n, ...
            assert {f for f, _, _ in records} == set(files[ctx.input_pipeline_id::pipelines])
        parts.append(sorted(records))
    assert sorted(sum(parts, [])) == everything and len(everything) == 18


def test_fewer_files_than_pipelines_shard_records(converted):
    _, out_dir, _, _ = converted
    source = build_source(f"tfrecord:{out_dir}/*", None, "train[:4]", None)  # files 0 and 1, 2 records each
    everything = sorted(_records(source.records("train")))
    parts = []
    for ctx in _contexts(3):
        records = _records(source.records("train", ctx, shuffle_files=True, seed=ctx.input_pipeline_id))
        assert len(records) == int(source.records("train", ctx).cardinality())
        parts.append(records)
    assert [len(p) for p in parts] == [2, 1, 1]
    assert sorted(sum(parts, [])) == everything and len(everything) == 4


def test_seeded_file_order(converted):
    _, out_dir, _, _ = converted
    source = build_source(f"tfrecord:{out_dir}/*", None, "train", None)
    files = _shards(out_dir, "train")

    def file_order(dataset):
        records = _records(dataset)
        assert sorted(records) == sorted(_stored(files))
        # All 6 files are open at once (8 at a time) and read a record each in turn: the first 6 records
        # name the files in the order they were given to the reader.
        assert len({f for f, _, _ in records[:6]}) == 6
        return [f for f, _, _ in records[:6]]

    assert file_order(source.records("train")) == files
    orders = {}
    for seed in (1, 2):
        dataset = source.records("train", shuffle_files=True, seed=seed)
        orders[seed] = file_order(dataset)
        assert file_order(dataset) == orders[seed]  # a second pass (a replayed epoch)
        assert file_order(source.records("train", shuffle_files=True, seed=seed)) == orders[seed]
    assert orders[1] != orders[2] and files not in orders.values()
    assert file_order(source.records("train", shuffle_files=True, seed=tf.constant(2, tf.int64))) == orders[2]
    unseeded = source.records("train", shuffle_files=True)
    passes = [tuple(file_order(unseeded)) for _ in range(3)]
    assert len(set(passes)) > 1  # a new order on every pass (3 equal ones: probability 1/720^2)


def test_record_counts_index_is_reused_until_a_file_changes(converted, tmp_path, caplog, request):
    _, out_dir, _, _ = converted
    data = tmp_path / "data"
    shutil.copytree(out_dir, data)
    index_dir = tmp_path / "run"
    # absl filters by its own verbosity before Python logging sees a record; another test may have lowered it.
    request.addfinalizer(lambda verbosity=absl_logging.get_verbosity(): absl_logging.set_verbosity(verbosity))
    absl_logging.set_verbosity(absl_logging.INFO)
    with caplog.at_level(logging.INFO):
        build_source(f"tfrecord:{data}/*", None, "train", None, index_dir=str(index_dir))
        assert any("counting the records of 6 of 6 files" in r.getMessage() for r in caplog.records)
        caplog.clear()  # the validation files, not read before, are counted now; the train files' counts reused
        first = build_source(f"tfrecord:{data}/*", None, "train", "validation", index_dir=str(index_dir))
        assert any("counting the records of 6 of 12 files" in r.getMessage() for r in caplog.records)
    (index_file,) = index_dir.glob("tfrecord_index-*.json")
    index = json.loads(index_file.read_text())
    shard = str(data / "train-00002-of-00006.tfrecord")
    assert index["files"][shard]["records"] == count_records(shard) == len(_stored([shard])) == 4
    # A wrong count planted in the index is served while the file keeps its size and mtime: proof it is read.
    index["files"][shard]["records"] = 9
    index_file.write_text(json.dumps(index))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reused = build_source(f"tfrecord:{data}/*", None, "train", "validation", index_dir=str(index_dir))
    assert reused.num_train == first.num_train + 5 == 23
    assert not any("counting the records" in r.getMessage() for r in caplog.records)
    # A new modification time: that file alone is counted again.
    os.utime(shard, ns=(0, os.stat(shard).st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rescanned = build_source(f"tfrecord:{data}/*", None, "train", "validation", index_dir=str(index_dir))
    assert rescanned.num_train == 18 and rescanned.num_classes == 3
    assert any("counting the records of 1 of 12 files" in r.getMessage() for r in caplog.records)
    assert json.loads(index_file.read_text())["files"][shard]["records"] == 4


def _one_line_error(pattern, call):
    with pytest.raises(UsageError, match=pattern) as error:
        call()
    assert "\n" not in str(error.value)
    return error.value


def test_unusable_files_are_one_line_errors_naming_them(converted, tmp_path):
    _, out_dir, _, _ = converted
    _one_line_error(r"^--dataset: no files match tfrecord:.*nothing-\*", lambda: build_source(
        f"tfrecord:{tmp_path}/nothing-*", None, "train", None))
    _one_line_error(r"^--train_split: unknown split 'tran'.*: train, validation$", lambda: build_source(
        f"tfrecord:{out_dir}/*", None, "tran", None))

    text = tmp_path / "text" / "train.tfrecord"
    text.parent.mkdir()
    text.write_text("these are notes, not records\n" * 3)
    _one_line_error(rf"^{re.escape(str(text))}: not a TFRecord file: ", lambda: build_source(
        f"tfrecord:{text.parent}/*", None, "train", None))

    shard = out_dir / "train-00000-of-00006.tfrecord"
    zipped = tmp_path / "zipped" / "train.tfrecord.gz"
    zipped.parent.mkdir()
    zipped.write_bytes(gzip.compress(shard.read_bytes()))
    _one_line_error(r"^.*train.tfrecord.gz: not a TFRecord file \(it is GZIP-compressed", lambda: build_source(
        f"tfrecord:{zipped}", None, "train", None))

    cut = tmp_path / "cut" / "train-00000-of-00001.tfrecord"
    cut.parent.mkdir()
    whole = shard.read_bytes()
    cut.write_bytes(whole[:-10])
    # Shard 0 holds 2 records; the second (index 1) lost its last 10 bytes.
    _one_line_error(rf"^{re.escape(str(cut))}: truncated TFRecord file: record 1 ends at byte {len(whole)}, after "
                    rf"the end of the file \({len(whole) - 10} bytes\)$",
                    lambda: build_source(f"tfrecord:{cut}", None, "train", None))

    other = tmp_path / "other" / "train.tfrecord"
    other.parent.mkdir()
    with tf.io.TFRecordWriter(str(other)) as writer:
        writer.write(tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[b"x"]))})).SerializeToString())
    _one_line_error(rf"^{re.escape(str(other))}: records have no 'image/encoded' feature \(found: image\)",
                    lambda: build_source(f"tfrecord:{other}", None, "train", None))

    garbage = tmp_path / "garbage" / "train.tfrecord"
    garbage.parent.mkdir()
    _write_examples(garbage, [(b"\x89PNG but no more", 0), (b"nothing", 1)])
    _one_line_error(r"^--train_split: tfrecord:.* split train holds no readable image: all 2 records fail to "
                    r"decode$", lambda: build_source(f"tfrecord:{garbage}", None, "train", None))


def test_converter_errors(converted, tmp_path, capsys):
    root, out_dir, _, _ = converted
    _one_line_error(rf"^{re.escape(str(out_dir))}: already holds shards", lambda: make_tfrecords.make_tfrecords(
        f"folder:{root}", str(out_dir), log=lambda line: None))
    assert make_tfrecords.main([f"npz:{root}", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: DATASET: expected folder:PATH, got 'npz:" + f"{root}'"
    assert make_tfrecords.main([f"folder:{root}", str(tmp_path / "out"), "--shards=0"]) == 2
    assert capsys.readouterr().err.startswith("error: --shards: must be positive")


def test_converter_folder_without_split_folders_is_train(tmp_path):
    for cls, value in (("cat", 10), ("dog", 20), ("dog", 30)):
        (tmp_path / "photos" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 5, 3), value, np.uint8)).save(tmp_path / "photos" / cls / f"{value}.png")
    lines = []
    info = make_tfrecords.make_tfrecords(f"folder:{tmp_path / 'photos'}", str(tmp_path / "out"), log=lines.append)
    assert info["splits"] == {"train": {"num_examples": 3, "num_shards": 1, "labelled": True, "skipped": 0}}
    assert sorted(os.listdir(tmp_path / "out")) == ["dataset_info.json", "train-00000-of-00001.tfrecord"]
    assert lines[-1].startswith("3 images in 1 shards -> ")
    source = build_source(f"tfrecord:{tmp_path / 'out'}/*", None, "train", None)
    assert source.class_names == ("cat", "dog")
    items = sorted((int(im[0, 0, 0]), int(y)) for im, y in source.as_dataset("train").as_numpy_iterator())
    assert items == [(10, 0), (20, 1), (30, 1)]


def _write_examples(path, examples):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image_bytes, label in examples:
            feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))}
            if label is not None:
                feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_files_without_split_names_are_one_unlabelled_split(tmp_path):
    images = [np.full((5, 6, 3), i, np.uint8) for i in range(5)]
    _write_examples(tmp_path / "a.tfrecord", [(_png(im), None) for im in images[:2]])
    _write_examples(tmp_path / "b.tfrecord", [(_png(im), None) for im in images[2:]])
    source = build_source(f"tfrecord:{tmp_path}/*.tfrecord", None, "train", ("validation", "test"))
    assert (source.num_train, source.num_classes, source.eval_split, source.class_names) == (5, 0, None, None)
    items = list(source.as_dataset("train").as_numpy_iterator())
    assert sorted(int(im[0, 0, 0]) for im, _ in items) == list(range(5))
    assert all(label == -1 for _, label in items)


def test_training_pipeline_resumes_exactly_over_a_corrupt_record(tmp_path):
    """Seeded pretraining over 3 shards, one record of which is not an image: a run resumed at step k yields
    the batches k.. of a run from step 0, the corrupt record skipped (and named) in every epoch."""
    data = tmp_path / "data"
    data.mkdir()
    ids = iter(range(1, 100))
    shards = []
    for f in range(3):
        examples = [(_png(np.full((12, 12, 3), next(ids) * 20, np.uint8)), f) for _ in range(4 if f == 1 else 3)]
        if f == 1:
            examples[1] = (b"\xff\xd8 not really a JPEG", 1)
        _write_examples(data / f"train-{f:05d}-of-00003.tfrecord", examples)
        shards.append(str(data / f"train-{f:05d}-of-00003.tfrecord"))
    source = build_source(f"tfrecord:{data}/*", None, "train", None)
    assert (source.num_train, source.num_classes) == (10, 3)

    def batches(start_step, steps, skipped):
        input_fn = pipeline.build_input_fn(
            source, mode="pretrain", global_batch_size=4, seed=0, start_step=start_step, skipped=skipped,
            augment=AugmentConfig(image_size=16, color_jitter_strength=0.5, use_blur=False))
        return [(x, y) for x, y in input_fn(None).take(steps).as_numpy_iterator()]

    (tmp_path / "run").mkdir()  # the model_dir, where the skipped-record lists go
    full_skipped = SkippedImages(str(tmp_path / "run"))
    full = batches(0, 8, full_skipped)  # 32 examples: 3 epochs and more of the 9 readable records
    # One distinct unreadable record, named by file and index, listed once per epoch (10 records each) read.
    assert full_skipped.count == 1
    listed = [line.split("\t") for line in (tmp_path / "run" / "skipped_images-0.tsv").read_text().splitlines()[1:]]
    assert {name for _, name in listed} == {f"{shards[1]}[1]"}
    assert [int(position) // 10 for position, _ in listed] == list(range(len(listed))) and len(listed) >= 3
    labels = np.concatenate([y for _, y in full])
    assert sorted(labels[:9].tolist()) == [0] * 3 + [1] * 3 + [2] * 3  # the first epoch: every readable one once

    resumed = batches(5, 3, SkippedImages(str(tmp_path / "run")))
    for (x_full, y_full), (x_resumed, y_resumed) in zip(full[5:], resumed):
        np.testing.assert_array_equal(y_full, y_resumed)
        np.testing.assert_array_equal(x_full, x_resumed)
    assert len(resumed) == 3
