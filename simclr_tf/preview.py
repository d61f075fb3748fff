"""PNG grid of augmented views: each row is an original image (resized) and its two pretraining views.

    python -m simclr_tf.preview --dataset=mnist_5k --out=grid.png [--image_size=32 --num_images=8 --seed=0
        --color_jitter_strength=1.0 --use_blur --data_dir=... --split=train]

The views come from the training pipeline itself (`pipeline.build_input_fn(mode='pretrain')`), so what the grid
shows is what the model sees.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource, build_source
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig

_GAP = 2  # pixels of white between tiles


def _originals_and_views(source: DataSource, split: str, *, augment: AugmentConfig, num_images: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`num_images` source images resized to the view size and their 6-channel view pairs, from the same
    elements: the pipeline is run on a source restricted to those images, without shuffling them away."""
    originals = [image for image, _ in source.as_dataset(split).take(num_images)]
    if not originals:
        raise UsageError("--dataset", f"split {split!r} of {source.name!r} has no images")

    def make_dataset(split_kind: str, input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
        # Labels replaced by the position in the source, to undo the pipeline's shuffle below.
        return source.as_dataset(split).take(len(originals)).enumerate().map(lambda i, ex: (ex[0], i))

    subset = DataSource(name=source.name, train_split=split, eval_split=split, num_train=len(originals),
                        num_eval=len(originals), num_classes=source.num_classes, eval_has_labels=True,
                        make_dataset=make_dataset)
    input_fn = pipeline.build_input_fn(subset, mode="pretrain", global_batch_size=len(originals), augment=augment,
                                       seed=seed)
    views, order = next(iter(input_fn(None)))
    # The pipeline shuffles; put the views back in source order.
    views = tf.gather(views, tf.argsort(order)).numpy()
    size = [augment.image_size, augment.image_size]
    resized = np.stack([tf.clip_by_value(tf.image.resize(tf.image.convert_image_dtype(o, tf.float32), size,
                                                         method="bicubic"), 0.0, 1.0)
                        for o in originals])
    return resized, views


def grid_image(originals: np.ndarray, views: np.ndarray) -> np.ndarray:
    """uint8 `[rows, 3 tiles]` grid with white gaps: original | view 1 | view 2."""
    n, size = originals.shape[0], originals.shape[1]
    step = size + _GAP
    grid = np.ones([n * step + _GAP, 3 * step + _GAP, 3], np.float32)
    for row in range(n):
        tiles = (originals[row], views[row, ..., :3], views[row, ..., 3:])
        for col, tile in enumerate(tiles):
            top, left = _GAP + row * step, _GAP + col * step
            grid[top:top + size, left:left + size] = tile
    return np.round(grid * 255.0).astype(np.uint8)


def write_preview(dataset: str, out: str, *, augment: AugmentConfig = AugmentConfig(image_size=32),
                  data_dir: Optional[str] = None, split: str = "train", num_images: int = 8,
                  seed: int = 0) -> np.ndarray:
    """Writes the PNG grid to `out` and returns it.

    Args:
        dataset: `--dataset` (a TFDS name, folder:PATH, npz:PATH or an embedded dataset).
        out: the PNG file to write; its folder must exist.
        augment: the pretraining views' size and augmentation settings.
        data_dir: TFDS data folder.
        split: the split to draw images from.
        num_images: rows of the grid.
        seed: seed of the views.
    """
    if num_images <= 0:
        raise UsageError("--num_images", f"must be positive, got {num_images}")
    source = build_source(dataset, data_dir, split, split)
    originals, views = _originals_and_views(source, "train", augment=augment, num_images=num_images, seed=seed)
    grid = grid_image(originals, views)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UsageError("--out", f"directory {directory} does not exist")
    Image.fromarray(grid).save(out, format="PNG")
    return grid


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simclr_tf.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="TFDS name, folder:PATH, npz:PATH or the embedded default")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="train", help="split to draw images from")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--color_jitter_strength", type=float, default=1.0)
    parser.add_argument("--use_blur", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        augment = config_lib.section(AugmentConfig, image_size=args.image_size, use_blur=args.use_blur,
                                     color_jitter_strength=args.color_jitter_strength)
        write_preview(args.dataset, args.out, augment=augment, data_dir=args.data_dir, split=args.split,
                      num_images=args.num_images, seed=args.seed)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
