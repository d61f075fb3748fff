"""The SimCLR model zoo: ResNet v1.5 backbones with SK/SE, projection and supervised heads."""
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import ResNet
from simclr_tf.models.simclr import SimCLRModel, batch_norm_variables, weight_decay_exempt_variables
from simclr_tf.models.build import build_model, mixed_precision_policy

__all__ = ["ProjectionHead", "ResNet", "SimCLRModel", "SupervisedHead", "batch_norm_variables", "build_model",
           "mixed_precision_policy", "weight_decay_exempt_variables"]
