"""LARS against a NumPy transcription of docs/design.md §6.3, on one and two replicas; checkpointing; the
optimizer factory and the weight-decay loss term."""
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.errors import UsageError
from simclr_tf.optimizers import LARS, build_optimizer, l2_regularization, weight_decay_loss
from simclr_tf.schedules import WarmupCosineSchedule
from tests.conftest import REPO


def lars_numpy(weights, grads_per_step, lrs, excluded, momentum, weight_decay, eeta):
    """docs/design.md §6.3 in float64. `grads_per_step[k][i]` may be a callable of the current weight."""
    w = [np.array(x, np.float64) for x in weights]
    v = [np.zeros_like(x) for x in w]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            g = np.array(g(w[i]) if callable(g) else g, np.float64)
            if i in excluded:
                update = lr * g
            else:
                g = g + weight_decay * w[i]
                w_norm, g_norm = np.linalg.norm(w[i]), np.linalg.norm(g)
                trust = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                update = lr * trust * g
            v[i] = momentum * v[i] + update
            w[i] = w[i] - v[i]
    return w, v


def closed_form_lr(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


@pytest.mark.parametrize("eeta", [1e-3, 1.0])
def test_lars_matches_numpy_with_exclusions_zero_norms_and_schedule(eeta):
    rng = np.random.default_rng(0)
    wd, momentum, steps = 0.5, 0.9, 5  # wd = 0.5 makes g = -wd * w cancel exactly in float32
    schedule = WarmupCosineSchedule(0.4, warmup_steps=2, total_steps=6)
    init = [
        rng.normal(size=(3, 4)).astype(np.float32),    # 0: regular kernel
        rng.normal(size=(4,)).astype(np.float32),      # 1: excluded (bias/BN-like): plain momentum
        np.zeros((5,), np.float32),                    # 2: ||w|| = 0 -> trust 1
        np.array([0.5, -1.0, 2.0], np.float32),        # 3: g + wd*w = 0 -> ||g|| = 0 -> trust 1
        np.zeros((2, 2), np.float32),                  # 4: both norms 0 on step 1
        rng.normal(size=(2, 3)).astype(np.float32),    # 5: excluded, second one
    ]
    grads = []
    for k in range(steps):
        grads.append([
            rng.normal(size=(3, 4)).astype(np.float32),
            rng.normal(size=(4,)).astype(np.float32),
            rng.normal(size=(5,)).astype(np.float32),
            lambda w: (-wd * w).astype(np.float32),
            np.zeros((2, 2), np.float32) if k == 0 else rng.normal(size=(2, 2)).astype(np.float32),
            rng.normal(size=(2, 3)).astype(np.float32),
        ])
    variables = [keras.Variable(x) for x in init]
    opt = LARS(schedule, momentum=momentum, weight_decay=wd, eeta=eeta, exclude=[variables[1]])
    opt.exclude_variables([variables[5]])
    for k in range(steps):
        numeric = [g(v.numpy()) if callable(g) else g for g, v in zip(grads[k], variables)]
        opt.apply_gradients(zip([tf.constant(g) for g in numeric], variables))
    lrs = [closed_form_lr(k, 0.4, 2, 6) for k in range(steps)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.4)
    w_ref, v_ref = lars_numpy(init, grads, lrs, {1, 5}, momentum, wd, eeta)
    assert int(opt.iterations.numpy()) == steps
    for i, var in enumerate(variables):
        np.testing.assert_allclose(var.numpy(), w_ref[i], rtol=1e-5, atol=1e-7, err_msg=f"variable {i}")
        # Velocities sum momentum-weighted terms of either sign: cancellation needs a scale-aware atol.
        np.testing.assert_allclose(opt.momentums[i].numpy(), v_ref[i], rtol=1e-5,
                                   atol=1e-6 * np.abs(v_ref[i]).max() + 1e-12, err_msg=f"velocity {i}")
    # The excluded variables really took the plain-momentum path (a regression here would be silent
    # with eeta = 1 only if trust happened to be 1).
    plain, _ = lars_numpy(init, grads, lrs, set(), momentum, wd, eeta)
    assert not np.allclose(plain[1], w_ref[1], rtol=1e-3)
    assert opt.is_excluded(variables[1]) and opt.is_excluded(variables[5])
    assert not opt.is_excluded(variables[0])


def test_lars_step_inside_tf_function():
    w = keras.Variable(np.array([[1.0, -2.0], [0.5, 3.0]], np.float32))
    b = keras.Variable(np.array([0.1, 0.2], np.float32))
    opt = LARS(0.3, momentum=0.9, weight_decay=1e-2, exclude=[b])
    g_w = np.array([[0.2, 0.1], [-0.3, 0.4]], np.float32)
    g_b = np.array([1.0, -1.0], np.float32)

    @tf.function
    def step():
        opt.apply_gradients([(tf.constant(g_w), w), (tf.constant(g_b), b)])

    for _ in range(3):
        step()
    ref, _ = lars_numpy([[[1.0, -2.0], [0.5, 3.0]], [0.1, 0.2]], [[g_w, g_b]] * 3, [0.3] * 3, {1}, 0.9,
                        1e-2, 1e-3)
    np.testing.assert_allclose(w.numpy(), ref[0], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), ref[1], rtol=1e-6)


