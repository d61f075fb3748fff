"""Start-up time of pretraining on an image folder: seconds from launching `run.py` to its first training step.

For each folder size (default 1k, 20k and 100k ImageNet-like JPEGs of 256x320, laid out as
`ROOT/train/<class>/*.jpg` with 100 files per class) this launches a tiny pretraining job (ResNet-18 x0.25,
32 px views, batch 8, 2 steps, a checkpoint every step) and times launch -> the first progress line
(`step 1/2 ...`), streaming the child's output line by line. A second launch on the same model_dir with
`--train_steps=4` then times a resumed run (launch -> `step 3/4`). The job's own cost (imports, model build,
tracing and compiling the first step) is the same for every folder, so "extra over 1k" (median(count) -
median(1k)) is what the folder size adds: listing, checking, ordering the files and anything else done per file
before the first step.

Launches are interleaved (1k, 20k, 100k, 1k, 20k, 100k, ...) so drift in the load of this shared machine hits
every size alike. The export at the end of training is never timed: a fresh launch is killed once its step-2
checkpoint is complete, a resumed one as soon as its first step is logged.

`--repo` picks the checkout whose `run.py` is launched (cwd and PYTHONPATH = that checkout), so the same script
measures an older commit from a `git worktree`:

    git worktree add /tmp/simclr_before HEAD
    python bench/startup.py --repo /tmp/simclr_before --out bench/results/startup_before.json
    python bench/startup.py --out bench/results/startup_after.json

`--repo A,B` launches both checkouts in the same interleaved rounds (size by size, A then B), which makes a
before/after comparison on this shared machine fairer than two runs at different times. Each launch records
the 1-minute load average before it.

The whole-process numbers carry the noise of a shared 2-core machine (the same 1k launch varies by 5-8 s), which
is larger than what a folder size adds once nothing is decoded at start. `--in_process` therefore also times,
inside one process, the folder-dependent part alone: `build_source` (listing, without and with the index file
a previous run left) and the first batch of the pretraining input pipeline at step 0 and at a resumed step.

Generated folders live in `--data_root/jpeg_<count>` and are reused when complete (100k files take 4-10
minutes to write on 2 cores, depending on other load, and 6 GB of disk); generation of a partial folder picks up where it stopped.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HEIGHT, WIDTH = 256, 320
FILES_PER_CLASS = 100
JPEG_QUALITY = 90
# Bump when the generated images change, so folders of an older generator are not reused silently.
GENERATOR_VERSION = 1
MARKER = ".bench_complete.json"
PROGRESS_PREFIX = "step "

_NOISE_BANK: Optional[Any] = None


# --------------------------------------------------------------------------------------------- generation


def _noise_bank():
    """A 2H x 2W x 3 field of unit Gaussian noise per worker; each image takes a random window of it."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        import numpy as np

        _NOISE_BANK = np.random.default_rng(12345).normal(0.0, 1.0, (2 * HEIGHT, 2 * WIDTH, 3)).astype("float32")
    return _NOISE_BANK


