"""Our `run.py` against the official SimCLR TF2 code, as whole processes with identical training flags.

`--official_dir PATH` is a checkout of google-research/simclr that you fetched yourself (nothing of it is kept
here); its `tf2/run.py` runs unmodified through `bench/official_shim.py`, which serves it the same `.npz`
images through a stand-in for `tfds.builder` and needs `tf_keras` (`pip install tf_keras`, matching TensorFlow).

Each round runs the official code, then each variant: ours (plain float32, `--recompute`, `--mixed_precision`,
...) and the official code's own (`official_malloc`: under the glibc settings of our default `--tune_malloc`,
so the table shows what the allocator alone is worth), so load from other processes hits all of them alike
(A B C A B C ...). Every run is one fresh process under
`/usr/bin/time -v` (peak RSS = its "Maximum resident set size"); the harness stamps each output line as it
arrives and reads the step-completion lines of each side (official: `Completed: k / n steps`, ours:
`step k/n`). Reported per run:

* **steady img/s** -- the batch size over the median time between consecutive step completions after step 2
  (step 1 holds tracing and compilation, step 2 sometimes a retrace);
* **peak RSS** -- of the whole process;
* **launch -> step 1** -- from just before the process starts to its first step-completion line;
* **whole job** -- launch to exit, with everything each side does at its end (ours also exports a SavedModel).

With `--preprocess`, the input pipelines instead, in one process (see `preprocess_main`): the official
`data_util.preprocess_image` (two views per image) and `batch_random_blur`, fed decoded JPEGs in the official
`data.py`'s tf.data structure, against our `folder:` pretraining pipeline over the same files, at 224 px.

Both sides run one training step per host call and save one checkpoint, at the end: the official loop runs
`--checkpoint_steps` steps per call and saves after each call, so it gets `--checkpoint_steps=1` and the shim's
final-save-only patch; ours gets `--steps_per_loop=1 --checkpoint_steps=<train_steps>`. Ratios are ours /
official within each round; the table gives their median and min-max.

    python bench/vs_official.py --official_dir ../simclr --data ../shared/data/cifar10_dev.npz \
        [--configs r18,r50] [--rounds 2] [--out bench/results/vs_official.json]
    python bench/vs_official.py --official_dir ../simclr --preprocess [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# The two configurations of issue 19 (official flag names; both sides define them all).
CONFIGS: Dict[str, Dict[str, object]] = {
    "r18": dict(flags=["--resnet_depth=18", "--width_multiplier=1", "--image_size=32", "--train_batch_size=256",
                       "--use_blur=False", "--train_steps=7"],
                title="ResNet-18, CIFAR stem, 32 px, batch 256"),
    "r50": dict(flags=["--resnet_depth=50", "--width_multiplier=1", "--image_size=64", "--train_batch_size=64",
                       "--use_blur=True", "--train_steps=10"],
                title="ResNet-50, 64 px, batch 64, blur"),
    # A minute-long check that both sides run and are parsed (not a measurement).
    "smoke": dict(flags=["--resnet_depth=18", "--width_multiplier=1", "--image_size=32", "--train_batch_size=16",
                         "--use_blur=False", "--train_steps=4"],
                  title="smoke check: ResNet-18, 32 px, batch 16"),
}
COMMON_FLAGS = ["--use_tpu=False", "--train_mode=pretrain", "--mode=train", "--eval_split=test",
                "--lineareval_while_pretraining=True", "--learning_rate=1.0", "--temperature=0.5",
                "--weight_decay=1e-4"]
# Our variants: name -> extra flags.
# `mixed` is the CLI's automatic choice (float32 on CPUs without bfloat16 instructions, where it is emulated).
VARIANTS: Dict[str, List[str]] = {"float32": [], "mixed": ["--mixed_precision"],
                                  "bfloat16": ["--mixed_precision", "--mixed_precision_dtype=bfloat16"],
                                  "recompute": ["--recompute"], "default_malloc": ["--tune_malloc=false"],
                                  # The memory-lean settings: recompute (the stem and the first two block
                                  # groups, which hold most of the activations), and the heap's holes given
                                  # back every 2 s.
                                  "lean": ["--recompute", "--recompute_groups=2", "--malloc_trim_secs=2"],
                                  # The least memory: every block recomputed, the holes given back every 0.2 s.
                                  "leanest": ["--recompute", "--malloc_trim_secs=0.2"]}
# The official code under extra environment variables: name -> variables. `official_malloc` gives it the
# glibc settings our --tune_malloc applies (simclr_tf.hardware.tune_malloc), to show what they alone are worth.
OFFICIAL_VARIANTS: Dict[str, Dict[str, str]] = {"official_malloc": {"MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "1"}}

OFFICIAL_STEP = re.compile(r"Completed: (\d+) / (\d+) steps")
OURS_STEP = re.compile(r"^step (\d+)/(\d+) ")
TIME_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
TIME_CPU = re.compile(r"(?:User|System) time \(seconds\): ([0-9.]+)")


def flag_value(flags: List[str], name: str) -> str:
    for flag in flags:
        if flag.startswith(f"--{name}="):
            return flag.split("=", 1)[1]
    raise KeyError(name)


def run_one(command: List[str], step_pattern: "re.Pattern[str]", log_path: str, timeout: float,
            extra_env: Optional[Dict[str, str]] = None) -> Dict:
    """Runs `command` under /usr/bin/time -v; the arrival time of each step-completion line, peak RSS, wall."""
    time_file = log_path + ".time"
    full = ["/usr/bin/time", "-v", "-o", time_file, *command]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=common.REPO_DIR,
               **(extra_env or {}))
    steps: Dict[int, float] = {}
    transcript: List[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(full, cwd=common.REPO_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - t0
            text = line.rstrip("\n")
            transcript.append(f"{now:9.3f} {text}")
            body = text.split("] ", 1)[-1] if "] " in text else text  # absl's prefix off, where there is one
            match = step_pattern.search(body)
            if match and int(match.group(1)) not in steps:
                steps[int(match.group(1))] = now

    samples: List[tuple] = []  # (seconds since launch, RSS MiB of the process under `time`), every 0.2 s

    def sample() -> None:
        child = None
        while proc.poll() is None:
            try:
                if child is None:
                    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                        found = f.read().split()
                    child = int(found[0]) if found else None
                if child is not None:
                    with open(f"/proc/{child}/status") as f:
                        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                    samples.append((time.monotonic() - t0, kib / 1024.0))
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.2)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    threading.Thread(target=sample, daemon=True).start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    wall = time.monotonic() - t0
    with open(log_path, "w") as f:
        f.write(" ".join(command) + "\n" + "\n".join(transcript) + "\n")
    rss = cpu = None
    if os.path.exists(time_file):
        with open(time_file) as f:
            text = f.read()
        found = TIME_RSS.search(text)
        rss = int(found.group(1)) / 1024.0 if found else None
        cpu = sum(float(v) for v in TIME_CPU.findall(text)) or None
    if proc.returncode != 0 or not steps:
        tail = "\n".join(transcript[-12:])
        raise RuntimeError(f"exit {proc.returncode}, {len(steps)} step lines; see {log_path}\n{tail}")
    return {"steps": steps, "peak_rss_mib": rss, "wall_s": wall, "cpu_s": cpu, "rss_samples": samples}


def summarise(run: Dict, batch: int) -> Dict[str, Optional[float]]:
    """Steady img/s (median step interval after step 2), launch -> step 1, whole job, peak RSS."""
    steps = run["steps"]
    order = sorted(steps)
    intervals = [steps[b] - steps[a] for a, b in zip(order, order[1:]) if a >= 2 and b == a + 1]
    median_step = statistics.median(intervals) if intervals else None
    last = steps[order[-1]]
    training = [mib for t, mib in run["rss_samples"] if t <= last]
    after = [mib for t, mib in run["rss_samples"] if t > last]
    return {"img_s": batch / median_step if median_step else None, "first_step_s": steps[order[0]],
            "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_mib": run["peak_rss_mib"],
            "step_s": median_step,
            # Where the peak is: up to the last step's line (training) and after it (saving, exporting).
            "training_rss_mib": max(training) if training else None,
            "after_training_rss_mib": max(after) if after else None}


def official_command(args, config_flags: List[str], model_dir: str) -> List[str]:
    return [sys.executable, os.path.join(common.BENCH_DIR, "official_shim.py"), "--official_dir",
            args.official_dir, "--npz", args.data, "--", *COMMON_FLAGS, *config_flags, "--dataset=cifar10",
            "--checkpoint_steps=1", f"--model_dir={model_dir}"]


def our_command(args, config_flags: List[str], variant: List[str], model_dir: str) -> List[str]:
    steps = flag_value(config_flags, "train_steps")
    return [sys.executable, os.path.join(common.REPO_DIR, "run.py"), *COMMON_FLAGS, *config_flags,
            f"--dataset=npz:{args.data}", "--steps_per_loop=1", f"--checkpoint_steps={steps}", *variant,
            f"--model_dir={model_dir}"]


def ratio_cell(values: List[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def table(results: Dict, variants: List[str]) -> str:
    """Markdown: per config and metric, official's median value and each variant's per-round ratio."""
    metrics = [("img_s", "steady img/s"), ("peak_rss_mib", "peak RSS MiB"),
               ("training_rss_mib", "RSS up to the last step (MiB, sampled)"),
               ("first_step_s", "launch -> end of step 1 (s)"), ("wall_s", "whole job (s)"),
               ("cpu_s", "whole job CPU-s (user + sys)")]
    head = "| config | metric | official | " + " | ".join(
        f"{v if v in OFFICIAL_VARIANTS else 'ours ' + v}: value, ratio" for v in variants) + " |"
    lines = [head, "|" + "---|" * (3 + len(variants))]
    for name, rounds in results.items():
        for key, label in metrics:
            official = [r["official"][key] for r in rounds if r["official"][key] is not None]
            cells = []
            for variant in variants:
                values = [r[variant][key] for r in rounds if r[variant][key] is not None]
                ratios = [r[variant][key] / r["official"][key] for r in rounds
                          if r[variant][key] is not None and r["official"][key]]
                value = f"{statistics.median(values):.1f}" if values else "–"
                cells.append(f"{value}, {ratio_cell(ratios)}")
            off = f"{statistics.median(official):.1f}" if official else "–"
            lines.append(f"| {CONFIGS[name]['title'] if key == 'img_s' else ''} | {label} | {off} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def official_preprocess_input_fn(official_dir: str, files: List[str], image_size: int, batch: int):
    """An `input_fn(InputContext)` of the official augmentation over JPEG files, as its `data.py` builds it.

    Per image: read, decode (what TFDS does for the official code), then `preprocess_image(is_training=True,
    color_jitter_strength=1.0)` twice (the pretraining `map_fn`); per batch: `batch_random_blur` on each view
    (the official code runs it inside the model step; here on the host, as our pipeline does). tf.data
    options, shuffle buffer (10 x batch above 32 px), AUTOTUNE map and prefetch as in `data.py`.
    """
    import tensorflow as tf

    sys.path.insert(0, os.path.join(official_dir, "tf2"))
    import data_util  # noqa: E402  (the official tf2/data_util.py: tf ops only, no Keras)

    def two_views(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        views = [data_util.preprocess_image(image, image_size, image_size, is_training=True,
                                            color_jitter_strength=1.0) for _ in range(2)]
        return tf.concat(views, -1)

    def blur(images):
        views = tf.split(images, 2, axis=-1)
        return tf.concat(data_util.batch_random_blur(views, image_size, image_size), -1)

    def input_fn(context):
        options = tf.data.Options()
        options.deterministic = False
        options.experimental_slack = True
        dataset = tf.data.Dataset.from_tensor_slices(files).with_options(options)
        dataset = dataset.shuffle(batch * 10).repeat(-1)
        dataset = dataset.map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.batch(batch, drop_remainder=True).map(blur, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return input_fn


def preprocess_main(args) -> None:
    """Views/s of the official augmentation vs our pipeline over the same JPEG folder, alternating rounds."""
    import input_rate  # bench/input_rate.py: its folder of ImageNet-like JPEGs and its timing loop
    import startup

    from simclr_tf.data import pipeline
    from simclr_tf.data.sources import build_source
    from simclr_tf.sections import AugmentConfig

    folder = os.path.join(os.path.abspath(args.data_root), f"jpeg_{args.num_images}")
    startup.make_folder(folder, args.num_images, log=print)
    source = build_source(f"folder:{folder}", None, "train", "train")
    files = sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(os.path.join(folder, "train"))
                   for name in names if name.endswith(".jpg"))
    augment = AugmentConfig(image_size=args.image_size, color_jitter_strength=1.0, use_blur=True)
    input_fns = {
        "official": official_preprocess_input_fn(args.official_dir, files, args.image_size, args.batch),
        "ours": pipeline.build_input_fn(source, mode="pretrain", global_batch_size=args.batch, augment=augment,
                                        seed=0),
    }
    views = 2 * args.batch
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in input_fns}
    for round_ in range(args.rounds):
        for name, input_fn in input_fns.items():
            m = input_rate.measure(input_fn, views, args.warmup, args.batches)
            results[name].append(m)
            print(f"round {round_ + 1}/{args.rounds} {name:>8}: {m['views_per_s']:7.1f} views/s, "
                  f"{m['views_per_cpu_s']:7.1f} views per CPU-s", flush=True)
    lines = ["| pipeline | views/s | ratio to official | views per CPU-s | ratio per CPU-s |", "|---|---|---|---|---|"]
    for name in input_fns:
        wall = [m["views_per_s"] for m in results[name]]
        cpu = [m["views_per_cpu_s"] for m in results[name]]
        ratio = [m["views_per_s"] / o["views_per_s"] for m, o in zip(results[name], results["official"])]
        cpu_ratio = [m["views_per_cpu_s"] / o["views_per_cpu_s"] for m, o in zip(results[name], results["official"])]
        lines.append(f"| {name} | {input_rate.spread(wall)} | {input_rate.spread(ratio, 2)} | "
                     f"{input_rate.spread(cpu)} | {input_rate.spread(cpu_ratio, 2)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": common.machine_description(), "folder": folder, "image_size": args.image_size,
                       "batch": args.batch, "rounds": results, "table": text}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_dir", required=True, help="a checkout of google-research/simclr")
    parser.add_argument("--data", default=os.path.join(common.REPO_DIR, "..", "shared", "data", "cifar10_dev.npz"),
                        help=".npz with x_train/y_train/x_test/y_test (uint8 NHWC)")
    parser.add_argument("--configs", default="r18,r50", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--variants", default="float32,lean,official_malloc",
                        help=f"our variants, of {sorted(VARIANTS)}, and the official code's, of "
                             f"{sorted(OFFICIAL_VARIANTS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="another variant of ours: a name and its extra flags, space-separated "
                             "(e.g. 'localbn=--global_bn=False'); repeatable, added to --variants")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--work_dir", default=None, help="model dirs and logs (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write all runs and the table as JSON here")
    parser.add_argument("--preprocess", action="store_true",
                        help="compare the input pipelines at --image_size instead of training runs")
    parser.add_argument("--data_root", default=os.path.join(tempfile.gettempdir(), "simclr_bench_startup"),
                        help="--preprocess: where the JPEG folder is made once and reused")
    parser.add_argument("--num_images", type=int, default=2000, help="--preprocess: JPEGs of 256x320")
    parser.add_argument("--image_size", type=int, default=224, help="--preprocess: view size")
    parser.add_argument("--batch", type=int, default=32, help="--preprocess: images per batch")
    parser.add_argument("--warmup", type=int, default=12, help="--preprocess: batches skipped per round")
    parser.add_argument("--batches", type=int, default=40, help="--preprocess: batches timed per round")
    args = parser.parse_args()

    if not os.path.isfile(os.path.join(args.official_dir, "tf2", "run.py")):
        sys.exit(f"--official_dir: no tf2/run.py under {args.official_dir} (git clone google-research/simclr)")
    if args.preprocess:
        common.setup_path()
        preprocess_main(args)
        return
    if not os.path.isfile(args.data):
        sys.exit(f"--data: {args.data} not found")
    if not os.path.exists("/usr/bin/time"):
        sys.exit("/usr/bin/time not found (the peak RSS comes from `time -v`; apt install time)")
    try:
        import tf_keras  # noqa: F401
    except ImportError:
        sys.exit("the official code needs tf_keras: pip install tf_keras (the version of your TensorFlow)")
    configs = args.configs.split(",")
    variants = args.variants.split(",")
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        if not name or not extra.startswith("--"):
            sys.exit(f"--variant: expected NAME=--flag[ --flag...], got {spec!r}")
        VARIANTS[name] = extra.split()
        variants.append(name)
    for name in configs:
        if name not in CONFIGS:
            sys.exit(f"--configs: unknown {name!r}; known: {', '.join(CONFIGS)}")
    for name in variants:
        if name not in VARIANTS and name not in OFFICIAL_VARIANTS:
            sys.exit(f"--variants: unknown {name!r}; known: {', '.join([*VARIANTS, *OFFICIAL_VARIANTS])}")

    work = args.work_dir or tempfile.mkdtemp(prefix="vs_official_")
    os.makedirs(work, exist_ok=True)
    print(json.dumps(common.machine_description()), flush=True)
    results: Dict[str, List[Dict]] = {}
    for name in configs:
        flags = CONFIGS[name]["flags"]
        batch = int(flag_value(flags, "train_batch_size"))
        results[name] = []
        for round_ in range(args.rounds):
            row = {}
            for side in ["official", *variants]:
                model_dir = os.path.join(work, f"{name}-{round_}-{side}")
                shutil.rmtree(model_dir, ignore_errors=True)
                env = OFFICIAL_VARIANTS.get(side)
                if side == "official" or env:
                    command, pattern = official_command(args, flags, model_dir), OFFICIAL_STEP
                else:
                    command, pattern = our_command(args, flags, VARIANTS[side], model_dir), OURS_STEP
                run = run_one(command, pattern, model_dir + ".log", args.timeout, env)
                row[side] = summarise(run, batch)
                shutil.rmtree(model_dir, ignore_errors=True)  # checkpoints of ResNet-50 fill a disk fast
                print(f"{name} round {round_} {side}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in row[side].items() if v is not None), flush=True)
            results[name].append(row)
    text = table(results, variants)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": common.machine_description(), "configs": {n: CONFIGS[n] for n in configs},
                       "common_flags": COMMON_FLAGS,
                       "variants": {v: VARIANTS.get(v, OFFICIAL_VARIANTS.get(v)) for v in variants},
                       "rounds": results, "table": text}, f, indent=1)


if __name__ == "__main__":
    main()
