"""Input pipelines (docs/design.md §1): shapes, per-replica batch, sharding, eval coverage, seeding."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_source(train_images: np.ndarray, eval_images: np.ndarray) -> DataSource:
    """Labels are the example's index, so coverage can be counted; shards per input pipeline like the
    real sources do."""
    def make_dataset(split_kind, input_context):
        images = train_images if split_kind == "train" else eval_images
        ds = tf.data.Dataset.from_tensor_slices((images, tf.range(len(images), dtype=tf.int64)))
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds

    return DataSource(name="generated", train_split="train", eval_split="test", num_train=len(train_images),
                      num_eval=len(eval_images), num_classes=len(train_images), eval_has_labels=True,
                      make_dataset=make_dataset, image_shape=tuple(train_images.shape[1:]))


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def constant_images(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    colours = np.random.default_rng(seed).integers(40, 220, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (n, height, width, 3)).copy(), colours[:, 0, 0] / 255.0


def take(dataset: tf.data.Dataset, k: int) -> list:
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(k)]


def num_eval_steps(num_eval: int, global_eval_batch_size: int) -> int:
    """Steps that cover every eval example once: ceil(num_eval / global batch). Equal to every replica's own
    batch count when the source shards element by element."""
    return math.ceil(num_eval / global_eval_batch_size)


# Both stage-2 layouts: one XLA program per batch (small views) and one per example (large views).
SIZES = [24, pipeline.EXAMPLE_PROGRAM_MIN_SIZE]


@pytest.mark.parametrize("size", SIZES)
def test_pretrain_shapes_views_and_seed(size):
    source = make_source(random_images(20, 40, 48), random_images(5, 40, 48, 1))
    input_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=8,
                                       augment=AugmentConfig(size, color_jitter_strength=0.5), seed=3)
    batches = take(input_fn(None), 3)
    for images, labels in batches:
        assert images.shape == (8, size, size, 6) and images.dtype == np.float32
        assert labels.shape == (8,) and labels.dtype == np.int64
        assert images.min() >= 0.0 and images.max() <= 1.0
        # The two views of every image differ.
        assert all(np.abs(images[i, ..., :3] - images[i, ..., 3:]).max() > 0.05 for i in range(8))
    # Same seed, same batches; another seed, other batches.
    again = take(pipeline.build_input_fn(source, mode="pretrain", global_batch_size=8,
                                         augment=AugmentConfig(size, color_jitter_strength=0.5), seed=3)(None), 3)
    for (a, la), (b, lb) in zip(batches, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    other = take(pipeline.build_input_fn(source, mode="pretrain", global_batch_size=8,
                                         augment=AugmentConfig(size, color_jitter_strength=0.5), seed=4)(None), 1)
    assert np.abs(other[0][0] - batches[0][0]).max() > 0.1
    grid = pipeline.view_grid(batches[0][0], 3)
    assert grid.shape == (1, 3 * size, 2 * size, 3) and grid.dtype == tf.float32
    np.testing.assert_array_equal(grid[0, size:2 * size, size:].numpy(), batches[0][0][1, ..., 3:])


@pytest.mark.parametrize("mode,size", [("finetune", 32), ("distill", 32), ("finetune", SIZES[1])])
def test_finetune_views_are_crop_and_flip_only(mode, size):
    # Constant-colour sources: crop + bicubic resize keeps the colour; jitter, grayscale or blur would not.
    images, colours = constant_images(16, 30, 36)
    source = make_source(images, images[:4])
    input_fn = pipeline.build_input_fn(source, mode=mode, global_batch_size=16,
                                       augment=AugmentConfig(size, color_jitter_strength=1.0, use_blur=True),
                                       cache_dataset=True, seed=0)
    for views, labels in take(input_fn(None), 4):
        assert views.shape == (16, size, size, 3) and views.dtype == np.float32
        np.testing.assert_allclose(views, np.broadcast_to(colours[labels][:, None, None, :], views.shape),
                                   atol=1e-5)


def test_finetune_flip_rate():
    # Left half dark, right half bright: a flipped view is bright on the left.
    images = np.zeros((8, 24, 24, 3), np.uint8)
    images[:, :, 12:] = 255
    source = make_source(images, images[:2])
    input_fn = pipeline.build_input_fn(source, mode="finetune", global_batch_size=64, augment=AugmentConfig(16),
                                       seed=1)
    views = np.concatenate([views for views, _ in take(input_fn(None), 20)])
    left, right = views[:, :, 0, 0].mean(axis=1), views[:, :, -1, 0].mean(axis=1)
    # Crops inside one half look the same flipped or not; |left - right| does not depend on the flip.
    informative = np.abs(left - right) > 0.5
    flipped = left[informative] > right[informative]
    assert flipped.size > 200
    assert abs(flipped.mean() - 0.5) < 4.5 * np.sqrt(0.25 / flipped.size)


def test_eval_every_example_once_with_remainder():
    source = make_source(random_images(4, 40, 40), random_images(23, 50, 60, 2))
    input_fn = pipeline.build_input_fn(source, mode="eval", global_batch_size=8, augment=AugmentConfig(40))
    batches = take(input_fn(None), 100)
    assert [len(labels) for _, labels in batches] == [8, 8, 7]
    assert sorted(np.concatenate([labels for _, labels in batches]).tolist()) == list(range(23))
    assert num_eval_steps(23, 8) == 3 == len(batches)
    views = np.concatenate([views for views, _ in batches])
    assert views.shape == (23, 40, 40, 3) and views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0


def test_input_context_per_replica_batch_and_sharding():
    source = make_source(random_images(40, 32, 32), random_images(23, 32, 32, 3))
    eval_fn = pipeline.build_input_fn(source, mode="eval", global_batch_size=8, augment=AugmentConfig(32))
    train_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=8, augment=AugmentConfig(32),
                                       seed=0)
    seen, train_labels = [], []
    for pipeline_id in range(2):
        # 4 replicas in 2 input pipelines: per-replica batch 8 / 4 = 2.
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=4)
        batches = take(eval_fn(ctx), 100)
        assert all(len(labels) == 2 for _, labels in batches[:-1]) and 1 <= len(batches[-1][1]) <= 2
        seen.extend(np.concatenate([labels for _, labels in batches]).tolist())
        # Each pipeline's batches contain only its shard.
        for images, labels in take(train_fn(ctx), 5):
            assert images.shape == (2, 32, 32, 6)
            assert (labels % 2 == pipeline_id).all()
            train_labels.append(labels)
    assert sorted(seen) == list(range(23))
    # Each pipeline feeds 2 replicas in turn: a step takes 2 of its batches.
    pipeline_batches = [len(take(eval_fn(tf.distribute.InputContext(2, i, 4)), 100)) for i in range(2)]
    assert num_eval_steps(23, 8) == max(-(-b // 2) for b in pipeline_batches) == 3


def test_bad_arguments_are_usage_errors():
    source = make_source(random_images(4, 16, 16), random_images(4, 16, 16))
    with pytest.raises(UsageError, match="--train_mode"):
        pipeline.build_input_fn(source, mode="linear", global_batch_size=4, augment=AugmentConfig(16))
    with pytest.raises(UsageError, match="--train_batch_size"):
        pipeline.build_input_fn(source, mode="pretrain", global_batch_size=0, augment=AugmentConfig(16))
    with pytest.raises(UsageError, match="--brightness"):
        pipeline.build_input_fn(source, mode="pretrain", global_batch_size=4,
                                augment=config_lib.section(AugmentConfig, image_size=16, brightness="v9"))
    input_fn = pipeline.build_input_fn(source, mode="eval", global_batch_size=6, augment=AugmentConfig(16))
    with pytest.raises(UsageError, match="--eval_batch_size"):
        input_fn(tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=4))
    assert pipeline.shuffle_buffer_size(4, 32) == 200 and pipeline.shuffle_buffer_size(4, 64) == 40


_MULTI_REPLICA = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
    from test_pipeline import make_source, random_images
    from simclr_tf.data import pipeline
    from simclr_tf.sections import AugmentConfig
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    source = make_source(random_images(16, 32, 32), random_images(7, 32, 32, 1))
    train = strategy.distribute_datasets_from_function(pipeline.build_input_fn(
        source, mode="pretrain", global_batch_size=8, augment=AugmentConfig(16), seed=0))
    images, labels = next(iter(train))
    shapes = [tuple(t.shape) for t in strategy.experimental_local_results(images)]
    assert shapes == [(4, 16, 16, 6)] * 2, shapes
    evaluation = strategy.distribute_datasets_from_function(pipeline.build_input_fn(
        source, mode="eval", global_batch_size=4, augment=AugmentConfig(16)))
    seen = []
    for _, labels in evaluation:
        for part in strategy.experimental_local_results(labels):
            seen.extend(part.numpy().tolist())
    assert sorted(seen) == list(range(7)), seen
    print("OK")
""")


