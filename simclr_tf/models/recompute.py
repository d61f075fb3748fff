"""Recomputing a layer's activations in the backward pass instead of keeping them (`--recompute`).

A training step keeps every intermediate activation of the forward pass until the backward pass has used it;
for a ResNet that is most of the step's memory. Wrapped here, a layer keeps only its input: its backward pass
runs its forward again (a second time, from that input) and differentiates that. For ResNet blocks this costs
one more forward pass per step and leaves, besides the block inputs, one block's activations alive at a time.

Why not `tf.recompute_grad`: the second forward pass would update BatchNormalization's moving averages a
second time (decay applied twice per step). Here it runs in a Keras `StatelessScope`, which drops its variable
writes, so the moving averages see each step once, exactly as without recompute; gradients are the same up
to float rounding (tests/test_recompute.py checks both against the plain step).
"""
from __future__ import annotations

from typing import Any

import keras

from simclr_tf.errors import ArgumentError

__all__ = ["check_backend", "recomputed_call"]


def check_backend(recompute: bool) -> None:
    """Recompute is built on TensorFlow's custom gradients: refuse it on the other Keras backends.

    Args:
        recompute: the `recompute` argument being checked.
    """
    if recompute and keras.backend.backend() != "tensorflow":
        raise ArgumentError("recompute", f"needs the TensorFlow backend, not {keras.backend.backend()!r}")


def recomputed_call(layer: keras.layers.Layer, inputs: Any, training: bool) -> Any:
    """`layer(inputs, training=training)` whose backward pass recomputes the layer's activations.

    Args:
        layer: a layer with one tensor input and a tensor or a tuple of tensors as output, without randomness
            (the recomputation must see what the first pass saw).
        inputs: its input.
        training: passed to the layer (both passes).
    """
    import tensorflow as tf  # the TensorFlow backend only (check_backend)

    @tf.custom_gradient
    def forward(x):
        y = layer(x, training=training)

        def backward(*dys, variables=None):
            # An output the loss does not use (the stem's pre-BN endpoint) may come with no gradient: zero.
            dys = [tf.zeros_like(y_i) if dy is None else dy for dy, y_i in zip(dys, tf.nest.flatten(y))]
            # Make the recomputation depend on the incoming gradient: TF runs an op as soon as its inputs are
            # ready, so without this every block's recomputation could run right after the forward pass, all
            # alive at once. A data dependency (not a control one), because XLA ignores control dependencies.
            # It adds 0, or NaN where the last output's gradient is NaN, so nothing is hidden.
            first = tf.reshape(dys[-1], [-1])[0]
            after_dy = tf.where(tf.math.is_nan(first), tf.constant(float("nan"), x.dtype), tf.zeros([], x.dtype))
            with tf.GradientTape() as tape:
                x_again = x + after_dy
                tape.watch(x_again)
                with keras.StatelessScope():  # no second moving-average update
                    y_again = layer(x_again, training=training)
            watched = list(variables or [])
            grads = tape.gradient(tf.nest.flatten(y_again), [x_again] + watched, output_gradients=list(dys))
            return grads[0], grads[1:]

        return y, backward

    return forward(inputs)
