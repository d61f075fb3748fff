"""`python -m simclr_tf.predict --images`: every readable image is predicted and printed with its class names;
each missing or damaged one is reported on stderr, and the exit status says so."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras
from simclr_tf import export, predict
from simclr_tf.models import SimCLRModel

SIZE = 16
NAMES = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = SimCLRModel(resnet_depth=18, width_multiplier=0.125, image_size=SIZE, num_proj_layers=2,
                        proj_out_dim=8, num_classes=len(NAMES), global_bn=False)
    model(tf.zeros([1, SIZE, SIZE, 3]), training=False)
    model_dir = tmp_path_factory.mktemp("export")
    return export.export_model(model, model_dir=str(model_dir), step=3, image_size=SIZE, keep=1,
                               class_names=NAMES)


def encoded(seed, fmt, size=(24, 20)):
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def parse_line(line):
    """'path: cat (0.5000), dog (0.3000)' -> (path, [('cat', 0.5), ('dog', 0.3)])."""
    path, ranked = line.rsplit(": ", 1)
    pairs = [item.rsplit(" (", 1) for item in ranked.split(", ")]
    return path, [(name, float(p.rstrip(")"))) for name, p in pairs]


def test_good_images_are_predicted_with_names_and_bad_ones_reported(saved_model, tmp_path, capsys):
    good = {tmp_path / "a.png": encoded(1, "PNG"), tmp_path / "b.jpg": encoded(2, "JPEG")}
    for path, data in good.items():
        path.write_bytes(data)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(encoded(3, "JPEG")[:300])  # starts like a JPEG, so only decoding finds it broken
    missing = tmp_path / "nope.png"
    good_a, good_b = good
    # One batch holds all three readable files: the truncated one fails it, the retry saves the other two.
    argv = ["--saved_model", saved_model, "--images", str(good_a), str(truncated), str(missing), str(good_b)]
    assert predict.main(argv) == 1
    captured = capsys.readouterr()
    printed = [parse_line(line) for line in captured.out.splitlines()]
    assert [path for path, _ in printed] == [str(good_a), str(good_b)]
    # Each good image is ranked as the SavedModel ranks it alone, by name.
    loaded = tf.saved_model.load(saved_model)
    alone = loaded.signatures["serving_default"](image_bytes=tf.constant(list(good.values())))
    for (_, ranked), probabilities in zip(printed, alone["probabilities"].numpy()):
        order = np.argsort(-probabilities, kind="stable")
        assert [name for name, _ in ranked] == [NAMES[c] for c in order]
        np.testing.assert_allclose([p for _, p in ranked], probabilities[order], atol=1e-4)
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"error: {truncated}: corrupt or truncated image: "), errors
    assert errors[1] == f"error: {missing}: no such file", errors


def test_older_exports_without_class_names_print_indices(tmp_path):
    # An export written before class names were stored has `num_classes` but no `class_names`.
    old = tf.Module()
    old.num_classes = tf.Variable(3)
    tf.saved_model.save(old, str(tmp_path / "old"))
    loaded = tf.saved_model.load(str(tmp_path / "old"))
    assert export.exported_class_names(loaded) == ()
    assert predict.class_names(loaded) == ["0", "1", "2"]