def test_two_replicas_with_distribute_datasets_from_function():
    result = subprocess.run([sys.executable, "-c", _MULTI_REPLICA, REPO, os.path.join(REPO, "tests")],
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_preview_writes_grid(tmp_path):
    from PIL import Image

    from simclr_tf import preview

    path = tmp_path / "data.npz"
    images = random_images(6, 20, 24)
    np.savez(path, x_train=images, y_train=np.arange(6), x_test=images[:2], y_test=np.arange(2))
    out = tmp_path / "grid.png"
    assert preview.main([f"--dataset=npz:{path}", f"--out={out}", "--image_size=16", "--num_images=3",
                         "--seed=1"]) == 0
    grid = np.asarray(Image.open(out))
    gap = 2
    assert grid.shape == (3 * (16 + gap) + gap, 3 * (16 + gap) + gap, 3)
    # First tile is the original, resized to 16 px.
    original = np.clip(tf.image.resize(images[:1] / 255.0, [16, 16], method="bicubic")[0].numpy(), 0, 1)
    np.testing.assert_allclose(grid[gap:gap + 16, gap:gap + 16] / 255.0, original, atol=1 / 255 + 1e-6)


def test_seeded_stream_resumes_exactly_at_any_step():
    """With a seed, batch k of a run started at step s equals batch s+k of a run started at 0 (across epochs)."""
    import tensorflow as tf

    from simclr_tf.data.sources import DataSource

    images = np.random.RandomState(0).randint(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    source = DataSource(name="t", train_split="train", eval_split="test", num_train=10, num_eval=0,
                        num_classes=10, eval_has_labels=False,
                        make_dataset=lambda kind, ctx=None: tf.data.Dataset.from_tensor_slices(
                            (images, np.arange(10, dtype=np.int64))))

    def batches(start, n, seed=0):
        fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=4, augment=AugmentConfig(8),
                                     seed=seed, start_step=start)
        return [(x.numpy(), y.numpy()) for x, y in fn(tf.distribute.InputContext()).take(n)]

    full = batches(0, 7)
    labels = np.concatenate([y for _, y in full])
    # Every epoch (10 examples) is a permutation, and consecutive epochs are shuffled differently.
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:20]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:20])
    for start in (1, 3, 5):  # 3 and 5 start mid-epoch
        for (xa, ya), (xb, yb) in zip(full[start:], batches(start, 7 - start)):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)
    other_seed = batches(0, 2, seed=1)
    assert not np.array_equal(other_seed[0][0], full[0][0])


