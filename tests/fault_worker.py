"""Process helpers of the fault-injection suite (tests/test_faults_*.py, driven by tests/fault_harness.py). Two modes:

`python tests/fault_worker.py serve` -- a pre-forking launcher. Importing TensorFlow costs seconds per
process and the kill -9 trials need a fresh process each time, so this imports `run.py` (and with it
TensorFlow and simclr_tf) once, creates no TF runtime state, and forks one child per request. Each child runs
`run.py`'s own `main` with the requested flags, exactly as `python run.py FLAGS` would, and can be killed at
any moment like a real run. One JSON object per line on stdin, one answer per line on stdout:

* `{"run": [flags...], "log": PATH, "no_dac_override": bool, "fsize": int}` -> `{"pid": N}`; the child's stdout
  and stderr go to PATH; `no_dac_override` drops root's CAP_DAC_OVERRIDE (so a read-only directory is
  read-only for root too; reading everything still works), `fsize` sets RLIMIT_FSIZE (a write beyond it
  fails with EFBIG, as on a full disk).
* `{"poll": N}` -> `{"pid": N, "exit": code or null, "t_exit": unix time}`; code < 0: killed by that signal.

`python tests/fault_worker.py watch JSON` -- a watcher that needs no TensorFlow (so it starts in milliseconds
and polls without sharing a GIL with the test): waits for a moment of a run, sends it a signal, and prints
`{"fired": bool, "t_fire": unix time, "matched": str, "waited": seconds}`. JSON keys: `pid`, `signal`,
`delay` (seconds to sleep after the moment), `timeout`, and the moment: `dir` + `pattern` (the `count`-th
new file or folder whose name matches appears in `dir` or `dir/saved_model`) or `log` + `pattern` (the log
holds `count` matching lines); without a pattern the moment is the start. With `log` and `early`, the signal
goes out during the delay as soon as the log has a line matching `early` (a random moment "before training").
"""
import json
import os
import re
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drop_dac_override():
    """Removes CAP_DAC_OVERRIDE from this process (Linux), so root obeys write permissions."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
    data[0].permitted &= ~(1 << 1)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


# ------------------------------------------------------------------------------------------------ serve


def _child(run_main, request):
    import resource
    import signal

    from absl import app as absl_app

    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    code = 1
    try:
        if request.get("fsize") is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        if request.get("no_dac_override") and os.geteuid() == 0:
            drop_dac_override()
        absl_app.run(run_main, argv=["run.py", *request["run"]])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 -- an uncaught error must end the child as python's own exit would
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve():
    sys.path.insert(0, REPO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import run  # defines the flags, imports absl

    # What run.main imports lazily, imported here so that children start warm.
    import simclr_tf.app  # noqa: F401
    import simclr_tf.export  # noqa: F401
    import simclr_tf.train  # noqa: F401

    finished = {}
    lock = threading.Lock()

    def reap():
        # Records each child's exit the moment it happens (for the SIGTERM latency); fork() copies only the
        # calling thread, so children never see this one.
        while True:
            try:
                pid, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.01)
                continue
            code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
            with lock:
                finished[pid] = (code, time.time())

    threading.Thread(target=reap, daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(run.main, request)
            answer = {"pid": pid}
        else:
            with lock:
                code, t_exit = finished.get(request["poll"], (None, None))
            answer = {"pid": request["poll"], "exit": code, "t_exit": t_exit}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ watch


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _names(directory):
    names = set()
    for sub in ("", "saved_model"):
        try:
            names.update(os.path.join(sub, n) if sub else n for n in os.listdir(os.path.join(directory, sub)))
        except OSError:
            pass
    return names


class _LogTail:
    """Reads a growing log incrementally and counts whole lines matching a pattern."""

    def __init__(self, path, pattern):
        self.path, self.pattern, self.offset, self.partial, self.hits, self.last = path, pattern, 0, "", 0, ""

    def poll(self):
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except OSError:
            return self.hits
        *lines, self.partial = (self.partial + data).split("\n")
        for line in lines:
            if self.pattern.search(line):
                self.hits, self.last = self.hits + 1, line.strip()
        return self.hits


def watch(spec):
    pid, start = spec["pid"], time.time()
    deadline = start + spec.get("timeout", 300)
    pattern = re.compile(spec["pattern"]) if spec.get("pattern") else None
    count = spec.get("count", 1)
    seen = _names(spec["dir"]) if pattern is not None and "dir" in spec else set()
    tail = _LogTail(spec["log"], pattern) if pattern is not None and "dir" not in spec else None
    hits, matched = 0, ""
    while pattern is not None and hits < count:
        if time.time() > deadline or not _alive(pid):
            return {"fired": False, "waited": time.time() - start, "matched": matched}
        if tail is None:
            names = _names(spec["dir"])
            new = sorted(n for n in names - seen if pattern.search(os.path.basename(n)))
            seen |= names
            if new:
                hits, matched = hits + len(new), new[-1]
        else:
            hits, matched = tail.poll(), tail.last
        if hits < count:
            time.sleep(0.001)
    fire_at = time.time() + spec.get("delay", 0.0)
    early = _LogTail(spec["log"], re.compile(spec["early"])) if spec.get("early") else None
    while time.time() < fire_at:
        if early is not None and early.poll():
            matched = "early: " + early.last
            break
        time.sleep(0.001)
    if not _alive(pid):
        return {"fired": False, "waited": time.time() - start, "matched": matched}
    try:
        os.kill(pid, spec.get("signal", 9))
    except ProcessLookupError:
        return {"fired": False, "waited": time.time() - start, "matched": matched}
    return {"fired": True, "t_fire": time.time(), "waited": time.time() - start, "matched": matched}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        print(json.dumps(watch(json.loads(sys.argv[2]))), flush=True)