def test_lars_slots_survive_checkpoint(tmp_path):
    def make():
        a = keras.Variable(np.zeros((3, 2), np.float32))
        b = keras.Variable(np.zeros((2,), np.float32))
        return a, b, LARS(WarmupCosineSchedule(0.5, 1, 10), weight_decay=1e-3, exclude=[b])

    rng = np.random.default_rng(3)
    grads = [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
             for _ in range(4)]
    a, b, opt = make()
    a.assign(rng.normal(size=(3, 2)).astype(np.float32))
    for g in grads[:2]:
        opt.apply_gradients(zip(g, [a, b]))
    path = tf.train.Checkpoint(optimizer=opt, a=a, b=b).save(str(tmp_path / "ckpt"))
    saved_slots = [m.numpy() for m in opt.momentums]
    assert all(np.abs(s).max() > 0 for s in saved_slots)

    # Restore into an unbuilt optimizer (deferred restoration, what a resuming training loop does) ...
    a2, b2, opt2 = make()
    tf.train.Checkpoint(optimizer=opt2, a=a2, b=b2).restore(path).assert_existing_objects_matched()
    opt2.build([a2, b2])
    # ... and into an optimizer built before the restore.
    a3, b3, opt3 = make()
    opt3.build([a3, b3])
    tf.train.Checkpoint(optimizer=opt3, a=a3, b=b3).restore(path).assert_consumed()
    for restored, (va, vb) in ((opt2, (a2, b2)), (opt3, (a3, b3))):
        assert int(restored.iterations.numpy()) == 2
        for m, s in zip(restored.momentums, saved_slots):
            np.testing.assert_array_equal(m.numpy(), s)
        np.testing.assert_array_equal(va.numpy(), a.numpy())
    # Continuing from the restored state equals continuing the original run (LR step and slots included).
    for g in grads[2:]:
        opt.apply_gradients(zip(g, [a, b]))
        opt2.apply_gradients(zip(g, [a2, b2]))
    np.testing.assert_array_equal(a2.numpy(), a.numpy())
    np.testing.assert_array_equal(b2.numpy(), b.numpy())


def test_lars_config_round_trip():
    opt = LARS(WarmupCosineSchedule(0.5, 3, 30), momentum=0.8, weight_decay=1e-4, eeta=2e-3)
    config = opt.get_config()
    assert config["momentum"] == 0.8 and config["weight_decay"] == 1e-4 and config["eeta"] == 2e-3
    clone = LARS.from_config(config)
    assert clone.momentum == 0.8 and clone.lars_weight_decay == 1e-4 and clone.eeta == 2e-3
    assert isinstance(clone._learning_rate, WarmupCosineSchedule)
    assert clone._learning_rate.get_config() == opt._learning_rate.get_config()
    assert clone.weight_decay is None  # Keras's decoupled decay stays off
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, LARS) and restored.eeta == 2e-3


def test_lars_rejects_name_patterns_and_bad_values():
    with pytest.raises(UsageError):
        LARS(0.1).exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(UsageError, match="--momentum"):
        LARS(0.1, momentum=1.5)
    with pytest.raises(UsageError, match="--weight_decay"):
        LARS(0.1, weight_decay=-1.0)


def test_build_optimizer():
    v = keras.Variable(np.ones((2,), np.float32))
    lars = build_optimizer("lars", 0.1, momentum=0.9, weight_decay=1e-6, exclude_from_weight_decay=[v])
    assert isinstance(lars, LARS) and lars.is_excluded(v) and lars.lars_weight_decay == 1e-6
    sgd = build_optimizer("momentum", 0.1, momentum=0.9, weight_decay=1e-6)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.9
    assert sgd.weight_decay is None
    adam = build_optimizer("adam", 0.1, weight_decay=1e-6)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay is None
    with pytest.raises(UsageError, match="--optimizer"):
        build_optimizer("sgd", 0.1)


