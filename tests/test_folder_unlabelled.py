"""Pretraining on unlabelled image folders: layouts, files skipped when read, every readable file once per epoch,
exact resume past skipped files, the file index, and two workers reading disjoint halves."""
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import pipeline
from simclr_tf.data.sources import DEFAULT_EVAL_SPLITS, build_source
from simclr_tf.data.sources.decoding import SkippedFiles, SkippedImages
from simclr_tf.data.sources.folder import decode_image_file
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig
from tests.conftest import REPO

AUGMENT = AugmentConfig(image_size=8, color_jitter_strength=0.5, use_blur=False)
NUM_IMAGES = 30
BAD = ("truncated.jpg", "text.png", "empty.jpeg")


def make_folder(root, nested: bool, num_images: int = NUM_IMAGES, seed: int = 0):
    """`num_images` images named `img<id>.(png|jpg)` (flat, or spread over nested folders) and 3 unreadable
    files; returns the root."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / (f"{2019 + i % 3}/trip{i % 2}" if nested and i % 4 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (10 + i % 3, 12, 3), np.uint8))
        image.save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(full, format="JPEG")
    bad_folder = root / ("2020" if nested else "")
    (bad_folder / BAD[0]).write_bytes(full.getvalue()[:len(full.getvalue()) // 2])
    (bad_folder / BAD[1]).write_text("not an image")
    (bad_folder / BAD[2]).write_bytes(b"")
    return root


def with_ids(source):
    """The source with each image's id (from its file name) as its label, so the ids can be counted after
    the whole training pipeline (shuffle, skip, decode, augment, batch)."""
    def decode(record):
        image, _ = decode_image_file(record)
        name = tf.strings.split(record[0], "/")[-1]
        return image, tf.strings.to_number(tf.strings.regex_replace(name, r"\D", ""), tf.int64)

    return dataclasses.replace(source, decode=decode)


def batches(source, n, *, start_step=0, skipped=None, batch=6, context=None):
    input_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=batch, augment=AUGMENT, seed=3,
                                       start_step=start_step, skipped=skipped)
    return [(x.numpy(), y.numpy()) for x, y in input_fn(context or tf.distribute.InputContext()).take(n)]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_unlabelled_folder_every_readable_file_once_per_epoch(tmp_path, nested):
    root = make_folder(tmp_path / "photos", nested)
    source = build_source(f"folder:{root}", None, "train", DEFAULT_EVAL_SPLITS)
    # No split folders: the folder itself is the train split, unlabelled, and there is no eval split.
    assert (source.num_train, source.num_classes, source.eval_split, source.num_eval) == (NUM_IMAGES + 3, 0, None, 0)
    assert {int(y) for _, y in source.as_dataset("train").as_numpy_iterator()} == {-1}

    skipped = SkippedImages(str(tmp_path))
    epochs = batches(with_ids(source), 2 * NUM_IMAGES // 6, skipped=skipped)
    assert all(x.shape == (6, 8, 8, 6) for x, _ in epochs)
    first = np.concatenate([y for _, y in epochs[:NUM_IMAGES // 6]])
    second = np.concatenate([y for _, y in epochs[NUM_IMAGES // 6:]])
    assert sorted(first) == list(range(NUM_IMAGES)) and sorted(second) == list(range(NUM_IMAGES))
    assert list(first) != list(second)  # each epoch has its own order
    assert skipped.count == 3
    listed = (tmp_path / "skipped_images-0.tsv").read_text().splitlines()
    assert listed[0] == "position\tfile"
    assert {os.path.basename(line.split("\t")[1]) for line in listed[1:]} == set(BAD)


def test_resume_past_skipped_files_is_exact(tmp_path):
    root = make_folder(tmp_path / "photos", nested=True)
    source = build_source(f"folder:{root}", None, "train", None)
    first_run = tmp_path / "first"
    first_run.mkdir()
    straight = batches(source, 12, skipped=SkippedImages(str(first_run)))
    k = 7  # past the first epoch's 3 skipped files
    resumed = batches(source, 12 - k, start_step=k, skipped=SkippedImages(str(first_run)))
    for (x, y), (rx, ry) in zip(straight[k:], resumed):
        np.testing.assert_array_equal(rx, x)
    # The earlier run's list is what places the resumed step: without it, the stream starts too early.
    assert SkippedFiles(str(first_run / "skipped_images-0.tsv")).record_position(k * 6) > k * 6
    blind = batches(source, 1, start_step=k, skipped=SkippedImages(str(tmp_path / "elsewhere")))
    assert not np.array_equal(blind[0][0], straight[k][0])


def test_record_position_counts_listed_skips(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text("position\tfile\n3\ta\n5\tb\n5\tb\n20\tc\n")
    skipped = SkippedFiles(str(path))
    # Examples 0..2 are records 0..2; record 3 is skipped; example 3 is record 4; record 5 skipped; ...
    assert [skipped.record_position(e) for e in (0, 2, 3, 4, 17, 18)] == [0, 2, 4, 6, 19, 21]


def test_labelled_class_folders_keep_their_meaning_and_modes_say_what_they_need(tmp_path):
    root = tmp_path / "imagenet_like"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")
    # Class folders directly under PATH (no split folders): PATH is the labelled train split.
    source = build_source(f"folder:{root}", None, "train[:50%]", "train[50%:]")
    assert (source.num_classes, source.class_names, source.num_train, source.num_eval) == (2, ("cat", "dog"), 3, 3)
    assert source.eval_has_labels
    unlabelled = build_source(f"folder:{make_folder(tmp_path / 'photos', nested=True)}", None, "train", None)
    from simclr_tf import app
    from simclr_tf.config import Config

    config = Config(dataset=f"folder:{tmp_path / 'photos'}", model_dir=str(tmp_path / "m"), train_mode="finetune",
                    strategy="one_device", eval_split="train")
    with pytest.raises(UsageError, match=r"^--train_split: fine-tuning needs labels"):
        app.prepare(config, log=lambda line: None)
    assert unlabelled.num_classes == 0


def test_file_index_is_reused_until_the_folder_changes(tmp_path):
    root = make_folder(tmp_path / "photos", nested=True)
    index_dir = tmp_path / "run"
    first = build_source(f"folder:{root}", None, "train", None, index_dir=str(index_dir))
    (index_file,) = index_dir.glob("folder_index-*.tsv")
    # A stale entry planted in the index is served while no listed directory changed: proof it is read.
    text = index_file.read_text()
    index_file.write_text(text.replace("END\n", "F\tghost.jpg\nEND\n"))
    os.utime(index_file)
    reused = build_source(f"folder:{root}", None, "train", None, index_dir=str(index_dir))
    assert reused.num_train == first.num_train + 1
    # Adding a file changes its directory's modification time: the folder is listed again.
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "2019" / "new.png")
    os.utime(root / "2019", ns=(0, os.stat(root / "2019").st_mtime_ns + 10**9))
    relisted = build_source(f"folder:{root}", None, "train", None, index_dir=str(index_dir))
    assert relisted.num_train == first.num_train + 1 and "ghost.jpg" not in index_file.read_text()


def test_folder_without_readable_images_is_one_error(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"nope")
    (root / "b.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"^--train_split: .* holds no readable image: all 2 .* fail to decode$"):
        build_source(f"folder:{root}", None, "train", None)


WORKER = r"""
import json, os, sys
import tensorflow as tf
sys.path.insert(0, {repo!r})
from tests.test_folder_unlabelled import AUGMENT, with_ids
from simclr_tf.data import pipeline
from simclr_tf.data.sources import build_source

