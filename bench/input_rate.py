"""Input rate of pretraining at 224 px by data source: the same images in memory, as JPEG files, as TFRecords.

No model: two-view pretraining batches (`[b, 224, 224, 6]`, s = 1.0, blur on, seed 0) straight from
`pipeline.build_input_fn`, for

* **in-memory** -- `npz:` holding the JPEGs decoded once into uint8 arrays (what decoding costs nothing);
* **folder** -- `folder:` over the JPEG files (decoded on every read);
* **tfrecord** -- `tfrecord:GLOB` over shards written by `python -m simclr_tf.make_tfrecords folder:PATH OUTDIR`
  (left out with a message while that converter does not exist in this checkout).

All three hold the same ~2,000 ImageNet-like 256x320 JPEGs (bench/startup.py's generator). Each round builds a
fresh iterator per source, skips `--warmup` batches (shuffle buffer fill, prefetch, XLA compile the first
time), then times `--batches` batches; sources alternate A B C A B C ... for `--rounds` rounds so load from
other processes hits them alike. Reported: views/s (wall) and views per process CPU-second, median and min-max
over rounds, and each source's ratio to the in-memory rate of the same round.

    python bench/input_rate.py [--num_images 2000] [--batch 32] [--batches 60] [--rounds 3]
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import startup  # noqa: E402  (bench/startup.py: the JPEG folder generator)

common.setup_path()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclr_tf.data import pipeline  # noqa: E402
from simclr_tf.data.sources import build_source  # noqa: E402
from simclr_tf.sections import AugmentConfig  # noqa: E402

CONVERTER = "simclr_tf.make_tfrecords"
NPZ_TEST_IMAGES = 64
# The dataset glob the converter documents (`--dataset=tfrecord:OUTDIR/*`), relative to its output folder.
TFRECORD_GLOB = "*"


def make_npz(folder: str, path: str, log=print) -> None:
    """`path` with the folder's JPEGs decoded (PIL) in file order: x_train/y_train, x_test/y_test (a few)."""
    if os.path.exists(path):
        log(f"reusing {path}")
        return
    from PIL import Image

    classes = sorted(os.listdir(os.path.join(folder, "train")))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(glob.glob(os.path.join(folder, "train", name, "*.jpg")))
        files += found
        labels += [label] * len(found)
    log(f"decoding {len(files)} JPEGs into {path}")
    start = time.monotonic()
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    y = np.asarray(labels, np.int64)
    tmp = path + ".part.npz"
    np.savez(tmp, x_train=images, y_train=y, x_test=images[:NPZ_TEST_IMAGES], y_test=y[:NPZ_TEST_IMAGES])
    os.replace(tmp, path)
    log(f"  {images.nbytes / 2**20:.0f} MiB of uint8 in {time.monotonic() - start:.0f} s")


