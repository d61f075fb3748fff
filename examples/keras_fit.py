"""SimCLR from Keras: `model.fit()` on the embedded MNIST subset (no download), then linear evaluation of the
pretrained encoder against a randomly initialised one, as `make demo` does for the command line.

    python examples/keras_fit.py [--epochs 10] [--model_dir runs/keras_fit]

A few minutes on 2 CPU cores at the defaults. Swap in any Keras encoder (see README "Use it from Keras").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import simclr_tf  # noqa: E402  (light: names load on first use)

simclr_tf.tune_malloc()  # before TensorFlow starts its threads: see simclr_tf.hardware.tune_malloc

import keras  # noqa: E402
from simclr_tf.linear_eval import linear_eval  # noqa: E402
from simclr_tf.models import ResNet  # noqa: E402


def make_model(num_classes: int, width: float, image_size: int) -> simclr_tf.SimCLR:
    # Our ResNet-18 (CIFAR stem) as a functional Keras model images -> h; any Keras model mapping images to a
    # vector or a feature map works the same way (keras.applications.ResNet50(include_top=False), ...).
    images = keras.Input((image_size, image_size, 3))
    encoder = keras.Model(images, ResNet(18, width, cifar_stem=True, name="resnet")(images)["h"], name="encoder")
    return simclr_tf.SimCLR(encoder, projection_layers=2, projection_dim=128, temperature=0.5,
                            num_classes=num_classes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps_per_epoch", type=int, default=0, help="0: one pass over the train split")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier")
    parser.add_argument("--model_dir", default="runs/keras_fit")
    parser.add_argument("--eval_epochs", type=int, default=100, help="epochs of the linear classifiers at the end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    source = simclr_tf.data.as_source("mnist_5k")  # train / test splits, 10 classes, shipped in the package
    steps = args.steps_per_epoch or simclr_tf.data.steps_per_epoch(source, args.batch_size)
    views = simclr_tf.data.pretraining_dataset(source, image_size=args.image_size, batch_size=args.batch_size,
                                               seed=args.seed, color_jitter_strength=0.5, use_blur=False)

    model = make_model(source.num_classes, args.width, args.image_size)
    model.build((None, args.image_size, args.image_size, 3))  # BackupAndRestore wants the variables up front
    total = args.epochs * steps
    schedule = simclr_tf.WarmupCosine(peak_learning_rate=1.0 * args.batch_size / 256, warmup_steps=steps,
                                      total_steps=total)
    model.compile(optimizer=simclr_tf.LARS(schedule, momentum=0.9, weight_decay=1e-4))

    callbacks = [
        simclr_tf.callbacks.KNNMonitor(source, image_size=args.image_size, every_n_epochs=max(1, args.epochs // 2)),
        simclr_tf.callbacks.CollapseMonitor(),
        keras.callbacks.TensorBoard(os.path.join(args.model_dir, "tensorboard")),
        keras.callbacks.BackupAndRestore(os.path.join(args.model_dir, "backup")),
    ]
    start = time.monotonic()
    history = model.fit(views, epochs=args.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=2)
    minutes = (time.monotonic() - start) / 60

    os.makedirs(args.model_dir, exist_ok=True)
    model.save(os.path.join(args.model_dir, "simclr.keras"))
    model.encoder.save(os.path.join(args.model_dir, "encoder.keras"))
    export = simclr_tf.export_model(model, model_dir=args.model_dir, step=total, image_size=args.image_size,
                                    keep=1, class_names=source.class_names)

    print("linear eval on frozen features (cached h, softmax classifier)", flush=True)
    pretrained = linear_eval(model, source, image_size=args.image_size, epochs=args.eval_epochs, seed=args.seed)
    random_init = make_model(source.num_classes, args.width, args.image_size)
    random_init.build((None, args.image_size, args.image_size, 3))
    baseline = linear_eval(random_init, source, image_size=args.image_size, epochs=args.eval_epochs,
                           seed=args.seed)
    print(f"\nSimCLR fit(): {total} steps in {minutes:.1f} min; SavedModel in {export}")
    print(f"linear eval top-1, pretrained encoder : {pretrained['top1']:.4f}")
    print(f"linear eval top-1, random-init encoder: {baseline['top1']:.4f}")
    return {"pretrained": pretrained, "random_init": baseline, "export": export, "model": model,
            "history": history.history, "source": source}


if __name__ == "__main__":
    main()
