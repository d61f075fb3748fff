"""Runs the official SimCLR TF2 code (google-research/simclr `tf2/run.py`) on an `.npz` of images, unmodified.

The official code reads its data through `tfds.builder(FLAGS.dataset)`; with no download possible here, this
wrapper puts a stand-in builder in its place that serves the arrays of an `.npz` (`x_train`/`y_train`,
`x_test`/`y_test`, uint8 NHWC, as our `npz:` source reads them) with the TFDS interface the official
`data.py` and `run.py` use (`info.splits[...].num_examples`, `info.features['label'].num_classes`,
`as_dataset(split, shuffle_files, as_supervised, read_config)` honouring the input context's shard).
Everything else is the official code as checked out. It runs under `tf_keras` (Keras 2), which it needs on
TensorFlow >= 2.16; `pip install tf_keras` matching the TensorFlow version.

One timing aid, stated in bench/vs_official.py's output: the official loop saves a checkpoint after every
`--checkpoint_steps` steps and runs exactly that many steps per host call, so per-step times need
`--checkpoint_steps=1`; with `--final_save_only` (this wrapper's flag, default on) those saves are skipped
except the last one, so the timed steps are training steps, as on our side.

    python bench/official_shim.py --official_dir PATH --npz FILE -- <official run.py flags>
"""
from __future__ import annotations

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the official code is Keras 2 code; must precede TensorFlow's import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _split_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """This wrapper's `--name value` options before `--`, the official flags after it."""
    if "--" not in argv:
        raise SystemExit("usage: official_shim.py --official_dir PATH --npz FILE [--final_save_only 0|1] -- FLAGS")
    cut = argv.index("--")
    mine, rest = argv[:cut], argv[cut + 1:]
    options = {"final_save_only": "1"}
    for i in range(0, len(mine), 2):
        if not mine[i].startswith("--") or i + 1 >= len(mine):
            raise SystemExit(f"official_shim.py: expected '--name value', got {mine[i:i + 2]}")
        options[mine[i][2:]] = mine[i + 1]
    for name in ("official_dir", "npz"):
        if name not in options:
            raise SystemExit(f"official_shim.py: --{name} is required")
    return options, rest


class _Split:
    def __init__(self, num_examples: int) -> None:
        self.num_examples = num_examples


class _Label:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes


class _Info:
    def __init__(self, arrays: dict) -> None:
        self.splits = {split: _Split(len(arrays[f"y_{split}"])) for split in ("train", "test")}
        self.features = {"label": _Label(int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1)}


class NpzBuilder:
    """The part of a `tfds.core.DatasetBuilder` the official code calls, over in-memory arrays."""

    def __init__(self, path: str) -> None:
        import numpy as np

        with np.load(path) as data:
            self.arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        images = self.arrays["x_train"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise SystemExit(f"{path}: x_train must be uint8 NHWC with 3 channels, got shape {images.shape}")
        self.info = _Info(self.arrays)

    def download_and_prepare(self) -> None:
        pass

    def as_dataset(self, split: str, shuffle_files: bool = False, as_supervised: bool = True,
                   read_config=None):
        import tensorflow as tf

        if split not in self.info.splits:
            raise SystemExit(f"the npz stand-in has splits train and test, not {split!r}")
        dataset = tf.data.Dataset.from_tensor_slices((self.arrays[f"x_{split}"], self.arrays[f"y_{split}"]))
        context = getattr(read_config, "input_context", None)
        if context is not None and context.num_input_pipelines > 1:
            dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
        return dataset


def main() -> None:
    options, official_flags = _split_argv(sys.argv[1:])
    tf2 = os.path.join(os.path.abspath(options["official_dir"]), "tf2")
    if not os.path.isfile(os.path.join(tf2, "run.py")):
        raise SystemExit(f"--official_dir: {tf2}/run.py not found (a checkout of google-research/simclr?)")
    sys.path.insert(0, tf2)

    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = NpzBuilder(options["npz"])
    tfds.builder = lambda name, data_dir=None, **kwargs: builder
    if options["final_save_only"] == "1":
        _keep_final_save_only(tf)

    import run as official_run  # noqa: E402  (the official tf2/run.py, its flags defined on import)
    from absl import app

    tf.compat.v1.enable_v2_behavior()
    tf.config.set_soft_device_placement(True)
    app.run(official_run.main, argv=[os.path.join(tf2, "run.py"), *official_flags])


def _keep_final_save_only(tf) -> None:
    """Makes `CheckpointManager.save` write only at the run's last step (read from the official flags)."""
    original = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, *args, **kwargs):
        from absl import flags

        import model as official_model  # tf2/model.py

        flags_ = flags.FLAGS
        import tensorflow_datasets as tfds

        total = official_model.get_train_steps(tfds.builder(flags_.dataset).info.splits[flags_.train_split]
                                               .num_examples)
        if checkpoint_number is not None and int(checkpoint_number) < total:
            return None
        return original(self, checkpoint_number, *args, **kwargs)

    tf.train.CheckpointManager.save = save


if __name__ == "__main__":
    main()
