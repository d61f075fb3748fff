"""What every train mode shares: the weight-decay term and the supervised cross-entropy."""
from __future__ import annotations

import abc
from typing import Any, Dict, Tuple

import tensorflow as tf

from simclr_tf import optimizers
from simclr_tf.models import SimCLRModel, batch_norm_variables
from simclr_tf.sections import OptimConfig

Metrics = Dict[str, tf.Tensor]


class Task(abc.ABC):
    """One train mode: the objective of one per-replica batch, on a model built by the caller.

    Subclasses implement `objective`; `loss` adds the weight-decay term that the optimizer does not apply
    itself. The loop (simclr_tf.train) owns gradients, replicas, optimizer steps and checkpoints.

    Args:
        model: the network being trained.
        optim: which optimizer and how much weight decay (LARS decays inside the update, see
            optimizers.weight_decay_loss).
    """

    def __init__(self, model: SimCLRModel, optim: OptimConfig) -> None:
        self.model = model
        self.optim = optim

    @abc.abstractmethod
    def objective(self, images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, Metrics]:
        """The mode's loss for a per-replica batch (no weight decay) and its metrics."""

    def before_steps(self) -> None:
        """Called eagerly before each run of training steps (a task with state of its own prepares it here)."""

    def after_step(self) -> None:
        """Called in the replica step, in the same traced function, right after the optimizer applied the
        step's gradients (a task with state of its own updates it here)."""

    def trackables(self) -> Dict[str, Any]:
        """Objects the run's checkpoint must hold besides model, optimizer and step, by checkpoint key."""
        return {}

    def regularisation(self) -> tf.Tensor:
        """The weight-decay term the reference adds to the loss (see optimizers.weight_decay_loss)."""
        head = self.model.supervised_head
        head_kernels = [head.dense.kernel] if head is not None and head.trainable else []
        return optimizers.weight_decay_loss(
            self.optim.optimizer, self.optim.weight_decay,
            trainable_variables=self.model.trainable_variables,
            supervised_head_kernels=head_kernels,
            exempt=batch_norm_variables(self.model))

    def loss(self, images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, Metrics]:
        """objective + weight decay for a per-replica batch, with `weight_decay` and `total_loss` metrics.

        Args:
            images: the pipeline's per-replica images (two views on the channel axis when pretraining).
            labels: [b] int, -1 where unlabelled.
        """
        loss, metrics = self.objective(images, tf.cast(labels, tf.int64))
        reg = self.regularisation()
        loss = loss + reg
        metrics.update(weight_decay=reg, total_loss=loss)
        return loss, metrics
