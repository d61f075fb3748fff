"""The SimCLR model zoo: ResNet v1.5 backbones with SK/SE, projection and supervised heads, and `SimCLR`
(any Keras encoder trained with `fit()`).

Everything here is Keras only and runs on every Keras backend; `build_model` / `mixed_precision_policy`
(the CLI's construction under a tf.distribute strategy) need TensorFlow and are imported on first use.
"""
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import ResNet
from simclr_tf.models.simclr import SimCLRModel, batch_norm_variables, weight_decay_exempt_variables

__all__ = ["ProjectionHead", "ResNet", "SimCLRModel", "SupervisedHead", "batch_norm_variables", "build_model",
           "mixed_precision_policy", "weight_decay_exempt_variables"]


def __getattr__(name: str):
    if name in ("build_model", "mixed_precision_policy"):
        from simclr_tf.models import build

        return getattr(build, name)
    raise AttributeError(f"module 'simclr_tf.models' has no attribute {name!r}")