def jpeg_bytes(index: int) -> bytes:
    """ImageNet-like JPEG number `index` (deterministic): 256x320, quality 90, about 35-75 KB.

    A coarse random colour field (4..24 cells high) upsampled bicubically gives smooth regions and edges, a
    half-resolution random layer adds texture, and a window of a shared noise field adds grain; the texture and
    grain strengths vary per image so file sizes spread like photos'. Everything random is drawn at low
    resolution with numpy and upscaled with PIL, so an image costs about 4 ms.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    cells = int(rng.integers(4, 24))
    coarse = (rng.random((cells, int(cells * 1.25) + 1, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
    fine = (rng.random((HEIGHT // 2, WIDTH // 2, 3)) * 255).astype(np.uint8)
    fine = np.asarray(Image.fromarray(fine).resize((WIDTH, HEIGHT), Image.BILINEAR), np.float32)
    y, x = int(rng.integers(0, HEIGHT)), int(rng.integers(0, WIDTH))
    grain = _noise_bank()[y:y + HEIGHT, x:x + WIDTH]
    pixels = smooth * 0.75 + (fine - 128.0) * rng.uniform(0.2, 1.6) + grain * rng.uniform(6.0, 55.0)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def file_path(root: str, index: int) -> str:
    return os.path.join(root, "train", f"n{index // FILES_PER_CLASS:08d}", f"img_{index:07d}.jpg")


def _write_one(task: tuple) -> int:
    root, index = task
    path = file_path(root, index)
    if os.path.exists(path):  # a partial folder from an interrupted run: keep what is there
        return 0
    data = jpeg_bytes(index)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def folder_is_complete(root: str, count: int) -> bool:
    try:
        with open(os.path.join(root, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker.get("count") == count and marker.get("version") == GENERATOR_VERSION


def make_folder(root: str, count: int, workers: int = 2, log=print) -> Dict[str, Any]:
    """`root/train/n<class>/img_<i>.jpg` for i < count, 100 per class; reused when already complete.

    Returns the marker: count, classes, total bytes, generation seconds (of the run that finished it).
    """
    if folder_is_complete(root, count):
        with open(os.path.join(root, MARKER)) as f:
            marker = json.load(f)
        log(f"reusing {root} ({count} files, {marker['total_bytes'] / 2**30:.2f} GiB)")
        return dict(marker, reused=True)
    if os.path.exists(os.path.join(root, MARKER)):  # another count or generator version: start over
        shutil.rmtree(root)
    classes = (count + FILES_PER_CLASS - 1) // FILES_PER_CLASS
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"n{c:08d}"), exist_ok=True)
    log(f"generating {count} JPEGs of {HEIGHT}x{WIDTH} in {classes} classes under {root} ({workers} processes)")
    start = time.monotonic()
    written, done = 0, 0
    step = max(1000, count // 20)
    with multiprocessing.Pool(workers) as pool:
        for size in pool.imap_unordered(_write_one, [(root, i) for i in range(count)], chunksize=64):
            written += size
            done += 1
            if done % step == 0 or done == count:
                elapsed = time.monotonic() - start
                log(f"  {done}/{count} files, {elapsed:.0f} s, ETA {elapsed / done * (count - done):.0f} s")
    seconds = time.monotonic() - start
    sizes = []
    for dirpath, _, files in os.walk(os.path.join(root, "train")):
        sizes += [os.path.getsize(os.path.join(dirpath, f)) for f in files if f.endswith(".jpg")]
    if len(sizes) != count:
        raise RuntimeError(f"{root}: expected {count} files, found {len(sizes)}")
    sizes.sort()
    marker = {"count": count, "classes": classes, "version": GENERATOR_VERSION, "height": HEIGHT, "width": WIDTH,
              "total_bytes": sum(sizes), "file_kb_min_median_max": [round(sizes[0] / 1024, 1),
                                                                    round(sizes[len(sizes) // 2] / 1024, 1),
                                                                    round(sizes[-1] / 1024, 1)],
              "generation_seconds": round(seconds, 1)}
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump(marker, f)
    log(f"  done in {seconds:.0f} s: {sum(sizes) / 2**30:.2f} GiB, file KB min/median/max "
        f"{marker['file_kb_min_median_max']}")
    return dict(marker, reused=False)


# ------------------------------------------------------------------------------------------------- timing


def run_command(repo: str, root: str, model_dir: str, train_steps: int) -> List[str]:
    return [sys.executable, os.path.join(repo, "run.py"), f"--dataset=folder:{root}", "--train_split=train",
            "--eval_split=train", "--mode=train", "--train_mode=pretrain", f"--train_steps={train_steps}",
            "--steps_per_loop=1", "--checkpoint_steps=1", "--train_batch_size=8", "--image_size=32",
            "--resnet_depth=18", "--width_multiplier=0.25", "--use_blur=false",
            "--lineareval_while_pretraining=false", "--seed=0", f"--model_dir={model_dir}"]


def child_env(repo: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2")
    return env


def _checkpoint_written(model_dir: str, step: int) -> bool:
    """True once TF's `checkpoint` state file names ckpt-<step> (it is rewritten after the files are complete)."""
    try:
        with open(os.path.join(model_dir, "checkpoint")) as f:
            return f"ckpt-{step}\"" in f.read()
    except OSError:
        return False


