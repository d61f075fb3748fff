"""Fault injection, kill -9 and resume: one short pretraining run killed at random moments (start-up, restore,
checkpoint writes, between steps, export) and resumed after each kill until it finishes; the resumed trainer
restores step, learning rate and optimizer slots. The chain runs in the background (tests/fault_harness.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from tests.fault_harness import (BASE_LR, CHAIN_STEPS, WARMUP_STEPS, chain_plan, check_model_dir, declare, fault,
                                 load_fully, tiny_config)

pytestmark = [pytest.mark.usefixtures("background"), pytest.mark.waits_for_chain]


CHAIN_KINDS = [t["kind"] for t in chain_plan(random.Random(0))]
KILL_CASES = [f"#{n} {kind}" for n, kind in enumerate(CHAIN_KINDS, start=1) if kind.startswith("kill -9")]


def test_kill9_at_random_moments_always_resumes_and_finishes(background, work):
    final_case = "the same command run after the last kill finishes and exports"
    declare(*KILL_CASES, final_case)
    chain = background["chain"].result()
    kills = [t for t in chain["trials"] if t["kind"].startswith("kill -9")]
    assert len(kills) == len(KILL_CASES) >= 10
    for trial, name in zip(kills, KILL_CASES):
        with fault(name):
            # Checked in the chain as it ran: killed by the signal; the next run resumed at the checkpoint
            # the state file named, ran consecutive steps at the schedule's learning rate; every checkpoint
            # left in model_dir loaded completely.
            assert trial["exit"] == -9 and trial["fired"] and trial["kind"] == name.split(" ", 1)[1]
    mid_write = [t["number"] for t in kills if t["kind"].endswith("checkpoint") and t["left_mid_write"]]
    assert mid_write, "no kill landed while a checkpoint was being written"
    final = chain["trials"][-1]
    with fault(final_case):
        latest, _ = check_model_dir(work["root"] / "chain")
        assert latest.endswith(f"ckpt-{CHAIN_STEPS}") and final["exit"] == 0
        assert f"exported SavedModel to {work['root'] / 'chain' / 'saved_model' / str(CHAIN_STEPS)}" in final["text"]
        assert sum(t["steps_run"] for t in chain["trials"]) >= CHAIN_STEPS
    def when(t):
        if str(t.get("matched", "")).startswith("early"):
            return " at its first step"
        return f" at {t['delay']:.2f} s" if "moment" in t["kind"] or "start-up" in t["kind"] else ""

    report = "; ".join(f"#{t['number']} {t['kind']}{when(t)} (resumed at {t['resumed_at']}, ran "
                       f"{t['steps_run']} steps)" for t in chain["trials"])
    print(f"kill chain, FAULTS_SEED={chain['seed']}: {report}; killed mid-write: {mid_write}")


def test_resumed_trainer_restores_step_learning_rate_and_optimizer_slots(background, work):
    """The restore every re-run does, inspected: all optimizer variables equal the checkpoint's values."""
    from simclr_tf import app
    from simclr_tf.train import Trainer

    background["chain"].result()
    model_dir = work["root"] / "chain"
    config = tiny_config(model_dir, dataset=f"npz:{work['npz']}", train_steps=CHAIN_STEPS, steps_per_loop=1,
                         keep_checkpoint_max=3, seed=7)
    strategy, source = app.prepare(config)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    with fault("resume restores step, learning-rate position and optimizer slots"):
        message = trainer.restore()
        assert message.endswith(f"ckpt-{CHAIN_STEPS} at step {CHAIN_STEPS}"), message
        assert int(trainer.optimizer.iterations.numpy()) == CHAIN_STEPS
        lr = float(trainer.optimizer.learning_rate(trainer.optimizer.iterations)) if callable(
            trainer.optimizer.learning_rate) else float(trainer.optimizer.learning_rate)
        assert lr == pytest.approx(BASE_LR * CHAIN_STEPS / WARMUP_STEPS, rel=1e-5)
        saved = load_fully(str(model_dir / f"ckpt-{CHAIN_STEPS}"))
        slots = 0
        for i, variable in enumerate(trainer.optimizer.variables):
            if variable is trainer.optimizer.iterations:  # saved as optimizer/_iterations, checked above
                continue
            key = f"optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
            assert key in saved, key
            np.testing.assert_array_equal(variable.numpy(), saved[key], err_msg=variable.path)
            slots += int(np.any(saved[key] != 0) and variable.shape.rank > 0)
        assert slots > 20, "the checkpoint holds no non-zero optimizer slots"
