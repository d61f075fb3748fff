"""XLA compilation of a training step (`--jit_compile`) on one replica or several."""
from __future__ import annotations

import threading
from typing import Callable

import tensorflow as tf

from simclr_tf.strategy import is_tpu


def compile_step(step: Callable, strategy: tf.distribute.Strategy) -> Callable:
    """`step` (a per-replica train step for `strategy.run`) compiled by XLA as far as TF allows.

    One replica (or a TPU, where everything is compiled anyway): the whole step is one XLA program. Several
    replicas: the ops of each replica's step are marked for XLA (see `_ReplicasJitScope`), so every device
    compiles its stretches between the cross-replica collectives.

    Args:
        step: `(images, labels) -> metrics`, run by `strategy.run` in each replica.
        strategy: the strategy the step runs under.
    """
    if strategy.num_replicas_in_sync == 1 or is_tpu(strategy):
        return tf.function(step, jit_compile=True)
    scope = _ReplicasJitScope()

    def clustered_step(images, labels):
        with scope:
            metrics = step(images, labels)
        return metrics

    return clustered_step


class _ReplicasJitScope:
    """`tf.xla.experimental.jit_scope` over one `strategy.run` of a step on several replicas (--jit_compile).

    `tf.function(step, jit_compile=True)` cannot serve there. On non-GPU devices `strategy.run` lifts it over
    all the replicas: one XLA program, placed on the first device, that reaches into the other replicas'
    variables ("Trying to access resource .../replica_1/... located in device CPU:1 from device CPU:0").
    On GPUs each replica gets its own program, but `ReplicaContext.all_gather` (NT-Xent) is a `merge_call`,
    which a nested function does not allow. So the step stays a plain function and every op `strategy.run`
    builds for it (each replica's, and the cross-replica merges) is marked for XLA: TF compiles, per device,
    the largest pieces between the collectives (sync-BN sums, the NT-Xent gather, the gradient all-reduce):
    forward and backward passes, the loss, the optimizer update.

    The replicas' threads build the one graph in turn, each pausing at every collective, so their scopes
    would interleave instead of nesting (the attribute scope is the graph's, and the first replica to leave
    would unmark the others' remaining ops): one scope is opened by the first replica to enter and closed by
    the last to leave.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._scope = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._scope = tf.xla.experimental.jit_scope(compile_ops=True)
                self._scope.__enter__()
            self._inside += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                scope, self._scope = self._scope, None
                scope.__exit__(None, None, None)
