"""SavedModel export for TF Serving, TF Hub-style reuse and end-to-end fine-tuning, plus a `.keras` file.

`export_model` writes `model_dir/saved_model/<step>/` (the layout TF Serving watches: numeric version
folders under one base path) holding:

* signature `serving_default`: input `image_bytes` (tf.string [None], encoded JPEG / PNG / GIF / BMP of any
  size), decoded to RGB and turned into the eval view inside the graph (centre crop 0.875 + bicubic resize to
  the export's image size, exactly `augment.eval_view`, as the eval pipeline does);
* signature `serving_float`: input `images` (float32 [None, S, S, 3], RGB in [0, 1], already preprocessed);
* both return `final_avg_pool` (h), `proj_head_input`, `proj_head_output` (z before normalisation),
  `initial_conv`, `initial_max_pool`, `block_group1..4` (the reference's names) and, when the model has a
  supervised head, `logits_sup` and `probabilities` (softmax of the logits);
* `__call__(images, trainable)`: a tf.function (images float32 [None, None, None, 3] in [0, 1]) returning the
  same dict, traced for trainable True (BN in training mode, statistics updated) and False, as the
  reference's export; with `trainable_variables_list` / `variables_list` (the reference's names) and
  `trainable_variables` / `variables` / `regularization_losses` (the TF Hub reusable-SavedModel names) the
  loaded object can be fine-tuned end to end with a GradientTape. The reference exports its training-time
  model, so a linear-eval run's SavedModel has a frozen backbone and stop-gradient heads; ours is a copy
  with every layer trainable and no stop-gradient, whatever the training mode.
* `encoder.keras`: the same network as a Keras 3 file (`keras.saving.load_model(path)` after
  `import simclr_tf`), returning the dict of `SimCLRModel.call`.
* `image_size` (int) and `num_classes` (int, 0 without a supervised head) as attributes of the loaded object,
  and `class_names` (string [num_classes]: the label of each class, as the dataset names them; empty when the
  dataset does not, or the model has no supervised head). Exports written before it have no `class_names`;
  `exported_class_names(loaded)` reads both.

The export is atomic: everything is written to a temporary folder next to the final one, reloaded and run
once, and only then renamed into place; old exports beyond `keep` are deleted after that. If anything fails,
earlier exports are untouched and no partial `<step>` folder appears.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data import augment
from simclr_tf.image_formats import IMAGE_MAGIC
from simclr_tf.models import SimCLRModel
from simclr_tf.models.contrastive import SimCLR

ENDPOINTS = ("initial_conv", "initial_max_pool", "block_group1", "block_group2", "block_group3", "block_group4")
EXPORT_SUBDIR = "saved_model"
KERAS_FILENAME = "encoder.keras"
# What can be exported: the CLI's network or fit()'s SimCLR (same outputs h, z, logits_sup).
ExportableModel = Union[SimCLRModel, SimCLR]
# Verification tolerance between the reloaded SavedModel and the in-memory Keras model (float32 CPU/GPU
# kernels may differ in summation order between the eager and the saved graph).
VERIFY_ATOL = 1e-4


def export_copy(model: ExportableModel) -> ExportableModel:
    """A single-device copy of `model` with every layer trainable, plain BN and no stop-gradient.

    Call it outside `strategy.scope()` (as app.py does): the copy then holds plain variables, so the SavedModel
    has no cross-replica ops, and its `__call__(trainable=True)` trains everything (see the module docstring).

    Args:
        model: a `SimCLRModel` (the CLI's) or a built `SimCLR` (fit()'s); both name their copy's changes in
            `export_overrides()`.
    """
    if not getattr(model, "image_size", None):
        raise ValueError("model: not built on square images yet (call it on a batch first)")
    config = dict(model.get_config())
    config.update(model.export_overrides(), name=f"{model.name}_export")
    copy = type(model).from_config(config)
    copy.build((None, model.image_size, model.image_size, 3))  # symbolic: creates the weights, computes nothing
    source, target = model.weights, copy.weights
    if len(source) != len(target):
        raise RuntimeError(f"export copy has {len(target)} weights, the model {len(source)}")
    for src, dst in zip(source, target):
        # Same architecture, same creation order: paths agree below the (renamed) model, whose name prefixes
        # them when the variables were created inside its build.
        if tuple(src.shape) != tuple(dst.shape) or _below(src.path, model.name) != _below(dst.path, copy.name):
            raise RuntimeError(f"export copy weight {dst.path} {tuple(dst.shape)} does not match the model's "
                               f"{src.path} {tuple(src.shape)}")
        dst.assign(np.asarray(src.numpy()))
    return copy


def _below(path: str, model_name: str) -> str:
    return path[len(model_name) + 1:] if path.startswith(model_name + "/") else path


def _outputs(model: ExportableModel, images: tf.Tensor, training: bool) -> Dict[str, tf.Tensor]:
    out = model(images, training=training)
    # fit()'s SimCLR around another encoder has no ResNet endpoints: it exports what it has.
    result = {name: out[name] for name in ENDPOINTS if name in out}
    result["final_avg_pool"] = out["h"]
    result["proj_head_input"] = out["proj_head_input"]
    result["proj_head_output"] = out["proj_head_output"]
    if "logits_sup" in out:
        result["logits_sup"] = out["logits_sup"]
        result["probabilities"] = tf.nn.softmax(tf.cast(out["logits_sup"], tf.float32), axis=-1)
    return {k: tf.cast(v, tf.float32) for k, v in result.items()}


def _assert_image_bytes(data: tf.Tensor) -> tf.Operation:
    """Fails with a readable message (and the bad indices) unless every element looks like an image file."""
    known = tf.zeros_like(data, dtype=tf.bool)
    for magic in IMAGE_MAGIC:
        known = tf.logical_or(known, tf.equal(tf.strings.substr(data, 0, len(magic)), magic))
    bad = tf.where(tf.logical_not(known))[:, 0]
    return tf.debugging.Assert(
        tf.equal(tf.size(bad), 0),
        ["serving_default: input 'image_bytes' must hold encoded JPEG, PNG, GIF or BMP files; these elements "
         "(indices) are not:", bad], summarize=10)


# What `export_model` saves with; `ExportModule` traces `__call__` in the same save context (see below).
SAVE_OPTIONS = tf.saved_model.SaveOptions()


@contextlib.contextmanager
def _as_when_saving(options: tf.saved_model.SaveOptions) -> Iterator[None]:
    """Functions traced inside are traced as `tf.saved_model.save(..., options=options)` traces them.

    The save context is part of a tf.function's trace key, so functions traced before `save` (the concrete
    `__call__` functions, which must exist before it) are traced all over again inside it: tracing them here
    under the same context lets `save` reuse them (each trace of a network is seconds at export). The context
    manager is TensorFlow's internal one; without it the functions are merely traced twice.
    """
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover - a TensorFlow without the module: trace twice, as before
        yield
        return
    if save_context.in_save_context():
        yield
        return
    with save_context.save_context(options):
        yield


class ExportModule(tf.Module):
    """The object `tf.saved_model.save` writes; see the module docstring for its interface."""

    # Plain attributes instead of tf.Module's read-only getters, so the TF Hub names are saved as lists.
    variables = None
    trainable_variables = None

    def __init__(self, model: ExportableModel, image_size: int, class_names: Sequence[str] = ()) -> None:
        super().__init__(name="simclr_export")
        # The network is reached through the functions' closures, not an attribute: as an attribute, the
        # SavedModel would walk and serialise every Keras layer object (and trace the extra `serving_default`
        # function each Keras model offers), which costs time at export and at every load and serves no one:
        # the interface is the functions and the variable lists below.
        self.trainable_variables_list = [v.value for v in model.trainable_variables]
        self.variables_list = [v.value for v in model.variables]
        self.trainable_variables = list(self.trainable_variables_list)
        self.variables = list(self.variables_list)
        self.regularization_losses = []
        self.image_size = tf.Variable(image_size, dtype=tf.int32, trainable=False, name="image_size")
        self.num_classes = tf.Variable(int(model.num_classes or 0), dtype=tf.int32, trainable=False,
                                       name="num_classes")
        # A variable like the two above (a plain tensor attribute is not saved); shape [0] when unknown.
        self.class_names = tf.Variable(tf.constant(list(class_names), dtype=tf.string, shape=[len(class_names)]),
                                       trainable=False, name="class_names")
        size = image_size

        # The inference graph, traced once and called by both signatures and by `__call__(trainable=False)`
        # (the SavedModel holds it once; each trace of the network costs about half a second at export).
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def inference(images):
            return _outputs(model, images, False)

        self._inference = inference

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def serving_float(images):
            # Signatures do not enforce their static shape when called: another size would silently
            # give features of a resolution the model was not trained for.
            check = tf.debugging.assert_equal(
                tf.shape(images)[1:], tf.constant([size, size, 3]),
                message=f"images must be [N, {size}, {size}, 3] float32 in [0, 1]")
            with tf.control_dependencies([check]):
                images = tf.identity(images)
            return inference(images)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_bytes(image_bytes):
            with tf.control_dependencies([_assert_image_bytes(image_bytes)]):
                image_bytes = tf.identity(image_bytes)

            def preprocess(data):
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
                return augment.eval_view(image, size)

            images = tf.map_fn(preprocess, image_bytes,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return inference(images)

        self._model = lambda images, training: _outputs(model, images, training)  # a plain callable: untracked
        self.serving_float = serving_float
        self.serving_bytes = serving_bytes
        spec = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
        with _as_when_saving(SAVE_OPTIONS):
            self.__call__.get_concrete_function(spec, trainable=True)
            self.__call__.get_concrete_function(spec, trainable=False)

    @tf.function
    def __call__(self, images, trainable):
        # `trainable` is a Python bool (one concrete function each), as in the reference's export.
        return self._model(images, True) if trainable else self._inference(images)

    def signatures(self) -> Dict[str, tf.types.experimental.PolymorphicFunction]:
        # The functions, not concrete functions traced here: `tf.saved_model.save` traces every function again
        # under its own save context, so tracing them first doubled their cost (2.7 s of a 14 s export).
        return {"serving_default": self.serving_bytes, "serving_float": self.serving_float}


def export_model(model: ExportableModel, *, model_dir: str, step: int, image_size: int, keep: int,
                 class_names: Optional[Sequence[str]] = None) -> str:
    """Writes `model_dir/saved_model/<step>/` atomically and keeps the `keep` newest exports (0: all).

    Args:
        model: the model to export (a single-device copy of it is saved).
        model_dir: the run's folder; the export goes to its `saved_model/<step>/`.
        step: the training step, the export's version number.
        image_size: the side of the images `serving_float` takes and `serving_default` resizes to.
        keep: how many exports to keep, newest first (0: all).
        class_names: the label of each class of the supervised head, stored as `class_names`; None: unknown.
            Ignored for a model without a supervised head (there are no classes to name).

    Returns:
        The final directory.

    Raises:
        ValueError: `class_names` does not name every class of the head.
        RuntimeError: the reloaded SavedModel does not reproduce the model (earlier exports are left as they
            were).
    """
    names = _checked_class_names(model, class_names)
    base = os.path.join(model_dir, EXPORT_SUBDIR)
    tf.io.gfile.makedirs(base)
    final = os.path.join(base, str(int(step)))
    # Not a number, so neither TF Serving nor our clean-up ever takes it for a version.
    tmp = os.path.join(base, f".tmp-{int(step)}-{uuid.uuid4().hex[:8]}")
    try:
        copy = export_copy(model)
        module = ExportModule(copy, image_size, names)
        tf.saved_model.save(module, tmp, signatures=module.signatures(), options=SAVE_OPTIONS)
        copy.save(os.path.join(tmp, KERAS_FILENAME))
        _verify(tmp, copy, image_size, names)
        if tf.io.gfile.exists(final):  # re-export of the same step: swap, then drop the old one
            old = f"{tmp}-old"
            tf.io.gfile.rename(final, old)
            tf.io.gfile.rename(tmp, final)
            tf.io.gfile.rmtree(old)
        else:
            tf.io.gfile.rename(tmp, final)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    _prune(base, keep)
    return final


def _checked_class_names(model: ExportableModel, class_names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    num_classes = int(model.num_classes or 0)
    if not class_names or num_classes == 0:
        return ()
    names = tuple(str(name) for name in class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names: {len(names)} names for a supervised head of {num_classes} classes")
    return names


def exported_class_names(loaded) -> Tuple[str, ...]:
    """The class names stored in a loaded export; empty when it has none (unknown, or an older export).

    Args:
        loaded: `tf.saved_model.load` of an export.
    """
    stored = getattr(loaded, "class_names", None)
    if stored is None:
        return ()
    return tuple(name.decode("utf-8") for name in stored.numpy().tolist())


def _verify(path: str, model: ExportableModel, image_size: int, class_names: Tuple[str, ...] = ()) -> None:
    loaded = tf.saved_model.load(path)
    if exported_class_names(loaded) != class_names:
        raise RuntimeError(f"export verification failed: reloaded class_names {exported_class_names(loaded)} "
                           f"differ from {class_names}; nothing was exported")
    images = tf.random.stateless_uniform([2, image_size, image_size, 3], seed=[1, 2])
    got = loaded.signatures["serving_float"](images=images)
    want = _outputs(model, images, False)
    for key in ("final_avg_pool", "proj_head_output") + (("logits_sup",) if "logits_sup" in want else ()):
        diff = float(tf.reduce_max(tf.abs(got[key] - want[key])))
        if not np.isfinite(diff) or diff > VERIFY_ATOL * (1.0 + float(tf.reduce_max(tf.abs(want[key])))):
            raise RuntimeError(f"export verification failed: reloaded SavedModel output {key!r} differs from "
                               f"the model by {diff:g}; nothing was exported")


def _prune(base: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(int(name.rstrip("/")) for name in tf.io.gfile.listdir(base) if name.rstrip("/").isdigit())
    for old in steps[:-keep]:
        try:
            tf.io.gfile.rmtree(os.path.join(base, str(old)))
        except tf.errors.OpError as e:  # a stale export left behind costs disk only
            logging.warning("could not delete old export %s: %s", old, e)


def latest_export(model_dir: str) -> Optional[str]:
    """The newest `model_dir/saved_model/<step>` folder, or None."""
    base = os.path.join(model_dir, EXPORT_SUBDIR)
    if not tf.io.gfile.isdir(base):
        return None
    steps = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(base) if n.rstrip("/").isdigit()]
    return os.path.join(base, str(max(steps))) if steps else None
