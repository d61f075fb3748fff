"""`SimCLR`: any Keras encoder + SimCLR's projection head (+ an online linear head), trained with `fit()`.

The second front door to the same step the CLI runs: the loss is `losses.pretraining_objective` (NT-Xent
gathered across tf.distribute replicas, the online head on stop_gradient(h)), the weight-decay term is the
one `tasks.Task` adds, and LARS / the warmup-cosine schedule are the CLI's objects. Keras's own trainer takes
the gradients, so `fit()`, `evaluate()`, callbacks, `steps_per_execution` and `strategy.scope()` work as
for any Keras model. Written in keras.ops: it trains on the TensorFlow, JAX and PyTorch backends
(cross-replica negatives and synchronized BN need TensorFlow's tf.distribute; elsewhere it is one device).
"""
from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

from simclr_tf import losses
from simclr_tf.errors import UsageError
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.layers import synchronized_bn_available
from simclr_tf.models.resnet import PACKAGE
from simclr_tf.models.simclr import exempt_from_weight_decay


def projection_std(z: Any) -> Any:
    """Mean over dimensions of the batch standard deviation of the L2-normalised rows of `z` [n, d].

    ~1/sqrt(d) when the projections spread over the sphere, 0 when they collapse to one point (the collapse
    signal of Jing et al. / SimSiam). Computed in float32.
    """
    unit = losses.l2_normalize(ops.cast(z, "float32"))
    return ops.mean(ops.std(unit, axis=0))


