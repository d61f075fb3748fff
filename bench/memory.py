"""Variants of the same pretraining on the CIFAR-10 dev subset, side by side at equal steps: SimCLRv2's memory
of negatives off vs on (`--compare memory`, the default), float32 vs mixed bfloat16 compute (`--compare
precision`, the accuracy-parity check of a faster path), or Keras' own BatchNormalization code vs our fused one vs
the memory-lean step (`--compare lean`: fused BN with the stem and block groups 1-2 recomputed, the parity check of
those levers); then linear-eval and kNN top-1 of each encoder, the time per step and what the run costs in memory.

    python bench/memory.py --data ../shared/data/cifar10_dev.npz --steps 2000 --seeds 0,1 --out runs/bench/memory.md
    python bench/memory.py --compare precision --steps 400 --seeds 0,1 --out runs/bench/precision.md
    python bench/memory.py --compare lean --steps 400 --seeds 0,1 --out runs/bench/lean.md

Every (variant, seed) row runs in its own process (`common.run_row`, which also reports its peak RSS), with the
protocol of bench/accuracy.py (its `make_config` and `evaluate`: ResNet-18 CIFAR stem width 0.25, LARS, τ 0.5,
colour strength 0.5, no blur, 2-layer head, warmup 1 epoch then cosine; linear eval and weighted kNN on the
frozen h), at batch 64, where in-batch negatives are few (126 per anchor) and a memory has the most to add.

The memory (K = 4096, m = 0.99 by default): at batch 64 a step writes 128 keys, so the queue spans the last 32
steps (2,048 images, a fifth of an epoch: an image's own earlier key has left the queue before the image comes
back, so no positive hides among the negatives). m = 0.99 gives the copy a time constant 1 / (1 - m) = 100
steps: longer than the 32 steps the queue spans (its keys come from nearly the same encoder), short against a
run of a few thousand steps. MoCo's and the ImageNet recipe's 0.999 (1,000 steps) suits ImageNet's 300 steps
per epoch at batch 4096 over 800 epochs, but would leave the copy far behind the online network for most of a
run this short.

Exits 0 after printing a note when the data file is absent (the bench machines have ../shared/data).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_DATA = os.path.join(common.REPO_DIR, "..", "shared", "data", "cifar10_dev.npz")
COMPARISONS = {"memory": ("off", "on"), "precision": ("float32", "bfloat16"),
               # keras_bn: the BN code before the fused kernel (Keras' own, element-wise ops); float32: the
               # defaults (fused BN); lean: + --recompute --recompute_groups=2. The lean setting's heap trimming
               # (--malloc_trim_secs, run.py's) returns free pages only and cannot change a number.
               "lean": ("keras_bn", "float32", "lean")}
VARIANTS = tuple(v for variants in COMPARISONS.values() for v in variants)


def row(args: argparse.Namespace) -> None:
    """One (variant, seed) run in this process: pretrain, time the steps, evaluate; emits the result."""
    common.setup_path()
    import accuracy  # bench/accuracy.py: the CIFAR protocol and its evaluation
    import numpy as np
    import tensorflow as tf

    from simclr_tf import app as simclr_app
    from simclr_tf import config as config_lib
    from simclr_tf.train import Trainer

    if args.variant == "keras_bn":
        # A bench-only switch back to Keras' BatchNormalization code path (no flag selects it).
        from simclr_tf.models import layers
        layers.BatchNormalization._fusable = lambda self, inputs, training, mask: False
    tf.keras.utils.set_random_seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="simclr_bench_memory_")
    try:
        # Chunks of steps between host round trips; the first one (tracing) is left out of the timing.
        chunk = max(1, min(50, args.steps // 4))
        protocol = argparse.Namespace(data=args.data, depth=args.depth, width=args.width, batch=args.batch,
                                      learning_rate=args.learning_rate, warmup_epochs=args.warmup_epochs)
        config = config_lib.validate(accuracy.make_config(protocol, workdir, args.steps, chunk).replace(
            seed=args.seed, memory_size=args.memory_size if args.variant == "on" else 0,
            memory_momentum=args.memory_momentum,
            # Forced: `--mixed_precision` alone stays in float32 on CPUs without bfloat16 instructions.
            mixed_precision=args.variant == "bfloat16", mixed_precision_dtype="bfloat16",
            recompute=args.variant == "lean", recompute_groups=2 if args.variant == "lean" else 4))
        strategy, source = simclr_app.prepare(config, log=lambda _: None)
        lines: List[tuple] = []
        trainer = Trainer(config, strategy, source, log=lambda m: lines.append((time.monotonic(), m)))
        start = time.monotonic()
        metrics = trainer.train()
        train_seconds = time.monotonic() - start
        chunk_ends = [t for t, m in lines if m.startswith("step ")]
        timed_steps = args.steps - chunk
        seconds_per_step = (chunk_ends[-1] - chunk_ends[0]) / timed_steps if timed_steps > 0 else float("nan")
        result: Dict[str, Any] = dict(variant=args.variant, seed=args.seed, steps=int(trainer.global_step.numpy()),
                                      train_minutes=round(train_seconds / 60, 2),
                                      seconds_per_step=round(seconds_per_step, 4),
                                      final_metrics={k: round(v, 4) for k, v in metrics.items()})
        memory = getattr(trainer.task, "memory", None)
        result["memory_size"] = config.memory_size
        result["queue_mib"] = (int(np.prod(memory.queue.shape)) * 4 / 2 ** 20) if memory else 0.0
        result["copy_mib"] = (sum(int(np.prod(w.shape)) * 4 for w in memory.model.weights) / 2 ** 20
                              if memory else 0.0)
        result.update(accuracy.evaluate(trainer.model, source, strategy))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    common.emit(result)


def table(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown report: one line per run, then the mean over seeds per variant."""
    memory = args.compare == "memory"
    column = "variant" if args.compare == "lean" else args.compare  # "lean" is also one of its variants
    title = {"memory": "Memory of negatives", "precision": "Compute precision", "lean": "BN kernel and recompute"}
    variants = " vs ".join(COMPARISONS[args.compare])
    out = [f"# {title[args.compare]}: {variants} (CIFAR-10 dev, batch {args.batch}, {args.steps} steps)", "",
           f"`{' '.join(['python', 'bench/memory.py', *sys.argv[1:]])}`", "",
           f"ResNet-{args.depth} width {args.width:g}, CIFAR stem, LARS lr {args.learning_rate:g} (linear scaling), "
           f"warmup {args.warmup_epochs:g} epoch(s) then cosine, τ 0.5; "
           + {"memory": f"memory on: K = {args.memory_size}, m = {args.memory_momentum:g}. ",
              "precision": "bfloat16: --mixed_precision (bfloat16 compute; float32 variables, loss, BN statistics, "
                           "optimizer). ",
              "lean": "keras_bn: Keras' own BatchNormalization code; float32: the defaults (TensorFlow's fused BN "
                      "kernel); lean: + --recompute --recompute_groups=2. "}[args.compare]
           + "Linear eval and weighted kNN (k = 200) on the frozen h, as "
           "bench/accuracy.py. s/step: in-process, after the first (tracing) chunk. "
           + ("Queue: K × d × 4 bytes; copy: the momentum encoder's weights (backbone + head, float32). " if memory
              else "") + "Peak RSS: the whole row process.", "",
           f"| {column} | seed | steps | linear top-1 | kNN top-1 | s/step | contrast_acc (last chunk) "
           + ("| queue MiB | copy MiB " if memory else "") + "| peak RSS MiB |",
           "|---|---|---|---|---|---|---|" + ("---|---|" if memory else "") + "---|"]
    for r in results:
        out.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | {100 * r['linear_top1']:.1f}% "
                   f"| {100 * r['knn_top1']:.1f}% | {r['seconds_per_step']:.3f} "
                   f"| {r['final_metrics'].get('contrast_acc', float('nan')):.3f} "
                   + (f"| {r['queue_mib']:.2f} | {r['copy_mib']:.2f} " if memory else "")
                   + f"| {r['peak_rss_mb']:.0f} |")
    out += ["", f"| {column} | runs | mean linear top-1 | mean kNN top-1 | mean s/step |", "|---|---|---|---|---|"]
    for variant in COMPARISONS[args.compare]:
        rows = [r for r in results if r["variant"] == variant]
        if rows:
            out.append(f"| {variant} | {len(rows)} | {100 * statistics.mean(r['linear_top1'] for r in rows):.1f}% "
                       f"| {100 * statistics.mean(r['knn_top1'] for r in rows):.1f}% "
                       f"| {statistics.mean(r['seconds_per_step'] for r in rows):.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of every run (equal for both)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every seed runs both variants")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="memory")
    parser.add_argument("--out", default=None, help="where the Markdown table goes (default runs/bench/COMPARE.md)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory_size", type=int, default=4096)
    parser.add_argument("--memory_momentum", type=float, default=0.99)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--learning_rate", type=float, default=1.0)
    parser.add_argument("--warmup_epochs", type=float, default=1.0)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a row process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        row(args)
        return
    args.out = args.out or os.path.join(common.REPO_DIR, "runs", "bench", f"{args.compare}.md")
    if not os.path.exists(args.data):
        print(f"skipped: {args.data} not found (the CIFAR-10 dev subset lives in ../shared/data)")
        return
    shared = ["--data", os.path.abspath(args.data), "--steps", str(args.steps), "--batch", str(args.batch),
              "--memory_size", str(args.memory_size), "--memory_momentum", str(args.memory_momentum),
              "--depth", str(args.depth), "--width", str(args.width), "--learning_rate", str(args.learning_rate),
              "--warmup_epochs", str(args.warmup_epochs)]
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in COMPARISONS[args.compare]:  # alternate, so a change in the machine's load hits both alike
            result = common.run_row("memory.py", shared + ["--variant", variant, "--seed", str(seed)])
            if result is None:
                sys.exit(f"the {variant} run with seed {seed} failed")
            results.append(result)
    report = table(results, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report + f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
