"""Pretraining: NT-Xent between two views of each image, plus the online linear head."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import tensorflow as tf

from simclr_tf import losses
from simclr_tf.memory import NegativesMemory
from simclr_tf.models import SimCLRModel
from simclr_tf.sections import ContrastConfig, OptimConfig
from simclr_tf.tasks.base import Metrics, Task


class PretrainTask(Task):
    """The SimCLR objective (the official `single_step`, pretrain branch), with SimCLRv2's memory of negatives
    when one is given (docs/design.md §4.4).

    Args:
        model: the network; its supervised head (if any) reads stop_gradient(h).
        optim: optimizer settings (weight decay).
        contrast: temperature and normalisation of NT-Xent.
        linear_eval: also train the supervised head on the labelled rows (online linear evaluation).
        memory: the momentum encoder and queue of negatives (`--memory_size` > 0); None: plain SimCLR.
    """

    def __init__(self, model: SimCLRModel, optim: OptimConfig, contrast: ContrastConfig,
                 linear_eval: bool, memory: Optional[NegativesMemory] = None) -> None:
        super().__init__(model, optim)
        self.contrast = contrast
        self.linear_eval = linear_eval and model.supervised_head is not None
        self.memory = memory

    def objective(self, images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, Metrics]:
        views = losses.view_rows(images)
        out = self.model(views, training=True)
        memory_args: Dict[str, Any] = {}
        if self.memory is not None:
            queue, filled = self.memory.negatives()  # read before this step's keys are written (after_step)
            memory_args = dict(memory=queue, memory_filled=filled)
            # The copy's keys are made here, where the views are, but held by the memory until after_step
            # writes them in this same trace of the step: this loss uses the queue as it was, never its own keys.
            self.memory.keys(views)
        loss, metrics = losses.pretraining_objective(out, labels, temperature=self.contrast.temperature,
                                                     hidden_norm=self.contrast.hidden_norm,
                                                     linear_eval=self.linear_eval, **memory_args)
        if self.memory is not None:
            metrics["memory_fill"] = self.memory.fill_fraction()
        return loss, metrics

    def before_steps(self) -> None:
        if self.memory is not None:
            self.memory.start()

    def after_step(self) -> None:
        if self.memory is not None:
            self.memory.after_step()

    def trackables(self) -> Dict[str, Any]:
        return {} if self.memory is None else {"memory": self.memory.trackable()}
