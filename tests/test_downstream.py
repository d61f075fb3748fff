"""Downstream use of a pretrained encoder: fine-tune from a model_dir, linear eval, kNN monitor, eval counts,
cached-feature linear eval and the predict command. Runs in-process on a tiny npz dataset."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import app, features, linear_eval, predict
from simclr_tf.config import Config
from simclr_tf.data import augment
from simclr_tf.evaluate import evaluate
from simclr_tf.models import build_model
from simclr_tf.train import Trainer
from tests.conftest import TINY, write_npz
from tests.test_knn import brute_force_knn

TINY_RUN = dict(TINY, proj_out_dim=16, train_batch_size=8, warmup_epochs=0, seed=0, train_split="train",
                eval_split="test", learning_rate=1.0)
PRETRAIN_STEPS = 2


def config(model_dir, dataset, **overrides):
    return Config(model_dir=str(model_dir), dataset=f"npz:{dataset}", **{**TINY_RUN, **overrides})


class Log(list):
    def __call__(self, line):
        self.append(line)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"four": write_npz(root / "four.npz", 4, cyclic_labels=True),
            "three": write_npz(root / "three.npz", 3, seed=1, cyclic_labels=True)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    """2 pretraining steps with the kNN monitor every step; exported at the end."""
    model_dir = tmp_path_factory.mktemp("pretrain")
    log = Log()
    cfg = config(model_dir, data["four"], train_steps=PRETRAIN_STEPS, checkpoint_steps=PRETRAIN_STEPS,
                 knn_every_steps=1, knn_k=10)
    app.main(cfg, log=log)
    return cfg, log


def train(cfg):
    """The training part of app.main (no export: the export tests cover it)."""
    strategy, source = app.prepare(cfg)
    Trainer(cfg, strategy, source, log=Log()).train()


def restored_model(cfg, prefix):
    """A model holding every variable of a checkpoint (full object-graph restore, independent of
    checkpoints.initialise_from_checkpoint)."""
    strategy, source = app.prepare(cfg)
    model = build_model(cfg.model, source.num_classes, strategy)
    tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
    return model


def encoder_weights(model):
    """Backbone and projection head: kernels, BN gammas/betas and BN moving statistics."""
    return [v.numpy() for v in model.backbone.weights + model.projection_head.weights]


def test_knn_monitor_runs_during_pretraining(pretrained):
    cfg, log = pretrained
    lines = [line for line in log if "kNN top-1" in line]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"], log
    from tests.test_train import summary_tags

    assert "knn/top1" in summary_tags(cfg.model_dir)
    assert os.path.isdir(os.path.join(cfg.model_dir, "saved_model", str(PRETRAIN_STEPS)))


def test_finetune_restores_encoder_and_zero_inits_head(pretrained, data, tmp_path):
    cfg, _ = pretrained
    prefix = tf.train.latest_checkpoint(cfg.model_dir)
    reference = restored_model(cfg, prefix)
    for zero_init in (True, False):
        ft = config(tmp_path / f"ft{zero_init}", data["four"], train_mode="finetune", checkpoint=cfg.model_dir,
                    zero_init_logits_layer=zero_init, train_steps=1)
        strategy, source = app.prepare(ft)
        trainer = Trainer(ft, strategy, source, log=Log())
        message = trainer.restore()  # what train() does before its first step
        assert prefix in message
        for got, want in zip(encoder_weights(trainer.model), encoder_weights(reference)):
            np.testing.assert_array_equal(got, want)
        head = [v.numpy() for v in trainer.model.supervised_head.weights]
        if zero_init:
            assert all(not np.any(v) for v in head)
        else:  # same class count: the pretraining run's online linear head is restored
            for got, want in zip(head, [v.numpy() for v in reference.supervised_head.weights]):
                np.testing.assert_array_equal(got, want)


def test_finetune_to_another_class_count_starts_a_fresh_head(pretrained, data, tmp_path, capsys):
    cfg, _ = pretrained
    ft = config(tmp_path / "ft3", data["three"], train_mode="finetune", checkpoint=cfg.model_dir, train_steps=1,
                learning_rate=0.5)
    train(ft)
    assert "fresh head" in capsys.readouterr().out
    model = restored_model(ft, tf.train.latest_checkpoint(ft.model_dir))
    assert model.supervised_head.dense.kernel.shape[-1] == 3
    # Full fine-tuning (fine_tune_after_block=-1) moves the backbone: the linear-eval test below can tell.
    reference = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    assert any(not np.array_equal(a, b) for a, b in zip(encoder_weights(model), encoder_weights(reference)))


def test_linear_eval_mode_leaves_encoder_and_bn_statistics_bit_identical(pretrained, data, tmp_path):
    cfg, _ = pretrained
    ft = config(tmp_path / "lin", data["four"], train_mode="finetune", checkpoint=cfg.model_dir,
                fine_tune_after_block=4, train_steps=3, learning_rate=0.5, optimizer="momentum")
    train(ft)
    after = restored_model(ft, tf.train.latest_checkpoint(ft.model_dir))
    before = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    assert int(tf.train.load_checkpoint(tf.train.latest_checkpoint(ft.model_dir)).get_tensor(
        "global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 3
    for got, want in zip(encoder_weights(after), encoder_weights(before)):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(after.supervised_head.dense.kernel.numpy(),
                              before.supervised_head.dense.kernel.numpy())


def test_features_and_eval_count_every_example_once(pretrained, data):
    cfg, _ = pretrained
    model = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    strategy, source = app.prepare(cfg)
    raw = np.load(data["four"])
    assert len(raw["y_test"]) % cfg.eval_batch_size != 0  # 20 = 2 * 7 + 6
    h, labels = features.extract_features(model, source, "eval", image_size=cfg.image_size,
                                          batch_size=cfg.eval_batch_size, strategy=strategy)
    np.testing.assert_array_equal(labels, raw["y_test"])
    # Each row is the model on that example's own eval view, computed one image at a time.
    views = np.stack([augment.eval_view(tf.constant(x), cfg.image_size).numpy() for x in raw["x_test"]])
    outputs = model(views, training=False)
    np.testing.assert_allclose(h, outputs["h"].numpy(), atol=1e-5, rtol=1e-5)
    train_h, train_labels = features.extract_features(model, source, "train", image_size=cfg.image_size,
                                                      batch_size=cfg.eval_batch_size)
    assert train_h.shape == (64, h.shape[1])
    np.testing.assert_array_equal(train_labels, raw["y_train"])

    result = evaluate(model, source, strategy, image_size=cfg.image_size, eval_batch_size=cfg.eval_batch_size)
    assert result["num_examples"] == 20
    predicted = np.argmax(outputs["logits_sup"].numpy(), axis=-1)
    assert result["top1"] == pytest.approx(np.mean(predicted == raw["y_test"]))


def test_eval_mode_reports_knn_top1(pretrained, data):
    cfg, _ = pretrained
    eval_cfg = cfg.replace(mode="eval", knn_every_steps=5, knn_k=10, knn_temperature=0.1)
    result = app.main(eval_cfg, log=Log())
    saved = json.loads(open(os.path.join(cfg.model_dir, "result.json")).read())
    assert saved["knn_top1"] == result["knn_top1"] and saved["num_examples"] == 20
    model = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    strategy, source = app.prepare(cfg)
    train_h, train_y = features.extract_features(model, source, "train", image_size=16, batch_size=7)
    eval_h, eval_y = features.extract_features(model, source, "eval", image_size=16, batch_size=7)
    want = np.mean(brute_force_knn(train_h, train_y, eval_h, 4, 10, 0.1) == eval_y)
    assert result["knn_top1"] == pytest.approx(want)


def test_cached_linear_eval_is_deterministic(pretrained):
    cfg, _ = pretrained
    model = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    _, source = app.prepare(cfg)
    first = linear_eval.linear_eval(model, source, image_size=16, batch_size=7, epochs=20, seed=3)
    second = linear_eval.linear_eval(model, source, image_size=16, batch_size=7, epochs=20, seed=3)
    assert first == second
    assert first["num_examples"] == 20 and first["num_train"] == 64
    assert 0.0 <= first["top1"] <= first["top5"] == 1.0  # 4 classes: top-5 covers all


# ------------------------------------------------------------------ the classifier on cached features


def blobs(n, d, classes, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_classifier_reaches_the_regularised_optimum():
    """At the fitted weights the gradient of mean CE + wd/2 ||W||^2 (standardised features) vanishes."""
    h, y = blobs(300, 6, 3, seed=0, spread=4.0)
    wd = 1e-2
    clf = linear_eval.fit_linear_classifier(h, y, 3, epochs=300, batch_size=300, learning_rate=0.5,
                                            weight_decay=wd, seed=0)
    x = (h.astype(np.float64) - clf.mean) / clf.scale
    logits = x @ clf.weights + clf.bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = (p - np.eye(3)[y]) / len(y)
    assert np.abs(x.T @ err + wd * clf.weights).max() < 1e-4
    assert np.abs(err.sum(0)).max() < 1e-4
    np.testing.assert_allclose(clf.mean, h.mean(0), rtol=1e-5)


def test_classifier_is_deterministic_and_accurate():
    h, y = blobs(600, 20, 5, seed=1)
    a = linear_eval.fit_linear_classifier(h, y, 5, epochs=10, seed=4)
    b = linear_eval.fit_linear_classifier(h, y, 5, epochs=10, seed=4)
    c = linear_eval.fit_linear_classifier(h, y, 5, epochs=10, seed=5)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)
    test_h, test_y = blobs(200, 20, 5, seed=1)
    assert linear_eval.accuracy(a, test_h, test_y)["top1"] > 0.95


def test_topk_accuracy_by_hand():
    logits = np.array([[0.1, 0.5, 0.4], [2.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    labels = np.array([2, 1, 1])
    assert linear_eval.topk_accuracy(logits, labels, 1) == pytest.approx(0.0)
    assert linear_eval.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)  # ties -> lower class id
    assert linear_eval.topk_accuracy(logits, labels, 5) == 1.0


# ------------------------------------------------------------------ predict / embed


def test_predict_cli_on_images_and_dataset(pretrained, data, tmp_path, capsys):
    cfg, _ = pretrained
    paths = []
    for i, (h, w) in enumerate([(16, 16), (40, 30), (9, 21)]):
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3)).astype(np.uint8)
        paths.append(str(tmp_path / f"img{i}.{'png' if i < 2 else 'jpg'}"))
        Image.fromarray(image).save(paths[-1])
    reps = tmp_path / "reps.npy"
    assert predict.main(["--saved_model", cfg.model_dir, "--images", *paths, "--top_k", "3",
                         "--embed_out", str(reps)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3 and all(line.count("(") == 3 for line in lines)
    loaded = predict.load(cfg.model_dir)
    blobs_ = [open(p, "rb").read() for p in paths]
    want = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs_))["final_avg_pool"].numpy()
    np.testing.assert_allclose(np.load(reps), want, atol=1e-6)

    out = tmp_path / "test_reps.npy"
    assert predict.main(["--saved_model", cfg.model_dir, "--dataset", f"npz:{data['four']}", "--split", "test",
                         "--batch_size", "7", "--embed_out", str(out)]) == 0
    assert "20 examples, top-1" in capsys.readouterr().out
    model = restored_model(cfg, tf.train.latest_checkpoint(cfg.model_dir))
    strategy, source = app.prepare(cfg)
    h, labels = features.extract_features(model, source, "eval", image_size=16, batch_size=7)
    np.testing.assert_allclose(np.load(out), h, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "test_reps_labels.npy"), labels)

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert predict.main(["--saved_model", cfg.model_dir, "--images", str(bad)]) == 2
    assert "not a JPEG, PNG" in capsys.readouterr().err


MULTI_REPLICA_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from simclr_tf import app, features
from simclr_tf.config import Config
from simclr_tf.evaluate import evaluate
from simclr_tf.models import build_model

cfg = Config(model_dir=sys.argv[2], dataset="npz:" + sys.argv[1], train_split="train", eval_split="test",
             resnet_depth=18, width_multiplier=0.125, image_size=16, num_proj_layers=2, strategy="mirrored",
             num_cpu_replicas=2, train_batch_size=8, seed=0)
strategy, source = app.prepare(cfg)
assert strategy.num_replicas_in_sync == 2
model = build_model(cfg.model, source.num_classes, strategy)
h2, y2 = features.extract_features(model, source, "eval", image_size=16, batch_size=8, strategy=strategy)
h1, y1 = features.extract_features(model, source, "eval", image_size=16, batch_size=8)
r2 = evaluate(model, source, strategy, image_size=16, eval_batch_size=8)
r1 = evaluate(model, source, tf.distribute.get_strategy(), image_size=16, eval_batch_size=8)
np.savez(sys.argv[3], h2=h2, y2=y2, h1=h1, y1=y1, n2=r2["num_examples"], n1=r1["num_examples"],
         top1_2=r2["top1"], top1_1=r1["top1"])
"""


def test_two_replicas_see_every_eval_example_once(data, tmp_path):
    """20 examples, global batch 8 on 2 replicas: the last round leaves one replica an empty batch."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", MULTI_REPLICA_SCRIPT, data["four"], str(tmp_path / "md"),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = np.load(out)
    assert int(r["n2"]) == int(r["n1"]) == 20
    assert r["top1_2"] == pytest.approx(float(r["top1_1"]))
    np.testing.assert_array_equal(r["y2"], np.load(data["four"])["y_test"])
    np.testing.assert_allclose(r["h2"], r["h1"], atol=1e-5)
