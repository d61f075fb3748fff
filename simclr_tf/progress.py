"""What a training run shows while it runs: the progress line, TensorBoard scalars, a sample of views."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import tensorflow as tf
from absl import logging

from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource
from simclr_tf.sections import AugmentConfig

# Metrics shown on the progress line, when the task reports them (TensorBoard gets all of them).
_SHOWN = ("total_loss", "contrast_acc", "sup_acc", "distill_loss", "teacher_agreement")


class Progress:
    """Logs each chunk of steps: `step i/N (p%) <metrics> lr | img/s | ETA`, and `train/*` scalars.

    Args:
        writer: TensorBoard writer (a no-op writer on non-chief workers).
        total_steps: the run's last step, for the percentage and the ETA.
        global_batch_size: images per step, for the throughput.
        log: where the line goes.
        start_step: the step this process started from (the ETA counts only its own steps).
    """

    def __init__(self, writer: tf.summary.SummaryWriter, total_steps: int, global_batch_size: int,
                 log: Callable[[str], None], start_step: int) -> None:
        self.writer = writer
        self.total = total_steps
        self.batch = global_batch_size
        self.log = log
        self.start_step = start_step
        self.start_time = time.monotonic()

    def chunk_done(self, step: int, metrics: Dict[str, float], num_steps: int, seconds: float,
                   learning_rate: float, skipped: int = 0) -> None:
        """Reports `num_steps` steps that ended at `step` and took `seconds`.

        Args:
            step: the global step after the chunk.
            metrics: the chunk's mean metrics.
            num_steps: steps in the chunk.
            seconds: the chunk's wall time.
            learning_rate: the current learning rate.
            skipped: unreadable image files skipped so far by this process's input pipelines.
        """
        with self.writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"train/{k}", v)
            tf.summary.scalar("train/learning_rate", learning_rate)
            if skipped:
                tf.summary.scalar("data/skipped_images", skipped)
        images_per_s = num_steps * self.batch / max(seconds, 1e-9)
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / max(step - self.start_step, 1) * (self.total - step)
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in _SHOWN if k in metrics)
        self.log(f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%) {shown} lr {learning_rate:.4g} | "
                 f"{images_per_s:.1f} img/s | ETA {format_seconds(eta)}"
                 + (f" | {skipped} unreadable image(s) skipped" if skipped else ""))


def write_view_sample(writer: tf.summary.SummaryWriter, source: DataSource, augment: AugmentConfig, step: int,
                      seed: Optional[int] = None, num_images: int = 8) -> None:
    """A few augmented view pairs to TensorBoard (`train/augmented_views`), one row per image.

    The views come from a pipeline of their own that reads only `num_images` examples, not from the training
    input function: a training-sized batch would decode the whole shuffle buffer (tens of thousands of images at
    ImageNet settings) for a handful of thumbnails.

    Args:
        writer: TensorBoard writer.
        source: the data; the first training examples are drawn.
        augment: pretraining view size and augmentation settings.
        step: the summary's step.
        seed: seed of the views (`--seed`); None: nondeterministic.
        num_images: rows of the grid.
    """
    try:
        images = pipeline.view_sample(source, augment, num_images, seed)
        grid = pipeline.view_grid(images, num_images)
        with writer.as_default(step=step):
            tf.summary.image("train/augmented_views", grid, max_outputs=1)
    except (tf.errors.OpError, ValueError) as e:  # a sample image is nice to have, never fatal
        logging.warning("could not write augmented view sample: %s", e)


def format_seconds(seconds: float) -> str:
    """`1h02m` or `3m04s`; `?` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
