"""Fault injection, the eval follower: `--mode=eval` following the run that the kill chain kills 10 times never
reads a partial checkpoint and evaluates the final one."""
from __future__ import annotations

import glob
import json
import re

import pytest

from tests.fault_harness import CHAIN_STEPS, fault

pytestmark = [pytest.mark.usefixtures("background"), pytest.mark.waits_for_chain]


def test_eval_following_the_killed_run_never_reads_a_partial_checkpoint(background, work):
    model_dir = work["root"] / "chain"
    with fault("--mode=eval following a run that is killed 10 times"):
        chain = background["chain"].result()
        assert chain["follower_exit"] == 0, chain["follower_log"][-3000:]
        assert "Traceback" not in chain["follower_log"]
        results = {}
        for path in glob.glob(str(model_dir / "result_*.json")):
            step = int(re.search(r"result_(\d+)\.json$", path).group(1))
            results[step] = json.load(open(path))
        assert CHAIN_STEPS in results and len(results) >= 3, sorted(results)
        for step, result in results.items():
            assert result["global_step"] == step and 0.0 <= result["top1"] <= 1.0
            assert result["num_examples"] == 20