def test_view_sample_reads_only_its_examples(tmp_path):
    """The TensorBoard sample of views (written at the start of pretraining) reads its 8 examples once, whatever
    the training batch: a training-sized batch would fill the shuffle buffer (batch 4096 at 224 px: ~41k decoded
    images) and augment 8,192 views for 8 thumbnails."""
    import dataclasses

    from simclr_tf import progress

    reads = tf.Variable(0, dtype=tf.int64)
    base = make_source(random_images(600, 20, 20), random_images(4, 20, 20))

    def counted(split_kind, input_context=None):
        def count(image, label):
            with tf.control_dependencies([reads.assign_add(1)]):
                return tf.identity(image), label

        return base.make_dataset(split_kind, input_context).map(count)

    source = dataclasses.replace(base, make_dataset=counted)
    writer = tf.summary.create_file_writer(str(tmp_path))
    progress.write_view_sample(writer, source, AugmentConfig(16, color_jitter_strength=0.5), step=3, seed=0)
    writer.flush()
    assert 8 <= int(reads.numpy()) <= 16
    events = [event for path in tmp_path.iterdir() for event in tf.compat.v1.train.summary_iterator(str(path))]
    images = [(event.step, value) for event in events for value in event.summary.value
              if value.tag == "train/augmented_views"]
    assert len(images) == 1 and images[0][0] == 3
    width, height, png = tf.make_ndarray(images[0][1].tensor)
    assert (int(width), int(height)) == (2 * 16, 8 * 16)  # 8 rows of view 1 | view 2
    assert tf.io.decode_png(png).shape == (8 * 16, 2 * 16, 3)
