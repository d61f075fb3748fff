"""Learning-rate scaling, step counts and the warmup + cosine schedule against their closed forms."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.errors import UsageError
from simclr_tf.schedules import (WarmupCosineSchedule, checkpoint_steps, epoch_steps, num_train_steps,
                                 scaled_learning_rate, warmup_steps)


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(0.3 * 16)
    assert scaled_learning_rate(1.0, 512, "linear") == pytest.approx(2.0)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)  # = 4.8, the v1 recipe
    assert scaled_learning_rate(0.1, 100, "sqrt") == pytest.approx(1.0)
    with pytest.raises(UsageError, match="--learning_rate_scaling"):
        scaled_learning_rate(0.1, 256, "log")
    with pytest.raises(UsageError, match="--train_batch_size"):
        scaled_learning_rate(0.1, 0, "linear")


def test_step_counts_follow_reference_formulas():
    # ImageNet: 1281167 images, batch 4096, 100 epochs -> 1281167 * 100 // 4096 + 1
    assert num_train_steps(0, 1281167, 100, 4096) == 31279
    assert num_train_steps(0, 50000, 1000, 512) == 50000 * 1000 // 512 + 1 == 97657
    assert num_train_steps(123, 50000, 1000, 512) == 123
    assert num_train_steps(0, 1000, 0.5, 64) == int(1000 * 0.5 // 64 + 1) == 8
    # warmup: int(round(epochs * N // B)) -- the floor division happens before the round
    assert warmup_steps(10, 1281167, 4096) == int(round(10 * 1281167 // 4096)) == 3127
    assert warmup_steps(0.5, 1000, 64) == 7
    assert warmup_steps(0, 1000, 64) == 0
    assert epoch_steps(50000, 512) == round(50000 / 512) == 98
    assert checkpoint_steps(0, 1, 50000, 512) == 98
    assert checkpoint_steps(0, 10, 50000, 512) == 980
    assert checkpoint_steps(500, 10, 50000, 512) == 500
    assert checkpoint_steps(0, 1, 100, 512) == 1  # reference gives 0 here; we floor at one step
    with pytest.raises(UsageError, match="--warmup_epochs"):
        warmup_steps(-1, 1000, 64)
    with pytest.raises(UsageError, match="--train_epochs"):
        num_train_steps(0, 1000, 0, 64)


def _closed_form(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_warmup_cosine_matches_closed_form():
    peak, warmup, total = 4.8, 100, 1000
    schedule = WarmupCosineSchedule(peak, warmup, total)
    checkpoints = {
        0: 0.0,                        # warmup start
        50: peak * 0.5,                # mid warmup
        99: peak * 0.99,               # last warmup step
        100: peak,                     # warmup end = cosine start
        550: peak * 0.5,               # mid cosine
        775: peak * 0.5 * (1 + math.cos(math.pi * 0.75)),
        1000: 0.0,                     # end
    }
    for step, expected in checkpoints.items():
        assert _closed_form(step, peak, warmup, total) == pytest.approx(expected, abs=1e-12)
        value = schedule(tf.constant(step, tf.int64))
        assert value.dtype == tf.float32
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=f"step {step}")
    for step in range(0, 1001, 37):
        np.testing.assert_allclose(schedule(step).numpy(), _closed_form(step, peak, warmup, total),
                                   rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    assert schedule(1500).numpy() == pytest.approx(0.0, abs=1e-6)  # stays at 0 past the end


def test_warmup_cosine_edge_cases():
    no_warmup = WarmupCosineSchedule(1.0, 0, 10)
    np.testing.assert_allclose(no_warmup(0).numpy(), 1.0)
    np.testing.assert_allclose(no_warmup(5).numpy(), 0.5, atol=1e-7)
    only_warmup = WarmupCosineSchedule(1.0, 10, 10)  # keras CosineDecay refuses decay_steps = 0
    np.testing.assert_allclose(only_warmup(5).numpy(), 0.5)
    assert only_warmup(10).numpy() == 0.0
    with pytest.raises(UsageError):
        WarmupCosineSchedule(1.0, -1, 10)


def test_warmup_cosine_inside_optimizer_and_serialisation():
    schedule = WarmupCosineSchedule(0.5, 2, 8)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(clone, WarmupCosineSchedule) and clone.get_config() == schedule.get_config()
    opt = keras.optimizers.SGD(schedule)
    v = keras.Variable(np.zeros(1, np.float32))
    seen = []
    for _ in range(4):
        seen.append(float(opt.learning_rate.numpy()))  # evaluated at the current iteration
        opt.apply_gradients([(tf.ones(1), v)])
    np.testing.assert_allclose(seen, [_closed_form(k, 0.5, 2, 8) for k in range(4)], rtol=1e-6)


def _closed_form_rate(peak, warmup, total, step):
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_learning_rate_follows_the_step_counter_through_a_skipped_float16_step():
    """Loss scaling skips an update whose gradients overflowed: optimizer.iterations stays, the run's step
    moves on, and the rate must be the schedule at the run's step (an injected Inf gradient)."""
    from simclr_tf import optimizers
    from simclr_tf.models import SimCLRModel
    from simclr_tf.schedules import at_step
    from simclr_tf.sections import OptimConfig
    from tests.conftest import TINY_ARCH

    peak, warmup, total = 1.0, 4, 20
    step = tf.Variable(0, dtype=tf.int64)
    model = SimCLRModel(**TINY_ARCH)
    model(tf.zeros([1, 16, 16, 3]))
    optimizer = optimizers.optimizer_for(model, OptimConfig("momentum", momentum=0.0, weight_decay=0.0),
                                         at_step(WarmupCosineSchedule(peak, warmup, total), step),
                                         loss_scaling=True)
    kernel = model.trainable_variables[0]
    before = kernel.numpy().copy()
    optimizer.apply_gradients([(tf.fill(kernel.shape, np.inf), kernel)])  # float16 overflow: skipped
    step.assign_add(1)
    np.testing.assert_array_equal(kernel.numpy(), before)
    assert int(optimizer.iterations) == 0 and int(step) == 1
    assert optimizers.current_learning_rate(optimizer) == pytest.approx(_closed_form_rate(peak, warmup, total, 1))
    # The next, finite step is taken at the rate of step 1, not of step 0 (which is 0 during warmup).
    # LossScaleOptimizer.apply_gradients takes gradients of the scaled loss: pass them scaled.
    grad = np.full(kernel.shape, 0.5, np.float32)
    scale = float(optimizer.scale_loss(tf.constant(1.0)))
    optimizer.apply_gradients([(tf.constant(grad * scale), kernel)])
    np.testing.assert_allclose(kernel.numpy(), before - _closed_form_rate(peak, warmup, total, 1) * grad,
                               rtol=1e-5)