def _features(encoded: Any) -> Any:
    """The encoder's output as [b, d]: `h` of a dict (our ResNet), a feature map average-pooled, or a vector."""
    if isinstance(encoded, dict):
        if "h" not in encoded:
            raise UsageError("encoder", f"returns a dict without 'h' (keys: {sorted(encoded)})")
        encoded = encoded["h"]
    rank = len(encoded.shape)
    if rank == 4:
        return ops.mean(encoded, axis=(1, 2))
    if rank == 2:
        return encoded
    raise UsageError("encoder", f"must return [b, d] or a [b, H, W, C] feature map, got shape {encoded.shape}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class SimCLR(keras.Model):
    """SimCLR around any Keras encoder, for `compile()` / `fit()`.

    Input: view pairs from `simclr_tf.data.pretraining_dataset` (`[b, S, S, 6]` floats in [0, 1], the two
    views on the channel axis, with labels -1 where unknown), or a tuple of two `[b, S, S, 3]` view batches;
    a single `[b, S, S, 3]` batch is run as is (inference). `call` returns a dict: `h` (encoder features),
    `proj_head_output` (z) and, with `num_classes`, `logits_sup`.

    Metrics shown by `fit()`: `loss` (NT-Xent + online head + weight-decay term), `contrast_loss`, `contrast_acc`,
    `contrast_entropy`, `proj_std` (see `projection_std`), and with `num_classes` the online linear head's
    `sup_acc` / `sup_loss` on the labelled rows.

    Weight decay: parameters of normalisation layers, every bias and the linear head are exempt, chosen by layer
    type and object for any encoder. With `simclr_tf.LARS` they also skip the trust ratio and the head's kernel
    is decayed through the loss (the reference's recipe); with another Keras optimizer use its `weight_decay`,
    from which `compile` excludes the same variables.

    Args:
        encoder: any Keras model or layer mapping images to a vector, a feature map (average-pooled here) or
            a dict with `h` (`simclr_tf.models.ResNet`). Inputs are images in [0, 1]: wrap an encoder that
            expects another range (e.g. keras.applications ones that rescale 0..255 themselves).
        projection_layers: layers of the nonlinear projection head (the reference's `num_proj_layers`).
        projection_dim: output width of the projection head.
        temperature: NT-Xent's tau.
        hidden_norm: L2-normalise projections in NT-Xent.
        num_classes: add the online linear head (trained on stop_gradient(h)); 0 / None: none.
        projection_head_mode: "nonlinear", "linear" or "none".
        batch_norm_decay: momentum of the projection head's BN.
        global_bn: synchronise every BatchNormalization layer (the encoder's included) across replicas, as
            the CLI does; needs the TensorFlow backend (ignored on the others, which run on one device).
        linear_head_stop_gradient: the online head sees stop_gradient(h) (False only for export copies).
    """

    def __init__(self, encoder: keras.layers.Layer, projection_layers: int = 3, projection_dim: int = 128,
                 temperature: float = 0.1, hidden_norm: bool = True, num_classes: Optional[int] = None,
                 projection_head_mode: str = "nonlinear", batch_norm_decay: float = 0.9, global_bn: bool = True,
                 linear_head_stop_gradient: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.layers.Layer):
            raise UsageError("encoder", f"must be a Keras model or layer, got {type(encoder).__name__}")
        if temperature <= 0:
            raise UsageError("temperature", f"must be > 0, got {temperature}")
        self.encoder = encoder
        self.projection_layers = int(projection_layers)
        self.projection_dim = int(projection_dim)
        self.temperature = float(temperature)
        self.hidden_norm = bool(hidden_norm)
        self.num_classes = int(num_classes or 0) or None
        self.projection_head_mode = projection_head_mode
        self.batch_norm_decay = float(batch_norm_decay)
        self.global_bn = bool(global_bn)
        self.linear_head_stop_gradient = bool(linear_head_stop_gradient)
        synchronized = self.global_bn and synchronized_bn_available()
        for layer in encoder._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = synchronized
        self.projection_head = ProjectionHead(projection_head_mode, self.projection_layers, self.projection_dim,
                                              self.batch_norm_decay, self.global_bn, name="projection_head")
        self.supervised_head = (SupervisedHead(self.num_classes, name="supervised_head")
                                if self.num_classes else None)
        self.image_size: Optional[int] = None
        self.projection_output_dim: Optional[int] = None  # d of z, known once built
        self.metric_trackers = {name: keras.metrics.Mean(name=name) for name in self._metric_names()}

    def _metric_names(self) -> list[str]:
        names = ["contrast_loss", "contrast_acc", "contrast_entropy", "proj_std"]
        return names + (["sup_acc", "sup_loss"] if self.supervised_head is not None else [])

    # ------------------------------------------------------------------------------------------ the network

    @staticmethod
    def _rows(inputs: Any) -> Any:
        """[b, S, S, 6] pairs or a (view1, view2) tuple -> [2b, S, S, 3]; [b, S, S, 3] stays."""
        if isinstance(inputs, (tuple, list)):
            if len(inputs) != 2:
                raise UsageError("SimCLR", f"takes a pair of view batches, got {len(inputs)} inputs")
            return ops.concatenate(list(inputs), axis=0)
        channels = inputs.shape[-1]
        if channels == 6:
            return losses.view_rows(inputs)
        if channels in (1, 3):
            return inputs
        raise UsageError("SimCLR", f"inputs must have 3 channels (images) or 6 (view pairs), got {channels}")

    def build(self, input_shape: Any) -> None:
        if isinstance(input_shape, (tuple, list)) and input_shape and isinstance(input_shape[0], (tuple, list)):
            input_shape = input_shape[0]
        shape = tuple(input_shape)
        image_shape = shape[:-1] + (3 if shape[-1] == 6 else shape[-1],)
        if image_shape[1] is not None and image_shape[1] == image_shape[2]:
            self.image_size = int(image_shape[1])
        # Symbolic calls create every variable without running a forward pass.
        h = _features(self.encoder(keras.KerasTensor(image_shape)))
        self.projection_output_dim = int(self.projection_head(h)[-1].shape[-1])
        if self.supervised_head is not None:
            self.supervised_head(h)
        self.built = True
        self._exclude_from_weight_decay()

    def call(self, inputs: Any, training: Optional[bool] = None) -> dict:
        rows = self._rows(inputs)
        h = _features(self.encoder(rows, training=training))
        hiddens = self.projection_head(h, training=training)
        outputs = {"h": h, "proj_head_input": h, "proj_head_output": hiddens[-1]}
        if self.supervised_head is not None:
            head_input = ops.stop_gradient(h) if self.linear_head_stop_gradient else h
            outputs["logits_sup"] = self.supervised_head(head_input)
        return outputs

    def embed(self, images: Any) -> Any:
        """h of `images` [b, S, S, 3] in [0, 1], in inference mode (features for kNN / linear evaluation)."""
        return self(images, training=False)["h"]

    # ------------------------------------------------------------------------------------------ weight decay

    def weight_decay_exempt_variables(self) -> list[keras.Variable]:
        """Normalisation scales/shifts, every bias, and the linear head: selected by layer type and object."""
        return exempt_from_weight_decay(self._flatten_layers(include_self=False, recursive=True),
                                        self.supervised_head)

    def _exclude_from_weight_decay(self) -> None:
        # Needs both the variables (build) and the optimizer (compile), which come in either order.
        inner = self._inner_optimizer()
        if not self.built or inner is None:
            return
        from simclr_tf.optimizers import LARS

        if isinstance(inner, LARS):
            inner.exclude_variables(self.weight_decay_exempt_variables())
        elif getattr(inner, "weight_decay", None):
            inner.exclude_from_weight_decay(var_list=self.weight_decay_exempt_variables())

    def _inner_optimizer(self) -> Any:
        """The compiled optimizer (inside a LossScaleOptimizer when there is one); None before compile."""
        optimizer = getattr(self, "optimizer", None)
        return getattr(optimizer, "inner_optimizer", optimizer)

    def compile(self, optimizer: Any = "rmsprop", **kwargs: Any) -> None:
        """Keras's compile; `loss` is SimCLR's own and must not be given."""
        if kwargs.get("loss") is not None:
            raise UsageError("SimCLR.compile", "takes no loss: the model's loss is NT-Xent (+ the online head)")
        super().compile(optimizer=optimizer, **kwargs)
        self._exclude_from_weight_decay()

    def fit(self, x: Any = None, y: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Keras's fit; refuses an endless dataset without `steps_per_epoch` (its first epoch would never end)."""
        if not args and kwargs.get("steps_per_epoch") is None and _is_endless(x):
            raise UsageError("steps_per_epoch", "the dataset never ends (simclr_tf.data.pretraining_dataset is an "
                                                "endless stream): pass fit(..., steps_per_epoch=N), e.g. "
                                                "simclr_tf.data.steps_per_epoch(data, batch_size)")
        if _is_dataset(x):
            kwargs.setdefault("shuffle", False)  # a tf.data input is shuffled by its pipeline (Keras would warn)
        return super().fit(x, y, *args, **kwargs)

    def compile_from_config(self, config: dict) -> None:
        # Keras skips restoring the compile state of models that override compile(); ours only adds the
        # weight-decay exclusions, so the saved optimizer (and with it its slots) comes back as Keras would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def regularisation(self) -> Any:
        """The weight-decay term added to the loss: with LARS, wd * l2(linear head's kernel) as the CLI adds
        (LARS decays everything else inside its update); with other optimizers nothing (their own decay)."""
        from simclr_tf.optimizers import LARS, l2_regularization

        inner = self._inner_optimizer()
        head = self.supervised_head
        if not isinstance(inner, LARS) or head is None or not head.trainable:
            return ops.convert_to_tensor(0.0, "float32")
        return l2_regularization([head.dense.kernel], inner.lars_weight_decay)

    # ------------------------------------------------------------------------------------------ loss, metrics

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                     training: bool = True) -> Any:
        if y_pred is None:
            y_pred = self(x, training=training)
        batch = ops.shape(y_pred["proj_head_output"])[0] // 2
        labels = ops.full((batch,), -1, "int32") if y is None else ops.cast(y, "int32")
        loss, metrics = losses.pretraining_objective(
            y_pred, labels, temperature=self.temperature, hidden_norm=self.hidden_norm,
            linear_eval=self.supervised_head is not None)
        loss = loss + self.regularisation()
        metrics["proj_std"] = projection_std(y_pred["proj_head_output"])
        for name, tracker in self.metric_trackers.items():
            tracker.update_state(metrics[name])
        return _scale_for_replicas(loss)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict:
        # Everything is measured in compute_loss; Keras's loss tracker and ours are the results.
        return self.get_metrics_result()

    # ------------------------------------------------------------------------------------------ saving

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "encoder": _portable(keras.saving.serialize_keras_object(self.encoder)),
                "projection_layers": self.projection_layers, "projection_dim": self.projection_dim,
                "temperature": self.temperature, "hidden_norm": self.hidden_norm, "num_classes": self.num_classes,
                "projection_head_mode": self.projection_head_mode, "batch_norm_decay": self.batch_norm_decay,
                "global_bn": self.global_bn, "linear_head_stop_gradient": self.linear_head_stop_gradient}

    @classmethod
    def from_config(cls, config: dict) -> "SimCLR":
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        return cls(encoder, **config)

    def export_overrides(self) -> dict:
        """Config changes of the single-device copy that `simclr_tf.export` saves (plain BN, gradients to h)."""
        return {"global_bn": False, "linear_head_stop_gradient": False}


def _is_dataset(x: Any) -> bool:
    return hasattr(x, "cardinality") and hasattr(x, "element_spec")  # a tf.data.Dataset, without importing TF


def _is_endless(x: Any) -> bool:
    return _is_dataset(x) and int(x.cardinality()) == -1  # tf.data.INFINITE_CARDINALITY


def _portable(config: Any) -> Any:
    """The encoder's config with every BatchNormalization unsynchronised: `global_bn` re-applies it where the
    backend can, and a saved model then also loads on backends without tf.distribute."""
    if isinstance(config, dict):
        config = {key: _portable(value) for key, value in config.items()}
        if config.get("class_name") == "BatchNormalization" and isinstance(config.get("config"), dict):
            config["config"] = {**config["config"], "synchronized": False}
        return config
    if isinstance(config, list):
        return [_portable(value) for value in config]
    return config


def _scale_for_replicas(loss: Any) -> Any:
    """The share of the global mean one replica's gradient must carry (loss / replicas): Keras sums replica
    gradients when it applies them, as the CLI's loop does (see losses.py)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            return loss / float(replicas)
    return loss
