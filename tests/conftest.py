"""Shared test fixtures and helpers.

Tests run on the CPU only; `SHARED_DATA` points at the optional `../shared/` folder that holds the CIFAR-10
dev subset and the golden checkpoints of the official code. Tests needing it skip when it is absent.

Also here: the tiny model / run settings (`TINY_ARCH`, `TINY`, `TINY_FLAGS`), `write_npz` (a small random npz
dataset), and the fault suite's hooks: the fixtures of `tests/fault_harness.py` are registered for every
test, fault tests marked `waits_for_chain` run after the other fault tests, and `faults survived: N/M` is
printed in the terminal summary from the outcomes of the `tests/test_faults_*.py` tests that ran.
"""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from simclr_tf.hardware import tune_malloc  # noqa: E402

tune_malloc()  # as run.py does by default, before TensorFlow starts its threads

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
GOLDEN = SHARED / "golden"

pytest_plugins = ["tests.fault_harness"]  # fixtures work, launcher, background, base

# The tiny ResNet-18 (width 1/8, 16x16 images) of most tests: the model's own arguments (`SimCLRModel(**...)`) ...
TINY_ARCH = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, num_proj_layers=2)
# ... and with the augmentation, loss and eval settings of a tiny run (`Config(**...)`, or as flags).
TINY = dict(TINY_ARCH, temperature=0.5, color_jitter_strength=0.5, use_blur=False, eval_batch_size=7)


def as_flags(values: dict) -> list:
    """`{"use_blur": False, "image_size": 16}` -> `["--use_blur=false", "--image_size=16"]` (run.py flags)."""
    return [f"--{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in values.items()]


TINY_FLAGS = as_flags(TINY)


def write_npz(path, classes: int, *, n_train: int = 64, n_test: int = 20, size: int = 16, seed: int = 0,
              cyclic_labels: bool = False, **override) -> str:
    """A random uint8 npz dataset (x_train, y_train, x_test, y_test) at `path`; returns the path as a string.

    Labels are random in [0, classes); with `cyclic_labels`, y_train is `arange(n_train) % classes` (every class
    present; no random draw, so x_test/y_test differ from the random-label file of the same seed) and the file
    also stores `num_classes`. `override` replaces or adds arrays; None drops one.
    """
    rng = np.random.RandomState(seed)
    arrays = dict(x_train=rng.randint(0, 256, (n_train, size, size, 3), dtype=np.uint8))
    arrays["y_train"] = np.arange(n_train) % classes if cyclic_labels else rng.randint(0, classes, n_train)
    arrays.update(x_test=rng.randint(0, 256, (n_test, size, size, 3), dtype=np.uint8),
                  y_test=rng.randint(0, classes, n_test))
    if cyclic_labels:
        arrays["num_classes"] = np.int64(classes)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


@pytest.fixture(scope="session")
def cifar10_dev_path() -> pathlib.Path:
    path = SHARED_DATA / "cifar10_dev.npz"
    if not path.exists():
        pytest.skip(f"{path} not present (only the project's own machines have ../shared/data)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} not present (only the project's own machines have ../shared/golden)")
    return GOLDEN


# ---------------------------------------------------------------------------------------------------- fault suite


def _is_fault_test(nodeid: str) -> bool:
    return os.path.basename(nodeid.split("::", 1)[0]).startswith("test_faults_")


def pytest_configure(config):
    config.addinivalue_line("markers", "waits_for_chain: a fault test that waits for the kill chain (runs after "
                                       "the other fault tests, which run while the chain runs)")


def pytest_collection_modifyitems(items):
    """Fault tests that wait for the kill chain go after the other fault tests (which run while it runs)."""
    slots = [i for i, item in enumerate(items) if _is_fault_test(item.nodeid)]
    faults = [items[i] for i in slots]
    ordered = sorted(faults, key=lambda item: item.get_closest_marker("waits_for_chain") is not None)  # stable
    for i, item in zip(slots, ordered):
        items[i] = item


_FAULT_TESTS = {}  # nodeid -> "passed" | "failed" | "skipped", in the order the tests ran


def pytest_runtest_logreport(report):
    if not _is_fault_test(report.nodeid):
        return
    if report.failed:  # in setup, call or teardown
        _FAULT_TESTS[report.nodeid] = "failed"
    elif report.skipped:
        _FAULT_TESTS.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _FAULT_TESTS.setdefault(report.nodeid, "passed")


def fault_outcomes() -> list:
    """(case name, survived) of every fault case of the fault tests that ran.

    A case survived if its `fault(name)` block completed (see tests/fault_harness.py). A failed test whose
    cases all survived (it failed before its first case, in a fixture, or between cases) counts as one more
    case that did not survive, so a failure always shows in the count."""
    from tests import fault_harness

    outcomes = []
    for nodeid, outcome in _FAULT_TESTS.items():
        cases = fault_harness.cases_of(nodeid)
        outcomes += cases
        if outcome == "failed" and all(survived for _, survived in cases):
            where = "outside its fault cases" if cases else "before its first fault case"
            outcomes.append((f"{nodeid.split('::', 1)[1]} (failed {where})", False))
    return outcomes


def pytest_terminal_summary(terminalreporter):
    if not _FAULT_TESTS:
        return
    outcomes = fault_outcomes()
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(f"faults survived: {sum(s for _, s in outcomes)}/{len(outcomes)}")
    for name, survived in outcomes:
        terminalreporter.write_line(f"  {'ok  ' if survived else 'FAIL'} {name}")


def pytest_sessionfinish(session):
    """Every fault case tried must survive (a failed case already fails its test; this is the guard)."""
    if _FAULT_TESTS and session.exitstatus == pytest.ExitCode.OK and not all(s for _, s in fault_outcomes()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