strategy = tf.distribute.MultiWorkerMirroredStrategy()
source = with_ids(build_source("folder:" + {root!r}, None, "train", None))
train_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=4, augment=AUGMENT, seed=0)
contexts = []
def input_fn(ctx):
    contexts.append(ctx)
    return train_fn(ctx)
iterator = iter(strategy.distribute_datasets_from_function(input_fn))
trained = []
for _ in range(2):
    _, labels = next(iterator)
    trained += [int(v) for t in strategy.experimental_local_results(labels) for v in t.numpy()]
(ctx,) = contexts
share = [int(y) for _, y in source.as_dataset("train", ctx).as_numpy_iterator()]
print("IDS " + json.dumps(dict(pipeline=ctx.input_pipeline_id, of=ctx.num_input_pipelines, share=share,
                               trained=trained)))
"""


def test_two_workers_read_disjoint_files_covering_the_folder(tmp_path):
    from tests.test_train import free_port

    root = make_folder(tmp_path / "photos", nested=True, num_images=16)
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    script = WORKER.format(repo=str(REPO), root=str(root))
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    seen = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        seen.append(json.loads(next(line for line in out.splitlines() if line.startswith("IDS "))[4:]))
    assert sorted((s["pipeline"], s["of"]) for s in seen) == [(0, 2), (1, 2)]
    shares = [set(s["share"]) for s in seen]
    assert not shares[0] & shares[1] and sorted(shares[0] | shares[1]) == list(range(16))
    for s, share in zip(seen, shares):  # the training batches of each worker come from its own share
        assert len(s["trained"]) == 4 and set(s["trained"]) <= share


def test_pretrain_on_unlabelled_folder_watch_knn_on_labelled_then_linear_eval(tmp_path):
    """run.py's path in-process: pretrain on a nested unlabelled folder with broken files, the kNN monitor on a
    separate labelled folder (--eval_dataset), then linear eval on that labelled folder from the checkpoint."""
    from simclr_tf import app
    from simclr_tf.config import Config
    from tests.conftest import TINY

    photos = make_folder(tmp_path / "photos", nested=True, num_images=16)
    labelled = tmp_path / "labelled"
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            (labelled / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(
                    labelled / split / name / f"{i}.png")
    run = dict(TINY, train_batch_size=4, warmup_epochs=0, seed=0, learning_rate=0.5)
    lines = []
    pretrain = Config(**run, model_dir=str(tmp_path / "pre"), dataset=f"folder:{photos}", train_steps=6,
                      checkpoint_steps=3, mode="train_then_eval", eval_dataset=f"folder:{labelled}",
                      knn_every_steps=3, knn_k=3)
    result = app.main(pretrain, log=lines.append)
    text = "\n".join(lines)
    assert "19 train / no eval split, 0 classes" in text  # 16 images + 3 broken files listed
    assert "--eval_split: no 'validation' split in folder:" in text
    progress = [line for line in lines if line.startswith("step ") and "/6 (" in line]
    assert progress[-1].startswith("step 6/6") and progress[-1].endswith("| 3 unreadable image(s) skipped")
    assert sum("kNN top-1" in line for line in lines) >= 1 and 0.0 <= result["knn_top1"] <= 1.0
    assert "top1" not in result  # no head: the training data has no labels
    listed = (tmp_path / "pre" / "skipped_images-0.tsv").read_text().splitlines()[1:]
    assert {os.path.basename(line.split("\t")[1]) for line in listed} == set(BAD)

    linear = Config(**run, model_dir=str(tmp_path / "lin"), dataset=f"folder:{labelled}", train_steps=2,
                    checkpoint_steps=2, mode="train_then_eval", train_mode="finetune", fine_tune_after_block=4,
                    checkpoint=str(tmp_path / "pre"), optimizer="momentum", zero_init_logits_layer=True)
    result = app.main(linear, log=lines.append)
    assert result["num_examples"] == 4 and 0.0 <= result["top1"] <= 1.0
