"""Building a SimCLRModel for a run: its variables exist afterwards, in the strategy's scope."""
from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.models.simclr import SimCLRModel
from simclr_tf.sections import ModelConfig


def mixed_precision_policy(strategy: tf.distribute.Strategy) -> str:
    """float16 compute on GPUs (with loss scaling), bfloat16 on TPUs and CPUs; variables stay float32."""
    devices = strategy.extended.worker_devices
    return "mixed_float16" if any("GPU" in d.upper() for d in devices) else "mixed_bfloat16"


def build_model(model: ModelConfig, num_classes: int, strategy: tf.distribute.Strategy, *,
                mixed_precision: bool = False) -> SimCLRModel:
    """Creates and builds the model in `strategy`'s scope.

    Args:
        model: the architecture.
        num_classes: outputs of the supervised head (0: none).
        strategy: where the variables live (mirrored across its replicas).
        mixed_precision: compute in the strategy's mixed policy (see `mixed_precision_policy`).
    """
    # Layers take the global dtype policy when constructed; set it for this model only, so differently
    # configured models can share a process.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision_policy(strategy) if mixed_precision else "float32")
    try:
        with strategy.scope():
            built = SimCLRModel(**model.model_kwargs(num_classes))
            built(tf.zeros([1, model.image_size, model.image_size, 3]), training=False)
    finally:
        keras.config.set_dtype_policy(previous)
    return built
