"""Accuracy at a wall-clock budget: SimCLR pretraining on the CIFAR-10 dev subset, then linear-eval and kNN
top-1 of the encoder, against the same protocol on a randomly initialised encoder.

The schedule length is set from a short calibration run, so that the warmup + cosine schedule ends at about the
budget; a timer stops training at the budget in any case (the loop finishes its current chunk of steps).

    python bench/accuracy.py --data ../shared/data/cifar10_dev.npz --budget_minutes 20
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.setup_path()

import tensorflow as tf  # noqa: E402

from simclr_tf import app as simclr_app  # noqa: E402
from simclr_tf import config as config_lib  # noqa: E402
from simclr_tf import knn, linear_eval  # noqa: E402
from simclr_tf.models import build_model
from simclr_tf.train import Trainer  # noqa: E402

CALIBRATION_STEPS = 4


def make_config(args: argparse.Namespace, model_dir: str, train_steps: int, steps_per_loop: int):
    return config_lib.validate(config_lib.Config(
        mode="train", train_mode="pretrain", dataset=f"npz:{args.data}", train_split="train", eval_split="test",
        model_dir=model_dir, resnet_depth=args.depth, width_multiplier=args.width, image_size=32,
        train_batch_size=args.batch, eval_batch_size=500, train_steps=train_steps, checkpoint_steps=train_steps,
        steps_per_loop=steps_per_loop, learning_rate=args.learning_rate, learning_rate_scaling="linear",
        weight_decay=1e-4, temperature=0.5, color_jitter_strength=0.5, use_blur=False, num_proj_layers=2,
        warmup_epochs=args.warmup_epochs, keep_checkpoint_max=1))


def seconds_per_step(args: argparse.Namespace, workdir: str) -> float:
    """Times CALIBRATION_STEPS steps after a first (compiling) chunk, with a throwaway trainer."""
    config = make_config(args, os.path.join(workdir, "calibrate"), 2 * CALIBRATION_STEPS, CALIBRATION_STEPS)
    strategy, source = simclr_app.prepare(config)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    times = []
    trainer.log = lambda _: times.append(time.monotonic())
    trainer.train()
    # log() calls: restore, "training ...", one progress line per chunk.
    return (times[-1] - times[-2]) / CALIBRATION_STEPS


def evaluate(model, source, strategy) -> dict:
    lin = linear_eval.linear_eval(model, source, image_size=32, batch_size=500, strategy=strategy)
    nn = knn.evaluate_knn(model, source, image_size=32, batch_size=500, strategy=strategy)
    return {"linear_top1": lin["top1"], "linear_top5": lin["top5"], "knn_top1": nn["knn_top1"],
            "num_train": lin["num_train"], "num_eval": lin["num_examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--budget_minutes", type=float, default=20.0)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1.0)
    parser.add_argument("--warmup_epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tf.keras.utils.set_random_seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="simclr_bench_acc_")
    try:
        step_seconds = seconds_per_step(args, workdir)
        budget = 60.0 * args.budget_minutes
        train_steps = max(10, int(0.95 * budget / step_seconds))
        config = make_config(args, os.path.join(workdir, "run"), train_steps, min(50, train_steps))
        strategy, source = simclr_app.prepare(config)
        print(f"calibration: {step_seconds:.2f} s/step -> {train_steps} steps "
              f"({train_steps * args.batch / source.num_train:.1f} epochs) for a {args.budget_minutes:g} min budget",
              flush=True)
        trainer = Trainer(config, strategy, source, log=lambda m: print(m, flush=True))
        # Hard cap at the budget: the same stop request SIGTERM makes (finish the chunk, save, return).
        stopper = threading.Timer(budget, trainer.request_stop)
        start = time.monotonic()
        stopper.start()
        try:
            trainer.train()
        finally:
            stopper.cancel()
        train_seconds = time.monotonic() - start
        steps_done = int(trainer.global_step.numpy())
        pretrained = evaluate(trainer.model, source, strategy)
        random_init = evaluate(build_model(config.model, source.num_classes, strategy), source, strategy)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"pretrained: {pretrained}\nrandom init: {random_init}", flush=True)
    common.emit({"config": {k: v for k, v in vars(args).items() if k != "data"}, "train_steps": train_steps,
                 "steps_done": steps_done, "train_minutes": round(train_seconds / 60, 2),
                 "epochs": round(steps_done * args.batch / source.num_train, 2),
                 "seconds_per_step_calibration": round(step_seconds, 3),
                 "pretrained": pretrained, "random_init": random_init})


if __name__ == "__main__":
    main()
