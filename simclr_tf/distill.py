"""SimCLRv2 distillation (docs/design.md §9): the frozen teacher of `--train_mode=distill`.

The trainer calls the teacher on the student's own batch, so both see the same crop + flip view, and minimises

    L = (1 - alpha) * mean_x [ -sum_y P_T(y|x; tau) log P_S(y|x; tau) ] + alpha * CE(labels),
    P(y|x; tau) = softmax(logits / tau),

with `alpha = --distill_alpha` (0: pure distillation, no label is read; > 0 mixes in the cross-entropy of the
examples that have a label, label >= 0) and `tau = --distill_temperature`. The distillation term is not
multiplied by tau**2 (Hinton et al.'s factor that keeps gradient sizes independent of tau), as in docs/design.md §9;
with tau != 1 raise the learning rate instead. docs/design.md §9 gives the same weights; the
`--distill_alpha` flag is alpha, the weight of the labels.

`--teacher_checkpoint` is one of:

* a simclr_tf checkpoint: a fine-tuning run's model_dir (its latest checkpoint) or a checkpoint prefix. The
  architecture is the one the checkpoint records (older checkpoints: the teacher run's `flags.json` next to
  them; with neither, the teacher is refused, never rebuilt from the student's flags). `--teacher_resnet_depth`
  / `--teacher_width_multiplier` / `--teacher_sk_ratio` override it, and a mismatch fails at restore.
* an official SimCLR TF1 checkpoint (fine-tuned, with its linear head): the architecture comes from its
  variables; the layer feeding the linear head is not stored in them and is taken from `--ft_proj_selector`.
* an exported SavedModel directory (`model_dir/saved_model/<step>`, see `simclr_tf.export`), called with
  `trainable=False`.

The teacher runs BN in inference mode, is never trained and is a plain Python object, so neither the student's
model nor its checkpoint tracks it. Its class count must equal the dataset's. When its image size differs from
`--image_size`, the student's view is resized (bicubic) to the teacher's size.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import checkpoints as ckpt_lib
from simclr_tf.config import Config
from simclr_tf.errors import UsageError, first_line
from simclr_tf.models import SimCLRModel

FLAG = "--teacher_checkpoint"
FLAGS_FILENAME = "flags.json"
# Settings that shape the teacher network, read from the teacher run's flags.json (keys = flag names).
ARCHITECTURE_FIELDS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "image_size", "proj_head_mode",
                       "proj_out_dim", "num_proj_layers", "ft_proj_selector", "batch_norm_decay")
# The explicit teacher flags win over flags.json.
TEACHER_FLAGS = {"resnet_depth": "teacher_resnet_depth", "width_multiplier": "teacher_width_multiplier",
                 "sk_ratio": "teacher_sk_ratio"}


class Teacher:
    """`teacher(images float32 [b, S, S, 3] in [0, 1]) -> float32 logits [b, num_classes]`, frozen.

    A plain object on purpose (not a `tf.Module` or Keras layer): objects that hold it never track its
    variables, so they stay out of the student's optimizer and checkpoints.
    """

    def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *, num_classes: int, image_size: int,
                 variables: List[tf.Variable], description: str, keep_alive: Any = None) -> None:
        self._logits_fn = logits_fn
        self.num_classes = num_classes
        self.image_size = image_size
        self.variables = list(variables)
        self.description = description
        self._keep_alive = keep_alive  # a loaded SavedModel must outlive the functions taken from it

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            images = tf.clip_by_value(
                tf.image.resize(images, [self.image_size, self.image_size], method="bicubic"), 0.0, 1.0)
        return tf.cast(self._logits_fn(images), tf.float32)

    def __repr__(self) -> str:
        return f"Teacher({self.description})"


def build_teacher(config: Config, strategy: tf.distribute.Strategy,
                  num_classes: Optional[int] = None) -> Teacher:
    """The frozen teacher of `config.teacher_checkpoint`, its variables created in `strategy`'s scope.

    `num_classes` is the dataset's class count (read from `config`'s dataset when None); the teacher must have
    exactly as many. Raises UsageError for a missing, mismatching or headless teacher.
    """
    path = config.teacher_checkpoint
    if not path:
        raise UsageError(FLAG, "is required with --train_mode=distill")
    if num_classes is None:
        from simclr_tf.data.sources import build_source

        num_classes = build_source(config.dataset, config.data_dir, config.train_split,
                                   config.eval_split).num_classes
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        teacher = _saved_model_teacher(path, strategy, num_classes)
    else:
        try:
            prefix = ckpt_lib.resolve_checkpoint(path)
        except UsageError as e:
            raise _renamed(e) from None
        if ckpt_lib.is_native_checkpoint(prefix):
            teacher = _native_teacher(config, prefix, strategy, num_classes)
        else:
            teacher = _official_teacher(config, prefix, strategy, num_classes)
    return teacher


# ------------------------------------------------------------------------------------------------------------
# simclr_tf checkpoints


def teacher_architecture(config: Config, prefix: str) -> Dict[str, Any]:
    """SimCLRModel arguments of the teacher in checkpoint `prefix`.

    The architecture comes from the checkpoint itself (every simclr_tf checkpoint records it), else from the
    teacher run's flags.json next to it (checkpoints written before they recorded it); without either the
    teacher cannot be rebuilt faithfully (the student's flags may differ, e.g. in --ft_proj_selector, in ways
    that still load but give other logits) and this refuses. Explicit --teacher_* flags override (a mismatch
    then fails at restore).
    """
    saved = ckpt_lib.stored_architecture(prefix)
    flags_path = os.path.join(os.path.dirname(prefix), FLAGS_FILENAME)
    if saved is None and tf.io.gfile.exists(flags_path):
        try:
            with tf.io.gfile.GFile(flags_path) as f:
                saved = json.load(f)
        except (ValueError, tf.errors.OpError) as e:
            raise UsageError(flags_path, f"cannot read the teacher's flags: {e}") from None
        if not isinstance(saved, dict):
            raise UsageError(flags_path, "expected a JSON object of flag values")
    if saved is None:
        raise UsageError(FLAG, f"{prefix} does not record its architecture and has no {FLAGS_FILENAME} next to "
                               "it, so the teacher cannot be rebuilt as it was trained; use the teacher run's "
                               "model_dir, or its SavedModel export")
    missing = [name for name in ARCHITECTURE_FIELDS if name not in saved]
    if missing:
        raise UsageError(FLAG, f"the teacher's recorded architecture lacks {', '.join(missing)}")
    arch = {name: saved[name] for name in ARCHITECTURE_FIELDS}
    for name, flag in TEACHER_FLAGS.items():
        value = getattr(config, flag)
        if value is not None:
            arch[name] = value
    arch["width_multiplier"] = float(arch["width_multiplier"])
    return arch


def _describe(arch: Dict[str, Any]) -> str:
    sk = f" SK {arch['sk_ratio']:g}" if arch["sk_ratio"] else ""
    return (f"ResNet-{arch['resnet_depth']} {arch['width_multiplier']:g}x{sk}, image {arch['image_size']}, "
            f"{arch['proj_head_mode']} head ({arch['num_proj_layers']} layers), ft_proj_selector "
            f"{arch['ft_proj_selector']}")


def _native_teacher(config: Config, prefix: str, strategy: tf.distribute.Strategy, num_classes: int) -> Teacher:
    arch = teacher_architecture(config, prefix)
    teacher_classes = _native_num_classes(prefix)
    if teacher_classes is None:
        raise UsageError(FLAG, f"{prefix} has no supervised head; the teacher must be a classifier (a "
                               "--train_mode=finetune run, or pretraining with online linear eval)")
    _check_classes(teacher_classes, num_classes, config)
    model = _frozen_model(arch, num_classes, strategy)
    parts = dict(backbone=model.backbone, projection_head=model.projection_head,
                 supervised_head=model.supervised_head)
    try:
        status = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts)).read(prefix)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        raise UsageError(FLAG, f"{prefix} does not match the teacher architecture ({_describe(arch)}); set "
                               "--teacher_resnet_depth / --teacher_width_multiplier / --teacher_sk_ratio to match "
                               "it, or leave them unset: "
                               f"{first_line(e)}") from None
    status.expect_partial()  # the optimizer slots and step of the teacher run are not wanted
    return _model_teacher(model, arch["image_size"], f"{prefix}, {_describe(arch)}")


def _native_num_classes(prefix: str) -> Optional[int]:
    """Classes of the supervised head in a simclr_tf checkpoint (from its object graph), None without one."""
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    node = graph.nodes[0]
    for name in ("model", "supervised_head", "dense", "bias"):
        child = next((c for c in node.children if c.local_name == name), None)
        if child is None:
            return None
        node = graph.nodes[child.node_id]
    keys = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
    if not keys:
        return None
    return int(reader.get_variable_to_shape_map()[keys[0]][0])


# ------------------------------------------------------------------------------------------------------------
# Official TF1 checkpoints


def _official_teacher(config: Config, prefix: str, strategy: tf.distribute.Strategy,
                      num_classes: int) -> Teacher:
    from simclr_tf import official

    try:
        spec = official.inspect_checkpoint(prefix)
    except UsageError as e:
        raise _renamed(e) from None
    if not spec.num_classes:
        raise UsageError(FLAG, f"{prefix} has no supervised head ({spec.describe()}); the teacher must be a "
                               "fine-tuned checkpoint")
    _check_classes(spec.num_classes, num_classes, config)
    for name, flag in TEACHER_FLAGS.items():
        wanted = getattr(config, flag)
        if wanted is not None and not _same(name, wanted, getattr(spec, name)):
            raise UsageError(f"--{flag}", f"{wanted:g} does not match the teacher checkpoint ({spec.describe()})")
    selector = config.ft_proj_selector if spec.proj_head_mode else 0
    kwargs = spec.model_kwargs(image_size=config.image_size, ft_proj_selector=selector)
    arch = {name: kwargs[name] for name in ARCHITECTURE_FIELDS if name in kwargs}
    arch["batch_norm_decay"] = config.batch_norm_decay
    model = _frozen_model(arch, num_classes, strategy)
    try:
        official.load_official_checkpoint(model, prefix, use_ema=config.use_ema and spec.has_ema)
    except UsageError as e:
        raise UsageError(FLAG, f"{_message(e)} (official checkpoints do not store which layer feeds the linear "
                               f"head; it is taken from --ft_proj_selector={selector})") from None
    return _model_teacher(model, arch["image_size"], f"official {prefix}, {spec.describe()}")


def _same(name: str, wanted: float, found: float) -> bool:
    if name == "sk_ratio":  # official checkpoints only tell SK on/off at widths <= 1x (see official.py)
        return (wanted > 0) == (found > 0)
    return abs(float(wanted) - float(found)) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Exported SavedModels


def _saved_model_teacher(path: str, strategy: tf.distribute.Strategy, num_classes: int) -> Teacher:
    # Loaded in the scope, its variables are mirrored and its functions run inside strategy.run.
    with strategy.scope():
        try:
            loaded = tf.saved_model.load(path)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise UsageError(FLAG, f"cannot load the SavedModel {path}: {first_line(e)}") from None
    if not all(hasattr(loaded, name) for name in ("num_classes", "image_size", "__call__")):
        raise UsageError(FLAG, f"{path} is not a simclr_tf export (no num_classes / image_size / __call__)")
    teacher_classes = int(loaded.num_classes.numpy())
    if teacher_classes == 0:
        raise UsageError(FLAG, f"{path} has no supervised head; the teacher must be a classifier")
    _check_classes(teacher_classes, num_classes, None)
    image_size = int(loaded.image_size.numpy())

    def logits(images: tf.Tensor) -> tf.Tensor:
        return loaded(images, False)["logits_sup"]

    variables = list(getattr(loaded, "variables", None) or [])
    return Teacher(logits, num_classes=teacher_classes, image_size=image_size, variables=variables,
                   description=f"SavedModel {path}, image {image_size}, {teacher_classes} classes",
                   keep_alive=loaded)


# ------------------------------------------------------------------------------------------------------------
# Shared


def _frozen_model(arch: Dict[str, Any], num_classes: int, strategy: tf.distribute.Strategy) -> SimCLRModel:
    # Inference only: plain BN (no cross-replica statistics), no freezing schedule, no stop-gradient.
    with strategy.scope():
        model = SimCLRModel(**arch, num_classes=num_classes, global_bn=False, fine_tune_after_block=-1,
                            linear_eval_stop_gradient=False, name="teacher")
        model(tf.zeros([1, arch["image_size"], arch["image_size"], 3]), training=False)
    model.trainable = False
    return model


def _model_teacher(model: SimCLRModel, image_size: int, description: str) -> Teacher:
    def logits(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)["logits_sup"]

    return Teacher(logits, num_classes=model.num_classes, image_size=image_size, variables=list(model.variables),
                   description=description, keep_alive=model)


def _check_classes(teacher_classes: int, dataset_classes: int, config: Optional[Config]) -> None:
    if teacher_classes != dataset_classes:
        dataset = f" ({config.dataset})" if config is not None else ""
        raise UsageError(FLAG, f"the teacher has {teacher_classes} classes but the dataset{dataset} has "
                               f"{dataset_classes}; distil on data of the teacher's task")


def _message(e: UsageError) -> str:
    text = str(e)
    return text[len(e.where) + 2:] if text.startswith(f"{e.where}: ") else text


def _renamed(e: UsageError) -> UsageError:
    """Errors of the shared checkpoint readers name --checkpoint; here the flag at fault is the teacher's."""
    return UsageError(FLAG, _message(e)) if e.where == "--checkpoint" else e
