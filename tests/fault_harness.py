"""Harness of the fault-injection suite: `tests/test_faults_*.py`, one file per family of faults.

Every case goes through `fault(name)`; tests/conftest.py prints `faults survived: N/M` in the terminal summary
from the cases of the fault tests that ran (see `cases_of`).

Cost control: TensorFlow's import is paid once by `tests/fault_worker.py serve`, which forks each run from a
warm process (each child runs run.py's own main); the kill trials, the eval follower and the run.py-level
cases run in those children while the in-process cases run in the test process, in parallel. The fixtures
here are session-scoped (registered for every test by tests/conftest.py), so the files share one launcher,
one work folder, one base run and one kill chain. Every fault file uses `background`, which starts the kill
chain (with its eval follower) and the base run before its first test; tests that wait for the chain are
marked `waits_for_chain`, and conftest runs them after the other fault tests.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import REPO, TINY, TINY_FLAGS, write_npz

WORKER = str(REPO / "tests" / "fault_worker.py")
# Pretraining at batch 8 on 64 images: lr = 0.3 * 8 / 256, warmup 10 epochs = 80 steps (longer than any run here).
BATCH, NUM_TRAIN = 8, 64
BASE_LR = 0.3 * BATCH / 256
WARMUP_STEPS = 10 * NUM_TRAIN // BATCH
CHAIN_STEPS = 30
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
STEP_LINE = re.compile(r"^step (\d+)/\d+ .* lr ([0-9.e+-]+) \|", re.M)

FAULTS = {"tried": [], "survived": []}
_CASE_TEST = {}  # case name -> node id of the test that declared it
_FAULTS_LOCK = threading.Lock()


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


def declare(*names: str) -> None:
    """Counts cases as tried before their checks can fail (so a crash cannot shrink the count)."""
    with _FAULTS_LOCK:
        for name in names:
            assert name not in FAULTS["tried"], f"duplicate fault case {name!r}"
            FAULTS["tried"].append(name)
            _CASE_TEST[name] = _current_test()


@contextlib.contextmanager
def fault(name: str):
    """One fault case: tried on entry (unless declared before), survived only if the block completes."""
    if name not in FAULTS["tried"]:
        declare(name)
    yield
    with _FAULTS_LOCK:
        assert name not in FAULTS["survived"], f"fault case {name!r} counted twice"
        FAULTS["survived"].append(name)


def cases_of(nodeid: str) -> list:
    """(name, survived) of the cases the test `nodeid` declared, in order."""
    with _FAULTS_LOCK:
        return [(name, name in FAULTS["survived"]) for name in FAULTS["tried"] if _CASE_TEST[name] == nodeid]


# ---------------------------------------------------------------------------------------------------- processes


class Launcher:
    """Client of `fault_worker.py serve`: forks run.py runs from a warm process; thread-safe."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, WORKER, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        self.lock = threading.Lock()
        self.children = set()
        self.stopped = False

    def _ask(self, request):
        assert not self.stopped, "the fault suite is shutting down"
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        assert line, "fault_worker serve died"
        return json.loads(line)

    def start(self, flags, log, **options) -> int:
        pid = self._ask({"run": [str(f) for f in flags], "log": str(log), **options})["pid"]
        self.children.add(pid)
        return pid

    def wait(self, pid, timeout=300.0):
        """(exit code, unix time of exit); exit None after `timeout` (the child is then killed)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self._ask({"poll": pid})
            if answer["exit"] is not None:
                self.children.discard(pid)
                return answer["exit"], answer["t_exit"]
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return None, None
            time.sleep(0.05)

    def run(self, flags, log, timeout=300.0, **options):
        """Runs to the end: (exit code, log text)."""
        code, _ = self.wait(self.start(flags, log, **options), timeout)
        return code, read_log(log)

    def stop(self):
        """Kills every run still going (after a failure, nothing may outlive the suite)."""
        self.stopped = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self):
        self.stop()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def watch(spec) -> dict:
    """Runs a `fault_worker.py watch` (fires a signal at a moment of a run) to its end."""
    out = subprocess.run([sys.executable, WORKER, "watch", json.dumps(spec)], capture_output=True, text=True,
                         timeout=spec.get("timeout", 300) + 60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Background(threading.Thread):
    """A function run in a thread; `result()` joins and re-raises its exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 -- handed to the test that joins
            self.error = e

    def result(self, timeout=900):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


# ---------------------------------------------------------------------------------------------------- checks


def read_log(path) -> str:
    """The run's own output, without TF's C++ log lines."""
    with open(path, errors="replace") as f:
        return "".join(line for line in f if not re.match(r"^[IWE]\d{4} |^WARNING: All log|^To enable", line))