def test_weight_decay_loss_per_optimizer():
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(3, 3), (3,), (4,), (3, 2), (2,)]]
    conv, bn_gamma, bn_beta, head_kernel, head_bias = [keras.Variable(x) for x in arrays]
    trainable = [conv, bn_gamma, bn_beta, head_kernel, head_bias]
    wd = 1e-2

    def half_sq(*xs):
        return sum(0.5 * float((x.astype(np.float64) ** 2).sum()) for x in xs)

    lars = weight_decay_loss("lars", wd, trainable_variables=trainable, supervised_head_kernels=[head_kernel],
                             exempt=[bn_gamma, bn_beta, head_bias])
    np.testing.assert_allclose(lars.numpy(), wd * half_sq(arrays[3]), rtol=1e-6)
    for name in ("momentum", "adam"):
        loss = weight_decay_loss(name, wd, trainable_variables=trainable,
                                 supervised_head_kernels=[head_kernel], exempt=[bn_gamma, bn_beta])
        np.testing.assert_allclose(loss.numpy(), wd * half_sq(arrays[0], arrays[3], arrays[4]), rtol=1e-6)
    none = weight_decay_loss("lars", wd, trainable_variables=trainable, supervised_head_kernels=[])
    assert none.numpy() == 0.0 and none.dtype == tf.float32
    assert l2_regularization([conv], 0.0).numpy() == 0.0
    with pytest.raises(UsageError, match="--optimizer"):
        weight_decay_loss("sgd", wd, trainable_variables=trainable, supervised_head_kernels=[])


_MIRRORED_SCRIPT = r"""
import json
import numpy as np
import keras
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from simclr_tf.optimizers import LARS
from simclr_tf.schedules import WarmupCosineSchedule

rng = np.random.default_rng(7)
init = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
# grads[step][replica][variable]
grads = [[[rng.normal(size=x.shape).astype(np.float32) for x in init] for _ in range(2)] for _ in range(3)]


def run(strategy, replicas):
    with strategy.scope():
        variables = [keras.Variable(x) for x in init]
        opt = LARS(WarmupCosineSchedule(0.5, 1, 4), momentum=0.9, weight_decay=1e-2, exclude=[variables[1]])
        opt.build(variables)

    def replica_step(g0, g1):
        opt.apply_gradients([(g0, variables[0]), (g1, variables[1])])

    @tf.function
    def step(g0, g1):
        strategy.run(replica_step, args=(g0, g1))

    for k in range(3):
        if replicas == 1:  # one device gets the sum the two replicas' gradients all-reduce to
            per_var = [tf.constant(grads[k][0][i] + grads[k][1][i]) for i in range(2)]
        else:
            per_var = [strategy.experimental_distribute_values_from_function(
                lambda ctx, i=i: tf.constant(grads[k][ctx.replica_id_in_sync_group][i])) for i in range(2)]
        step(*per_var)
    weights = [[t.numpy().tolist() for t in strategy.experimental_local_results(v.value)] for v in variables]
    slots = [[t.numpy().tolist() for t in strategy.experimental_local_results(m.value)]
             for m in opt.momentums]
    return dict(weights=weights, slots=slots, excluded=opt.is_excluded(variables[1]),
                replicas=strategy.num_replicas_in_sync)

mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 2)
single = run(tf.distribute.get_strategy(), 1)
print("RESULT" + json.dumps(dict(init=[x.tolist() for x in init],
                                 grads=[[[g.tolist() for g in r] for r in s] for s in grads],
                                 mirrored=mirrored, single=single)))
"""


def test_lars_under_mirrored_strategy_equals_single_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])
    mirrored, single = result["mirrored"], result["single"]
    assert mirrored["replicas"] == 2 and mirrored["excluded"] and single["excluded"]
    grads = result["grads"]
    summed = [[np.array(s[0][i]) + np.array(s[1][i]) for i in range(2)] for s in grads]
    lrs = [closed_form_lr(k, 0.5, 1, 4) for k in range(3)]
    w_ref, v_ref = lars_numpy(result["init"], summed, lrs, {1}, 0.9, 1e-2, 1e-3)
    for i in range(2):
        copies = [np.array(x) for x in mirrored["weights"][i]]
        np.testing.assert_array_equal(copies[0], copies[1])  # replicas stay in sync
        np.testing.assert_allclose(copies[0], np.array(single["weights"][i][0]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(copies[0], w_ref[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.array(mirrored["slots"][i][0]), v_ref[i], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.array(mirrored["slots"][i][1]), v_ref[i], rtol=1e-5, atol=1e-9)
