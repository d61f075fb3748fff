"""Keras callbacks for `fit()` on `SimCLR`: the kNN monitor and the collapse monitor.

Both write their value into the epoch's `logs`, so Keras's progress bar, `History`, `TensorBoard` (list it
after them) and `EarlyStopping` / `ModelCheckpoint(monitor=...)` see it like any metric.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import keras
import numpy as np

from simclr_tf.errors import UsageError


def _features(model: keras.Model, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    # Not features.extract_features: that one traces the model in a tf.function under a tf.distribute strategy,
    # which a model on the JAX backend cannot run; `embed` on numpy batches runs on any backend.
    features, labels = [], []
    for images, y in dataset.as_numpy_iterator():
        features.append(keras.ops.convert_to_numpy(model.embed(images)))
        labels.append(y)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the encoder's features (`knn_top1` in the logs) every `every_n_epochs` epochs.

    The train split of `data` is the memory bank and its eval split is classified (centre crops, inference
    mode), as the CLI's `--knn_every_steps` monitor does (simclr_tf.knn).

    Args:
        data: labelled data with an eval split: a DataSource, a `--dataset` string (e.g. `folder:PATH` with
            train/ and test/ class folders) or `((train_images, train_labels), (eval_images, eval_labels))`.
        image_size: side of the centre crops.
        batch_size: rows per feature-extraction batch.
        every_n_epochs: how often (the last epoch is always measured).
        k, temperature: the kNN classifier's neighbours and vote temperature.
    """

    def __init__(self, data: Any, *, image_size: int, batch_size: int = 256, every_n_epochs: int = 1,
                 k: int = 200, temperature: float = 0.1) -> None:
        super().__init__()
        from simclr_tf.data.views import as_source

        if every_n_epochs < 1:
            raise UsageError("every_n_epochs", f"must be >= 1, got {every_n_epochs}")
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], tuple):
            (train_x, train_y), eval_data = data
            source = as_source((train_x, train_y), eval_data=eval_data, name="kNN data")
        else:
            source = as_source(data)
        if source.num_classes < 1 or not source.eval_has_labels or source.num_eval == 0:
            raise UsageError("KNNMonitor", f"needs labelled train and eval splits; {source.name} has none")
        self.source = source
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.every_n_epochs = int(every_n_epochs)
        self.k = int(k)
        self.temperature = float(temperature)
        self._epochs: Optional[int] = None

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._epochs = self.params.get("epochs") if self.params else None

    def evaluate(self) -> float:
        """kNN top-1 of the model's current features."""
        from simclr_tf.data.views import eval_dataset
        from simclr_tf.knn import knn_top1

        train_h, train_y = _features(self.model, eval_dataset(self.source, image_size=self.image_size,
                                                              batch_size=self.batch_size, split="train"))
        eval_h, eval_y = _features(self.model, eval_dataset(self.source, image_size=self.image_size,
                                                            batch_size=self.batch_size, split="eval"))
        labelled = train_y >= 0
        return knn_top1(train_h[labelled], train_y[labelled], eval_h, eval_y, self.source.num_classes,
                        k=self.k, temperature=self.temperature)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        last = self._epochs is not None and epoch + 1 == self._epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        if logs is not None:
            logs["knn_top1"] = self.evaluate()


class CollapseMonitor(keras.callbacks.Callback):
    """Watches `proj_std` (the per-dimension spread of the L2-normalised projections, measured by `SimCLR`
    every step) against its healthy value 1/sqrt(d).

    Adds `collapse_ratio` = proj_std * sqrt(d) to the epoch logs: ~1 when the projections spread over the
    sphere, -> 0 when they collapse to a point. Below `warn_below` it prints a warning, and with
    `stop_training` ends `fit()`.

    Args:
        warn_below: the ratio that counts as collapse.
        stop_training: stop `fit()` on collapse.
    """

    def __init__(self, warn_below: float = 0.1, stop_training: bool = False) -> None:
        super().__init__()
        if not 0 < warn_below < 1:
            raise UsageError("warn_below", f"must be in (0, 1), got {warn_below}")
        self.warn_below = float(warn_below)
        self.stop_training = bool(stop_training)
        self.collapsed_at: Optional[int] = None

    @staticmethod
    def healthy_std(dim: int) -> float:
        """The spread of projections uniform on the unit sphere of R^dim: 1/sqrt(dim)."""
        return 1.0 / math.sqrt(dim)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if not logs or "proj_std" not in logs:
            return
        ratio = float(logs["proj_std"]) / self.healthy_std(self.model.projection_output_dim)
        logs["collapse_ratio"] = ratio
        if ratio < self.warn_below:
            self.collapsed_at = epoch
            print(f"\nCollapseMonitor: epoch {epoch + 1}: projections collapsing (proj_std = {ratio:.3f} / "
                  f"sqrt(d)); lower the learning rate or raise the temperature")
            if self.stop_training:
                self.model.stop_training = True
