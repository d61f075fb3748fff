"""The building blocks of the ResNet backbones: padded convolutions, BN, the stems, SK and SE.

Every composite layer lists its leaf layers (`Conv2D`, `BatchNormalization`) in `leaf_layers()` in the order
the official TF1 code creates the corresponding variables. That order is the contract the official
checkpoint loader (`simclr_tf.official`) maps names by, and it is how weight-decay exclusions select
variables by object.
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops


PACKAGE = "simclr_tf"
BATCH_NORM_EPSILON = 1e-5

BLOCKS_PER_DEPTH: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
GROUP_BASE_FILTERS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)
SK_MIN_DIM = 32


def scaled(channels: int, width_multiplier: float) -> int:
    """Channel count at a width multiplier, `int(N * w)` as in the official code (exact for integer w)."""
    return int(channels * width_multiplier)


def conv_initializer() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")


def batch_norm(batch_norm_decay: float, global_bn: bool, init_zero: bool = False, center: bool = True,
               name: str | None = None) -> keras.layers.BatchNormalization:
    """BN with the reference's epsilon 1e-5 (Keras' default is 1e-3) and decay as Keras momentum.

    `global_bn` (statistics over all replicas) needs tf.distribute, i.e. the TensorFlow backend; on the other
    Keras backends, which train on one device here, it is a no-op.
    """
    return BatchNormalization(
        momentum=batch_norm_decay, epsilon=BATCH_NORM_EPSILON, center=center, scale=True,
        gamma_initializer="zeros" if init_zero else "ones", synchronized=global_bn and synchronized_bn_available(),
        name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training pass runs TensorFlow's fused kernel where the statistics are
    one replica's.

    Keras 3 normalises with separate element-wise ops (moments, then scale and shift), and their backward pass
    holds several batch-sized temporaries at once; the fused kernel (`FusedBatchNormV3`, what tf.keras used)
    does each direction in one op: ResNet-18 at batch 256 x 2 views with `--recompute`, the step's peak tensor
    memory 2035 -> 1905 MiB. The numbers are Keras' up to float rounding: the same biased batch variance
    normalises, and the moving variance takes it too (the kernel reports the unbiased one, n / (n - 1) times
    it, which is undone here). Everything else (inference, masks, renorm, statistics synchronised over
    several replicas, other backends) is Keras' own code. On GPUs the Keras path stays: cuDNN's minimum
    epsilon (1e-5) is not below the reference's 1e-5 in float64 but is in float32, and the rounding of that
    edge has not been checked on a GPU here.
    """

    def _fusable(self, inputs: Any, training: Any, mask: Any) -> bool:
        if keras.backend.backend() != "tensorflow" or not (training and self.trainable) or mask is not None:
            return False
        if self.renorm or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return False
        import tensorflow as tf  # the TensorFlow backend only

        if self.synchronized:
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                return False
        return not tf.config.list_logical_devices("GPU")

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        # As Keras: statistics in float32 whatever the compute dtype (mixed precision).
        x = ops.cast(inputs, "float32")
        channels = x.shape[-1]
        gamma = ops.cast(self.gamma, "float32") if self.scale else tf.ones([channels], "float32")
        beta = ops.cast(self.beta, "float32") if self.center else tf.zeros([channels], "float32")
        outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel's correction is n / max(n - 1, 1) over the n = batch x height x width values per channel.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
        variance = unbiased * (tf.maximum(n - 1.0, 1.0) / n)
        self.moving_mean.assign(
            ops.cast(self.moving_mean, "float32") * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, "float32") * self.momentum + variance * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)


def synchronized_bn_available() -> bool:
    """Whether Keras can synchronise BatchNormalization across replicas (only its TensorFlow backend can)."""
    return keras.backend.backend() == "tensorflow"


