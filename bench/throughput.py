"""One throughput row: a full SimCLR pretraining step with the real input pipeline, the same step on a pre-made
batch (compute only), a plain supervised Keras step of the same backbone and, optionally, a PyTorch SimCLR
step on the same backbone -- measured in alternating rounds in this one process, so load from other processes
hits all of them alike.

Each measurement runs `--steps` steps inside the trainer's own multi-step loop (one host round-trip) and
reports source images per second (a SimCLR image is two views). FLOPs: the model's forward float ops counted
by TF's profiler on the frozen inference graph; a training step costs about 3x forward (forward + two
backward matmuls per layer) on each of the two views.

    python bench/throughput.py --depth 18 --image_size 32 --batch 256 [--torch] [--replicas 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.setup_path()
# Under an oversubscribed CPU, OpenMP threads that spin while waiting starve each other: torch (OpenMP) runs
# several times slower with the default policy. TF does not use OpenMP, so this only helps the baseline.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tensorflow as tf  # noqa: E402

from simclr_tf import config as config_lib  # noqa: E402
from simclr_tf.data import pipeline  # noqa: E402
from simclr_tf.sections import AugmentConfig  # noqa: E402
from simclr_tf.strategy import build_strategy  # noqa: E402

NUM_CLASSES = 10
NUM_SOURCE_IMAGES = 256


def source_for(image_size: int):
    """CIFAR-like 32x32 sources for 32 px, ImageNet-like 256x320 JPEG-decoded sources above."""
    import augment as augment_bench  # bench/augment.py

    if image_size <= 32:
        images = tf.image.convert_image_dtype(
            tf.random.stateless_uniform([NUM_SOURCE_IMAGES, 32, 32, 3], seed=[0, 3]), tf.uint8)
    else:
        images = augment_bench.jpeg_decoded_images(NUM_SOURCE_IMAGES)
    return augment_bench.in_memory_source(images)


def make_config(args: argparse.Namespace, model_dir: str):
    return config_lib.validate(config_lib.Config(
        mode="train", train_mode="pretrain", dataset="bench", model_dir=model_dir, resnet_depth=args.depth,
        width_multiplier=args.width, image_size=args.image_size, train_batch_size=args.batch,
        train_steps=10**6, checkpoint_steps=10**6, steps_per_loop=args.steps, learning_rate=0.3,
        weight_decay=1e-6, temperature=0.1, use_blur=True, num_cpu_replicas=args.replicas,
        global_bn=args.global_bn))


def forward_flops_per_image(model, image_size: int) -> float:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: model(x, training=False)["proj_head_output"])
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, 3], tf.float32)))
    options = tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return float(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def matmul_peak_flops(n: int = 2048, seconds: float = 3.0) -> float:
    """float32 FLOP/s of a large TF matmul on all cores (the machine's practical peak)."""
    a = tf.random.stateless_normal([n, n], seed=[1, 1])
    b = tf.random.stateless_normal([n, n], seed=[1, 2])

    @tf.function
    def run(k):
        acc = tf.zeros([n, n])
        for _ in tf.range(k):
            acc += tf.matmul(a, b)
        return acc

    run(tf.constant(1)).numpy()
    reps, best = 4, 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        run(tf.constant(reps)).numpy()
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - t0))
    return best


def supervised_loop(args: argparse.Namespace, strategy):
    """A plain supervised Keras training step (ResNet + Dense, softmax CE, SGD momentum) on the same backbone."""
    import keras

    from simclr_tf.models.resnet import ResNet

    with strategy.scope():
        backbone = ResNet(args.depth, args.width, cifar_stem=args.image_size <= 32, global_bn=args.global_bn)
        head = keras.layers.Dense(NUM_CLASSES)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        backbone(tf.zeros([1, args.image_size, args.image_size, 3]))
        head(tf.zeros([1, backbone.output_dim]))
        variables = backbone.trainable_variables + head.trainable_variables
        optimizer.build(variables)

    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = head(backbone(images, training=True)["h"])
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function
    def loop(iterator, num_steps):
        loss = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss = strategy.reduce("MEAN", strategy.run(step, args=next(iterator)), axis=None)
        return loss

    return loop


