"""SimCLRv2 distillation (docs/design.md §9): the teacher, the objective, frozen teacher, unlabelled data, export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

# Four classes told apart by colour: a tiny teacher learns them in a few dozen steps, so the student's
# agreement with it has room to rise from chance.
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 230], [220, 210, 40]])
NUM_CLASSES = len(COLOURS)
SIZE = 16
TEACHER_STEPS = 30
# Fast BN moving averages: after a few dozen steps inference-mode BN must match the trained weights.
ARCH = dict(resnet_depth=18, image_size=SIZE, num_proj_layers=2, batch_norm_decay=0.7)
TRAIN = dict(train_split="train", eval_split="test", train_batch_size=16, optimizer="momentum",
             learning_rate=1.6, learning_rate_scaling="linear", warmup_epochs=0, weight_decay=0.0,
             strategy="one_device", seed=0, eval_batch_size=32, keep_checkpoint_max=1)


def colour_npz(path, n_train=128, n_test=32, seed=0, unlabelled=False):
    rng = np.random.RandomState(seed)

    def make(n):
        y = np.arange(n) % NUM_CLASSES
        # Brightness per image plus faint pixel noise: random crops keep the statistics of whole images.
        x = COLOURS[y][:, None, None, :] * rng.uniform(0.6, 1.1, (n, 1, 1, 1)) + rng.randint(
            -10, 10, (n, SIZE, SIZE, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    if unlabelled:
        y_train = np.full_like(y_train, -1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A real fine-tuned teacher (ResNet-18 0.25x, head on projection layer 1), its model_dir and export."""
    import keras

    from simclr_tf import app, export
    from simclr_tf.config import Config, validate
    from simclr_tf.train import Trainer, write_flags_json

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("distill")
    labelled = colour_npz(root / "colours.npz")
    unlabelled = colour_npz(root / "unlabelled.npz", unlabelled=True)
    config = validate(Config(**TRAIN, **ARCH, dataset=f"npz:{labelled}", train_mode="finetune",
                             model_dir=str(root / "teacher"), width_multiplier=0.25, ft_proj_selector=1,
                             train_steps=TEACHER_STEPS, checkpoint_steps=TEACHER_STEPS, steps_per_loop=10))
    strategy, source = app.prepare(config)
    write_flags_json(config)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    trainer.train()
    saved_model = export.export_model(trainer.model, model_dir=config.model_dir, step=TEACHER_STEPS,
                                      image_size=SIZE, keep=1)
    x_test = np.load(labelled)["x_test"].astype(np.float32) / 255.0
    accuracy = np.mean(np.argmax(trainer.model(x_test, training=False)["logits_sup"], -1)
                       == np.load(labelled)["y_test"])
    assert accuracy > 0.9, f"the teacher did not learn the colours ({accuracy})"  # precondition
    return dict(root=root, model=trainer.model, model_dir=config.model_dir, saved_model=saved_model,
                labelled=labelled, unlabelled=unlabelled, x_test=x_test)


def student_config(teacher_run, name, **changes):
    from simclr_tf.config import Config, validate

    values = dict(TRAIN, **ARCH, dataset=f"npz:{teacher_run['unlabelled']}", train_mode="distill",
                  model_dir=str(teacher_run["root"] / name), width_multiplier=0.125,
                  teacher_checkpoint=teacher_run["model_dir"], train_steps=40, checkpoint_steps=20,
                  steps_per_loop=10)
    values.update(changes)
    return validate(Config(**values))


def test_teacher_from_model_dir_prefix_and_saved_model_equals_the_fine_tuned_model(teacher_run):
    """flags.json gives width 0.25 and ft_proj_selector 1 (the student's flags say 0.125 and 0)."""
    import tensorflow as tf

    from simclr_tf.distill import build_teacher

    images = tf.random.stateless_uniform([6, SIZE, SIZE, 3], seed=[3, 4])
    want = teacher_run["model"](images, training=False)["logits_sup"].numpy()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    prefix = tf.train.latest_checkpoint(teacher_run["model_dir"])
    for path in (teacher_run["model_dir"], prefix, teacher_run["saved_model"]):
        config = student_config(teacher_run, "unused", teacher_checkpoint=path)
        teacher = build_teacher(config, strategy, NUM_CLASSES)
        assert teacher.num_classes == NUM_CLASSES and teacher.image_size == SIZE
        np.testing.assert_allclose(teacher(images).numpy(), want, atol=1e-4, err_msg=path)
    # A student at another resolution: the teacher sees the same view resized to its own size.
    config = student_config(teacher_run, "unused", image_size=24)
    big = tf.image.resize(images, [24, 24], method="bicubic")
    back = tf.clip_by_value(tf.image.resize(big, [SIZE, SIZE], method="bicubic"), 0.0, 1.0)
    np.testing.assert_allclose(build_teacher(config, strategy, NUM_CLASSES)(big).numpy(),
                               teacher_run["model"](back, training=False)["logits_sup"].numpy(), atol=1e-4)