def timed_launch(repo: str, root: str, model_dir: str, train_steps: int, wait_for_checkpoint: Optional[int],
                 timeout: float, log_path: str) -> Dict[str, Any]:
    """Launches run.py; seconds from just before Popen to the first progress line (and other milestones).

    After the first progress line the child is killed, unless `wait_for_checkpoint` is a step: then it is killed
    once that checkpoint is complete (or it exits by itself).
    """
    command = run_command(repo, root, model_dir, train_steps)
    lines: "queue.Queue[tuple[float, Optional[str]]]" = queue.Queue()
    t0 = time.monotonic()
    proc = subprocess.Popen(command, cwd=repo, env=child_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((time.monotonic(), line.rstrip("\n")))
        lines.put((time.monotonic(), None))

    threading.Thread(target=reader, daemon=True).start()
    milestones: Dict[str, float] = {}
    first_step_line = None
    transcript = []
    deadline = t0 + timeout
    ended = False
    try:
        while True:
            if wait_for_checkpoint is not None and first_step_line is not None and \
                    _checkpoint_written(model_dir, wait_for_checkpoint):
                break
            try:
                when, line = lines.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no first step within {timeout:.0f} s") from None
                continue
            if line is None:
                ended = True
                break
            transcript.append(f"{when - t0:9.3f} {line}")
            text = line.split("] ", 1)[-1] if "] " in line else line  # without absl's prefix, if any
            if text.startswith("dataset ") and "dataset" not in milestones:
                milestones["dataset"] = when - t0
            elif text.startswith("training ") and "training" not in milestones:
                milestones["training"] = when - t0
            elif text.startswith(PROGRESS_PREFIX) and "/" in text.split()[1] and first_step_line is None:
                milestones["first_step"] = when - t0
                first_step_line = text
                if wait_for_checkpoint is None:
                    break
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL: SIGTERM would make the trainer save a checkpoint of its own
        proc.wait()
        with open(log_path, "w") as f:
            f.write(" ".join(command) + "\n" + "\n".join(transcript) + "\n")
    if first_step_line is None:
        raise RuntimeError(f"run.py {'exited' if ended else 'stopped'} before a progress line "
                           f"(exit {proc.returncode}); see {log_path}")
    if wait_for_checkpoint is not None and not _checkpoint_written(model_dir, wait_for_checkpoint):
        raise RuntimeError(f"run.py exited before checkpoint {wait_for_checkpoint} was written; see {log_path}")
    return {"seconds": round(milestones["first_step"], 3), "first_line": first_step_line,
            "milestones": {k: round(v, 3) for k, v in milestones.items()}}


def import_check(repo: str) -> str:
    """Where `simclr_tf` comes from for a child launched like run.py (cwd and PYTHONPATH = repo)."""
    out = subprocess.run([sys.executable, "-c", "import simclr_tf, os; print(os.path.dirname(simclr_tf.__file__))"],
                         cwd=repo, env=child_env(repo), capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    if os.path.realpath(path) != os.path.realpath(os.path.join(repo, "simclr_tf")):
        raise RuntimeError(f"simclr_tf resolves to {path}, not to the checkout {repo}")
    return path


def repo_commit(repo: str) -> str:
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" (with uncommitted changes)" if dirty else "")


def median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 2)


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


