"""Fault injection, exports and serving: an export failing verification leaves the earlier ones; the serving
signatures and the predict CLI reject bad requests; the .keras encoder loads with safe_mode=True."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.fault_harness import copy_base, digest, fault, tiny_config

pytestmark = pytest.mark.usefixtures("background")  # the kill chain and the base run start with the first test


def test_export_failing_verification_leaves_earlier_exports(work, base):
    import tensorflow as tf

    from simclr_tf import export
    from simclr_tf.models import build_model

    model_dir = copy_base(base, work, "bad_export")
    model = build_model(tiny_config(model_dir).model, 4, tf.distribute.get_strategy())
    tf.train.Checkpoint(model=model).read(str(model_dir / "ckpt-4")).expect_partial()
    kernel = model.supervised_head.dense.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    before = digest(model_dir / "saved_model")
    with fault("export whose reloaded SavedModel does not reproduce the model"):
        with pytest.raises(RuntimeError, match="export verification failed"):
            export.export_model(model, model_dir=str(model_dir), step=5, image_size=16, keep=1)
        assert digest(model_dir / "saved_model") == before
        assert sorted(os.listdir(model_dir / "saved_model")) == ["4"]


def test_serving_rejects_bad_requests_and_keras_file_loads_safely(work, base, capsys):
    import keras
    import tensorflow as tf
    from PIL import Image

    import simclr_tf  # noqa: F401 -- registers the Keras classes
    from simclr_tf import predict

    export_dir = str(base / "saved_model" / "4")
    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_default"]
    png = work["root"] / "ok.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (20, 20, 3), dtype=np.uint8)).save(png)
    good = png.read_bytes()
    assert serve(image_bytes=tf.constant([good]))["final_avg_pool"].shape[0] == 1

    with fault("serving: non-image bytes"):
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            serve(image_bytes=tf.constant([good, b"GET / HTTP/1.1", good]))
        assert "must hold encoded JPEG, PNG, GIF or BMP" in str(e.value) and "[1]" in str(e.value)
    with fault("serving: image bytes with a valid header but corrupt body"):
        with pytest.raises(tf.errors.InvalidArgumentError):
            serve(image_bytes=tf.constant([good[:60]]))
    with fault("serving: wrong dtypes"):
        for signature, kwargs, wanted in (("serving_float", dict(images=tf.zeros([1, 16, 16, 3], tf.uint8)),
                                           "float"),
                                          ("serving_default", dict(image_bytes=tf.constant([1, 2], tf.int32)),
                                           "string")):
            with pytest.raises(tf.errors.InvalidArgumentError, match=f"expected to be a {wanted} tensor"):
                loaded.signatures[signature](**kwargs)
    with fault("predict CLI: a non-image file"):
        text_file = work["root"] / "notes.png"
        text_file.write_text("not an image")
        capsys.readouterr()
        assert predict.main(["--saved_model", export_dir, "--images", str(png), str(text_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {text_file}: not a JPEG, PNG, GIF or BMP file", err

    with fault(".keras encoder loads with safe_mode=True"):
        model = keras.saving.load_model(os.path.join(export_dir, "encoder.keras"), safe_mode=True)
        images = tf.random.stateless_uniform([2, 16, 16, 3], seed=[4, 5])
        np.testing.assert_allclose(model(images, training=False)["h"].numpy(),
                                   loaded.signatures["serving_float"](images=images)["final_avg_pool"].numpy(),
                                   atol=1e-4)
