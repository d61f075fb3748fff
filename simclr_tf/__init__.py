"""simclr_tf: SimCLR v1/v2 for TensorFlow 2 and Keras 3.

Two front doors to one training step: `python run.py` (the official flags) and the Keras API below, for
`compile()` / `fit()` with any Keras encoder::

    model = simclr_tf.SimCLR(encoder, projection_dim=128, temperature=0.1, num_classes=10)
    model.compile(optimizer=simclr_tf.LARS(simclr_tf.WarmupCosine(peak, warmup_steps, total_steps),
                                           weight_decay=1e-6))
    model.fit(simclr_tf.data.pretraining_dataset(images, image_size=32, batch_size=256), ...)

Names are imported on first use: `SimCLR`, `LARS`, `WarmupCosine` and `projection_std` need only Keras (any
backend); `data` and `callbacks` use tf.data.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "SimCLR": ("simclr_tf.models.contrastive", "SimCLR"),
    "projection_std": ("simclr_tf.models.contrastive", "projection_std"),
    "ResNet": ("simclr_tf.models.resnet", "ResNet"),
    "LARS": ("simclr_tf.optimizers", "LARS"),
    "WarmupCosine": ("simclr_tf.schedules", "WarmupCosineSchedule"),
    "export_model": ("simclr_tf.export", "export_model"),
    "tune_malloc": ("simclr_tf.hardware", "tune_malloc"),
    "HeapTrimmer": ("simclr_tf.hardware", "HeapTrimmer"),
}
_SUBMODULES = ("callbacks", "data", "models")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    if name in _SUBMODULES:
        return importlib.import_module(f"simclr_tf.{name}")
    raise AttributeError(f"module 'simclr_tf' has no attribute {name!r}")
