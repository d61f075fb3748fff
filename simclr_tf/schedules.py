"""Learning-rate scaling, warmup + cosine schedule and step counts (docs/design.md §6.5, §7.1).

The step formulas are the reference's, integer quirks included (`N * epochs // B + 1` training steps, warmup
from a float floor-division), so that flag files written for the official code give the same schedule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
from keras import ops

from simclr_tf.errors import UsageError
from simclr_tf.sections import ScheduleConfig

SCALINGS = ("linear", "sqrt")


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise UsageError(where, f"must be > 0, got {value}")


def scaled_learning_rate(base_learning_rate: float, batch_size: int, scaling: str) -> float:
    """base * B / 256 ('linear') or base * sqrt(B) ('sqrt'); B is the global batch."""
    _positive("--train_batch_size", batch_size)
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return base_learning_rate * math.sqrt(batch_size)
    raise UsageError("--learning_rate_scaling", f"must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def num_train_steps(train_steps: int, num_examples: int, train_epochs: float, batch_size: int) -> int:
    """`train_steps` if non-zero, else N * epochs // B + 1 (the reference's count, one extra step)."""
    if train_steps:
        _positive("--train_steps", train_steps)
        return int(train_steps)
    _positive("--train_batch_size", batch_size)
    _positive("--train_epochs", train_epochs)
    return int(num_examples * train_epochs // batch_size + 1)


def warmup_steps(warmup_epochs: float, num_examples: int, batch_size: int) -> int:
    """int(round(warmup_epochs * N // B)); 0 disables warmup."""
    _positive("--train_batch_size", batch_size)
    if warmup_epochs < 0:
        raise UsageError("--warmup_epochs", f"must be >= 0, got {warmup_epochs}")
    return int(round(warmup_epochs * num_examples // batch_size))


def epoch_steps(num_examples: int, batch_size: int) -> int:
    """Steps per epoch as the reference counts them: round(N / B)."""
    _positive("--train_batch_size", batch_size)
    return int(round(num_examples / batch_size))


def checkpoint_steps(checkpoint_steps: int, checkpoint_epochs: float, num_examples: int,
                     batch_size: int) -> int:
    """`checkpoint_steps` if non-zero, else checkpoint_epochs * round(N / B), at least 1.

    The floor of 1 is ours: with fewer examples than half a batch the reference's count is 0, which would
    make a steps-per-loop training loop spin without progress.
    """
    if checkpoint_steps:
        _positive("--checkpoint_steps", checkpoint_steps)
        return int(checkpoint_steps)
    _positive("--checkpoint_epochs", checkpoint_epochs)
    return max(1, int(checkpoint_epochs * epoch_steps(num_examples, batch_size)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts of a run, derived once from its ScheduleConfig and the dataset size."""

    train_steps: int
    warmup_steps: int
    checkpoint_steps: int
    steps_per_loop: int
    learning_rate: float  # after batch scaling

    @classmethod
    def from_config(cls, schedule: ScheduleConfig, num_train: int) -> "Schedule":
        """The step counts of `schedule` over `num_train` training examples."""
        batch = schedule.train_batch_size
        total = num_train_steps(schedule.train_steps, num_train, schedule.train_epochs, batch)
        every = min(checkpoint_steps(schedule.checkpoint_steps, schedule.checkpoint_epochs, num_train, batch),
                    total)
        per_loop = schedule.steps_per_loop or min(every, 100)
        return cls(train_steps=total, warmup_steps=warmup_steps(schedule.warmup_epochs, num_train, batch),
                   checkpoint_steps=every, steps_per_loop=max(1, per_loop),
                   learning_rate=scaled_learning_rate(schedule.learning_rate, batch,
                                                      schedule.learning_rate_scaling))

    def is_time(self, step: int, every: int, *, at_end: bool = True) -> bool:
        """The loop's one "is it time" predicate: `step` ends a period of `every` steps (0: never) or, with
        `at_end`, the run."""
        return every > 0 and (step % every == 0 or (at_end and step >= self.train_steps))

    def steps_until_event(self, step: int, *periods: int) -> int:
        """Steps from `step` to the next multiple of any period (0: off) or the end, at most steps_per_loop."""
        n = min(self.steps_per_loop, self.train_steps - step)
        for every in periods:
            if every > 0:
                n = min(n, every - step % every)
        return n


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(s) = peak * s / W for s < W, then peak * (1 + cos(pi * min(s - W, T - W) / (T - W))) / 2.

    W = warmup steps, T = total training steps; lr reaches 0 at s = T and stays there. Written out rather
    than using keras CosineDecay(warmup_target=...) because that one rejects T == W (decay_steps must be > 0),
    which the flags allow; with T <= W the schedule is warmup only and 0 from s = W on. Computed in float32.
    """

    def __init__(self, peak_learning_rate: float, warmup_steps: int, total_steps: int,
                 name: str = "WarmupCosine") -> None:
        super().__init__()
        if warmup_steps < 0:
            raise UsageError("--warmup_epochs", f"warmup steps must be >= 0, got {warmup_steps}")
        _positive("--train_steps", total_steps)
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.name = name

    def __call__(self, step: Any) -> Any:
        # keras.ops only: the schedule drives LARS under fit() on any Keras backend.
        step = ops.cast(step, "float32")
        peak = ops.convert_to_tensor(self.peak_learning_rate, "float32")
        warmup = float(self.warmup_steps)
        decay_steps = float(self.total_steps - self.warmup_steps)
        if self.warmup_steps > 0:
            warm = peak * step / warmup
        else:
            warm = peak
        if decay_steps > 0:
            progress = ops.minimum(ops.maximum(step - warmup, 0.0), decay_steps) / decay_steps
            cosine = peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            cosine = ops.zeros_like(peak)
        return ops.where(step < warmup, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "name": self.name,
        }


def at_step(schedule: keras.optimizers.schedules.LearningRateSchedule,
            step: Any) -> Callable[[], Any]:
    """The learning rate as a function of the run's step counter, for an optimizer's `learning_rate`.

    Keras evaluates a schedule at `optimizer.iterations`, which counts *applied* updates: a step that loss
    scaling skips (float16 overflow) does not advance it, and the schedule would fall behind the run. The run's
    own counter advances every step, so warmup and decay stay where the step count says.

    Args:
        schedule: the learning rate of a step.
        step: the run's step counter (the global step, which the loop increments after each step).
    """
    return lambda: schedule(step)
