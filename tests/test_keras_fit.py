"""The Keras front door: `simclr_tf.SimCLR` + `fit()` against the CLI's step, other encoders, the JAX backend,
the callbacks, saving and export, and the runnable example."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from simclr_tf.models import ResNet
from tests.conftest import REPO, write_npz

QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def tiny_simclr(num_classes=4, **kwargs):
    return simclr_tf.SimCLR(ResNet(18, 0.125, cifar_stem=True, name="resnet"), projection_layers=2,
                            temperature=0.5, num_classes=num_classes, **kwargs)


def view_batch(n=8, size=16, seed=1, labelled=True):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 4, n) if labelled else np.full(n, -1)
    return rng.rand(n, size, size, 6).astype(np.float32), labels


def relative_errors(a: dict, b: dict, keys) -> dict:
    return {k: float(np.abs(a[k] - b[k]).max()) / max(float(np.abs(b[k]).max()), 1e-6) for k in keys}


# ------------------------------------------------------------------------------------------ worker processes


class Worker:
    """A worker process started now and read when a test needs it: the two workers of this module (each mostly
    one busy core of tracing and compiling) run beside the in-process tests instead of after them."""

    def __init__(self, args, out, env, tmp):
        self.out = out
        self.log = open(tmp / f"{out.stem}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, *map(str, args), f"--out={out}"], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def result(self, timeout=900) -> dict:
        code = self.proc.wait(timeout=timeout)
        self.log.seek(0)
        self.output = self.log.read()
        assert code == 0, self.output[-3000:]
        return dict(np.load(self.out))


@pytest.fixture(scope="module", autouse=True)
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keras_fit_workers")
    # fit() vs the CLI loop: two batches, the second with unlabelled rows, which the online head skips: one in
    # each replica's half, because its loss is a mean over each replica's labelled rows (as in the reference),
    # which equals the global mean only for equal counts.
    data = write_npz(tmp / "tiny.npz", classes=4)
    first, second = view_batch(seed=1), view_batch(seed=2)
    second[1][[1, 6]] = -1
    np.savez(tmp / "batches.npz", images0=first[0], labels0=first[1], images1=second[0], labels1=second[1])
    fit_vs_cli = Worker([REPO / "tests" / "fit_step_worker.py", f"--data={data}", f"--batches={tmp / 'batches.npz'}",
                         f"--model_dir={tmp}"], tmp / "fit_vs_cli.npz",
                        {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}, tmp)  # TF's log says whether XLA ran
    # The JAX backend: three fit() steps from these weights on this batch.
    images, labels = view_batch(seed=7)
    labels[::4] = -1
    keras.utils.set_random_seed(0)
    model = tiny_simclr()
    model.build((None, 16, 16, 6))
    np.savez(tmp / "jax_inputs.npz", images=images, labels=labels,
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    # jax is in requirements.txt: a missing one fails the JAX test with the worker's ImportError.
    jax = Worker([REPO / "tests" / "jax_fit_worker.py", f"--inputs={tmp / 'jax_inputs.npz'}", "--steps=3"],
                 tmp / "jax.npz", {**QUIET, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}, tmp)
    yield {"fit_vs_cli": fit_vs_cli, "jax": jax, "jax_inputs": tmp / "jax_inputs.npz"}
    for worker in (fit_vs_cli, jax):
        if worker.proc.poll() is None:
            worker.proc.kill()


@pytest.fixture(scope="module")
def fit_and_cli_steps(workers):
    return workers["fit_vs_cli"].result()


# ------------------------------------------------------------------------------------------ other encoders


def lars_exclusions_by_layer(model, optimizer):
    """(excluded, decayed) variable counts, checked against each layer's type."""
    excluded = decayed = 0
    for layer in model.encoder._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            for v in layer.trainable_weights:
                assert optimizer.is_excluded(v), v.path
                excluded += 1
            continue
        for name in ("kernel", "depthwise_kernel"):
            v = getattr(layer, name, None)
            if isinstance(v, keras.Variable) and v.trainable:
                assert not optimizer.is_excluded(v), v.path
                decayed += 1
        bias = getattr(layer, "bias", None)
        if isinstance(bias, keras.Variable):
            assert optimizer.is_excluded(bias), bias.path
            excluded += 1
    for v in model.supervised_head.weights:
        assert optimizer.is_excluded(v)
    return excluded, decayed


