"""Fault injection, bad input: npz files with bad content or pickled arrays, image folders with odd formats,
tiny and corrupt files, and no loader that opts out of safe loading. They need no model, so they run while
the kill chain and the base run start (tests/fault_harness.py)."""
from __future__ import annotations

import glob
import os
import re
import struct
import zlib

import numpy as np
import pytest

from tests.conftest import REPO, write_npz
from tests.fault_harness import NUM_TRAIN, fault

pytestmark = pytest.mark.usefixtures("background")  # the kill chain and the base run start with the first test


def test_npz_files_with_bad_content_are_rejected_in_one_line_naming_file_and_key(work):
    from simclr_tf.data.sources import build_source
    from simclr_tf.errors import UsageError

    root = work["root"]
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    cases = {
        "npz missing key": (dict(x_test=None), "x_test"),
        "npz float images": (dict(x_train=images.astype(np.float32)), "x_train"),
        "npz float labels": (dict(y_train=rng.rand(NUM_TRAIN)), "y_train"),
        "npz 2-channel images": (dict(x_train=rng.randint(0, 256, (NUM_TRAIN, 8, 8, 2), dtype=np.uint8)),
                                 "x_train"),
        "npz labels/images count mismatch": (dict(y_train=np.zeros(3, np.int64)), "y_train"),
        "npz label >= num_classes": (dict(num_classes=np.int64(3), y_train=np.arange(NUM_TRAIN) % 3,
                                          y_test=np.full(20, 3)), "y_test"),
        "npz label < -1": (dict(y_train=np.full(NUM_TRAIN, -2)), "y_train"),
        "npz empty split": (dict(x_test=np.zeros((0, 16, 16, 3), np.uint8), y_test=np.zeros(0, np.int64)),
                            "x_test"),
    }
    for number, (name, (override, key)) in enumerate(cases.items()):
        path = write_npz(root / f"bad_{number}.npz", classes=4, **override)
        with fault(name):
            with pytest.raises(UsageError) as e:
                build_source(f"npz:{path}", None, "train", "test")
            message = str(e.value)
            assert "\n" not in message and message.startswith(path) and f"'{key}'" in message, message

    with fault("not an npz file"):
        path = root / "garbage.npz"
        path.write_bytes(os.urandom(300))
        with pytest.raises(UsageError) as e:
            build_source(f"npz:{path}", None, "train", "test")
        assert str(e.value).startswith("--dataset:") and str(path) in str(e.value) and "\n" not in str(e.value)

    with fault("split spec selecting no examples"):
        with pytest.raises(UsageError) as e:
            build_source(f"npz:{work['npz']}", None, "train[:0]", "test")
        assert str(e.value).startswith("--train_split:") and "\n" not in str(e.value)


