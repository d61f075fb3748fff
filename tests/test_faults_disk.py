"""Fault injection, the disk: an unwritable model_dir, a model_dir path through a file, a full disk while
writing a checkpoint or an export (run.py runs forked by tests/fault_worker.py)."""
from __future__ import annotations

import os

import pytest

from tests.fault_harness import base_flags, check_model_dir, copy_base, digest, error_line, fault

pytestmark = pytest.mark.usefixtures("background")  # the kill chain and the base run start with the first test


def test_unwritable_model_dir_is_a_clear_error_and_leaves_checkpoints_alone(work, base, launcher):
    model_dir = copy_base(base, work, "read_only")
    before = digest(model_dir)
    os.chmod(model_dir, 0o555)
    try:
        with fault("read-only model_dir holding earlier checkpoints"):
            code, text = launcher.run(base_flags(work["npz"], model_dir, steps=6), work["root"] / "ro.log",
                                      no_dac_override=True)
            line = error_line(text)
            assert code == 2 and line.startswith("error: --model_dir: cannot write") and "ermission" in line, line
            assert digest(model_dir) == before
    finally:
        os.chmod(model_dir, 0o755)

    with fault("model_dir path running through a regular file"):
        code, text = launcher.run(base_flags(work["npz"], os.path.join(work["npz"], "run")),
                                  work["root"] / "through_file.log")
        line = error_line(text)
        assert code == 2 and line.startswith("error: --model_dir: cannot create") and work["npz"] in line, line


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(work, base, launcher):
    """RLIMIT_FSIZE makes every write past 200 kB fail (EFBIG), as a full disk would, for root too."""
    model_dir = copy_base(base, work, "full_disk")
    checkpoints = {k: v for k, v in digest(model_dir).items() if k.startswith(("ckpt-", "checkpoint"))}
    with fault("disk full while writing a checkpoint"):
        code, text = launcher.run(base_flags(work["npz"], model_dir, steps=6), work["root"] / "full.log",
                                  fsize=200_000)
        line = error_line(text)
        assert code == 2 and line.startswith("error: --model_dir: cannot write the checkpoint of step 6"), line
        assert "ckpt-4" in line and "untouched" in line, line
        latest, steps = check_model_dir(model_dir)
        assert latest.endswith("ckpt-4") and steps == [2, 4]
        assert {k: v for k, v in digest(model_dir).items() if k in checkpoints} == checkpoints

    model_dir = copy_base(base, work, "full_disk_export")
    exports = digest(model_dir / "saved_model")
    with fault("disk full while exporting (previous export intact)"):
        # train_steps=4 is done: the run only re-exports step 4, over the existing export of step 4.
        code, text = launcher.run(base_flags(work["npz"], model_dir, steps=4), work["root"] / "full_export.log",
                                  fsize=200_000)
        line = error_line(text)
        assert code == 2 and "cannot write the SavedModel of step 4" in line and "untouched" in line, line
        assert digest(model_dir / "saved_model") == exports  # same files, same bytes, no temp folder left
