"""Fault injection, SIGTERM (preemption): the run in the kill chain that gets SIGTERM saves a checkpoint and
exits 0 within a bound, and the next run resumes there."""
from __future__ import annotations

import re

import pytest

from tests.fault_harness import fault

pytestmark = [pytest.mark.usefixtures("background"), pytest.mark.waits_for_chain]


def test_sigterm_saves_and_exits_zero_within_bound(background):
    with fault("SIGTERM (preemption) mid-training"):
        chain = background["chain"].result()
        trial = next(t for t in chain["trials"] if t["kind"] == "SIGTERM")
        later = chain["trials"][trial["number"]]  # the next run
        match = re.search(r"stop requested \(SIGTERM\): saved checkpoint at step (\d+)", trial["text"])
        assert trial["exit"] == 0 and match, trial["text"][-2000:]
        step = int(match.group(1))
        assert trial["latest_after"].endswith(f"ckpt-{step}") and step == trial["resumed_at"] + trial["steps_run"]
        assert later["resumed_at"] == step
        # One chunk (steps_per_loop=1) + one checkpoint + process exit; generous for a loaded CI machine.
        assert trial["sigterm_seconds"] < 20.0, trial["sigterm_seconds"]
    print(f"SIGTERM -> exit 0 after {trial['sigterm_seconds']:.2f} s (checkpoint at step {step})")