class Unpickled:
    """Unpickling this creates a marker file: proof that a loader executed pickled code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npz_is_read_without_pickle(work):
    from simclr_tf.data.sources import build_source
    from simclr_tf.errors import UsageError

    marker = work["root"] / "pickle_ran"
    Unpickled.marker = str(marker)
    payload = np.empty(NUM_TRAIN, dtype=object)
    payload[:] = [Unpickled() for _ in range(NUM_TRAIN)]
    path = write_npz(work["root"] / "pickled.npz", classes=4, y_train=payload)
    with fault("npz with a pickled (code-carrying) array"):
        with pytest.raises(UsageError) as e:
            build_source(f"npz:{path}", None, "train", "test")
        assert not marker.exists(), "the npz loader unpickled an object array"
        assert str(e.value).startswith(path) and "pickle" in str(e.value) and "\n" not in str(e.value)


def _png16(path, array):
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3] uint16), written by hand: PIL cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    color = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_image_folder_formats_sizes_and_corrupt_files(work, caplog):
    """Grayscale / RGBA / palette / 16-bit PNGs decode to the right RGB; images smaller than the crop go
    through both pipelines; corrupt files are skipped and named; an empty or all-corrupt split is an error."""
    import tensorflow as tf
    from PIL import Image

    from simclr_tf.data import pipeline
    from simclr_tf.data.sources import build_source
    from simclr_tf.data.sources.decoding import SkippedFiles
    from simclr_tf.errors import UsageError
    from simclr_tf.sections import AugmentConfig

    rng = np.random.RandomState(2)
    root = work["root"] / "folder"
    rgb = rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)
    gray = rng.randint(0, 256, (20, 24), dtype=np.uint8)
    alpha = rng.randint(0, 256, (20, 24), dtype=np.uint8)
    gray16 = rng.randint(0, 65536, (20, 24), dtype=np.uint16)
    rgb16 = rng.randint(0, 65536, (20, 24, 3), dtype=np.uint16)
    small = rng.randint(0, 256, (5, 3, 3), dtype=np.uint8)
    # class folder -> (file writer, expected decoded RGB uint8)
    classes = {
        "a_gray": (lambda p: Image.fromarray(gray, "L").save(p), np.repeat(gray[..., None], 3, -1)),
        "b_rgba": (lambda p: Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p), rgb),
        "c_palette": (lambda p: Image.fromarray(rgb).quantize(16).save(p),
                      np.asarray(Image.fromarray(rgb).quantize(16).convert("RGB"))),
        "d_gray16": (lambda p: _png16(p, gray16), np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, -1)),
        "e_rgb16": (lambda p: _png16(p, rgb16), (rgb16 >> 8).astype(np.uint8)),
        "f_small": (lambda p: Image.fromarray(small).save(p), small),
        "g_one_pixel": (lambda p: Image.fromarray(rgb[:1, :1]).save(p), rgb[:1, :1]),
    }
    for split in ("train", "test"):
        for name, (writer, _) in classes.items():
            os.makedirs(root / split / name)
            writer(root / split / name / "img.png")
    bad = {"a_gray/truncated.jpg": None, "b_rgba/noise.png": os.urandom(500), "c_palette/empty.jpg": b"",
           "d_gray16/text.png": b"hello, not an image"}
    buffer = root / "full.jpg"
    Image.fromarray(rgb).save(buffer, quality=90)
    bad["a_gray/truncated.jpg"] = buffer.read_bytes()[:300]
    buffer.unlink()
    for rel, data in bad.items():
        (root / "train" / rel).write_bytes(data)

    source = build_source(f"folder:{root}", None, "train", "test")
    skipped = SkippedFiles()
    with caplog.at_level("WARNING"):
        examples = list(source.as_dataset("train", skipped=skipped))  # decoded (and skipped) when read
    with fault("corrupt, truncated, empty and non-image files in an image folder"):
        assert sorted(os.path.relpath(f, root / "train") for f in skipped.names) == sorted(bad)
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert all(os.path.basename(rel) in warned for rel in bad), warned
        assert len(examples) == len(classes) and source.num_train == len(classes) + len(bad)

    decoded = {}
    for image, label in examples:
        decoded[sorted(classes)[int(label)]] = image.numpy()
    for name, title in (("a_gray", "grayscale PNG"), ("b_rgba", "RGBA PNG"), ("c_palette", "palette PNG"),
                        ("d_gray16", "16-bit grayscale PNG"), ("e_rgb16", "16-bit RGB PNG")):
        with fault(title):
            want = classes[name][1]
            assert decoded[name].shape == want.shape and decoded[name].dtype == np.uint8
            np.testing.assert_allclose(decoded[name].astype(int), want.astype(int), atol=1)

    with fault("images smaller than the crop (5x3 and 1x1 at image_size 16)"):
        np.testing.assert_array_equal(decoded["f_small"], small)
        for mode, channels in (("pretrain", 6), ("eval", 3)):
            augment = AugmentConfig(image_size=16, color_jitter_strength=0.5, use_blur=False)
            input_fn = pipeline.build_input_fn(source, mode=mode, global_batch_size=len(classes), augment=augment,
                                               seed=0)
            images, _ = next(iter(input_fn(tf.distribute.InputContext())))
            images = images.numpy()
            assert images.shape == (len(classes), 16, 16, channels)
            assert np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0

    with fault("image folder split with no images"):
        os.makedirs(root / "empty" / "a_gray")
        with pytest.raises(UsageError) as e:
            build_source(f"folder:{root}", None, "train", "empty")
        assert str(e.value).startswith("--eval_split:") and str(root / "empty") in str(e.value)
        assert "\n" not in str(e.value)

    with fault("image folder split whose files are all corrupt"):
        for rel, data in bad.items():
            target = root / "broken" / rel
            os.makedirs(target.parent, exist_ok=True)
            target.write_bytes(data)
        with pytest.raises(UsageError) as e:
            build_source(f"folder:{root}", None, "broken", "broken")
        assert str(e.value).startswith("--train_split:") and str(root / "broken") in str(e.value)


def test_loaders_never_opt_out_of_safe_loading():
    """No code path loads pickles or unsafe Keras files (the behavioural checks are the npz and .keras cases)."""
    offenders = []
    for path in glob.glob(str(REPO / "simclr_tf" / "**" / "*.py"), recursive=True) + [str(REPO / "run.py")]:
        text = open(path).read()
        for pattern in (r"allow_pickle\s*=\s*True", r"safe_mode\s*=\s*False", r"\bpickle\.loads?\(",
                        r"enable_unsafe_deserialization"):
            offenders += [f"{os.path.relpath(path, REPO)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders
