"""Fault injection, non-finite values: a NaN/Inf loss stops the run naming the step and the last good
checkpoint; Inf weights behind a finite loss are never saved."""
from __future__ import annotations

import glob
import re
import signal

import numpy as np
import pytest

from tests.fault_harness import all_finite, base_flags, check_model_dir, checkpoint_step, copy_base, error_line
from tests.fault_harness import fault, tiny_config

pytestmark = pytest.mark.usefixtures("background")  # the kill chain and the base run start with the first test


def test_non_finite_loss_stops_naming_step_and_last_good_checkpoint(work, base, launcher):
    model_dir = copy_base(base, work, "nan")
    with fault("non-finite loss (--learning_rate=1e30)"):
        flags = base_flags(work["npz"], model_dir, steps=12) + ["--learning_rate=1e30", "--checkpoint_steps=1",
                                                                 "--steps_per_loop=1"]
        code, text = launcher.run(flags, work["root"] / "nan.log")
        line = error_line(text)
        match = re.search(r"non-finite (loss at step (\d+)|values in \S+ after step (\d+)); training stopped "
                          r"without saving\. Last good checkpoint: (\S+)$", line)
        assert code == 3 and match, line
        bad_step, last = int(match.group(2) or match.group(3)), match.group(4)
        latest, steps = check_model_dir(model_dir)
        assert last == latest and checkpoint_step(last) == bad_step - 1 and max(steps) < bad_step, (line, steps)
        for step in steps:
            assert all_finite(str(model_dir / f"ckpt-{step}")), f"ckpt-{step} holds NaN/Inf"


def test_non_finite_weights_behind_a_finite_loss_are_never_saved(work):
    """An Inf BN moving variance does not show in the training loss (training BN uses batch statistics):
    the check before saving must catch it."""
    import keras

    from simclr_tf import app
    from simclr_tf.train import NonFiniteLossError, Trainer

    model_dir = work["root"] / "inf_stat"
    config = tiny_config(model_dir, dataset=f"npz:{work['npz']}")
    strategy, source = app.prepare(config)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    bn = next(layer for layer in trainer.model.leaf_layers() if isinstance(layer, keras.layers.BatchNormalization))
    value = bn.moving_variance.numpy()
    value[0] = np.inf
    bn.moving_variance.assign(value)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with fault("Inf in a BN statistic while the loss stays finite"):
            with pytest.raises(NonFiniteLossError) as e:
                trainer.train()
            message = str(e.value)
            assert "moving_variance after step 2" in message and "Last good checkpoint: none" in message, message
            assert not glob.glob(str(model_dir / "ckpt-*"))
    finally:
        signal.signal(signal.SIGTERM, previous)
