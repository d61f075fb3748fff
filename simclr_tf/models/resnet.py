"""ResNet v1.5 backbones of SimCLR v1/v2 (docs/design.md §3), as Keras 3 layers: blocks, groups, network.

The leaf layers come from `simclr_tf.models.layers`; see there for the variable-order contract.
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from simclr_tf.errors import UsageError
from simclr_tf.models.layers import (BLOCKS_PER_DEPTH, GROUP_BASE_FILTERS, GROUP_STRIDES,
                                     PACKAGE, SK_MIN_DIM, FixedPaddingConv2D, SelectiveKernel, SqueezeExcite,
                                     Stem, CompositeLayer, batch_norm, scaled)
from simclr_tf.models.recompute import check_backend, recomputed_call

__all__ = ["BLOCKS_PER_DEPTH", "GROUP_BASE_FILTERS", "PACKAGE", "SK_MIN_DIM", "BlockGroup", "ResNet",
           "ResidualBlock", "SelectiveKernel", "SqueezeExcite", "Stem", "batch_norm", "scaled"]

@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(CompositeLayer):
    """Basic (ResNet-18/34) or bottleneck (50+) block, post-activation, stride on the 3x3 conv.

    A projection shortcut (created first, as in the reference) is a strided 1x1 conv + BN, or with SK the
    ResNet-D form: 2x2 average pool with the stride, then a 1x1 conv + BN.
    """

    def __init__(self, filters: int, strides: int, use_projection: bool, bottleneck: bool, sk_ratio: float,
                 se_ratio: float, batch_norm_decay: float, global_bn: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.use_projection = use_projection
        self.bottleneck = bottleneck
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        out_channels = 4 * filters if bottleneck else filters

        def bn(name: str, init_zero: bool = False) -> keras.layers.BatchNormalization:
            return batch_norm(batch_norm_decay, global_bn, init_zero=init_zero, name=name)

        self.shortcut_pool = None
        self.shortcut_conv = self.shortcut_bn = None
        if use_projection:
            if sk_ratio > 0:
                self.shortcut_pool = keras.layers.AveragePooling2D(
                    2, strides, padding="same" if strides == 1 else "valid")
                self.shortcut_conv = FixedPaddingConv2D(out_channels, 1, 1, name="shortcut")
            else:
                self.shortcut_conv = FixedPaddingConv2D(out_channels, 1, strides, name="shortcut")
            self.shortcut_bn = bn("shortcut_bn")

        self.sk = None  # SK replaces the bottleneck's 3x3 conv; basic blocks have none
        if bottleneck:
            self.conv_a = FixedPaddingConv2D(filters, 1, 1, name="conv_a")
            self.bn_a = bn("bn_a")
            if sk_ratio > 0:
                self.sk = SelectiveKernel(filters, strides, sk_ratio, batch_norm_decay, global_bn, name="sk")
                self.conv_b = self.bn_b = None
            else:
                self.conv_b = FixedPaddingConv2D(filters, 3, strides, name="conv_b")
                self.bn_b = bn("bn_b")
            self.conv_c = FixedPaddingConv2D(out_channels, 1, 1, name="conv_c")
            self.bn_c = bn("bn_c", init_zero=True)
        else:
            self.conv_a = FixedPaddingConv2D(filters, 3, strides, name="conv_a")
            self.bn_a = bn("bn_a")
            self.conv_b = FixedPaddingConv2D(filters, 3, 1, name="conv_b")
            self.bn_b = bn("bn_b", init_zero=True)
            self.conv_c = self.bn_c = None
        self.se = SqueezeExcite(filters, out_channels, se_ratio, name="se") if se_ratio > 0 else None

    @property
    def last_bn(self) -> keras.layers.BatchNormalization:
        """The BN whose gamma starts at zero, so the block starts as its shortcut."""
        return self.bn_c if self.bottleneck else self.bn_b

    def call(self, inputs, training=None):
        shortcut = inputs
        if self.use_projection:
            if self.shortcut_pool is not None:
                if self.strides > 1:
                    # Pad bottom/right so odd sizes give ceil(n / 2) like the strided main path.
                    shortcut = ops.pad(shortcut, [[0, 0], [0, 1], [0, 1], [0, 0]])
                shortcut = self.shortcut_pool(shortcut)
            shortcut = self.shortcut_bn(self.shortcut_conv(shortcut), training=training)

        x = ops.relu(self.bn_a(self.conv_a(inputs), training=training))
        if self.bottleneck:
            if self.sk is not None:
                x = self.sk(x, training=training)
            else:
                x = ops.relu(self.bn_b(self.conv_b(x), training=training))
        else:
            x = self.conv_b(x)
        x = self.last_bn(self.conv_c(x) if self.bottleneck else x, training=training)
        if self.se is not None:
            x = self.se(x)
        return ops.relu(x + shortcut)

    def leaf_layers(self) -> list[keras.layers.Layer]:
        leaves: list[keras.layers.Layer] = []
        if self.use_projection:
            leaves += [self.shortcut_conv, self.shortcut_bn]
        leaves += [self.conv_a, self.bn_a]
        if self.sk is not None:
            leaves += self.sk.leaf_layers()
        else:
            leaves += [self.conv_b, self.bn_b]
        if self.bottleneck:
            leaves += [self.conv_c, self.bn_c]
        if self.se is not None:
            leaves += self.se.leaf_layers()
        return leaves

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "use_projection": self.use_projection, "bottleneck": self.bottleneck, "sk_ratio": self.sk_ratio,
                "se_ratio": self.se_ratio, "batch_norm_decay": self.batch_norm_decay, "global_bn": self.global_bn}


@keras.saving.register_keras_serializable(package=PACKAGE)
class BlockGroup(CompositeLayer):
    """`num_blocks` residual blocks; the first has the projection shortcut and the stride.

    With `recompute`, training keeps only each block's input and recomputes the rest in the backward pass
    (`simclr_tf.models.recompute`).
    """

    def __init__(self, filters: int, num_blocks: int, strides: int, bottleneck: bool, sk_ratio: float,
                 se_ratio: float, batch_norm_decay: float, global_bn: bool, recompute: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_backend(recompute)
        self.recompute = recompute
        self.filters = filters
        self.num_blocks = num_blocks
        self.strides = strides
        self.bottleneck = bottleneck
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        for i in range(num_blocks):  # attributes, not a list: see Stem.convs
            setattr(self, f"block{i}", ResidualBlock(filters, strides if i == 0 else 1, i == 0, bottleneck,
                                                     sk_ratio, se_ratio, batch_norm_decay, global_bn,
                                                     name=f"block{i}"))

    @property
    def blocks(self) -> list[ResidualBlock]:
        return [getattr(self, f"block{i}") for i in range(self.num_blocks)]

    def call(self, inputs, training=None):
        x = inputs
        for block in self.blocks:
            x = recomputed_call(block, x, training) if self.recompute and training else block(x, training=training)
        return x

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [leaf for block in self.blocks for leaf in block.leaf_layers()]

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "num_blocks": self.num_blocks,
                "strides": self.strides, "bottleneck": self.bottleneck, "sk_ratio": self.sk_ratio,
                "se_ratio": self.se_ratio, "batch_norm_decay": self.batch_norm_decay, "global_bn": self.global_bn,
                "recompute": self.recompute}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResNet(CompositeLayer):
    """The backbone: stem, four block groups, global average pool.

    `fine_tune_after_block` k freezes the stem (k >= 0) and groups 1..k: their variables are not trainable
    and they run BN in inference mode even when the model is called with `training=True`.
    `call` returns the endpoints `initial_conv`, `initial_max_pool`, `block_group1..4` and `h`.
    `recompute` (TensorFlow backend): training recomputes the stem's and each residual block's activations in
    the backward pass instead of keeping them: less memory for one more forward pass, same numbers.
    `recompute_groups` k limits that to the stem and groups 1..k: early groups hold most of the activations
    (each group halves the spatial size and doubles the channels) for about equal shares of the compute, so
    the later groups cost the most recomputation per byte saved.
    """

    def __init__(self, resnet_depth: int = 50, width_multiplier: float = 1.0, sk_ratio: float = 0.0,
                 se_ratio: float = 0.0, cifar_stem: bool = False, batch_norm_decay: float = 0.9,
                 global_bn: bool = True, fine_tune_after_block: int = -1, recompute: bool = False,
                 recompute_groups: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if resnet_depth not in BLOCKS_PER_DEPTH:
            raise UsageError("--resnet_depth", f"{resnet_depth} is not one of {sorted(BLOCKS_PER_DEPTH)}")
        if not width_multiplier > 0 or scaled(64, width_multiplier) < (2 if sk_ratio > 0 else 1):
            raise UsageError("--width_multiplier", f"{width_multiplier} leaves the stem without channels")
        if sk_ratio < 0 or se_ratio < 0:
            raise UsageError("--sk_ratio" if sk_ratio < 0 else "--se_ratio", "must be >= 0")
        if not -1 <= fine_tune_after_block <= 4:
            raise UsageError("--fine_tune_after_block", f"{fine_tune_after_block} is not in -1..4")
        if not 0 <= recompute_groups <= 4:
            raise UsageError("--recompute_groups", f"{recompute_groups} is not in 0..4")
        self.resnet_depth = resnet_depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.cifar_stem = cifar_stem
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.fine_tune_after_block = fine_tune_after_block
        self.recompute = recompute
        self.recompute_groups = recompute_groups
        kind, counts = BLOCKS_PER_DEPTH[resnet_depth]
        self.bottleneck = kind == "bottleneck"
        self.stem = Stem(width_multiplier, cifar_stem, sk_ratio > 0, batch_norm_decay, global_bn, name="stem")
        # Basic blocks have no SK unit but take the ResNet-D shortcut: the reference's flag applies to both.
        for g, (base, n, stride) in enumerate(zip(GROUP_BASE_FILTERS, counts, GROUP_STRIDES)):
            setattr(self, f"block_group{g + 1}", BlockGroup(  # attributes, not a list: see Stem.convs
                scaled(base, width_multiplier), n, stride, self.bottleneck, sk_ratio, se_ratio, batch_norm_decay,
                global_bn, recompute and g < recompute_groups, name=f"block_group{g + 1}"))
        self.output_dim = scaled(512, width_multiplier) * (4 if self.bottleneck else 1)
        for part in self.frozen_parts():
            part.trainable = False

    @property
    def groups(self) -> list[BlockGroup]:
        return [getattr(self, f"block_group{g}") for g in range(1, 5)]

    def parts(self) -> list[CompositeLayer]:
        """Stem then groups 1..4: the units `fine_tune_after_block` counts."""
        return [self.stem, *self.groups]

    def frozen_parts(self) -> list[CompositeLayer]:
        return self.parts()[: self.fine_tune_after_block + 1]

    def build(self, input_shape) -> None:
        # A symbolic pass creates every variable, so a Keras model that holds this layer (functional models
        # rebuilt by keras.saving, BackupAndRestore) finds it built; no pixels are computed.
        self.call(keras.KerasTensor(tuple(input_shape)))
        self.built = True

    def call(self, inputs, training=None):
        frozen = self.fine_tune_after_block + 1
        stem_training = False if frozen > 0 else training
        # The stem is recomputed too: its convolution is cheap (3 input channels) while the activations it
        # keeps are the largest of the network's (with the CIFAR stem, each as large as a group-1 activation).
        initial_conv, x = (recomputed_call(self.stem, inputs, stem_training) if self.recompute and stem_training
                           else self.stem(inputs, training=stem_training))
        endpoints = {"initial_conv": initial_conv, "initial_max_pool": x}
        for g, group in enumerate(self.groups):
            x = group(x, training=False if frozen > g + 1 else training)
            endpoints[f"block_group{g + 1}"] = x
        endpoints["h"] = ops.mean(x, axis=(1, 2))
        return endpoints

    def leaf_layers(self) -> list[keras.layers.Layer]:
        return [leaf for part in self.parts() for leaf in part.leaf_layers()]

    def get_config(self) -> dict:
        return {**super().get_config(), "resnet_depth": self.resnet_depth,
                "width_multiplier": self.width_multiplier, "sk_ratio": self.sk_ratio, "se_ratio": self.se_ratio,
                "cifar_stem": self.cifar_stem, "batch_norm_decay": self.batch_norm_decay,
                "global_bn": self.global_bn, "fine_tune_after_block": self.fine_tune_after_block,
                "recompute": self.recompute, "recompute_groups": self.recompute_groups}
