"""Fine-tuning and distillation: supervised objectives on single views."""
from __future__ import annotations

from typing import Callable, Tuple

import tensorflow as tf

from simclr_tf import losses
from simclr_tf.models import SimCLRModel
from simclr_tf.sections import DistillConfig, OptimConfig
from simclr_tf.losses import supervised_terms
from simclr_tf.tasks.base import Metrics, Task


class FinetuneTask(Task):
    """Cross-entropy of the supervised head on labelled images (the official finetune branch)."""

    def objective(self, images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, Metrics]:
        out = self.model(images, training=True)
        sup = supervised_terms(out["logits_sup"], labels)
        return sup["sup_loss"], sup


class DistillTask(Task):
    """(1 - alpha) * distillation from a frozen teacher's logits + alpha * label cross-entropy.

    Args:
        model: the student.
        optim: optimizer settings (weight decay).
        distill: temperature and alpha.
        teacher: images -> logits of the frozen teacher (no gradient flows into it).
    """

    def __init__(self, model: SimCLRModel, optim: OptimConfig, distill: DistillConfig,
                 teacher: Callable[[tf.Tensor], tf.Tensor]) -> None:
        super().__init__(model, optim)
        self.distill = distill
        self.teacher = teacher

    def objective(self, images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, Metrics]:
        out = self.model(images, training=True)
        alpha = self.distill.distill_alpha
        teacher_logits = tf.stop_gradient(tf.cast(self.teacher(images), tf.float32))
        dist = losses.distillation_loss(teacher_logits, out["logits_sup"],
                                        temperature=self.distill.distill_temperature)
        loss = (1.0 - alpha) * dist
        agree = tf.equal(tf.argmax(teacher_logits, -1), tf.argmax(out["logits_sup"], -1))
        metrics = dict(distill_loss=dist, teacher_agreement=tf.reduce_mean(tf.cast(agree, tf.float32)))
        if alpha > 0:  # with alpha = 0 no label is read
            sup = supervised_terms(out["logits_sup"], labels)
            loss += alpha * sup["sup_loss"]
            metrics.update(sup)
        return loss, metrics