# ConvNeXt rescales 0..255 inputs itself (include_preprocessing): our [0, 1] views are scaled up for it.
# ResNet50 is in the slow set (80 s here): ConvNeXtTiny covers a keras.applications encoder in the default run,
# and our own ResNet, the same residual family, trains through fit() in the step-equality tests.
@pytest.mark.parametrize("family, input_scale", [pytest.param("ResNet50", 1.0, marks=pytest.mark.slow),
                                                 ("ConvNeXtTiny", 255.0)])
def test_keras_applications_encoder_trains(family, input_scale):
    """A keras.applications encoder (weights=None) at 32 px: LARS exclusions by layer object, and the
    contrastive loss falls on a fixed batch."""
    base = getattr(keras.applications, family)(weights=None, include_top=False, input_shape=(32, 32, 3))
    images_in = keras.Input((32, 32, 3))
    # A feature map [b, 1, 1, C]: SimCLR average-pools it.
    encoder = keras.Model(images_in, base(keras.layers.Rescaling(input_scale)(images_in)), name=family)
    model = simclr_tf.SimCLR(encoder, projection_dim=64, temperature=0.2, num_classes=4)
    optimizer = simclr_tf.LARS(3.0, weight_decay=1e-6)
    model.compile(optimizer=optimizer)
    images, labels = view_batch(n=16, size=32, seed=3)
    history = model.fit(tf.data.Dataset.from_tensors((images, labels)).repeat(), epochs=8, steps_per_epoch=1,
                        verbose=0)
    excluded, decayed = lars_exclusions_by_layer(model, optimizer)
    assert excluded > 50 and decayed > 50
    # The online head (plain momentum at this rate, as in the reference) may grow large; the loss stays finite.
    assert np.all(np.isfinite(history.history["loss"]))
    losses = history.history["contrast_loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_our_resnet_exclusions_match_the_cli():
    """For our ResNet, fit()'s type-based exclusions are exactly the CLI's (models.weight_decay_exempt_variables)."""
    from simclr_tf.models import SimCLRModel, weight_decay_exempt_variables

    cli = SimCLRModel(resnet_depth=18, width_multiplier=0.125, se_ratio=0.25, image_size=16, num_proj_layers=2,
                      num_classes=4)
    cli(np.zeros((1, 16, 16, 3), np.float32))
    fit = simclr_tf.SimCLR(cli.backbone, projection_layers=2, num_classes=4)
    fit.build((None, 16, 16, 3))
    # The backbone's variables are the same objects in both models, so the sets compare by identity.
    backbone = {id(v) for v in cli.backbone.weights}
    cli_exempt = {id(v) for v in weight_decay_exempt_variables(cli)} & backbone
    fit_exempt = {id(v) for v in fit.weight_decay_exempt_variables()} & backbone
    assert cli_exempt == fit_exempt and len(cli_exempt) > 40
    assert any("bias" in v.path for v in cli.backbone.weights if id(v) in fit_exempt)  # SE biases counted


def test_endless_dataset_without_steps_per_epoch_is_one_clear_error():
    from simclr_tf.errors import UsageError

    x = np.random.RandomState(0).randint(0, 256, (32, 16, 16, 3)).astype(np.uint8)
    views = simclr_tf.data.pretraining_dataset(x, image_size=16, batch_size=8, use_blur=False)
    model = tiny_simclr(num_classes=0)
    model.compile(optimizer=simclr_tf.LARS(0.1))
    with pytest.raises(UsageError, match="steps_per_epoch"):
        model.fit(views, epochs=1)
    assert not model.optimizer.iterations.numpy()  # refused before any step
    assert simclr_tf.data.steps_per_epoch(x, 8) == 4


# ------------------------------------------------------------------------------------------ collapse monitor


def test_projection_std_reads_one_over_sqrt_d_or_zero():
    """~1/sqrt(d) for random unit vectors (uniform on the sphere), 0 for collapsed (identical) ones."""
    rng = np.random.RandomState(0)
    for d in (16, 128):
        z = rng.randn(4096, d).astype(np.float32) * 3.0  # any scale: the rows are normalised first
        spread = float(simclr_tf.projection_std(z))
        assert abs(spread * np.sqrt(d) - 1.0) < 0.03, (d, spread)
        collapsed = np.tile(rng.randn(1, d).astype(np.float32), (4096, 1))
        # float32 rounding of the mean leaves ~1e-6, a millionth of the healthy value's order.
        assert float(simclr_tf.projection_std(collapsed)) * np.sqrt(d) < 1e-4

    monitor = simclr_tf.callbacks.CollapseMonitor(warn_below=0.1, stop_training=True)
    model = tiny_simclr()
    model.build((None, 16, 16, 3))
    monitor.set_model(model)
    model.stop_training = False  # as fit() sets it
    logs = {"proj_std": 1.0 / np.sqrt(model.projection_output_dim)}
    monitor.on_epoch_end(0, logs)
    assert logs["collapse_ratio"] == pytest.approx(1.0) and not model.stop_training
    logs = {"proj_std": 1e-4}
    monitor.on_epoch_end(1, logs)
    assert logs["collapse_ratio"] < 0.1 and model.stop_training and monitor.collapsed_at == 1


# ------------------------------------------------------------------------------------------ JAX backend


def test_fit_under_the_jax_backend_matches_tensorflow(workers):
    """Three fit() steps of our ResNet under KERAS_BACKEND=jax, TensorFlow unimportable there: the same losses
    and weights as the same steps under TensorFlow."""
    from tests.jax_fit_worker import run

    jax_result = workers["jax"].result()
    inputs = workers["jax_inputs"]
    tf_losses, tf_weights = run(str(inputs), 3)
    np.testing.assert_allclose(jax_result["losses"], tf_losses, rtol=1e-4)
    initial = np.load(inputs)
    moved = 0
    for i, w in enumerate(tf_weights):
        scale = max(float(np.abs(w).max()), 1e-6)
        # XLA:CPU and TF's oneDNN kernels sum convolutions in different orders; three steps through training-mode
        # BN and LARS's per-layer ratios grow that to ~2e-4 of an array's scale (a wrong formula shows as O(1)).
        np.testing.assert_allclose(jax_result[f"w{i}"], w, atol=1e-3 * scale + 1e-7, err_msg=f"w{i}")
        moved += not np.allclose(w, initial[f"w{i}"])
    assert moved > 20


# ------------------------------------------------------------------------------------------ the example


def test_keras_fit_example_saves_loads_and_exports(tmp_path, capsys):
    """examples/keras_fit.py at tiny size (in this process): fit() with the kNN and collapse monitors, TensorBoard
    and BackupAndRestore; then model.save / load_model(safe_mode=True) restores outputs, optimizer state and LARS
    exclusions (a further step is identical on both), encoder.keras and the SavedModel export agree."""
    import importlib.util

    from simclr_tf.knn import evaluate_knn

    spec = importlib.util.spec_from_file_location("keras_fit_example", REPO / "examples" / "keras_fit.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = tmp_path / "run"
    result = example.main(["--epochs=2", "--steps_per_epoch=2", "--batch_size=32", "--image_size=16",
                           "--width=0.125", "--eval_epochs=5", f"--model_dir={run}"])
    out = capsys.readouterr().out
    assert "knn_top1" in out and "collapse_ratio" in out
    for line in ("linear eval top-1, pretrained encoder", "linear eval top-1, random-init encoder"):
        assert line in out
    model, history = result["model"], result["history"]
    for key in ("loss", "contrast_loss", "contrast_acc", "sup_acc", "proj_std", "knn_top1", "collapse_ratio"):
        assert len(history[key]) == 2, key
    # The monitor's last value is the CLI's kNN evaluation of the final encoder.
    cli_knn = evaluate_knn(model, result["source"], image_size=16, batch_size=256, k=200, temperature=0.1)
    assert history["knn_top1"][-1] == pytest.approx(cli_knn["knn_top1"])
    assert [f for _, _, files in os.walk(run / "tensorboard") for f in files if "tfevents" in f]

    loaded = keras.saving.load_model(str(run / "simclr.keras"), safe_mode=True)
    assert isinstance(loaded, simclr_tf.SimCLR)
    images = np.random.RandomState(0).rand(4, 16, 16, 3).astype(np.float32)
    np.testing.assert_allclose(loaded.embed(images), model.embed(images), atol=1e-6)
    excluded = [i for i, v in enumerate(model.trainable_weights) if model.optimizer.is_excluded(v)]
    assert len(excluded) > 10
    assert excluded == [i for i, v in enumerate(loaded.trainable_weights) if loaded.optimizer.is_excluded(v)]
    batch = view_batch(n=16, seed=5, labelled=False)
    for m in (model, loaded):
        m.fit(*batch, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=a.path)

    # The saved encoder and the export: the model of the run, before the extra step above.
    assert os.listdir(run / "saved_model") == ["4"]
    served = tf.saved_model.load(result["export"]).signatures["serving_float"](images=tf.constant(images))
    assert "logits_sup" in served and "probabilities" in served
    encoder = keras.saving.load_model(str(run / "encoder.keras"), safe_mode=True)
    np.testing.assert_allclose(encoder(images, training=False), served["final_avg_pool"], atol=1e-4)


# ------------------------------------------------------------------------------------------ fit step == CLI step
# (last in the module: the worker started with it has had the other tests' time to finish)


@pytest.mark.parametrize("replicas", [1, 2])
def test_fit_step_equals_cli_step(fit_and_cli_steps, replicas):
    """Gradients, two steps' losses, weights (BN statistics included) and LARS slots: fit() == the CLI loop."""
    result = fit_and_cli_steps
    cli = {k[len(f"cli{replicas}_"):]: v for k, v in result.items() if k.startswith(f"cli{replicas}_")}
    fit = {k[len(f"fit{replicas}_"):]: v for k, v in result.items() if k.startswith(f"fit{replicas}_")}
    assert set(cli) == set(fit)
    # Gradients directly on one device; on two, the first step's slots are lr-scaled gradients (see the worker).
    assert sum(k.startswith("g") for k in cli) > 40 or replicas == 2
    assert sum(k.startswith("s1_slot") for k in cli) > 40
    for step in (1, 2):
        np.testing.assert_allclose(fit[f"loss{step}"], cli[f"loss{step}"], rtol=1e-5)
    # The tolerance of the replica tests (tests/test_train.py): 1e-4 of each array's scale.
    errors = relative_errors(fit, cli, [k for k in cli if not k.startswith("loss")])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])
    # The steps really trained: weights moved from the initial values, and again in step 2.
    initial = result[f"init{replicas}"]
    after = [np.concatenate([np.ravel(cli[f"s{step}_w{i}"]) for i in range(sum(k.startswith(f"s{step}_w") for k in cli))])
             for step in (1, 2)]
    assert not np.allclose(after[0], initial) and not np.allclose(after[1], after[0])