def make_tfrecords(folder: str, out_dir: str, log=print) -> tuple[Optional[str], str]:
    """(`tfrecord:GLOB` dataset or None, a note): shards from the converter, made once and then reused."""
    if importlib.util.find_spec(CONVERTER) is None:
        return None, f"skipped: {CONVERTER} is not importable in this checkout yet"
    done = out_dir.rstrip("/") + ".complete"  # beside the folder: its glob must see only the converter's files
    if not os.path.exists(done):
        if os.path.exists(out_dir):
            import shutil

            shutil.rmtree(out_dir)
        command = [sys.executable, "-m", CONVERTER, f"folder:{folder}", out_dir]
        log(f"$ {' '.join(command[1:])}")
        start = time.monotonic()
        env = dict(os.environ, PYTHONPATH=common.REPO_DIR)
        proc = subprocess.run(command, cwd=common.REPO_DIR, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            return None, f"skipped: the converter failed (exit {proc.returncode}):\n{tail}"
        log(f"  converted in {time.monotonic() - start:.0f} s")
        open(done, "w").close()
    shards = glob.glob(os.path.join(out_dir, "*.tfrecord*"))
    if not shards:
        return None, f"skipped: no *.tfrecord* shards in {out_dir}"
    size = sum(os.path.getsize(m) for m in shards)
    return f"tfrecord:{os.path.join(out_dir, TFRECORD_GLOB)}", f"{len(shards)} shard(s), {size / 2**20:.0f} MiB"


def measure(input_fn, views_per_batch: int, warmup: int, batches: int) -> Dict[str, float]:
    """Views per wall second and per process CPU second over `batches` batches of a fresh iterator."""
    iterator = iter(input_fn(tf.distribute.InputContext()))
    for _ in range(warmup):
        next(iterator)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    del iterator  # stops its threads before the next source runs
    return {"views_per_s": batches * views_per_batch / wall, "views_per_cpu_s": batches * views_per_batch / cpu}


def spread(xs: List[float], digits: int = 0) -> str:
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", default=os.path.join(tempfile.gettempdir(), "simclr_bench_startup"),
                        help="where the JPEG folder (jpeg_<n>), its npz and its shards are kept and reused")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=12, help="batches skipped per round and source")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per round and source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sources", default="memory,folder,tfrecord")
    parser.add_argument("--tfrecord_dataset", default=None,
                        help="a tfrecord:GLOB to use instead of converting the folder")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args()

    log = lambda s: print(s, flush=True)  # noqa: E731
    root = os.path.abspath(args.data_root)
    folder = os.path.join(root, f"jpeg_{args.num_images}")
    folder_info = startup.make_folder(folder, args.num_images, log=log)
    wanted = args.sources.split(",")
    datasets: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    if "memory" in wanted:
        npz = folder + ".npz"
        make_npz(folder, npz, log)
        datasets["memory"] = f"npz:{npz}"
    if "folder" in wanted:
        datasets["folder"] = f"folder:{folder}"
    if "tfrecord" in wanted:
        if args.tfrecord_dataset:
            datasets["tfrecord"] = args.tfrecord_dataset
        else:
            dataset, notes["tfrecord"] = make_tfrecords(folder, folder + "_tfrecords", log)
            log(f"tfrecord: {notes['tfrecord']}")
            if dataset is not None:
                datasets["tfrecord"] = dataset

    augment = AugmentConfig(image_size=args.image_size, color_jitter_strength=1.0, use_blur=True)
    input_fns = {}
    for name, dataset in datasets.items():
        start = time.monotonic()
        try:
            source = build_source(dataset, None, "train", "train")
        except Exception as e:  # noqa: BLE001 -- a source that cannot be built is reported, not fatal
            notes[name] = f"skipped: build_source({dataset!r}) failed: {type(e).__name__}: {e}"
            log(f"{name}: {notes[name]}")
            continue
        build_s = time.monotonic() - start
        notes.setdefault(name, "")
        notes[name] = (notes[name] + "; " if notes[name] else "") + f"source built in {build_s:.1f} s"
        log(f"{name}: {dataset} ({source.num_train} train images; built in {build_s:.1f} s)")
        input_fns[name] = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=args.batch,
                                                  augment=augment, seed=0)
    if "memory" not in input_fns:
        raise SystemExit("the in-memory source is the reference of the ratios; it must be measured")

    views = 2 * args.batch
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in input_fns}
    for r in range(args.rounds):
        for name, input_fn in input_fns.items():
            m = measure(input_fn, views, args.warmup, args.batches)
            results[name].append(m)
            log(f"round {r + 1}/{args.rounds} {name:>8}: {m['views_per_s']:7.1f} views/s, "
                f"{m['views_per_cpu_s']:7.1f} views per CPU-s")

    rows = []
    for name in input_fns:
        wall = [m["views_per_s"] for m in results[name]]
        cpu = [m["views_per_cpu_s"] for m in results[name]]
        ratio = [m["views_per_s"] / ref["views_per_s"] for m, ref in zip(results[name], results["memory"])]
        cpu_ratio = [m["views_per_cpu_s"] / ref["views_per_cpu_s"]
                     for m, ref in zip(results[name], results["memory"])]
        rows.append({"source": name, "dataset": datasets[name], "views_per_s": [round(x, 1) for x in wall],
                     "views_per_cpu_s": [round(x, 1) for x in cpu], "ratio_to_memory": [round(x, 3) for x in ratio],
                     "ratio_to_memory_per_cpu_s": [round(x, 3) for x in cpu_ratio],
                     "views_per_s_median": round(statistics.median(wall), 1),
                     "ratio_to_memory_median": round(statistics.median(ratio), 3), "note": notes.get(name, "")})

    print(f"\nPretraining views at {args.image_size} px (batch {args.batch}, two views per image, s = 1.0, blur) "
          f"from {args.num_images} JPEGs of {startup.HEIGHT}x{startup.WIDTH}; median (min-max) over "
          f"{args.rounds} rounds of {args.batches} batches.\n")
    print("| source | views/s | ratio to in-memory | views per CPU-s | ratio per CPU-s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['source']} | {spread(row['views_per_s'])} | {spread(row['ratio_to_memory'], 2)} | "
              f"{spread(row['views_per_cpu_s'])} | {spread(row['ratio_to_memory_per_cpu_s'], 2)} |")
    for name, note in notes.items():
        if name not in input_fns:
            print(f"\n{name}: {note}")

    result = {"config": vars(args), "machine": common.machine_description(), "folder": folder_info,
              "rows": rows, "notes": notes}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        log(f"\nwrote {args.out}")
    common.emit({"rows": rows, "notes": notes})


if __name__ == "__main__":
    main()