def test_bad_teachers_are_usage_errors(teacher_run):
    import tensorflow as tf

    from simclr_tf.distill import build_teacher
    from simclr_tf.errors import UsageError

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    cases = [
        (dict(), 10, "--teacher_checkpoint: the teacher has 4 classes but the dataset"),
        (dict(teacher_checkpoint=teacher_run["saved_model"]), 3, "the teacher has 4 classes but"),
        (dict(teacher_width_multiplier=0.5), NUM_CLASSES, "does not match the teacher architecture"),
        (dict(teacher_resnet_depth=34), NUM_CLASSES, "does not match the teacher architecture"),
    ]
    for changes, classes, message in cases:
        with pytest.raises(UsageError) as err:
            build_teacher(student_config(teacher_run, "unused", **changes), strategy, classes)
        assert message in str(err.value) and "\n" not in str(err.value), (changes, str(err.value))
        assert err.value.where == "--teacher_checkpoint"


def test_distill_objective_matches_numpy_and_alpha_zero_reads_no_label(teacher_run):
    """Trainer.gradients_fn on a fixed batch: (1-a)*KL-style term + a*CE of the labelled rows, in NumPy."""
    import tensorflow as tf

    from simclr_tf import app
    from simclr_tf.distill import build_teacher
    from simclr_tf.train import Trainer

    rng = np.random.RandomState(5)
    images = tf.constant(rng.rand(8, SIZE, SIZE, 3).astype(np.float32))
    labels = tf.constant([0, 3, -1, 2, -1, 1, 1, 0], tf.int64)
    teacher_logits = teacher_run["model"](images, training=False)["logits_sup"].numpy().astype(np.float64)
    for alpha, tau in ((0.3, 2.0), (0.0, 0.5)):
        config = student_config(teacher_run, f"objective_{alpha}", distill_alpha=alpha, distill_temperature=tau)
        strategy, source = app.prepare(config)
        trainer = Trainer(config, strategy, source, teacher=build_teacher(config, strategy, NUM_CLASSES),
                          log=lambda _: None)
        compute = trainer.gradients_fn()
        metrics, grads = strategy.run(compute, args=(images, labels))
        student = trainer.model(images, training=True)["logits_sup"].numpy().astype(np.float64)
        distill = np.mean(-np.sum(softmax(teacher_logits / tau) * np.log(softmax(student / tau)), -1))
        valid = labels.numpy() >= 0
        ce = np.mean(-np.log(softmax(student)[valid, labels.numpy()[valid]]))
        np.testing.assert_allclose(float(metrics["distill_loss"]), distill, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["total_loss"]), (1 - alpha) * distill + alpha * ce, rtol=1e-5)
        agreement = np.mean(np.argmax(teacher_logits, -1) == np.argmax(student, -1))
        np.testing.assert_allclose(float(metrics["teacher_agreement"]), agreement)
        assert float(metrics["weight_decay"]) == 0.0
        # Labels only matter with alpha > 0: all -1 (or other labels) must leave the gradients unchanged.
        _, grads_unlabelled = strategy.run(compute, args=(images, tf.fill([8], tf.constant(-1, tf.int64))))
        # (Unused projection-head layers have no gradient: None in both.)
        same = all((a is None and b is None) or np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(grads, grads_unlabelled))
        if alpha == 0:
            assert "sup_loss" not in metrics and same
        else:
            np.testing.assert_allclose(float(metrics["sup_loss"]), ce, rtol=1e-5)
            assert not same