def in_process(args) -> None:
    """Times build_source (no index, then with the index it wrote) and the first pretraining batch at step 0
    and at step 1000 (a resumed run), per folder size, median of `--repeats`; prints a table, writes `--out`."""
    common.setup_path()
    import tensorflow as tf

    from simclr_tf.data import pipeline
    from simclr_tf.data.sources import build_source
    from simclr_tf.sections import AugmentConfig

    augment = AugmentConfig(image_size=32, color_jitter_strength=1.0, use_blur=False)
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        root = os.path.join(os.path.abspath(args.data_root), f"jpeg_{count}")
        make_folder(root, count, args.workers, log=lambda s: print(s, flush=True))
        times: Dict[str, List[float]] = {"list": [], "list_indexed": [], "first_batch": [], "first_batch_resumed": []}
        for _ in range(args.repeats):
            index_dir = tempfile.mkdtemp(prefix="simclr_index_")
            for key in ("list", "list_indexed"):
                t = time.perf_counter()
                source = build_source(f"folder:{root}", None, "train", None, index_dir=index_dir)
                times[key].append(time.perf_counter() - t)
            for key, step in (("first_batch", 0), ("first_batch_resumed", 1000)):
                t = time.perf_counter()
                input_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=8, augment=augment,
                                                   seed=0, start_step=step)
                next(iter(input_fn(tf.distribute.InputContext())))
                times[key].append(time.perf_counter() - t)
        row = {"count": count, **{k: _round(median(v)) for k, v in times.items()}}
        rows.append(row)
        print(row, flush=True)
    print("\n| files | list (no index) s | list (index) s | first batch, step 0 s | first batch, step 1000 s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['count']} | {_fmt(r['list'])} | {_fmt(r['list_indexed'])} | {_fmt(r['first_batch'])} | "
              f"{_fmt(r['first_batch_resumed'])} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"in_process": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", default=os.path.join(tempfile.gettempdir(), "simclr_bench_startup"),
                        help="where the generated folders live (jpeg_<count>); reused when complete")
    parser.add_argument("--counts", default="1000,20000,100000", help="folder sizes; the first is the base")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved launches per size and kind")
    parser.add_argument("--repo", default=common.REPO_DIR,
                        help="checkout whose run.py is launched; several, comma-separated, are interleaved")
    parser.add_argument("--out", default=None, help="JSON result file")
    parser.add_argument("--workers", type=int, default=2, help="processes generating JPEGs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    parser.add_argument("--keep_logs", default=None, help="folder for the children's transcripts (default: tmp)")
    parser.add_argument("--generate_only", action="store_true", help="make the folders, measure nothing")
    parser.add_argument("--in_process", action="store_true",
                        help="time only the folder-dependent start-up in this process (this checkout's simclr_tf)")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return

    repos = [os.path.abspath(r) for r in args.repo.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    checkouts = []
    for repo in repos:
        checkouts.append({"repo": repo, "commit": repo_commit(repo), "simclr_tf_from": import_check(repo)})
        print(f"repo {repo} @ {checkouts[-1]['commit']}; simclr_tf from {checkouts[-1]['simclr_tf_from']}",
              flush=True)

    folders = {}
    for count in counts:
        root = os.path.join(os.path.abspath(args.data_root), f"jpeg_{count}")
        folders[count] = {"root": root, **make_folder(root, count, args.workers,
                                                       log=lambda s: print(s, flush=True))}

    if args.generate_only:
        return
    machine = common.machine_description()  # imports TF: after the generator's worker processes are gone
    work = tempfile.mkdtemp(prefix="simclr_startup_")
    logs = args.keep_logs or os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    runs: List[Dict[int, Dict[str, List[Dict[str, Any]]]]] = [
        {c: {"fresh": [], "resumed": []} for c in counts} for _ in repos]
    start = time.monotonic()
    try:
        for r in range(args.repeats):
            for count in counts:
                for i, repo in enumerate(repos):  # several checkouts: interleaved too, so drift hits all alike
                    model_dir = os.path.join(work, f"model_{count}_{r}_{i}")
                    root = folders[count]["root"]
                    name = f"{count}_{r}" + (f"_repo{i}" if len(repos) > 1 else "")
                    load = os.getloadavg()[0]
                    fresh = timed_launch(repo, root, model_dir, 2, wait_for_checkpoint=2, timeout=args.timeout,
                                         log_path=os.path.join(logs, f"{name}_fresh.log"))
                    fresh["load_1min_before"] = round(load, 2)
                    load = os.getloadavg()[0]
                    resumed = timed_launch(repo, root, model_dir, 4, wait_for_checkpoint=None,
                                           timeout=args.timeout, log_path=os.path.join(logs, f"{name}_resumed.log"))
                    resumed["load_1min_before"] = round(load, 2)
                    if not resumed["first_line"].startswith(("step 3/4", "step 4/4")):
                        raise RuntimeError(f"resumed run did not resume from step 2: {resumed['first_line']!r}")
                    runs[i][count]["fresh"].append(fresh)
                    runs[i][count]["resumed"].append(resumed)
                    label = f" repo {i}" if len(repos) > 1 else ""
                    print(f"round {r + 1}/{args.repeats}{label} {count:>7} files: fresh {fresh['seconds']:7.2f} s "
                          f"{fresh['milestones']}, resumed {resumed['seconds']:7.2f} s {resumed['milestones']} "
                          f"(load {fresh['load_1min_before']:.1f})", flush=True)
                    shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        if args.keep_logs is None:
            print(f"children's transcripts: {logs}", flush=True)
        else:  # model dirs of a failed launch included
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - start

    base = counts[0]
    results = []
    for checkout, repo_runs in zip(checkouts, runs):
        rows = summarise(repo_runs, counts, folders)
        results.append(dict(checkout, rows=rows, runs={str(c): v for c, v in repo_runs.items()}))
        print(f"\nStart-up of a tiny pretraining job (`{' '.join(run_command('REPO', 'ROOT', 'DIR', 2)[2:])}`), "
              f"launch -> first progress line, median of {args.repeats}; extra = median - median({base} files).")
        print(f"{checkout['repo']} @ {checkout['commit']}\n")
        print(f"| files | fresh s | extra over {base} (fresh) | resumed s | extra over {base} (resumed) | "
              "launch -> `dataset` line, fresh / resumed s |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['count']} | {row['fresh_median_s']:.1f} | {row['fresh_extra_over_base_s']:+.1f} | "
                  f"{row['resumed_median_s']:.1f} | {row['resumed_extra_over_base_s']:+.1f} | "
                  f"{_fmt(row['fresh_launch_to_dataset_line_median_s'])} / "
                  f"{_fmt(row['resumed_launch_to_dataset_line_median_s'])} |")

    result = {"machine": machine, "config": vars(args), "base_count": base, "measure_seconds": round(seconds, 1),
              "folders": folders, "results": results}
    if len(results) == 1:  # one checkout: its fields at the top level as well
        result.update(results[0])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    common.emit({"results": [{k: v for k, v in x.items() if k != "runs"} for x in results]})


def summarise(runs: Dict[int, Dict[str, List[Dict[str, Any]]]], counts: List[int],
              folders: Dict[int, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per folder size: medians of fresh and resumed launches, and their extra over the first size."""
    base = counts[0]
    base_fresh = median([x["seconds"] for x in runs[base]["fresh"]])
    base_resumed = median([x["seconds"] for x in runs[base]["resumed"]])
    rows = []
    for count in counts:
        fresh = [x["seconds"] for x in runs[count]["fresh"]]
        resumed = [x["seconds"] for x in runs[count]["resumed"]]
        dataset_s = {kind: [x["milestones"]["dataset"] for x in runs[count][kind] if "dataset" in x["milestones"]]
                     for kind in ("fresh", "resumed")}
        rows.append({"count": count, "fresh_s": fresh, "resumed_s": resumed,
                     "fresh_median_s": round(median(fresh), 2), "resumed_median_s": round(median(resumed), 2),
                     "fresh_extra_over_base_s": round(median(fresh) - base_fresh, 2),
                     "resumed_extra_over_base_s": round(median(resumed) - base_resumed, 2),
                     **{f"{kind}_launch_to_dataset_line_median_s": _round(median(dataset_s[kind]))
                        for kind in ("fresh", "resumed")},
                     "folder_gib": round(folders[count]["total_bytes"] / 2**30, 2)})
    return rows


if __name__ == "__main__":
    main()