def error_line(text: str) -> str:
    """The single `error: ...` line run.py printed; there must be exactly one and no traceback."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def digest(directory) -> dict:
    """path -> sha256 of every file below `directory` (to prove files were left untouched)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def checkpoint_step(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1])


def load_fully(prefix: str) -> dict:
    """Reads every tensor of a checkpoint (fails on a truncated or missing shard)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def check_model_dir(model_dir) -> tuple:
    """Every checkpoint in model_dir loads completely and the state file names one that exists.

    Returns (latest prefix or None, sorted steps of the checkpoints present)."""
    import tensorflow as tf

    steps = []
    for index in glob.glob(os.path.join(model_dir, "ckpt-*.index")):
        prefix = index[: -len(".index")]
        load_fully(prefix)
        steps.append(checkpoint_step(prefix))
    state = tf.train.get_checkpoint_state(str(model_dir))
    latest = None
    if state is not None:
        latest = state.model_checkpoint_path
        assert os.path.exists(latest + ".index"), f"state file names missing checkpoint {latest}"
        assert tf.train.latest_checkpoint(str(model_dir)) == latest
    return latest, sorted(steps)


def all_finite(prefix: str) -> bool:
    return all(np.all(np.isfinite(v)) for v in load_fully(prefix).values()
               if isinstance(v, np.ndarray) and v.dtype.kind == "f")


# ---------------------------------------------------------------------------------------------------- runs


def common_flags(npz, model_dir):
    return [f"--dataset=npz:{npz}", "--train_split=train", "--eval_split=test", f"--model_dir={model_dir}",
            f"--train_batch_size={BATCH}", *TINY_FLAGS]


def base_flags(npz, model_dir, steps=4):
    return ["--mode=train", *common_flags(npz, model_dir), f"--train_steps={steps}", "--checkpoint_steps=2",
            "--steps_per_loop=2", "--seed=3"]


def tiny_config(model_dir, **changes):
    """The Config of `base_flags` (in-process cases)."""
    from simclr_tf.config import Config

    values = dict(dataset="npz:unused", train_split="train", eval_split="test", model_dir=str(model_dir),
                  train_batch_size=BATCH, train_steps=4, checkpoint_steps=2, steps_per_loop=2, **TINY, seed=3,
                  mode="train")
    values.update(changes)
    return Config(**values)


def make_base(launcher, work):
    """A finished 4-step run with checkpoints 2 and 4 and an export of step 4, copied by many cases."""
    model_dir = work["root"] / "base"
    code, text = launcher.run(base_flags(work["npz"], model_dir), work["root"] / "base.log")
    assert code == 0, text[-3000:]
    assert os.path.isdir(model_dir / "saved_model" / "4"), text[-3000:]
    return model_dir


def copy_base(base, work, name):
    target = work["root"] / name
    shutil.copytree(base, target)
    return target


# ---------------------------------------------------------------------------------------------------- kill chain


def chain_flags(work, mode="train"):
    return [f"--mode={mode}", *common_flags(work["npz"], work["root"] / "chain"), f"--train_steps={CHAIN_STEPS}",
            "--checkpoint_steps=2", "--steps_per_loop=1", "--keep_checkpoint_max=3", "--seed=7"]


def chain_plan(rng: random.Random) -> list:
    """10 kill -9 trials at different kinds of moments, one SIGTERM, then a run to the end.

    Only the runs that must reach training (checkpoint writes, steps, SIGTERM, export) pay for graph tracing;
    the others die during start-up, restore or tracing, which is where a random moment mostly falls anyway.
    """
    return [
        dict(kind="kill -9 during start-up", delay=rng.uniform(0.2, 3.0)),
        dict(kind="kill -9 while writing a checkpoint", count=1),
        dict(kind="kill -9 at a random moment", delay="random"),
        dict(kind="kill -9 while writing a checkpoint", count=rng.randint(1, 3)),
        dict(kind="kill -9 right after the restore", delay=rng.uniform(0, 0.5)),
        dict(kind="SIGTERM", count=rng.randint(1, 3)),
        dict(kind="kill -9 at a random moment", delay="random"),
        dict(kind="kill -9 between training steps", count=rng.randint(1, 3), delay=rng.uniform(0, 0.05)),
        dict(kind="kill -9 while writing a checkpoint", count=rng.randint(1, 2)),
        dict(kind="kill -9 during start-up", delay=rng.uniform(0.2, 3.0)),
        dict(kind="kill -9 while exporting the SavedModel"),
        dict(kind="run to the end"),
    ]
def _watch_spec(trial, pid, work, log, first_step_after):
    model_dir = str(work["root"] / "chain")
    kind = trial["kind"]
    spec = {"pid": pid, "signal": 9, "timeout": 240}
    if kind in ("kill -9 during start-up", "kill -9 at a random moment"):
        delay = trial["delay"]
        if delay == "random":  # in start-up, restore or graph tracing, before the first step
            delay = trial["rng"].uniform(0.5, 0.6 * first_step_after)
            trial["delay"] = round(delay, 2)
        # Never later than the first step: a run that got faster than the sizing run must still be killed.
        spec.update(delay=delay, log=str(log), early=r"^step \d+/")
    elif kind == "kill -9 while writing a checkpoint":
        spec.update(dir=model_dir, pattern=r"^ckpt-\d+_temp$", count=trial["count"])
    elif kind == "kill -9 between training steps":
        spec.update(log=str(log), pattern=r"^step \d+/", count=trial["count"], delay=trial["delay"])
    elif kind == "kill -9 right after the restore":
        spec.update(log=str(log), pattern=r"^resumed from ", delay=trial["delay"])
    elif kind == "SIGTERM":
        spec.update(log=str(log), pattern=r"^step \d+/", count=trial["count"], signal=15)
    elif kind == "kill -9 while exporting the SavedModel":
        spec.update(dir=model_dir, pattern=r"^\.tmp-\d+-", timeout=300)
    else:
        return None
    return spec


def _check_trial(trial, text, before, work):
    """What every run of the chain must show: resume point, step numbering, learning rate, clean model_dir."""
    resumed = RESUMED.search(text)
    if resumed:
        assert before is not None and resumed.group(1) == before, (resumed.group(0), before)
        assert int(resumed.group(2)) == checkpoint_step(before)
    elif "starting from random initialisation" in text:
        assert before is None, f"restarted from scratch although {before} exists"
    start = checkpoint_step(before) if before else 0
    steps = [(int(s), float(lr)) for s, lr in STEP_LINE.findall(text)]
    if steps:
        assert [s for s, _ in steps] == list(range(start + 1, start + 1 + len(steps))), steps
        for step, lr in steps:  # the restored optimizer step drives the schedule: lr = base * step / warmup
            assert lr == pytest.approx(BASE_LR * step / WARMUP_STEPS, rel=2e-3), (step, lr)
    trial["resumed_at"] = start
    trial["steps_run"] = len(steps)
    latest, present = check_model_dir(work["root"] / "chain")
    trial["latest_after"] = latest
    trial["checkpoints_after"] = present
    return latest


def run_chain(launcher, work):
    """One pretraining run, killed and re-run until it finishes, with `--mode=eval` following it."""
    seed = int(os.environ.get("FAULTS_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    model_dir = work["root"] / "chain"
    follower = launcher.start(chain_flags(work, "eval"), work["root"] / "follower.log")
    trials, before, first_step_after = [], None, 10.0
    for number, trial in enumerate(chain_plan(rng), start=1):
        trial.update(number=number, rng=rng)
        trials.append(trial)
        log = work["root"] / f"chain_{number}.log"
        pid = launcher.start(chain_flags(work), log)
        spec = _watch_spec(trial, pid, work, log, first_step_after)
        fired = watch(spec) if spec else {"fired": False}
        code, t_exit = launcher.wait(pid, timeout=300)
        text = read_log(log)
        trial.update(exit=code, fired=fired["fired"], matched=fired.get("matched"), log=str(log))
        if trial["kind"].startswith("kill -9"):
            assert fired["fired"] and code == -9, (trial, text[-2000:])
            temp = [n for n in os.listdir(model_dir) if n.endswith("_temp") or ".tempstate" in n]
            trial["left_mid_write"] = bool(temp)
        elif trial["kind"] == "SIGTERM":
            assert fired["fired"] and code == 0, (trial, text[-2000:])
            trial["sigterm_seconds"] = t_exit - fired["t_fire"]
        else:
            assert code == 0, (trial, text[-3000:])
        if number == 2:  # killed at its first checkpoint: about when steps begin on this machine
            first_step_after = max(2.0, fired["waited"])
        trial["text"] = text
        before = _check_trial(trial, text, before, work)
        del trial["rng"]
    code, _ = launcher.wait(follower, timeout=240)
    return {"seed": seed, "trials": trials, "follower_exit": code,
            "follower_log": read_log(work["root"] / "follower.log")}


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "npz": write_npz(root / "data.npz", classes=4, n_train=NUM_TRAIN)}


@pytest.fixture(scope="session")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def background(launcher, work):
    """Starts the kill chain (with its eval follower) and the base run; every fault file uses it, so both
    start before the first fault test."""
    jobs = {"chain": Background(run_chain, launcher, work), "base": Background(make_base, launcher, work)}
    yield jobs
    launcher.stop()  # a no-op after a good run; after a failure, ends the chain at once
    for job in jobs.values():
        job.join(60)


@pytest.fixture(scope="session")
def base(background):
    return background["base"].result()