def read_scalars(directory, tag):
    import tensorflow as tf

    values = {}
    for path in tf.io.gfile.glob(os.path.join(str(directory), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_distillation_on_unlabelled_data_keeps_teacher_frozen_and_raises_agreement(teacher_run):
    import keras
    import tensorflow as tf

    from simclr_tf import app
    from simclr_tf.distill import build_teacher
    from simclr_tf.train import Trainer

    keras.utils.set_random_seed(1)
    config = student_config(teacher_run, "student")  # alpha 0, every train label -1
    strategy, source = app.prepare(config)
    assert {int(y) for _, y in source.as_dataset("train")} == {-1}
    teacher = build_teacher(config, strategy, source.num_classes)
    trainer = Trainer(config, strategy, source, teacher=teacher, log=lambda _: None)
    x = teacher_run["x_test"]

    def agreement():
        return np.mean(np.argmax(teacher(x).numpy(), -1)
                       == np.argmax(trainer.model(x, training=False)["logits_sup"].numpy(), -1))

    before_teacher = [v.numpy().copy() for v in teacher.variables]
    before_student = [v.numpy().copy() for v in trainer.model.trainable_variables]
    initial = agreement()
    trainer.train()
    final = agreement()
    # The teacher: every variable (BN moving statistics included) unchanged, none seen by the optimizer.
    assert len(before_teacher) > 50
    for value, variable in zip(before_teacher, teacher.variables):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    student_ids = {id(v) for v in trainer.model.variables}
    assert not any(id(v) in student_ids for v in teacher.variables)
    assert any(not np.array_equal(v.numpy(), b) for v, b in zip(trainer.model.trainable_variables, before_student))
    # Nor saved with the student: no tensor of the checkpoint has a shape only the (wider) teacher has.
    teacher_only = ({tuple(v.shape) for v in teacher.variables}
                    - {tuple(v.shape) for v in trainer.model.variables})
    assert len(teacher_only) > 5
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(config.model_dir)).get_variable_to_shape_map()
    assert not teacher_only & {tuple(shape) for shape in saved.values()}
    # Agreement: from chance to nearly all, on held-out images in inference mode, and in the summaries.
    assert initial < 0.6 and final >= 0.85, (initial, final)
    logged = read_scalars(config.model_dir, "train/teacher_agreement")
    assert sorted(logged) == [10, 20, 30, 40] and logged[40] > logged[10], logged
    assert set(read_scalars(config.model_dir, "train/distill_loss")) == {10, 20, 30, 40}


def test_official_teacher_matches_the_official_logits(golden_dir):
    """An official TF1 checkpoint as teacher: logits of the official eval graph for both head inputs."""
    import tensorflow as tf

    from simclr_tf.config import Config
    from simclr_tf.distill import build_teacher
    from simclr_tf.errors import UsageError

    path = golden_dir / "r18_1x8_cifar"
    expected = np.load(path / "expected_r18_1x8_cifar.npz")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    for selector in (0, 1):
        config = Config(train_mode="distill", teacher_checkpoint=str(path), image_size=32, model_dir="unused",
                        ft_proj_selector=selector)
        got = build_teacher(config, strategy, 10)(expected["x"]).numpy()
        want = expected[f"logits_sup_sel{selector}"]
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)
    with pytest.raises(UsageError, match="--teacher_resnet_depth: 50 does not match"):
        build_teacher(config.replace(teacher_resnet_depth=50), strategy, 10)
    with pytest.raises(UsageError, match="the teacher has 10 classes but"):
        build_teacher(config, strategy, 4)


# run.py's main on 2 logical CPU devices, split before anything initialises TensorFlow's devices.
SPLIT_CPU_AND_RUN = """
import sys
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from absl import flags
from simclr_tf import app, config
config.define_flags()
flags.FLAGS(sys.argv)
app.main(config.from_flags())
"""


def test_distill_end_to_end_two_replicas_saved_model_teacher_exports_and_serves(teacher_run):
    """run.py's main on 2 mirrored CPU replicas, SavedModel teacher, all-unlabelled train split, alpha 0: trains,
    evaluates, exports; the export serves like the fine-tuned teacher's and reproduces the eval top-1."""
    import tensorflow as tf

    from simclr_tf.data import augment

    model_dir = teacher_run["root"] / "e2e"
    args = [sys.executable, "-c", SPLIT_CPU_AND_RUN, "--mode=train_then_eval", "--train_mode=distill",
            f"--dataset=npz:{teacher_run['unlabelled']}", "--train_split=train", "--eval_split=test",
            f"--teacher_checkpoint={teacher_run['saved_model']}", f"--model_dir={model_dir}",
            "--strategy=mirrored", "--num_cpu_replicas=2", "--resnet_depth=18", "--width_multiplier=0.125",
            f"--image_size={SIZE}", "--num_proj_layers=2", "--train_batch_size=16", "--train_steps=6",
            "--checkpoint_steps=3", "--optimizer=momentum", "--learning_rate=1.6", "--warmup_epochs=0",
            "--eval_batch_size=10", "--distill_temperature=2", "--seed=0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 replica(s)" in proc.stdout and "teacher_agreement" in proc.stdout
    result = json.loads((model_dir / "result.json").read_text())
    assert result["global_step"] == 6 and result["num_examples"] == 32
    served = tf.saved_model.load(str(model_dir / "saved_model" / "6"))
    teacher = tf.saved_model.load(teacher_run["saved_model"])
    data = np.load(teacher_run["labelled"])
    views = tf.stack([augment.eval_view(tf.constant(image), SIZE) for image in data["x_test"]])
    out = served.signatures["serving_float"](images=views)
    assert set(out) == set(teacher.signatures["serving_float"](images=views[:2]))
    assert out["logits_sup"].shape == (32, NUM_CLASSES)
    top1 = np.mean(np.argmax(out["logits_sup"].numpy(), -1) == data["y_test"])
    assert abs(top1 - result["top1"]) < 1e-6, (top1, result)