def constant_input(strategy, images: tf.Tensor, labels: tf.Tensor):
    """A distributed dataset repeating one pre-made global batch (each replica gets its share)."""
    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        n = images.shape[0] // ctx.num_replicas_in_sync
        part = slice(ctx.input_pipeline_id * n, (ctx.input_pipeline_id + 1) * n)
        return tf.data.Dataset.from_tensors((images[part], labels[part])).repeat()

    return iter(strategy.distribute_datasets_from_function(input_fn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps per measurement (one host round-trip)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--global_bn", type=int, default=1)
    parser.add_argument("--modes", default="full,compute,supervised", help="subset of full,compute,supervised")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch SimCLR step")
    parser.add_argument("--flops", action="store_true", help="count FLOPs and measure the matmul peak")
    args = parser.parse_args()
    modes = args.modes.split(",")

    from simclr_tf.train import Trainer  # after the strategy split the CPU

    strategy = build_strategy("auto", num_cpu_replicas=args.replicas)
    source = source_for(args.image_size)
    model_dir = tempfile.mkdtemp(prefix="simclr_bench_tp_")
    config = make_config(args, model_dir)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    input_fn = pipeline.build_input_fn(source, mode="pretrain", global_batch_size=args.batch,
                                       augment=AugmentConfig(args.image_size))
    full_iter = iter(strategy.distribute_datasets_from_function(input_fn))
    batch_images, batch_labels = next(iter(input_fn(tf.distribute.InputContext())))
    batch_images = tf.identity(batch_images)
    compute_iter = constant_input(strategy, batch_images, batch_labels)
    steps = tf.constant(args.steps)

    runners = {}
    if "full" in modes:
        runners["full"] = lambda: trainer.run_steps(full_iter, args.steps)["total_loss"]
    if "compute" in modes:
        runners["compute"] = lambda: trainer.run_steps(compute_iter, args.steps)["total_loss"]
    if "supervised" in modes:
        sup = supervised_loop(args, strategy)
        sup_iter = constant_input(strategy, batch_images[..., :3], batch_labels)
        runners["supervised"] = lambda: float(sup(sup_iter, steps))
    if args.torch:
        try:
            import torch_simclr
        except ImportError as e:
            print(f"torch row skipped: {e}", flush=True)
        else:
            torch_step = torch_simclr.make_step(args.depth, args.width, args.image_size, batch_images.numpy(),
                                                batch_labels.numpy(), NUM_CLASSES)
            runners["torch"] = lambda: torch_step(args.steps)

    for name, run in runners.items():  # warm-up: tracing, compilation, first batches
        t0 = time.perf_counter()
        run()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            with common.Timer() as t:
                run()
            times[name].append(t.wall)
            cpu_times[name].append(t.cpu)
            print(f"round {r} {name}: {t.wall / args.steps:.3f} s/step", flush=True)
            if name == "full":
                time.sleep(1.0)  # let the pipeline refill its buffer off the clock, not in the next round

    result = {"config": vars(args), "images_per_step": args.batch, "sec_per_step": {}, "images_per_s": {},
              "images_per_cpu_s": {}}
    for name in runners:
        wall = statistics.median(times[name]) / args.steps
        cpu = statistics.median(cpu_times[name]) / args.steps
        result["sec_per_step"][name] = round(wall, 4)
        result["images_per_s"][name] = round(args.batch / wall, 2)
        result["images_per_cpu_s"][name] = round(args.batch / cpu, 2)
    if args.flops:
        fwd = forward_flops_per_image(trainer.model, args.image_size)
        result["forward_gflops_per_view"] = round(fwd / 1e9, 4)
        result["matmul_peak_gflops"] = round(matmul_peak_flops() / 1e9, 1)
        if "compute" in result["images_per_s"]:
            result["achieved_gflops_compute"] = round(6 * fwd * result["images_per_s"]["compute"] / 1e9, 1)
    common.emit(result)


if __name__ == "__main__":
    main()
