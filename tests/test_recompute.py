"""--recompute: the backward pass recomputes each residual block instead of keeping its activations.

Checked against the plain model (the same weights, the same batch): the same loss, the same gradients for
every variable and the input, and BatchNormalization's moving averages updated exactly once per step (a
second, recomputed forward pass must not update them again). Both in a tf.function (how the trainer runs) and
eagerly; basic and bottleneck blocks (the latter with SE, whose layers are inside the block).
"""
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models.simclr import SimCLRModel

ARCHS = {
    "basic": dict(resnet_depth=18, width_multiplier=0.125, image_size=16),
    "bottleneck_se": dict(resnet_depth=50, width_multiplier=0.0625, se_ratio=0.25,
                             image_size=16),
}


def one_step(model, images, graph):
    """Loss, gradients (variables and input) of one training-mode pass; the model's BN averages move."""

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=True)
            # A loss that reaches every block and both BN parameters: projections and h, unevenly weighted.
            loss = tf.reduce_sum(out["proj_head_output"] ** 2) + tf.reduce_sum(out["h"] * tf.range(
                tf.cast(tf.shape(out["h"])[-1], tf.float32)))
        return loss, tape.gradient(loss, [x] + model.trainable_variables)

    fn = tf.function(grads) if graph else grads
    loss, g = fn(tf.constant(images))
    return float(loss), [t.numpy() for t in g]


# Eagerly only the basic blocks: the bottleneck model's eager pass adds half a minute, and the
# recompute wrapper is the same code for both block kinds.
# `groups`: --recompute_groups (the stem and groups 1..k recomputed, the rest kept as usual).
@pytest.mark.parametrize("arch,graph,groups", [("basic", True, 4), ("basic", False, 4), ("bottleneck_se", True, 4),
                                               ("basic", True, 1)],
                         ids=["basic-tf.function", "basic-eager", "bottleneck_se-tf.function",
                              "basic-first-group-only"])
def test_recompute_gives_the_plain_gradients_and_one_moving_average_update(arch, graph, groups):
    images = np.random.RandomState(0).rand(6, 16, 16, 3).astype(np.float32)
    plain = SimCLRModel(**ARCHS[arch], num_classes=0)
    recomputed = SimCLRModel(**ARCHS[arch], num_classes=0, recompute=True, recompute_groups=groups)
    assert [g.recompute for g in recomputed.backbone.groups] == [g < groups for g in range(4)]
    plain(images[:1], training=False)
    recomputed(images[:1], training=False)
    assert len(plain.weights) == len(recomputed.weights)
    recomputed.set_weights(plain.get_weights())
    before = [w.numpy() for w in plain.non_trainable_weights]

    loss, grads = one_step(plain, images, graph)
    loss_r, grads_r = one_step(recomputed, images, graph)

    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert len(grads_r) == len(grads) == 1 + len(plain.trainable_variables)
    for i, (g, g_r) in enumerate(zip(grads, grads_r)):
        assert g is not None and g_r is not None, i
        scale = max(float(np.abs(g).max()), 1e-6)
        np.testing.assert_allclose(g_r, g, atol=1e-5 * scale, err_msg=f"gradient {i}")
    moved = 0
    for w, w_r, w0 in zip(plain.non_trainable_weights, recomputed.non_trainable_weights, before):
        # One update m <- 0.9 m + 0.1 batch statistic in both; a second one would differ by ~10% of the step.
        np.testing.assert_allclose(w_r.numpy(), w.numpy(), rtol=1e-5, atol=1e-7, err_msg=w.path)
        moved += not np.allclose(w.numpy(), w0)
    assert moved > len(before) // 2  # the averages really moved in this step


def test_recompute_leaves_inference_alone_and_round_trips_its_setting():
    images = np.random.RandomState(1).rand(2, 16, 16, 3).astype(np.float32)
    plain = SimCLRModel(**ARCHS["basic"], num_classes=3)
    recomputed = SimCLRModel(**ARCHS["basic"], num_classes=3, recompute=True)
    plain(images, training=False)
    recomputed(images, training=False)
    recomputed.set_weights(plain.get_weights())
    np.testing.assert_allclose(recomputed(images, training=False)["logits_sup"].numpy(),
                               plain(images, training=False)["logits_sup"].numpy(), rtol=1e-6, atol=1e-7)
    again = SimCLRModel.from_config(recomputed.get_config())
    assert again.recompute and again.backbone.recompute and all(g.recompute for g in again.backbone.groups)
    partial = SimCLRModel.from_config(SimCLRModel(**ARCHS["basic"], recompute=True, recompute_groups=2).get_config())
    assert [g.recompute for g in partial.backbone.groups] == [True, True, False, False]
