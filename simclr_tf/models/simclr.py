"""SimCLRModel: backbone + projection head + supervised head, freezing and weight-decay exclusions."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import keras
from keras import ops

from simclr_tf.errors import UsageError
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import PACKAGE, ResNet


@keras.saving.register_keras_serializable(package=PACKAGE)
class SimCLRModel(keras.Model):
    """The SimCLR network. `call(images [b, S, S, 3] in [0, 1], training)` returns a dict:

    `h` (final average pool), `proj_head_input` (= h), `proj_head_output` (z, not normalised),
    `proj_layers` (outputs of head layers 1..L), `sup_head_input` (selected by `ft_proj_selector`: 0 = h,
    i = head layer i, -1 = last), `logits_sup` (only with `num_classes`), and the backbone endpoints
    `initial_conv` (pre-BN), `initial_max_pool`, `block_group1..4`.

    `fine_tune_after_block` k freezes the stem and groups 1..k (k = 4: the whole backbone and the
    projection head, so only the supervised head trains); frozen parts run BN in inference mode.
    With `linear_eval_stop_gradient` the supervised head sees `stop_gradient` of its input (online linear
    evaluation during pretraining). `recompute` trades memory for compute in training (see `ResNet`).
    """

    def __init__(self, resnet_depth: int = 50, width_multiplier: float = 1.0, sk_ratio: float = 0.0,
                 se_ratio: float = 0.0, image_size: int = 224, proj_head_mode: str = "nonlinear",
                 proj_out_dim: int = 128, num_proj_layers: int = 3, ft_proj_selector: int = 0,
                 num_classes: int | None = None, batch_norm_decay: float = 0.9, global_bn: bool = True,
                 fine_tune_after_block: int = -1, linear_eval_stop_gradient: bool = True,
                 recompute: bool = False, recompute_groups: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resnet_depth = resnet_depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.image_size = image_size
        self.proj_head_mode = proj_head_mode
        self.proj_out_dim = proj_out_dim
        self.num_proj_layers = num_proj_layers
        self.ft_proj_selector = ft_proj_selector
        self.num_classes = num_classes or None
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.fine_tune_after_block = fine_tune_after_block
        self.linear_eval_stop_gradient = linear_eval_stop_gradient
        self.recompute = recompute
        self.recompute_groups = recompute_groups

        self.backbone = ResNet(resnet_depth, width_multiplier, sk_ratio, se_ratio, cifar_stem=image_size <= 32,
                               batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                               fine_tune_after_block=fine_tune_after_block, recompute=recompute,
                               recompute_groups=recompute_groups, name="resnet")
        self.projection_head = ProjectionHead(proj_head_mode, num_proj_layers, proj_out_dim, batch_norm_decay,
                                              global_bn, name="projection_head")
        num_layers = self.projection_head.num_layers
        if not -1 <= ft_proj_selector <= num_layers:
            raise UsageError("--ft_proj_selector",
                             f"{ft_proj_selector} is not in -1..{num_layers} (the projection head has "
                             f"{num_layers} layers)")
        if self.head_frozen:
            self.projection_head.trainable = False
        self.supervised_head = (SupervisedHead(self.num_classes, name="supervised_head")
                                if self.num_classes else None)

    @property
    def head_frozen(self) -> bool:
        return self.fine_tune_after_block >= 4

    def build(self, input_shape) -> None:
        # Symbolic calls create every variable without running a forward pass at full resolution.
        endpoints = self.backbone(keras.KerasTensor(tuple(input_shape)))
        hiddens = self.projection_head(endpoints["h"])
        if self.supervised_head is not None:
            self.supervised_head(hiddens[self.ft_proj_selector])
        self.built = True

    def call(self, images, training=None):
        endpoints = self.backbone(images, training=training)
        h = endpoints["h"]
        hiddens = self.projection_head(h, training=False if self.head_frozen else training)
        outputs = dict(endpoints)
        outputs["proj_head_input"] = h
        outputs["proj_head_output"] = hiddens[-1]
        outputs["proj_layers"] = list(hiddens[1:])
        outputs["sup_head_input"] = hiddens[self.ft_proj_selector]
        if self.supervised_head is not None:
            head_input = outputs["sup_head_input"]
            if self.linear_eval_stop_gradient:
                head_input = ops.stop_gradient(head_input)
            outputs["logits_sup"] = self.supervised_head(head_input)
        return outputs

    def leaf_layers(self) -> list[keras.layers.Layer]:
        """Every conv / BN / dense layer: backbone in TF1 creation order, then the heads."""
        leaves = self.backbone.leaf_layers() + self.projection_head.leaf_layers()
        if self.supervised_head is not None:
            leaves += self.supervised_head.leaf_layers()
        return leaves

    def export_overrides(self) -> dict:
        """Config changes of the single-device copy that `simclr_tf.export` saves (see export.export_copy)."""
        return {"fine_tune_after_block": -1, "linear_eval_stop_gradient": False, "global_bn": False}

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, "resnet_depth": self.resnet_depth,
                "width_multiplier": self.width_multiplier, "sk_ratio": self.sk_ratio, "se_ratio": self.se_ratio,
                "image_size": self.image_size, "proj_head_mode": self.proj_head_mode,
                "proj_out_dim": self.proj_out_dim, "num_proj_layers": self.num_proj_layers,
                "ft_proj_selector": self.ft_proj_selector, "num_classes": self.num_classes,
                "batch_norm_decay": self.batch_norm_decay, "global_bn": self.global_bn,
                "fine_tune_after_block": self.fine_tune_after_block,
                "linear_eval_stop_gradient": self.linear_eval_stop_gradient, "recompute": self.recompute,
                "recompute_groups": self.recompute_groups}

    @classmethod
    def from_config(cls, config: dict) -> "SimCLRModel":
        return cls(**config)


def batch_norm_variables(model: SimCLRModel) -> list[keras.Variable]:
    """Every BN gamma and beta, selected by layer object: what the reference keeps out of L2 regularisation."""
    return [v for layer in model.leaf_layers() if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.gamma, layer.beta) if v is not None]


# Layers whose parameters are normalisation scales and shifts: kept out of weight decay and LARS's trust ratio,
# as the reference does with BN.
NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                        keras.layers.GroupNormalization)


def exempt_from_weight_decay(layers: Iterable[keras.layers.Layer],
                             supervised_head: Optional[keras.layers.Layer]) -> list[keras.Variable]:
    """Normalisation scales and shifts, every bias, and the whole supervised head, once each, selected by layer
    type and object (docs/design.md §6.2): the one rule for the CLI's network and for fit()'s any encoder.

    Args:
        layers: every layer that may hold such variables (leaf layers, or a recursive flattening).
        supervised_head: the linear head (it gets its own L2 term in the loss); None: none.
    """
    exempt = []
    for layer in layers:
        if isinstance(layer, NORMALIZATION_LAYERS):
            exempt += [getattr(layer, "gamma", None), getattr(layer, "beta", None)]
        else:
            exempt.append(getattr(layer, "bias", None))
    if supervised_head is not None:
        exempt += list(supervised_head.weights)
    unique: dict[int, keras.Variable] = {}
    for variable in exempt:
        if isinstance(variable, keras.Variable):  # not None, nor a custom layer's non-variable `bias`
            unique.setdefault(id(variable), variable)
    return list(unique.values())


def weight_decay_exempt_variables(model: SimCLRModel) -> list[keras.Variable]:
    """Variables LARS leaves out of weight decay and trust-ratio scaling (docs/design.md §6.2).

    BN gammas and betas, every bias (squeeze-excite convs), and the whole supervised head (it gets its own
    L2 term in the loss). Selected by layer object, so renamed or nested layers cannot slip through.
    """
    return exempt_from_weight_decay(model.leaf_layers(), model.supervised_head)
