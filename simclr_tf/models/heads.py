"""Projection head (none / linear / nonlinear) and supervised head of SimCLR (docs/design.md §3.6, §3.7)."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from simclr_tf.errors import UsageError
from simclr_tf.models.resnet import PACKAGE, batch_norm

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")


def dense_initializer() -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(mean=0.0, stddev=0.01)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ProjectionHead(keras.layers.Layer):
    """g(h): `call` returns the list [h, layer 1, ..., layer L] (the reference's `hiddens_list`).

    nonlinear: layers 1..L-1 are dense d->d (no bias), BN, ReLU; layer L is dense d->proj_out_dim (no bias),
    BN without beta, no ReLU. linear: one dense d->proj_out_dim (no bias) + BN without beta. none: [h].
    d (the input width) is known at build time, so the dense layers are created in `build`.
    """

    def __init__(self, proj_head_mode: str = "nonlinear", num_proj_layers: int = 3, proj_out_dim: int = 128,
                 batch_norm_decay: float = 0.9, global_bn: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proj_head_mode not in PROJ_HEAD_MODES:
            raise UsageError("--proj_head_mode", f"{proj_head_mode!r} is not one of {', '.join(PROJ_HEAD_MODES)}")
        if proj_head_mode == "nonlinear" and num_proj_layers < 1:
            raise UsageError("--num_proj_layers", f"must be >= 1 with --proj_head_mode=nonlinear, got {num_proj_layers}")
        if proj_out_dim < 1:
            raise UsageError("--proj_out_dim", f"must be >= 1, got {proj_out_dim}")
        self.proj_head_mode = proj_head_mode
        self.num_proj_layers = num_proj_layers
        self.proj_out_dim = proj_out_dim
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn

    @property
    def num_layers(self) -> int:
        """L: the number of head layers, so valid selectors are -1..L."""
        return {"none": 0, "linear": 1, "nonlinear": self.num_proj_layers}[self.proj_head_mode]

    # Layers live in plain attributes, not lists, so tf.train.Checkpoint sees them (see resnet.Stem.convs).
    @property
    def dense_layers(self) -> list[keras.layers.Dense]:
        return [getattr(self, f"dense{j}") for j in range(self.num_layers) if hasattr(self, f"dense{j}")]

    @property
    def bn_layers(self) -> list[keras.layers.BatchNormalization]:
        return [getattr(self, f"bn{j}") for j in range(self.num_layers) if hasattr(self, f"bn{j}")]

    def build(self, input_shape) -> None:
        mid_dim = int(input_shape[-1])
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            dense = keras.layers.Dense(self.proj_out_dim if last else mid_dim, use_bias=False,
                                       kernel_initializer=dense_initializer(), name=f"dense{j}")
            bn = batch_norm(self.batch_norm_decay, self.global_bn, center=not last, name=f"bn{j}")
            dense.build(input_shape if j == 0 else (input_shape[0], mid_dim))
            bn.build((input_shape[0], dense.units))
            setattr(self, f"dense{j}", dense)
            setattr(self, f"bn{j}", bn)
            # Layers made after `trainable = False` was set on the head must inherit it.
            dense.trainable = bn.trainable = self.trainable

    def call(self, inputs, training=None):
        hiddens = [inputs]
        x = inputs
        for j, (dense, bn) in enumerate(zip(self.dense_layers, self.bn_layers)):
            x = bn(dense(x), training=training)
            if j != self.num_layers - 1:
                x = ops.relu(x)
            hiddens.append(x)
        return hiddens

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [layer for pair in zip(self.dense_layers, self.bn_layers) for layer in pair]

    def get_config(self) -> dict:
        return {**super().get_config(), "proj_head_mode": self.proj_head_mode,
                "num_proj_layers": self.num_proj_layers, "proj_out_dim": self.proj_out_dim,
                "batch_norm_decay": self.batch_norm_decay, "global_bn": self.global_bn}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SupervisedHead(keras.layers.Layer):
    """Linear classifier: dense with bias, kernel N(0, 0.01), no BN."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise UsageError("--num_classes", f"must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.dense = keras.layers.Dense(num_classes, use_bias=True, kernel_initializer=dense_initializer(),
                                        bias_initializer="zeros", name="dense")

    def call(self, inputs):
        return self.dense(inputs)

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [self.dense]

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}