def test_trainer_learning_rate_is_a_function_of_the_global_step(tmp_path):
    from simclr_tf import optimizers
    from simclr_tf.config import Config
    from simclr_tf.data.sources import build_source
    from simclr_tf.train import Trainer
    from tests.conftest import TINY, write_npz

    data = write_npz(tmp_path / "tiny.npz", classes=4)
    config = Config(**TINY, model_dir=str(tmp_path / "run"), dataset=f"npz:{data}", train_split="train",
                    eval_split="test", train_batch_size=8, train_steps=20, warmup_epochs=0.5,
                    learning_rate=0.8, learning_rate_scaling="linear", strategy="one_device")
    trainer = Trainer(config, tf.distribute.get_strategy(), build_source(config.dataset, None, "train", "test"),
                      log=lambda _: None)
    sch = trainer.schedule
    assert sch.warmup_steps == 4 and sch.learning_rate == pytest.approx(0.8 * 8 / 256)
    for k in (0, 2, 4, 11, 20):
        trainer.global_step.assign(k)
        assert int(trainer.optimizer.iterations) == 0
        assert optimizers.current_learning_rate(trainer.optimizer) == pytest.approx(
            _closed_form_rate(sch.learning_rate, sch.warmup_steps, sch.train_steps, k), rel=1e-5, abs=1e-9)


def test_warmup_warning_only_when_warmup_outlasts_the_run():
    from simclr_tf.app import warmup_warning
    from simclr_tf.config import Config

    # The case: 240,000 images, batch 512, one epoch = 469 steps under 10 warmup epochs = 4,687 steps.
    one_epoch = Config(train_epochs=1, train_batch_size=512)
    line = warmup_warning(one_epoch, 240_000)
    assert line is not None and "--warmup_epochs" in line and "4687 warmup steps" in line and \
        "469 training steps" in line, line
    assert warmup_warning(one_epoch.replace(warmup_epochs=0), 240_000) is None
    assert warmup_warning(one_epoch.replace(warmup_epochs=0.5), 240_000) is None  # 234 of 469 steps
    assert warmup_warning(Config(train_batch_size=512), 240_000) is None  # 100 epochs
    # The peak is first reached at step == warmup steps, so a run of exactly that many steps never reaches it.
    assert warmup_warning(one_epoch.replace(train_steps=4687), 240_000) is not None
    assert warmup_warning(one_epoch.replace(train_steps=4688), 240_000) is None
