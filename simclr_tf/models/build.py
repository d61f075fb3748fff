"""Building a SimCLRModel for a run: its variables exist afterwards, in the strategy's scope."""
from __future__ import annotations

from typing import Union

import keras
import tensorflow as tf
from absl import logging

from simclr_tf.hardware import MIXED_PRECISION_DTYPES, cpu_has_native_bfloat16
from simclr_tf.models.simclr import SimCLRModel
from simclr_tf.sections import ModelConfig

# Mixed precision requests: False (float32), True (= "auto"), or one of MIXED_PRECISION_DTYPES.
MixedPrecision = Union[bool, str]


def gpus_have_native_bfloat16() -> bool:
    """Whether every visible GPU computes in bfloat16 natively: NVIDIA compute capability 8.0 (Ampere) on."""
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability is None or tuple(capability) < (8, 0):
            return False
    return True


def mixed_precision_policy(strategy: tf.distribute.Strategy, request: MixedPrecision = True) -> str:
    """The Keras dtype policy a run computes in; variables stay float32 under all of them.

    Args:
        strategy: whose devices compute.
        request: False: "float32". "bfloat16" / "float16": that type. True or "auto": bfloat16 where the
            devices compute in it natively (TPUs, GPUs of compute capability >= 8.0, CPUs with bfloat16
            instructions), float16 with loss scaling on older GPUs, and float32 on CPUs without bfloat16
            instructions (where it is emulated, many times slower), with a warning.
    """
    if request is False:
        return "float32"
    if request is True:
        request = "auto"
    if request not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"request: one of False, True, {MIXED_PRECISION_DTYPES}, got {request!r}")
    if request != "auto":
        return f"mixed_{request}"
    devices = " ".join(strategy.extended.worker_devices).upper()
    if "TPU" in devices:
        return "mixed_bfloat16"
    if "GPU" in devices:
        return "mixed_bfloat16" if gpus_have_native_bfloat16() else "mixed_float16"
    if cpu_has_native_bfloat16():
        return "mixed_bfloat16"
    logging.log_first_n(logging.WARNING, "--mixed_precision: this CPU has no bfloat16 instructions (avx512_bf16, "
                        "amx_bf16), so the run computes in float32; --mixed_precision_dtype=bfloat16 forces "
                        "bfloat16 (emulated: about half the activation memory, many times slower)", 1)
    return "float32"


def build_model(model: ModelConfig, num_classes: int, strategy: tf.distribute.Strategy, *,
                mixed_precision: MixedPrecision = False) -> SimCLRModel:
    """Creates and builds the model in `strategy`'s scope.

    Args:
        model: the architecture.
        num_classes: outputs of the supervised head (0: none).
        strategy: where the variables live (mirrored across its replicas).
        mixed_precision: the compute type requested (see `mixed_precision_policy`).
    """
    # Layers take the global dtype policy when constructed; set it for this model only, so differently
    # configured models can share a process.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision_policy(strategy, mixed_precision))
    try:
        with strategy.scope():
            built = SimCLRModel(**model.model_kwargs(num_classes))
            built(tf.zeros([1, model.image_size, model.image_size, 3]), training=False)
    finally:
        keras.config.set_dtype_policy(previous)
    return built