@keras.saving.register_keras_serializable(package=PACKAGE)
class FixedPaddingConv2D(keras.layers.Conv2D):
    """Bias-free conv; strided convs pad k-1 (floor before, ceil after) then VALID, stride 1 is SAME.

    Padding explicitly makes the output independent of the input size's parity, as in the reference.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, **kwargs: Any) -> None:
        for key in ("padding", "use_bias", "kernel_initializer"):
            kwargs.pop(key, None)
        super().__init__(filters, kernel_size, strides=strides, padding="valid" if strides > 1 else "same",
                         use_bias=False, kernel_initializer=conv_initializer(), **kwargs)

    def call(self, inputs):
        if self.strides[0] > 1:
            total = self.kernel_size[0] - 1
            begin = total // 2
            inputs = ops.pad(inputs, [[0, 0], [begin, total - begin], [begin, total - begin], [0, 0]])
        return super().call(inputs)


class CompositeLayer(keras.layers.Layer):
    """A layer made of conv/BN leaves; `leaf_layers()` gives them in TF1 variable-creation order."""

    def leaf_layers(self) -> list[keras.layers.Layer]:
        raise NotImplementedError


@keras.saving.register_keras_serializable(package=PACKAGE)
class Stem(CompositeLayer):
    """ImageNet stem (7x7/2 + max-pool), ResNet-D deep stem (with SK) or CIFAR stem (3x3/1, no pool).

    Returns `(initial_conv, initial_max_pool)`: the last stem conv's output before its BN (the reference's
    endpoint) and the stem's output.
    """

    def __init__(self, width_multiplier: float, cifar_stem: bool, deep_stem: bool, batch_norm_decay: float,
                 global_bn: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width_multiplier = width_multiplier
        self.cifar_stem = cifar_stem
        self.deep_stem = deep_stem and not cifar_stem
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        width = scaled(64, width_multiplier)
        if cifar_stem:
            specs = [(width, 3, 1)]
        elif self.deep_stem:
            specs = [(width // 2, 3, 2), (width // 2, 3, 1), (width, 3, 1)]
        else:
            specs = [(width, 7, 2)]
        self.num_convs = len(specs)
        for i, (f, k, s) in enumerate(specs):
            setattr(self, f"conv{i}", FixedPaddingConv2D(f, k, s, name=f"conv{i}"))
            setattr(self, f"bn{i}", batch_norm(batch_norm_decay, global_bn, name=f"bn{i}"))
        self.pool = None if cifar_stem else keras.layers.MaxPooling2D(3, 2, padding="same")

    # Layers live in plain attributes, not lists: tf.train.Checkpoint does not see layers that Keras 3 keeps
    # in tracked lists, and run.py's checkpoints must hold every variable.
    @property
    def convs(self) -> list[FixedPaddingConv2D]:
        return [getattr(self, f"conv{i}") for i in range(self.num_convs)]

    @property
    def bns(self) -> list[keras.layers.BatchNormalization]:
        return [getattr(self, f"bn{i}") for i in range(self.num_convs)]

    def call(self, inputs, training=None):
        x = inputs
        for conv, bn in zip(self.convs, self.bns):
            x = conv(x)
            initial_conv = x
            x = ops.relu(bn(x, training=training))
        if self.pool is not None:
            x = self.pool(x)
        return initial_conv, x

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [layer for pair in zip(self.convs, self.bns) for layer in pair]

    def get_config(self) -> dict:
        return {**super().get_config(), "width_multiplier": self.width_multiplier, "cifar_stem": self.cifar_stem,
                "deep_stem": self.deep_stem, "batch_norm_decay": self.batch_norm_decay,
                "global_bn": self.global_bn}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SelectiveKernel(CompositeLayer):
    """SK unit: a 3x3 conv to 2f split into two streams, mixed by a softmax over streams.

    The mixing weights come from the spatial mean of the streams' sum through a 1x1 conv to
    max(int(f * sk_ratio), 32) (BN-ReLU) and a bias-free, BN-free 1x1 conv to 2f.
    """

    def __init__(self, filters: int, strides: int, sk_ratio: float, batch_norm_decay: float, global_bn: bool,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.sk_ratio = sk_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.mid_dim = max(int(filters * sk_ratio), SK_MIN_DIM)
        self.conv = FixedPaddingConv2D(2 * filters, 3, strides, name="sk_conv")
        self.bn = batch_norm(batch_norm_decay, global_bn, name="sk_conv_bn")
        self.fc1 = FixedPaddingConv2D(self.mid_dim, 1, 1, name="sk_fc1")
        self.fc1_bn = batch_norm(batch_norm_decay, global_bn, name="sk_fc1_bn")
        self.fc2 = FixedPaddingConv2D(2 * filters, 1, 1, name="sk_fc2")

    def call(self, inputs, training=None):
        x = ops.relu(self.bn(self.conv(inputs), training=training))
        streams = ops.stack(ops.split(x, 2, axis=-1), axis=0)  # [2, b, h, w, f]
        pooled = ops.mean(ops.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mixing = ops.relu(self.fc1_bn(self.fc1(pooled), training=training))
        mixing = ops.stack(ops.split(self.fc2(mixing), 2, axis=-1), axis=0)  # [2, b, 1, 1, f]
        mixing = ops.softmax(mixing, axis=0)
        return ops.sum(streams * mixing, axis=0)

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [self.conv, self.bn, self.fc1, self.fc1_bn, self.fc2]

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "sk_ratio": self.sk_ratio, "batch_norm_decay": self.batch_norm_decay, "global_bn": self.global_bn}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SqueezeExcite(CompositeLayer):
    """Channel gate: spatial mean -> 1x1 conv (bias) to max(1, int(f * se_ratio)) -> ReLU -> 1x1 conv (bias)
    back to the block's output channels -> sigmoid."""

    def __init__(self, filters: int, out_channels: int, se_ratio: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.out_channels = out_channels
        self.se_ratio = se_ratio
        self.reduce = keras.layers.Conv2D(max(1, int(filters * se_ratio)), 1, padding="same", use_bias=True,
                                          kernel_initializer=conv_initializer(), name="se_reduce")
        self.expand = keras.layers.Conv2D(out_channels, 1, padding="same", use_bias=True,
                                          kernel_initializer=conv_initializer(), name="se_expand")

    def call(self, inputs):
        gate = self.expand(ops.relu(self.reduce(ops.mean(inputs, axis=(1, 2), keepdims=True))))
        return ops.sigmoid(gate) * inputs

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [self.reduce, self.expand]

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "out_channels": self.out_channels,
                "se_ratio": self.se_ratio}
