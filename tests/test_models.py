"""Model zoo (docs/design.md §3): structure, initialisers, freezing, sync BN, heads, `.keras` round trip."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.errors import UsageError
from simclr_tf.models import SimCLRModel, weight_decay_exempt_variables
from simclr_tf.models.resnet import BLOCKS_PER_DEPTH, ResNet, SelectiveKernel, SqueezeExcite
from tests.conftest import TINY_ARCH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(TINY_ARCH, num_classes=5)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).rand(n, size, size, 3).astype("float32")


def count(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def formula_backbone_params(depth: int, w: float, sk: bool) -> int:
    """Parameter count (incl. BN moving statistics: 4 numbers per BN channel) from docs/design.md §3.1."""
    kind, blocks = BLOCKS_PER_DEPTH[depth]

    def conv(k, cin, cout):
        return k * k * cin * cout

    c64 = int(64 * w)
    if sk:
        total = conv(3, 3, c64 // 2) + conv(3, c64 // 2, c64 // 2) + conv(3, c64 // 2, c64) + 4 * (2 * (c64 // 2) + c64)
    else:
        total = conv(7, 3, c64) + 4 * c64
    cin = c64
    for base, n in zip((64, 128, 256, 512), blocks):
        f = int(base * w)
        out = 4 * f if kind == "bottleneck" else f
        for b in range(n):
            if b == 0:
                total += conv(1, cin, out) + 4 * out
            if kind == "bottleneck":
                total += conv(1, cin, f) + 4 * f + conv(1, f, out) + 4 * out
                if sk:
                    mid = max(int(f * 0.0625), 32)
                    total += conv(3, f, 2 * f) + 4 * 2 * f + conv(1, f, mid) + 4 * mid + conv(1, mid, 2 * f)
                else:
                    total += conv(3, f, f) + 4 * f
            else:
                total += conv(3, cin, f) + conv(3, f, f) + 8 * f
            cin = out
    return total


# ResNet-152 (12 s to build) is in the slow set; the default run checks the same block counts up to 101.
@pytest.mark.parametrize("depth,width,sk,millions", [
    (50, 1, False, 24), (50, 2, False, 94), (50, 1, True, 35), (101, 1, False, 43),
    pytest.param(152, 1, False, 58, marks=pytest.mark.slow)])
def test_backbone_parameter_counts_match_simclrv2_table(depth, width, sk, millions):
    # Counted like the MANIFEST's official width-1 builds (23.56M R50, 35.28M R50-SK): all backbone variables
    # including BN moving statistics. They are part of the checkpoint, and trainable-only R101 (42.50M) would
    # sit exactly on the rounding edge of the table's 43M.
    backbone = ResNet(depth, width, sk_ratio=0.0625 if sk else 0.0, cifar_stem=False)
    backbone(keras.KerasTensor((None, 64, 64, 3)))  # symbolic: builds variables without a forward pass
    total = count(backbone.weights)
    assert total == formula_backbone_params(depth, width, sk)
    assert round(total / 1e6) == millions
    if (depth, width, sk) == (50, 1, False):
        assert total == 23_561_152 and count(backbone.trainable_weights) == 23_508_032  # torchvision R50 - fc


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_resnets_with_sk_take_the_resnet_d_stem_and_shortcuts(depth):
    """As the reference builds them: deep 3-conv stem, average-pool + 1x1 projection shortcuts, no SK conv
    (basic blocks have no bottleneck 3x3 for SK to replace). Counted against the closed form, then run."""
    width = 0.25
    backbone = ResNet(depth, width, sk_ratio=0.0625, cifar_stem=False)
    out = backbone(tf.random.uniform([2, 64, 64, 3]), training=True)
    assert count(backbone.weights) == formula_backbone_params(depth, width, True)
    assert count(backbone.weights) != formula_backbone_params(depth, width, False)
    assert backbone.stem.num_convs == 3
    assert not any(isinstance(layer, SelectiveKernel) for layer in backbone._flatten_layers())
    projections = [g.blocks[0] for g in backbone.groups if g.blocks[0].shortcut_pool is not None]
    assert len(projections) == 4  # every group's first block projects (as in the reference), pooling first
    assert tuple(out["h"].shape) == (2, int(512 * width)) and bool(tf.reduce_all(tf.math.is_finite(out["h"])))
    # A strided group's pooled shortcut is exactly the 2x2 average of the input, then the 1x1 conv.
    block = projections[1]
    x = tf.random.uniform([1, 8, 8, block.shortcut_conv.kernel.shape[2]])
    pooled = tf.nn.avg_pool2d(x, 2, 2, "VALID")
    np.testing.assert_allclose(block.shortcut_conv(block.shortcut_pool(x)).numpy(),
                               tf.nn.conv2d(pooled, block.shortcut_conv.kernel, 1, "SAME").numpy(), atol=1e-5)


@pytest.mark.parametrize("depth,width,dim", [(18, 0.25, 128), (34, 0.25, 128), (50, 0.25, 512)])
def test_h_width_is_2048w_for_bottleneck_and_512w_for_basic(depth, width, dim):
    model = SimCLRModel(depth, width, image_size=32, proj_head_mode="none")
    spec = keras.ops.shape(model.backbone(keras.KerasTensor((2, 32, 32, 3)))["h"])
    assert tuple(spec) == (2, dim) and model.backbone.output_dim == dim


def test_stems_keep_or_reduce_resolution():
    cifar = SimCLRModel(**TINY_MODEL)
    out = cifar(images(2, 16), training=False)
    assert out["initial_conv"].shape == (2, 16, 16, 8) and out["block_group1"].shape == (2, 16, 16, 8)
    assert out["block_group4"].shape == (2, 2, 2, 64)
    imagenet = SimCLRModel(50, 0.0625, sk_ratio=0.0625, image_size=64, proj_head_mode="none")
    out = imagenet(images(1, 64), training=False)
    # ResNet-D stem: 3x3/2 conv, two 3x3 convs, max-pool: 64 -> 32 -> 16
    assert [c.kernel.shape for c in imagenet.backbone.stem.convs] == [(3, 3, 3, 2), (3, 3, 2, 2), (3, 3, 2, 4)]
    assert out["initial_conv"].shape == (1, 32, 32, 4) and out["block_group1"].shape == (1, 16, 16, 16)
    assert out["block_group4"].shape == (1, 2, 2, 128)


def test_selective_kernel_matches_its_definition():
    layer = SelectiveKernel(filters=8, strides=2, sk_ratio=0.0625, batch_norm_decay=0.9, global_bn=False)
    x = images(2, 9)[..., :3].repeat(2, axis=-1)  # [2, 9, 9, 6], odd size exercises the fixed padding
    y = layer(x, training=False).numpy()
    assert y.shape == (2, 5, 5, 8)
    assert layer.conv.kernel.shape == (3, 3, 6, 16) and layer.fc1.kernel.shape == (1, 1, 8, 32)
    assert layer.fc2.kernel.shape == (1, 1, 32, 16)

    def bn(v, layer_bn):  # inference BN with the layer's (initial) statistics and epsilon 1e-5
        return (v - layer_bn.moving_mean.numpy()) / np.sqrt(layer_bn.moving_variance.numpy() + 1e-5) * \
            layer_bn.gamma.numpy() + layer_bn.beta.numpy()

    padded = np.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    k = layer.conv.kernel.numpy()
    conv = np.zeros((2, 5, 5, 16), np.float32)
    for i in range(5):
        for j in range(5):
            patch = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            conv[:, i, j] = np.einsum("bhwc,hwco->bo", patch, k)
    streams = np.maximum(bn(conv, layer.bn), 0)
    s1, s2 = streams[..., :8], streams[..., 8:]
    pooled = (s1 + s2).mean(axis=(1, 2))
    mid = np.maximum(bn(pooled @ layer.fc1.kernel.numpy()[0, 0], layer.fc1_bn), 0)
    logits = mid @ layer.fc2.kernel.numpy()[0, 0]
    a = np.exp(logits[:, :8]) / (np.exp(logits[:, :8]) + np.exp(logits[:, 8:]))
    expected = a[:, None, None] * s1 + (1 - a[:, None, None]) * s2
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_squeeze_excite_matches_its_definition():
    layer = SqueezeExcite(filters=8, out_channels=32, se_ratio=0.25)
    x = images(2, 4).repeat(11, axis=-1)[..., :32]
    y = layer(x).numpy()
    assert layer.reduce.kernel.shape == (1, 1, 32, 2) and layer.expand.kernel.shape == (1, 1, 2, 32)
    layer.reduce.bias.assign(np.linspace(-1, 1, 2).astype("float32"))
    layer.expand.bias.assign(np.linspace(-1, 1, 32).astype("float32"))
    y = layer(x).numpy()
    squeezed = x.mean(axis=(1, 2))
    hidden = np.maximum(squeezed @ layer.reduce.kernel.numpy()[0, 0] + layer.reduce.bias.numpy(), 0)
    gate = 1 / (1 + np.exp(-(hidden @ layer.expand.kernel.numpy()[0, 0] + layer.expand.bias.numpy())))
    np.testing.assert_allclose(y, x * gate[:, None, None], atol=1e-6)
    model = SimCLRModel(50, 0.0625, se_ratio=0.25, image_size=32, proj_head_mode="none")
    model.build((None, 32, 32, 3))
    se = model.backbone.groups[3].blocks[0].se
    assert se.reduce.kernel.shape == (1, 1, 128, 8) and se.expand.kernel.shape == (1, 1, 8, 128)


def test_initialisers():
    model = SimCLRModel(50, 0.25, image_size=32, num_classes=10)
    model.build((None, 32, 32, 3))
    blocks = [b for g in model.backbone.groups for b in g.blocks]
    for block in blocks:
        assert np.all(block.last_bn.gamma.numpy() == 0)
        others = [layer for layer in block.leaf_layers()
                  if isinstance(layer, keras.layers.BatchNormalization) and layer is not block.last_bn]
        assert all(np.all(layer.gamma.numpy() == 1) for layer in others)
        assert block.last_bn.epsilon == 1e-5 and block.last_bn.momentum == 0.9
    checked = 0
    for layer in model.backbone.leaf_layers():
        if isinstance(layer, keras.layers.Conv2D) and np.prod(layer.kernel.shape) >= 20_000:
            kh, kw, cin, _ = layer.kernel.shape
            assert abs(layer.kernel.numpy().std() / np.sqrt(1.0 / (kh * kw * cin)) - 1) < 0.1, layer.name
            checked += 1
    assert checked > 10
    dense = model.projection_head.dense_layers[0].kernel.numpy()
    assert abs(dense.std() / 0.01 - 1) < 0.1 and abs(model.supervised_head.dense.kernel.numpy().std() / 0.01 - 1) < 0.1


def test_two_replica_sync_bn_equals_single_device_on_concatenated_batch():
    script = textwrap.dedent("""
        import os, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from simclr_tf.models import SimCLRModel
        x = np.random.RandomState(0).rand(8, 16, 16, 3).astype("float32")
        x[4:] = x[4:] * 0.5 + 0.3  # replicas see different statistics, so per-replica BN would differ
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        def compare(global_bn):
            kw = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, num_proj_layers=2, num_classes=5,
                      global_bn=global_bn)
            single = SimCLRModel(**kw)
            single.build((None, 16, 16, 3))
            init = [v.numpy() for v in single.weights]
            with strategy.scope():
                multi = SimCLRModel(**kw)
                multi.build((None, 16, 16, 3))
            for v, value in zip(multi.weights, init):
                v.assign(value)
            ref = single(x, training=True)
            dist = strategy.experimental_distribute_values_from_function(
                lambda ctx: x[4 * ctx.replica_id_in_sync_group:4 * ctx.replica_id_in_sync_group + 4])
            out = tf.function(lambda t: strategy.run(lambda u: multi(u, training=True), args=(t,)))(dist)
            rel = 0.0
            for key in ("block_group2", "h", "proj_head_output", "logits_sup"):
                got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out[key])])
                rel = max(rel, np.abs(got - ref[key].numpy()).max() / np.abs(ref[key].numpy()).max())
            stats = max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(single.weights, multi.weights))
            moved = max(np.abs(a.numpy() - b).max() for a, b in zip(single.weights, init))
            return rel, stats, moved
        print("RESULT", *compare(True), *compare(False))
    """)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, run.stderr[-3000:]
    sync_out, sync_stats, moved, local_out, local_stats, _ = map(float, line[0].split()[1:])
    assert moved > 1e-3  # the training-mode pass did update the moving statistics
    assert sync_out < 1e-4 and sync_stats < 1e-5
    assert local_out > 1e-3 and local_stats > 1e-4  # without sync the replicas' BN differs: the test can fail


def bn_stats(layers):
    return [v.numpy().copy() for layer in layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


def stats_changed(before, after):
    return [not np.array_equal(a, b) for a, b in zip(before, after)]


def test_fine_tune_after_block_4_freezes_backbone_and_projection_head():
    model = SimCLRModel(**TINY_MODEL, fine_tune_after_block=4)
    model.build((None, 16, 16, 3))
    assert model.backbone.trainable_weights == [] and model.projection_head.trainable_weights == []
    assert {id(v) for v in model.trainable_variables} == {id(v) for v in model.supervised_head.weights}
    frozen_bns = model.backbone.leaf_layers() + model.projection_head.leaf_layers()
    before = bn_stats(frozen_bns)
    model(images(4, 16), training=True)
    assert not any(stats_changed(before, bn_stats(frozen_bns)))
    free = SimCLRModel(**TINY_MODEL, fine_tune_after_block=-1)
    free.build((None, 16, 16, 3))
    before = bn_stats(free.backbone.leaf_layers())
    free(images(4, 16), training=True)
    assert all(stats_changed(before, bn_stats(free.backbone.leaf_layers())))


def test_fine_tune_after_block_2_freezes_exactly_stem_and_groups_1_2():
    model = SimCLRModel(**TINY_MODEL, fine_tune_after_block=2)
    model.build((None, 16, 16, 3))
    parts = model.backbone.parts()
    assert [bool(p.trainable_weights) for p in parts] == [False, False, False, True, True]
    trainable = {id(v) for v in model.trainable_variables}
    expected = [v for p in parts[3:] for v in p.trainable_weights]
    expected += model.projection_head.trainable_weights + model.supervised_head.trainable_weights
    assert trainable == {id(v) for v in expected} and len(expected) == len(model.trainable_variables)
    before = [bn_stats(p.leaf_layers()) for p in parts]
    model(images(4, 16), training=True)
    changed = [any(stats_changed(b, bn_stats(p.leaf_layers()))) for b, p in zip(before, parts)]
    assert changed == [False, False, False, True, True]


@pytest.mark.parametrize("mode,layers,selectors", [("none", 0, (0, -1)), ("linear", 1, (0, 1, -1)),
                                                   ("nonlinear", 3, (0, 1, 2, 3, -1))])
def test_projection_modes_and_selectors_give_documented_shapes(mode, layers, selectors):
    x = images(3, 16)
    for selector in selectors:
        model = SimCLRModel(**{**TINY_MODEL, "num_proj_layers": 3}, proj_head_mode=mode, proj_out_dim=24,
                            ft_proj_selector=selector)
        out = model(x, training=True)
        dims = {"none": [], "linear": [24], "nonlinear": [64, 64, 24]}[mode]
        assert [t.shape for t in out["proj_layers"]] == [(3, d) for d in dims]
        assert out["proj_head_output"].shape == (3, dims[-1] if dims else 64)
        assert out["proj_head_input"].shape == out["h"].shape == (3, 64)
        width = ([64] + dims)[selector]
        assert out["sup_head_input"].shape == (3, width) and out["logits_sup"].shape == (3, 5)
        np.testing.assert_array_equal(out["sup_head_input"], ([out["h"]] + out["proj_layers"])[selector])
        if layers:
            assert model.projection_head.bn_layers[-1].beta is None  # last head BN has no beta
            assert all(bn.beta is not None for bn in model.projection_head.bn_layers[:-1])
    with pytest.raises(UsageError, match="--ft_proj_selector"):
        SimCLRModel(**{**TINY_MODEL, "num_proj_layers": 3}, proj_head_mode=mode, ft_proj_selector=layers + 1)
    assert "logits_sup" not in SimCLRModel(**{**TINY_MODEL, "num_classes": 0}, proj_head_mode=mode)(x)


def test_linear_eval_stop_gradient():
    x = images(2, 16)
    for stop, expect_grad in ((True, False), (False, True)):
        model = SimCLRModel(**TINY_MODEL, linear_eval_stop_gradient=stop)
        model.build((None, 16, 16, 3))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True)["logits_sup"] ** 2)
        grads = tape.gradient(loss, model.backbone.trainable_variables)
        assert any(g is not None and np.abs(g.numpy()).max() > 0 for g in grads) == expect_grad


def test_weight_decay_exemptions_selected_by_object():
    model = SimCLRModel(50, 0.0625, sk_ratio=0.0625, se_ratio=0.25, image_size=32, num_classes=3)
    model.build((None, 32, 32, 3))
    leaves = model.leaf_layers()
    assert {id(v) for layer in leaves for v in layer.weights} == {id(v) for v in model.weights}
    exempt = {id(v) for v in weight_decay_exempt_variables(model)}
    for layer in leaves:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert all(id(v) in exempt for v in (layer.gamma, layer.beta) if v is not None)
        else:
            assert (id(layer.kernel) in exempt) == (layer is model.supervised_head.dense)
            if layer.bias is not None:
                assert id(layer.bias) in exempt
    assert any(leaf.bias is not None for leaf in leaves if isinstance(leaf, keras.layers.Conv2D))  # SE biases


def test_keras_round_trip_is_exact(tmp_path):
    model = SimCLRModel(50, 0.0625, sk_ratio=0.0625, se_ratio=0.25, image_size=40, num_proj_layers=3,
                        ft_proj_selector=1, num_classes=4, fine_tune_after_block=1, global_bn=False)
    x = images(2, 40)
    model(x, training=True)  # move BN statistics off their initial values
    for layer in model.leaf_layers():  # non-trivial values everywhere, incl. zero-initialised gammas
        for v in layer.weights:
            v.assign(v.numpy() + np.random.RandomState(len(v.name)).normal(0, 0.01, v.shape).astype("float32"))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, SimCLRModel) and loaded.get_config() == model.get_config()
    for training in (False, True):
        a, b = model(x, training=training), loaded(x, training=training)
        for key in ("h", "proj_head_output", "sup_head_input", "logits_sup", "initial_conv", "block_group3"):
            np.testing.assert_array_equal(a[key], b[key])
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    # run.py checkpoints with tf.train.Checkpoint: it must reach every variable (Keras 3 hides list members).
    saved = tf.train.Checkpoint(model=model).write(str(tmp_path / "tf2"))
    entries = [n for n, _ in tf.train.list_variables(saved) if n.startswith("model/")]
    assert len(entries) == len(model.weights)
