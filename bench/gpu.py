"""Throughput of the SimCLR training step on an accelerator, in one command (`bench/gpu.sh` / `make bench-gpu`).

Compute only: one pre-made batch of view pairs is trained on repeatedly (no input pipeline), through the Keras
front door (`simclr_tf.SimCLR` + our ResNet + LARS), so it runs on whichever Keras backend the machine has:
TensorFlow when it is installed, else JAX (the backend-agnostic core; no TensorFlow needed). Prints a table:
config, precision, XLA, images/s (an image = one pair of views), ms per step.

    python bench/gpu.py                              # ResNet-50 at 224 px and ResNet-18 at 32 px, float32 and mixed
    python bench/gpu.py --configs r18_32 --batch 512 --steps 50
    KERAS_BACKEND=jax python bench/gpu.py ...        # force a backend

Mixed precision is bfloat16 where the device computes in it natively (TPUs, NVIDIA Ampere or newer, CPUs with
bfloat16 instructions), else float16 with loss scaling (Keras wraps the optimizer itself); variables, loss and
optimizer state stay float32.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Which backend: the one asked for, else TensorFlow when present, else JAX (the lent GPU machines have no TF).
if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "tensorflow" if importlib.util.find_spec("tensorflow") else "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

CONFIGS = {  # name: (ResNet depth, image size, default global batch)
    "r50_224": (50, 224, 256),
    "r18_32": (18, 32, 512),
}


def accelerator() -> str:
    """The device the backend computes on, in words."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}:{getattr(device, 'device_kind', '')}"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"gpu:{details.get('device_name', 'GPU')} x{len(gpus)}"
        return "cpu"
    return backend


def supports_bfloat16() -> bool:
    """bfloat16 compute is native: TPUs, NVIDIA compute capability >= 8.0, CPUs with bfloat16 instructions
    (the CLI's `--mixed_precision_dtype=auto` rule)."""
    from simclr_tf.hardware import cpu_has_native_bfloat16

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return cpu_has_native_bfloat16()
        if device.platform != "gpu":
            return True
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    if backend == "tensorflow":
        import tensorflow as tf

        from simclr_tf.models.build import gpus_have_native_bfloat16  # the CLI's rule

        if not tf.config.list_physical_devices("GPU"):
            return cpu_has_native_bfloat16()
        return gpus_have_native_bfloat16()
    return False


def measure(depth: int, image_size: int, batch: int, *, width: float, mixed: bool, xla: bool, steps: int,
            warmup: int) -> dict:
    """Images/s and ms/step of `steps` training steps after `warmup` (tracing, compiling) ones."""
    import simclr_tf
    from simclr_tf.models import ResNet

    policy = ("mixed_bfloat16" if supports_bfloat16() else "mixed_float16") if mixed else "float32"
    keras.config.set_dtype_policy(policy)
    try:
        model = simclr_tf.SimCLR(ResNet(depth, width, cifar_stem=image_size <= 32, name="resnet"),
                                 projection_layers=3, projection_dim=128, temperature=0.1)
        model.compile(optimizer=simclr_tf.LARS(0.3, weight_decay=1e-6), jit_compile=xla)
        rng = np.random.default_rng(0)
        views = rng.random((batch, image_size, image_size, 6), dtype=np.float32)
        for _ in range(warmup):
            model.train_on_batch(views)
        start = time.perf_counter()
        for _ in range(steps):
            logs = model.train_on_batch(views, return_dict=True)
        elapsed = time.perf_counter() - start  # train_on_batch returns host values: every step has finished
    finally:
        keras.config.set_dtype_policy("float32")
    if not np.isfinite(logs["loss"]):
        raise RuntimeError(f"non-finite loss {logs['loss']} (depth {depth}, {policy}, xla={xla})")
    return {"policy": policy, "images_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: each config's default)")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier")
    parser.add_argument("--precisions", default="float32,mixed")
    parser.add_argument("--xla", default="on,off", help="on, off or on,off")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    print(f"backend {keras.backend.backend()} on {accelerator()}; keras {keras.__version__}", flush=True)
    print("| config | batch | precision | XLA | images/s | ms/step |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"--configs: unknown {name!r} (known: {', '.join(CONFIGS)})")
        depth, size, default_batch = CONFIGS[name]
        for precision in args.precisions.split(","):
            for xla in args.xla.split(","):
                if keras.backend.backend() == "jax" and xla == "off":
                    continue  # JAX always compiles with XLA
                try:
                    r = measure(depth, size, args.batch or default_batch, width=args.width,
                                mixed=precision == "mixed", xla=xla == "on", steps=args.steps, warmup=args.warmup)
                    print(f"| {name} x{args.width:g} | {args.batch or default_batch} | {r['policy']} | {xla} | "
                          f"{r['images_per_s']:.0f} | {r['ms_per_step']:.1f} |", flush=True)
                except Exception as error:  # one failing combination (e.g. out of memory) must not end the table
                    print(f"| {name} x{args.width:g} | {args.batch or default_batch} | {precision} | {xla} | "
                          f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | |", flush=True)


if __name__ == "__main__":
    main()
