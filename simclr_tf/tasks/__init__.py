"""Train modes as tasks: each builds the loss of one per-replica batch; simclr_tf.train runs them."""
from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from simclr_tf.memory import NegativesMemory
from simclr_tf.models import SimCLRModel
from simclr_tf.losses import supervised_terms
from simclr_tf.tasks.base import Task
from simclr_tf.tasks.finetune import DistillTask, FinetuneTask
from simclr_tf.tasks.pretrain import PretrainTask

__all__ = ["DistillTask", "FinetuneTask", "PretrainTask", "Task", "build_task", "supervised_terms"]


def build_task(config, model: SimCLRModel, teacher: Optional[Callable] = None,
               strategy: Optional[tf.distribute.Strategy] = None) -> Task:
    """The task of `config.train_mode` on `model`.

    Args:
        config: the run's `Config` (its sections are handed to the task).
        model: the network to train.
        teacher: images -> logits, required for distillation.
        strategy: where `model` lives (the memory of negatives is built there); None: the current strategy.
    """
    if config.train_mode == "pretrain":
        memory = None
        if config.contrast.memory_size > 0:
            memory = NegativesMemory(model, config.model, config.contrast, strategy or tf.distribute.get_strategy(),
                                     mixed_precision=config.mixed_precision_request)
        return PretrainTask(model, config.optim, config.contrast, config.lineareval_while_pretraining, memory)
    if config.train_mode == "finetune":
        return FinetuneTask(model, config.optim)
    if config.train_mode == "distill":
        if teacher is None:
            raise ValueError("teacher: required for train_mode 'distill'")
        return DistillTask(model, config.optim, config.distill, teacher)
    raise ValueError(f"train_mode: must be pretrain, finetune or distill, got {config.train_mode!r}")
