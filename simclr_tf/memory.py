"""SimCLRv2's memory of negatives (docs/design.md §4.4): a momentum copy of the encoder and a FIFO queue of
the projections it made of past batches, used as extra negatives by NT-Xent.

The paper (SimCLRv2 §2) "designates a memory network (with a moving average of weights for stabilization) whose
output will be buffered as negative examples", following MoCo. Here:

* the momentum copy is backbone + projection head (no supervised head), built like the online model; it never
  receives a gradient, and after every optimizer step its trainable weights (kernels, BN gamma/beta) follow
  `w_m <- m w_m + (1 - m) w`. Its BN layers keep their own moving statistics, updated by its own forward passes
  in training mode (batch statistics, synchronised across replicas with --global_bn, as the online network);
* each step it projects both views of the batch; the keys, normalised as NT-Xent normalises the anchors, are
  gathered from every replica in the single-device row order [all view-1 rows; all view-2 rows] and written to
  the queue after the step's loss was computed (so a step never sees its own keys);
* the in-batch negatives stay the online network's, so `--memory_size=0` is plain SimCLR, bit for bit.

Per step, inside one traced replica function: loss (queue as it was) -> gradients -> optimizer update ->
`after_step`: enqueue this step's keys, then the momentum update (MoCo's order: the next step's keys come from
the updated copy).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import List, Tuple, Union

import keras
import tensorflow as tf

from simclr_tf.losses import gather_from_replicas
from simclr_tf.models import SimCLRModel, build_model
from simclr_tf.sections import ContrastConfig, ModelConfig

_NORM_EPSILON = 1e-12  # as NT-Xent's, so keys and anchors are normalised alike

VariablePairs = List[Tuple[keras.Variable, keras.Variable]]


def encoder_layer_pairs(online: SimCLRModel, copy: SimCLRModel) -> List[Tuple[keras.layers.Layer,
                                                                               keras.layers.Layer]]:
    """The leaf layers of backbone + projection head of two identically built models, matched by position.

    Both lists come from `leaf_layers()` (construction order), so layer i of one is layer i of the other;
    the types and every weight's shape are checked, and the leaves must hold every weight of both parts, so
    nothing is silently left out of the momentum update.

    Args:
        online: the model being trained.
        copy: a model built from the same architecture (its supervised head, if any, is not paired).

    Raises:
        ValueError: the two encoders are not built alike.
    """
    leaves = [m.backbone.leaf_layers() + m.projection_head.leaf_layers() for m in (online, copy)]
    if len(leaves[0]) != len(leaves[1]):
        raise ValueError(f"momentum copy: {len(leaves[1])} layers, the online encoder {len(leaves[0])}")
    for a, b in zip(*leaves):
        if type(a) is not type(b) or [w.shape for w in a.weights] != [w.shape for w in b.weights]:
            raise ValueError(f"momentum copy: layer {b.path or b.name} does not match the online encoder's "
                             f"{a.path or a.name}")
    for model, model_leaves in zip((online, copy), leaves):
        owned = {id(w) for part in (model.backbone, model.projection_head) for w in part.weights}
        if owned != {id(w) for layer in model_leaves for w in layer.weights}:
            raise ValueError("momentum copy: the encoder has weights outside its leaf layers")
    return list(zip(*leaves))


class NegativesMemory:
    """The momentum encoder and the queue of its keys; see the module docstring.

    Build it where the online model's variables live: it builds the copy with `build_model` and creates the
    queue, write pointer, fill count and the `initialised` flag under `strategy.scope()`, aggregated
    ONLY_FIRST_REPLICA (every replica holds the same queue; the first replica's write is the one kept).

    Args:
        online: the model being trained.
        model: its architecture (the copy gets the same, without a supervised head).
        contrast: `memory_size` K > 0, `memory_momentum` m, `hidden_norm`.
        strategy: the strategy of `online`.
        mixed_precision: as `online` was built.
    """

    def __init__(self, online: SimCLRModel, model: ModelConfig, contrast: ContrastConfig,
                 strategy: tf.distribute.Strategy, *, mixed_precision: Union[bool, str] = False) -> None:
        if contrast.memory_size <= 0:
            raise ValueError(f"memory_size: must be > 0 to build a memory, got {contrast.memory_size}")
        self.size = contrast.memory_size
        self.momentum = contrast.memory_momentum
        self.hidden_norm = contrast.hidden_norm
        # Keras-trainable on purpose: Keras BN normalises with the moving statistics when its layer is not
        # trainable, and the copy must use batch statistics like the online network. No optimizer ever holds
        # its variables and its outputs are stop_gradient'ed, so it never receives a gradient.
        self.model = build_model(dataclasses.replace(model, supervised_head=False), 0, strategy,
                                 mixed_precision=mixed_precision)
        pairs = encoder_layer_pairs(online, self.model)
        # The momentum update covers what the optimizer trains; BN moving statistics come from the copy's own
        # forward passes. The first copy takes everything, statistics included.
        self._ema_pairs: VariablePairs = [(w, w_m) for a, b in pairs
                                          for w, w_m in zip(a.trainable_weights, b.trainable_weights)]
        self._copy_pairs: VariablePairs = [(w, w_m) for a, b in pairs for w, w_m in zip(a.weights, b.weights)]
        head = online.projection_head
        dim = head.dense_layers[-1].units if head.dense_layers else online.backbone.output_dim
        only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        with strategy.scope():
            self.queue = tf.Variable(tf.zeros([self.size, dim], tf.float32), trainable=False,
                                     aggregation=only_first, name="memory_queue")
            self.pointer = tf.Variable(tf.constant(0, tf.int64), trainable=False, aggregation=only_first,
                                       name="memory_pointer")
            self.filled = tf.Variable(tf.constant(0, tf.int64), trainable=False, aggregation=only_first,
                                      name="memory_filled")
            self.initialised = tf.Variable(False, trainable=False, aggregation=only_first,
                                           name="memory_initialised")
        # Keys travel from `keys()` (called in the task's objective) to `after_step()` within one trace of
        # the replica step. With several replicas `strategy.run` traces each replica in its own thread,
        # interleaved at every collective, so the hand-over is per thread.
        self._pending = threading.local()

    def trackable(self) -> tf.train.Checkpoint:
        """What the run's checkpoint holds of the memory (under `memory/`)."""
        return tf.train.Checkpoint(model=self.model, queue=self.queue, pointer=self.pointer, filled=self.filled,
                                   initialised=self.initialised)

    def variables(self) -> list:
        """Every variable of the memory: the copy's weights, queue, pointer, fill count, flag."""
        return list(self.model.weights) + [self.queue, self.pointer, self.filled, self.initialised]

    def start(self) -> bool:
        """Makes the copy an exact copy of the online encoder (BN statistics included) unless it already is one.

        Eager, outside the train step, before the first step of a fresh run or of a run initialised from
        --checkpoint; a resumed run restored `initialised` and its copy, and keeps them. Returns True if it
        copied.
        """
        if bool(self.initialised.numpy()):
            return False
        for w, w_m in self._copy_pairs:
            w_m.assign(w.value)
        self.initialised.assign(True)
        return True

    def negatives(self) -> Tuple[tf.Tensor, tf.Tensor]:
        """`(queue [K, d] float32, filled)` as they are before this step's write."""
        return tf.convert_to_tensor(self.queue), tf.convert_to_tensor(self.filled)

    def fill_fraction(self) -> tf.Tensor:
        """filled / K, float32: the `memory_fill` metric."""
        return tf.cast(self.filled, tf.float32) / float(self.size)

    def keys(self, views: tf.Tensor) -> tf.Tensor:
        """The copy's keys of this replica's views, gathered from all replicas, held for `after_step`.

        Args:
            views: [2b, S, S, 3], this replica's view-1 rows then its view-2 rows.

        Returns:
            [2 R b, d] float32: all replicas' view-1 keys in replica order, then their view-2 keys; the row order
            of a single device holding the global batch, so the queue is the same on any number of replicas.
        """
        z = self.model(views, training=True)["proj_head_output"]
        z = tf.stop_gradient(tf.cast(z, tf.float32))
        if self.hidden_norm:
            z = tf.math.l2_normalize(z, axis=-1, epsilon=_NORM_EPSILON)
        z1, z2 = tf.split(z, 2, axis=0)
        keys = tf.concat([gather_from_replicas(z1)[0], gather_from_replicas(z2)[0]], axis=0)
        self._pending.keys = keys
        return keys

    def after_step(self) -> None:
        """Enqueues the keys of this step, then moves the copy towards the online weights (in the replica step,
        right after the optimizer applied the step's gradients)."""
        keys = getattr(self._pending, "keys", None)
        if keys is None:
            raise RuntimeError("NegativesMemory.after_step: no keys; the step's objective must call keys() first")
        self._pending.keys = None
        self.enqueue(keys)
        self.momentum_update()

    def enqueue(self, keys: tf.Tensor) -> None:
        """Writes `keys` ([n, d], identical in every replica) at the pointer, wrapping around; keeps the last K.

        Args:
            keys: the rows to write, oldest first.
        """
        n = tf.shape(keys, out_type=tf.int64)[0]
        kept = tf.minimum(n, self.size)
        rows = keys[n - kept:]  # when n > K only the last K would survive a row-by-row write
        # Row j of the batch goes to (pointer + j) mod K; the kept rows are j = n - kept .. n - 1, all distinct.
        index = (tf.convert_to_tensor(self.pointer) + (n - kept) + tf.range(kept, dtype=tf.int64)) % self.size
        self.queue.scatter_update(tf.IndexedSlices(rows, index))
        self.pointer.assign((tf.convert_to_tensor(self.pointer) + n) % self.size)
        self.filled.assign(tf.minimum(tf.convert_to_tensor(self.filled) + n, self.size))

    def momentum_update(self) -> None:
        """w_m <- m w_m + (1 - m) w for every trainable weight of the encoder; each replica updates its own
        copy with its own (identical) values, as BN updates its statistics, so no value crosses devices."""
        m = self.momentum
        for w, w_m in self._ema_pairs:
            w_m.assign(m * w_m.value + (1.0 - m) * w.value)
