"""simclr_tf's BatchNormalization: TensorFlow's fused kernel in one replica's training pass.

Checked against the formulas written out in NumPy: the normalised output (biased batch variance), both moving
averages (m <- d m + (1 - d) batch statistic, the variance biased as in Keras, not the kernel's unbiased one),
and the closed-form backward pass of batch normalisation. The graph is inspected to show the fused kernel
really ran (and that inference keeps Keras' own path).
"""
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models.layers import BATCH_NORM_EPSILON, batch_norm

DECAY = 0.9


def make_layer(channels, seed=0, dtype=None):
    layer = batch_norm(DECAY, global_bn=True, name="bn")
    if dtype is not None:
        layer = type(layer).from_config({**layer.get_config(), "dtype": dtype})
    layer.build((None, 4, 4, channels))
    rng = np.random.RandomState(seed)
    layer.gamma.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    layer.beta.assign(rng.normal(size=channels).astype(np.float32))
    layer.moving_mean.assign(rng.normal(size=channels).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    return layer


def op_types(layer, shape, training):
    fn = tf.function(lambda x: layer(x, training=training))
    graph = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    return {op.type for op in graph.get_operations()}


def test_training_pass_is_fused_and_matches_the_formulas():
    rng = np.random.RandomState(1)
    # Channels with means far from 0 and different spreads: E[x^2] - E[x]^2 would lose digits here.
    x = (rng.normal(size=(6, 5, 5, 7)) * rng.uniform(0.1, 3.0, 7) + rng.uniform(-20, 20, 7)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)  # loss = sum(w * y): dL/dy = w
    layer = make_layer(7)
    assert "FusedBatchNormV3" in op_types(layer, x.shape, training=True)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    mm0, mv0 = layer.moving_mean.numpy(), layer.moving_variance.numpy()

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = tf.function(lambda t: layer(t, training=True))(xt)
        loss = tf.reduce_sum(w * y)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 1, 2))
    var = x64.var(axis=(0, 1, 2))  # biased
    xhat = (x64 - mean) / np.sqrt(var + BATCH_NORM_EPSILON)
    np.testing.assert_allclose(y.numpy(), xhat * gamma + beta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), DECAY * mm0 + (1 - DECAY) * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), DECAY * mv0 + (1 - DECAY) * var, rtol=1e-5)
    # Closed-form backward pass of y = gamma * xhat + beta over the batch statistics.
    dy = w.astype(np.float64)
    axes = (0, 1, 2)
    np.testing.assert_allclose(dbeta.numpy(), dy.sum(axes), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dgamma.numpy(), (dy * xhat).sum(axes), rtol=1e-4, atol=1e-4)
    expected_dx = gamma / np.sqrt(var + BATCH_NORM_EPSILON) * (
        dy - dy.mean(axes) - xhat * (dy * xhat).mean(axes))
    np.testing.assert_allclose(dx.numpy(), expected_dx, rtol=1e-3, atol=1e-4)


def test_one_value_per_channel_gives_zero_variance_not_nan():
    # n = 1: the kernel's n / (n - 1) correction is n / max(n - 1, 1); undoing it must not divide by zero.
    layer = make_layer(3, seed=2)
    mv0 = layer.moving_variance.numpy()
    layer(tf.constant(np.arange(3, dtype=np.float32).reshape(1, 1, 1, 3)), training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(), DECAY * mv0, rtol=1e-6)


def test_inference_uses_the_moving_averages_through_keras_own_path():
    layer = make_layer(4, seed=3)
    assert "FusedBatchNormV3" not in op_types(layer, (2, 3, 3, 4), training=False)
    x = np.random.RandomState(4).normal(size=(2, 3, 3, 4)).astype(np.float32)
    expected = ((x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + BATCH_NORM_EPSILON)
                * layer.gamma.numpy() + layer.beta.numpy())
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_statistics_and_the_compute_dtype(dtype):
    layer = make_layer(5, seed=5, dtype=dtype)
    reference = make_layer(5, seed=5)
    x = np.random.RandomState(6).normal(3.0, 2.0, size=(4, 3, 3, 5)).astype(np.float32)
    y = layer(tf.cast(x, layer.compute_dtype), training=True)
    reference(tf.cast(tf.cast(x, layer.compute_dtype), tf.float32), training=True)
    assert y.dtype == layer.compute_dtype
    assert layer.moving_variance.dtype == "float32"
    np.testing.assert_allclose(layer.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-5)
