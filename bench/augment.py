"""Pretraining augmentation throughput: our batched pipeline vs the reference's per-image `map`.

Both pipelines start from the same in-memory 256x320 images (random smooth images that went through JPEG
encode/decode), shuffle, repeat, and yield `[b, S, S, 6]` two-view batches with the same ops (s = 1.0, blur on).
Rounds alternate between the two implementations so load from other processes hits both alike; views/s are
wall-clock, and views per CPU-second are printed too because this machine is shared.

    python bench/augment.py [--sizes 32,224] [--seconds 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.setup_path()

import tensorflow as tf  # noqa: E402

from simclr_tf.data import pipeline  # noqa: E402
from simclr_tf.data.sources import DataSource  # noqa: E402
from simclr_tf.sections import AugmentConfig  # noqa: E402
from tests.reference_augment import reference_view  # noqa: E402

SOURCE_HEIGHT, SOURCE_WIDTH = 256, 320
BATCH_FOR_SIZE = {32: 128, 64: 64, 96: 32, 128: 32, 160: 16, 224: 16}


def jpeg_decoded_images(count: int, seed: int = 0) -> tf.Tensor:
    """Random smooth colour images with some texture, encoded as JPEG and decoded again."""
    coarse = tf.random.stateless_uniform([count, 8, 10, 3], seed=[seed, 1])
    smooth = tf.image.resize(coarse, [SOURCE_HEIGHT, SOURCE_WIDTH], method="bicubic")
    noise = tf.random.stateless_normal([count, SOURCE_HEIGHT, SOURCE_WIDTH, 3], seed=[seed, 2], stddev=0.05)
    pixels = tf.image.convert_image_dtype(tf.clip_by_value(smooth + noise, 0.0, 1.0), tf.uint8, saturate=True)
    return tf.stack([tf.io.decode_jpeg(tf.io.encode_jpeg(p, quality=90)) for p in pixels])


def in_memory_source(images: tf.Tensor) -> DataSource:
    labels = tf.zeros([images.shape[0]], tf.int64)

    def make_dataset(split_kind: str, input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((images, labels))

    fields = {f.name for f in dataclasses.fields(DataSource)}
    extra = {"image_shape": tuple(images.shape[1:])} if "image_shape" in fields else {}
    return DataSource(name="bench", train_split="train", eval_split="eval", num_train=int(images.shape[0]),
                      num_eval=0, num_classes=1, eval_has_labels=False, make_dataset=make_dataset, **extra)


def reference_dataset(source: DataSource, batch: int, image_size: int) -> tf.data.Dataset:
    """The reference's structure: every op inside one per-image map."""
    settings = AugmentConfig(image_size)

    def two_views(image: tf.Tensor, label: tf.Tensor) -> tuple:
        views = [reference_view(image, settings) for _ in range(2)]
        return tf.concat(views, axis=-1), label

    dataset = source.as_dataset("train").shuffle(pipeline.shuffle_buffer_size(batch, image_size)).repeat()
    dataset = dataset.map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def measure(dataset: tf.data.Dataset, views_per_batch: int, seconds: float, warmup: int = 3) -> tuple[float, float]:
    """(views per wall second, views per process CPU second) over about `seconds` after a warm-up."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    wall0, cpu0, batches = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - wall0 < seconds:
        next(iterator)
        batches += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return batches * views_per_batch / wall, batches * views_per_batch / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per round and pipeline")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_images", type=int, default=64)
    args = parser.parse_args()

    source = in_memory_source(jpeg_decoded_images(args.num_images))
    rows = []
    for image_size in [int(s) for s in args.sizes.split(",")]:
        batch = BATCH_FOR_SIZE.get(image_size, 32)
        ours = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=batch,
                                       augment=AugmentConfig(image_size), seed=0)(None)
        reference = reference_dataset(source, batch, image_size)
        results: dict[str, list[tuple[float, float]]] = {"per-image": [], "batched": []}
        for _ in range(args.rounds):
            results["per-image"].append(measure(reference, 2 * batch, args.seconds))
            results["batched"].append(measure(ours, 2 * batch, args.seconds))
        ref_wall = statistics.median(r[0] for r in results["per-image"])
        ours_wall = statistics.median(r[0] for r in results["batched"])
        ref_cpu = statistics.median(r[1] for r in results["per-image"])
        ours_cpu = statistics.median(r[1] for r in results["batched"])
        rows.append((image_size, batch, ref_wall, ours_wall, ours_wall / ref_wall, ours_cpu / ref_cpu))
        print(f"{image_size:>4} px  batch {batch:>3}: per-image {ref_wall:8.1f} views/s, batched {ours_wall:8.1f}"
              f" views/s, ratio {ours_wall / ref_wall:.2f}x (per CPU-second {ours_cpu / ref_cpu:.2f}x)", flush=True)

    print("\n| image size | batch | per-image map (views/s) | batched (views/s) | ratio | ratio per CPU-s |")
    print("|---|---|---|---|---|---|")
    for image_size, batch, ref_wall, ours_wall, ratio, cpu_ratio in rows:
        print(f"| {image_size} | {batch} | {ref_wall:.0f} | {ours_wall:.0f} | {ratio:.2f}x | {cpu_ratio:.2f}x |")
    common.emit({"config": vars(args), "rows": [
        {"image_size": s, "batch": b, "per_image_views_per_s": round(r, 1), "batched_views_per_s": round(o, 1),
         "ratio": round(q, 3), "ratio_per_cpu_s": round(c, 3)} for s, b, r, o, q, c in rows]})


if __name__ == "__main__":
    main()
