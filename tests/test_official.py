"""Loading the official TF1 SimCLR checkpoints (docs/design.md §12) against the golden fixtures of the official code."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import convert, official
from simclr_tf.checkpoints import is_native_checkpoint, resolve_checkpoint
from simclr_tf.errors import UsageError
from simclr_tf.models import SimCLRModel

FIXTURES = {"r18_1x8_cifar": 32, "r50_1x8_sk0_v1": 64, "r50_1x16_sk1_v2": 64}
ENDPOINTS = ("initial_conv", "initial_max_pool", "block_group1", "block_group2", "block_group3", "block_group4",
             "h", "proj_head_output")


def assert_close(got, expected, key):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4 * np.abs(expected).max(), err_msg=key)


def load_fixture(golden_dir, name):
    path = golden_dir / name
    info = json.loads((path / "info.json").read_text())
    return path, info, dict(np.load(path / f"expected_{name}.npz"))


def build_loaded(path, image_size, selector=0, use_ema=False):
    spec = official.inspect_checkpoint(path)
    model = SimCLRModel(**spec.model_kwargs(image_size=image_size, ft_proj_selector=selector))
    official.load_official_checkpoint(model, path, use_ema=use_ema)
    return model


def check_outputs(out, expected, suffix=""):
    for key in ENDPOINTS:
        if key + suffix in expected:
            assert_close(out[key], expected[key + suffix], key + suffix)
    hiddens = [out["h"]] + list(out["proj_layers"])
    assert f"proj_head_layer{len(hiddens)}{suffix}" not in expected  # the model has every recorded layer
    for j, hidden in enumerate(hiddens):
        assert_close(hidden, expected[f"proj_head_layer{j}{suffix}"], f"proj_head_layer{j}{suffix}")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_golden_fixture_outputs(golden_dir, name):
    path, info, expected = load_fixture(golden_dir, name)
    flags = info["official_flags"]
    spec = official.inspect_checkpoint(path)
    assert (spec.resnet_depth, spec.width_multiplier, spec.num_proj_layers, spec.num_classes) == (
        flags["resnet_depth"], flags["width_multiplier"], flags["num_proj_layers"], 10)
    assert (spec.sk_ratio > 0) == (flags["sk_ratio"] > 0) and spec.cifar_stem == (flags["image_size"] <= 32)
    selectors = info["ft_proj_selectors_recorded"]
    for selector in (0, max(selectors)):
        model = build_loaded(path, FIXTURES[name], selector)
        out = model(expected["x"], training=False)
        check_outputs(out, expected)
        assert_close(out["sup_head_input"], expected[f"head_input_sel{selector}"], "sup_head_input")
        assert_close(out["logits_sup"], expected[f"logits_sup_sel{selector}"], f"logits_sup_sel{selector}")
    if spec.has_ema:
        model = build_loaded(path, FIXTURES[name], 0, use_ema=True)
        out = model(expected["x"], training=False)
        check_outputs(out, expected, "_ema")
        assert_close(out["logits_sup"], expected["logits_sup_ema"], "logits_sup_ema")
        assert np.abs(out["h"] - expected["h"]).max() > 1e-3  # EMA copies really differ from the plain ones
    else:
        with pytest.raises(UsageError, match="--use_ema"):
            build_loaded(path, FIXTURES[name], 0, use_ema=True)


def test_convert_and_reload_gives_same_outputs(golden_dir, tmp_path):
    path, _, expected = load_fixture(golden_dir, "r18_1x8_cifar")
    out_dir = tmp_path / "converted"
    assert convert.main([f"--checkpoint={path}", f"--out={out_dir}", "--ft_proj_selector=1"]) == 0
    record = json.loads((out_dir / convert.ARCHITECTURE_FILE).read_text())
    assert record["flags"]["resnet_depth"] == 18 and record["flags"]["ft_proj_selector"] == 1
    model_entries = [n for n, _ in tf.train.list_variables(str(path / "model.ckpt-0"))
                     if n != "global_step" and not n.endswith("/Momentum")]
    assert record["num_classes"] == 10 and record["variables_loaded"] == len(model_entries) == 116
    loaded = keras.models.load_model(out_dir / convert.KERAS_FILE, safe_mode=True)
    out = loaded(expected["x"], training=False)
    check_outputs(out, expected)
    assert_close(out["logits_sup"], expected["logits_sup_sel1"], "logits_sup_sel1")
    fresh = SimCLRModel(**record["model_kwargs"])
    fresh.build((None, 32, 32, 3))
    tf.train.Checkpoint(model=fresh).restore(record["tf2_checkpoint"]).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh(expected["x"])["logits_sup"], out["logits_sup"])
    # Fine-tuning from the converted checkpoint: groups 3-4 and heads train, stem and groups 1-2 stay put.
    tuned = SimCLRModel(**{**record["model_kwargs"], "fine_tune_after_block": 2, "linear_eval_stop_gradient": False})
    tuned.build((None, 32, 32, 3))
    tf.train.Checkpoint(model=tuned).restore(record["tf2_checkpoint"]).assert_existing_objects_matched()
    frozen = [v.numpy() for p in tuned.backbone.parts()[:3] for v in p.weights]
    group4 = tuned.backbone.groups[3].blocks[-1].conv_b.kernel.numpy()
    labels = np.array([1, 2, 3, 4])
    optimizer = keras.optimizers.SGD(0.05)
    losses = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            logits = tuned(expected["x"], training=True)["logits_sup"]
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        grads = tape.gradient(loss, tuned.trainable_variables)  # head layer 2 is unused with selector 1
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, tuned.trainable_variables) if g is not None])
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert not np.array_equal(group4, tuned.backbone.groups[3].blocks[-1].conv_b.kernel.numpy())
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, [v for p in tuned.backbone.parts()[:3]
                                                                     for v in p.weights]))
    # The loader tells the official (name-based) format from ours by the object graph.
    assert not is_native_checkpoint(resolve_checkpoint(str(path)))
    assert not is_native_checkpoint(resolve_checkpoint(str(path / "model.ckpt-0")))
    assert is_native_checkpoint(resolve_checkpoint(str(record["tf2_checkpoint"])))
    with pytest.raises(UsageError):
        resolve_checkpoint(str(tmp_path / "nothing"))


def rewrite_checkpoint(source, target, drop=(), add=None):
    """A TF1-style (name-keyed) checkpoint with some variables dropped, replaced or added."""
    reader = tf.train.load_checkpoint(str(source))
    tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if name not in drop}
    tensors.update(add or {})
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(target), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    return target


def load_error(model, path, **kwargs):
    with pytest.raises(UsageError) as error:
        official.load_official_checkpoint(model, path, **kwargs)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--checkpoint: ")
    return message


def test_refuses_truncated_extra_misshaped_and_other_architecture(golden_dir, tmp_path):
    path = golden_dir / "r18_1x8_cifar" / "model.ckpt-0"
    model = SimCLRModel(**official.inspect_checkpoint(path).model_kwargs())
    missing = "base_model/batch_normalization_7/moving_variance"
    message = load_error(model, rewrite_checkpoint(path, tmp_path / "truncated", drop=[missing]))
    assert f"missing variable {missing} (the model expects shape [16])" in message
    extra = "base_model/conv2d_99/kernel"
    message = load_error(model, rewrite_checkpoint(path, tmp_path / "extra", add={extra: np.zeros((1, 1, 2, 2))}))
    assert f"unexpected variable {extra} [1, 1, 2, 2]" in message
    bad = "head_contrastive/nl_0/dense/kernel"
    message = load_error(model, rewrite_checkpoint(path, tmp_path / "shape", add={bad: np.zeros((64, 63))}))
    assert f"variable {bad} has shape [64, 63], the model expects [64, 64]" in message
    # A v1-style checkpoint loaded into an R18 CIFAR model: the stem kernel is the first mismatch.
    message = load_error(model, golden_dir / "r50_1x8_sk0_v1")
    assert "base_model/conv2d/kernel has shape [7, 7, 3, 8], the model expects [3, 3, 3, 8]" in message
    assert "the checkpoint is ResNet-50 0.125x" in message
    spec = official.inspect_checkpoint(golden_dir / "r50_1x16_sk1_v2")
    with pytest.raises(UsageError, match="^--resnet_depth: 101 does not match"):
        spec.check_against(resnet_depth=101)
    with pytest.raises(UsageError, match="^--image_size: 32 does not match"):
        spec.check_against(image_size=32)
    spec.check_against(resnet_depth=50, width_multiplier=0.0625, sk_ratio=0.0625, num_proj_layers=3,
                       proj_out_dim=128, num_classes=10, image_size=64)


def test_optional_heads(golden_dir, tmp_path):
    path, _, expected = load_fixture(golden_dir, "r18_1x8_cifar")
    spec = official.inspect_checkpoint(path)
    model = SimCLRModel(**{**spec.model_kwargs(), "num_classes": 3})
    load_error(model, path)  # the supervised head's shape differs
    report = official.load_official_checkpoint(model, path, skip_supervised_head=True)
    assert set(report.kept_initial) == {"head_supervised/linear_layer/dense/kernel",
                                        "head_supervised/linear_layer/dense/bias"}
    assert_close(model(expected["x"])["proj_head_output"], expected["proj_head_output"], "proj_head_output")
    reader = tf.train.load_checkpoint(str(path))
    v1_style = rewrite_checkpoint(path, tmp_path / "v1", drop=[n for n in reader.get_variable_to_shape_map()
                                                              if n.startswith("head_contrastive/")])
    assert official.inspect_checkpoint(v1_style).proj_head_mode is None
    model = SimCLRModel(**spec.model_kwargs())
    assert "missing variable head_contrastive/nl_0/dense/kernel" in load_error(model, v1_style)
    official.load_official_checkpoint(model, v1_style, allow_missing_projection_head=True)
    assert_close(model(expected["x"])["logits_sup"], expected["logits_sup"], "logits_sup")


def manifest_names(depth, w, sk, layers, classes, out_dim=128):
    """(name, shape) in creation order, written from MANIFEST.md's naming scheme (ImageNet stem)."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    entries, counters = [], {"conv2d": 0, "batch_normalization": 0}

    def scope(base):
        i = counters[base]
        counters[base] += 1
        return f"base_model/{base}" + ("" if i == 0 else f"_{i}")

    def conv(k, cin, cout):
        entries.append((scope("conv2d") + "/kernel", [k, k, cin, cout]))

    def bn(c):
        s = scope("batch_normalization")
        entries.extend((f"{s}/{v}", [c]) for v in ("gamma", "beta", "moving_mean", "moving_variance"))

    c64 = int(64 * w)
    if sk:
        for cin, cout in ((3, c64 // 2), (c64 // 2, c64 // 2), (c64 // 2, c64)):
            conv(3, cin, cout)
            bn(cout)
    else:
        conv(7, 3, c64)
        bn(c64)
    cin = c64
    for base, n in zip((64, 128, 256, 512), blocks):
        f = int(base * w)
        for b in range(n):
            if b == 0:
                conv(1, cin, 4 * f)
                bn(4 * f)
            conv(1, cin, f)
            bn(f)
            if sk:
                mid = max(int(f * 0.0625), 32)
                conv(3, f, 2 * f)
                bn(2 * f)
                conv(1, f, mid)
                bn(mid)
                conv(1, mid, 2 * f)
            else:
                conv(3, f, f)
                bn(f)
            conv(1, f, 4 * f)
            bn(4 * f)
            cin = 4 * f
    d = cin
    for j in range(layers):
        dim = out_dim if j == layers - 1 else d
        entries.append((f"head_contrastive/nl_{j}/dense/kernel", [d, dim]))
        for v in ("gamma", "beta", "moving_mean", "moving_variance"):
            if not (v == "beta" and j == layers - 1):
                entries.append((f"head_contrastive/nl_{j}/batch_normalization/{v}", [dim]))
    entries += [("head_supervised/linear_layer/dense/kernel", [d, classes]),
                ("head_supervised/linear_layer/dense/bias", [classes])]
    return entries


# The 152-deep SK case (15 s) is in the slow set; the default run maps depth 101 here and SK on the golden R50-SK.
@pytest.mark.parametrize("depth,sk,layers", [(101, False, 2), pytest.param(152, True, 3, marks=pytest.mark.slow)])
def test_mapping_rule_covers_architectures_without_fixture(tmp_path, depth, sk, layers):
    model = SimCLRModel(depth, 0.25, sk_ratio=0.0625 if sk else 0.0, image_size=64, num_proj_layers=layers,
                        num_classes=1000)
    mapping = official.official_variable_map(model)
    expected = manifest_names(depth, 0.25, sk, layers, 1000)
    assert [(n, list(v.shape)) for n, v in mapping.items()] == expected
    assert len(mapping) == len(model.weights)
    # A checkpoint with exactly these names (plus slots and a step) is recognised and loads.
    rng = np.random.RandomState(0)
    tensors = {n: rng.normal(size=s).astype("float32") for n, s in expected}
    tensors.update({f"{n}/Momentum": np.zeros(s, "float32") for n, s in expected[:5]})
    tensors["global_step"] = np.int64(7)
    names = sorted(tensors)
    prefix = str(tmp_path / "model.ckpt-7")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    spec = official.inspect_checkpoint(tmp_path)
    assert (spec.resnet_depth, spec.width_multiplier, spec.sk_ratio > 0, spec.num_proj_layers,
            spec.num_classes, spec.cifar_stem) == (depth, 0.25, sk, layers, 1000, False)
    official.load_official_checkpoint(model, tmp_path)
    name, _ = expected[-3]
    np.testing.assert_array_equal(mapping[name].numpy(), tensors[name])