def test_cli_step_on_two_replicas_equals_one_device(fit_and_cli_steps):
    """The CLI's own 2-replica steps (sync BN, NT-Xent over both replicas, LARS) equal its 1-device steps from the
    same weights: the default run's check of tests/test_train.py::test_replicas_equal_single_device_step, whose
    2-replica case (its own worker processes) runs in the slow set."""
    result = fit_and_cli_steps
    one = {k[len("cli1_"):]: v for k, v in result.items() if k.startswith("cli1_")}
    two = {k[len("cli2_"):]: v for k, v in result.items() if k.startswith("cli2_")}
    np.testing.assert_array_equal(result["init1"], result["init2"])
    for step in (1, 2):
        np.testing.assert_allclose(two[f"loss{step}"], one[f"loss{step}"], rtol=1e-5)
    errors = relative_errors(two, one, [k for k in two if not k.startswith("loss")])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


def test_xla_compiled_cli_step_equals_the_plain_step(workers, fit_and_cli_steps):
    """--jit_compile on one device: the same two steps as the plain CLI step, compiled by XLA. The default run's
    check of tests/test_train.py::test_jit_compiled_step_equals_single_device_step (in the slow set)."""
    result = fit_and_cli_steps
    assert "Compiled cluster using XLA" in workers["fit_vs_cli"].output  # XLA really ran the step
    plain = {k[len("cli1_"):]: v for k, v in result.items() if k.startswith("cli1_s") or k.startswith("cli1_loss")}
    jit = {k[len("jit1_"):]: v for k, v in result.items() if k.startswith("jit1_")}
    assert set(jit) == set(plain)
    for step in (1, 2):
        np.testing.assert_allclose(jit[f"loss{step}"], plain[f"loss{step}"], rtol=1e-5)
    # XLA fuses and reorders float32 sums: ~2e-5 of each array's scale per LARS step (test_train's tolerance).
    errors = relative_errors(jit, plain, [k for k in plain if not k.startswith("loss")])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])
