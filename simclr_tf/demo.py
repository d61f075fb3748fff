"""`make demo`: pretrain on the embedded dataset, then compare linear-eval accuracy of the pretrained encoder
with a randomly initialised one under the same protocol.

    python -m simclr_tf.demo [--model_dir=runs/demo] [any run.py flag to override flags/demo.flags]
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from simclr_tf import config as config_lib  # noqa: E402

DEMO_FLAGS = pathlib.Path(__file__).resolve().parents[1] / "flags" / "demo.flags"


def run_demo(config: config_lib.Config) -> dict:
    import tensorflow as tf

    from simclr_tf import app as simclr_app
    from simclr_tf import linear_eval
    from simclr_tf.models import build_model
    from simclr_tf.train import Trainer

    simclr_app.configure_logging()
    if config.seed is not None:
        tf.keras.utils.set_random_seed(config.seed)
    strategy, source = simclr_app.prepare(config)
    print(f"[demo] dataset {source.name}: {source.num_train} train / {source.num_eval} test images, "
          f"{source.num_classes} classes; ResNet-{config.resnet_depth} x{config.width_multiplier:g} at "
          f"{config.image_size} px", flush=True)
    start = time.monotonic()
    trainer = Trainer(config, strategy, source)
    trainer.train()
    step = int(trainer.global_step.numpy())
    online = simclr_app.evaluate_and_record(config, trainer.model, source, strategy, step, print)
    simclr_app.export_run(config, trainer.model, step, print)
    train_minutes = (time.monotonic() - start) / 60

    print("[demo] linear eval on frozen features (cached h, softmax classifier)", flush=True)
    pretrained = linear_eval.linear_eval(trainer.model, source, image_size=config.image_size,
                                         batch_size=config.eval_batch_size, seed=config.seed or 0)
    random_init = build_model(config.model, source.num_classes, strategy,
                              mixed_precision=config.mixed_precision_request)
    baseline = linear_eval.linear_eval(random_init, source, image_size=config.image_size,
                                       batch_size=config.eval_batch_size, seed=config.seed or 0)
    print()
    print(f"[demo] SimCLR pretraining: {step} steps in {train_minutes:.1f} min")
    print(f"[demo] online linear head top-1 (trained during pretraining): {online.get('top1', float('nan')):.4f}")
    print(f"[demo] linear eval top-1, pretrained encoder : {pretrained['top1']:.4f}")
    print(f"[demo] linear eval top-1, random-init encoder: {baseline['top1']:.4f}")
    print(f"[demo] outputs in {config.model_dir} (checkpoints, TensorBoard summaries, result.json, saved_model/)")
    return {"online": online, "pretrained": pretrained, "random_init": baseline}


def main(argv):
    config = config_lib.from_command_line(argv, flags.FLAGS)
    if flags.FLAGS["model_dir"].value == "runs/demo" and os.path.isdir(config.model_dir):
        shutil.rmtree(config.model_dir)  # the default demo directory always starts fresh
    run_demo(config)


if __name__ == "__main__":
    config_lib.define_flags()
    flags.FLAGS.set_default("model_dir", "runs/demo")
    argv = [sys.argv[0], f"--flagfile={DEMO_FLAGS}", *sys.argv[1:]]
    app.run(main, argv=argv)
