"""Checkpoints: resume a run, or initialise a model from another run / an official checkpoint.

Saving goes through `tf.train.CheckpointManager`: TF writes the shards of a checkpoint first and then replaces
the `checkpoint` state file atomically, and deletes old checkpoints only after that, so a crash while saving
leaves `model_dir` pointing at the previous complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.errors import NonFiniteLossError, UsageError, first_line
from simclr_tf.sections import ModelConfig

ARCHITECTURE_ATTRIBUTE = "json"
ARCHITECTURE_KEY = f"architecture/.ATTRIBUTES/{ARCHITECTURE_ATTRIBUTE}"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix, or from a directory holding checkpoints (latest wins)."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest and tf.io.gfile.exists(latest + ".index"):
            return latest
        # A directory without a state file: the newest *.index in it.
        indexes = sorted(tf.io.gfile.glob(os.path.join(path, "*.index")), key=_step_of)
        if indexes:
            return indexes[-1][: -len(".index")]
        raise UsageError("--checkpoint", f"no checkpoint in directory {path}")
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise UsageError("--checkpoint", f"no checkpoint at {path}")


def _step_of(index_path: str) -> int:
    stem = os.path.basename(index_path)[: -len(".index")]
    tail = stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def is_native_checkpoint(prefix: str) -> bool:
    """True for a checkpoint written by tf.train.Checkpoint (object graph), False for TF1 name-based ones."""
    names = {name for name, _ in tf.train.list_variables(prefix)}
    return "_CHECKPOINTABLE_OBJECT_GRAPH" in names


def initialise_from_checkpoint(model, path: str, *, restore_supervised_head: bool = True,
                               use_ema: bool = False, flag: str = "--checkpoint") -> str:
    """Loads model weights only (no optimizer, no step) from a simclr_tf or an official TF1 checkpoint.

    The supervised head is restored only when its shape matches; otherwise it keeps its fresh initialisation
    and a note is logged (the reference crashes on a new class count). Returns the prefix used.
    """
    prefix = resolve_checkpoint(path)
    if not is_native_checkpoint(prefix):
        from simclr_tf import official  # the TF1 name-based format of the released SimCLR checkpoints

        spec = official.inspect_checkpoint(prefix)
        head_matches = spec.num_classes == (model.num_classes or 0)
        if restore_supervised_head and spec.num_classes and not head_matches:
            print(f"note: the checkpoint's supervised head has {spec.num_classes} classes, this run "
                  f"{model.num_classes}; a fresh head is trained", flush=True)
        official.load_official_checkpoint(
            model, prefix, use_ema=use_ema,
            skip_supervised_head=not restore_supervised_head or not head_matches,
            allow_missing_projection_head=spec.proj_head_mode is None)
        return prefix
    parts = {"backbone": model.backbone}
    if getattr(model, "projection_head", None) is not None:
        parts["projection_head"] = model.projection_head
    root = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts))
    try:
        status = root.read(prefix)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise UsageError(flag, f"{prefix} does not match this architecture: "
                               f"{describe_mismatch(root, prefix, e)}") from None
    status.expect_partial()
    head = getattr(model, "supervised_head", None)
    if head is not None and restore_supervised_head:
        before = [v.numpy() for v in head.variables]
        try:
            tf.train.Checkpoint(model=tf.train.Checkpoint(supervised_head=head)).read(prefix).expect_partial()
        except (ValueError, tf.errors.InvalidArgumentError) as e:
            for v, value in zip(head.variables, before):
                v.assign(value)
            logging.warning("Supervised head not restored from %s (%s); starting a fresh head.",
                            prefix, first_line(e))
            print(f"note: the checkpoint's supervised head has another shape; a fresh head is trained "
                  f"({first_line(e)})", flush=True)
    return prefix


def zero_supervised_head(model) -> None:
    for v in model.supervised_head.trainable_variables:
        v.assign(tf.zeros_like(v))


def checkpoint_step(prefix: str) -> Optional[int]:
    reader = tf.train.load_checkpoint(prefix)
    for key in ("global_step/.ATTRIBUTES/VARIABLE_VALUE", "global_step"):
        if reader.has_tensor(key):
            return int(np.asarray(reader.get_tensor(key)))
    return None


def describe_mismatch(root: tf.train.Checkpoint, prefix: str, error: BaseException) -> str:
    """Names the first model variable whose presence or shape differs between checkpoint `prefix` and `root`.

    Called only after a restore failed: it writes `root`'s own layout to a temporary checkpoint (the one
    public way to learn what `root` would read) and compares the two by path below `model`.
    """
    try:
        saved = _model_variable_shapes(prefix)
        with tempfile.TemporaryDirectory() as tmp:
            ours = _model_variable_shapes(root.write(os.path.join(tmp, "layout")))
    except (tf.errors.OpError, IndexError, ValueError):  # an unreadable checkpoint: TF's words will do
        return first_line(error)
    for path, shape in ours.items():
        if path in saved and saved[path] != shape:
            return f"variable {path} has shape {saved[path]} in the checkpoint, {shape} in this model"
    for path in ours:
        if path not in saved:
            return f"variable {path} of this model is not in the checkpoint"
    scopes = {"/".join(path.split("/")[:2]) for path in ours}
    for path in saved:
        if "/".join(path.split("/")[:2]) in scopes and path not in ours:
            return f"the checkpoint has variable {path}, which this model lacks"
    return first_line(error)


def _model_variable_shapes(prefix: str) -> dict:
    """`model/...` object path -> shape of every variable under the root's `model` child, in graph order.

    Checkpoint keys name each variable by its shortest path, which for trainable weights runs through the
    optimizer; the object graph gives the path through the model instead.
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    roots = [c.node_id for c in graph.nodes[0].children if c.local_name == "model"]
    paths = {node: "model" for node in roots}
    queue = list(roots)
    while queue:
        node = queue.pop(0)
        for child in graph.nodes[node].children:
            if child.node_id not in paths:
                paths[child.node_id] = f"{paths[node]}/{child.local_name}"
                queue.append(child.node_id)
    found = {}
    for node, path in paths.items():
        for attribute in graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE" and attribute.checkpoint_key in shapes:
                found[path] = list(shapes[attribute.checkpoint_key])
    return found




class RecordedArchitecture(tf.__internal__.tracking.Trackable):
    """The model's architecture (its ModelConfig as JSON), written into every checkpoint next to `model`.

    Saved as a string tensor, not a variable: it describes the model of the process that saves, so restoring
    leaves it as it is (a run resumed with other flags records what it now trains).
    """

    def __init__(self, model: ModelConfig) -> None:
        self.text = json.dumps(dataclasses.asdict(model), sort_keys=True)

    def _serialize_to_tensors(self) -> dict:
        return {ARCHITECTURE_ATTRIBUTE: tf.constant(self.text)}

    def _restore_from_tensors(self, restored_tensors: dict) -> tf.Operation:
        return tf.no_op()


def stored_architecture(prefix: str) -> Optional[dict]:
    """The architecture a simclr_tf checkpoint records (ModelConfig fields), or None for older checkpoints."""
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(ARCHITECTURE_KEY):
        return None
    value = reader.get_tensor(ARCHITECTURE_KEY)
    return json.loads(value.decode() if isinstance(value, bytes) else str(value))


def resume(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
           legacy: Optional[tf.train.Checkpoint] = None) -> Optional[str]:
    """Restores the latest checkpoint of `manager` into `checkpoint`; its prefix, or None when there is none.

    Args:
        checkpoint: the run's checkpoint root.
        manager: the run's checkpoint manager.
        legacy: the same root without `architecture`, for checkpoints written before they recorded it.

    Raises UsageError naming --model_dir when that checkpoint was written by another architecture or cannot
    be read; nothing is overwritten.
    """
    latest = manager.latest_checkpoint
    if not latest:
        return None
    try:
        if legacy is not None and stored_architecture(latest) is None:
            checkpoint = legacy
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise UsageError("--model_dir", f"{latest} was written by another architecture: "
                         f"{describe_mismatch(checkpoint, latest, e)}; use a new "
                         "--model_dir or the flags of that run (its flags.json)") from None
    except (tf.errors.OpError, IndexError) as e:  # truncated files raise IndexError
        raise UsageError("--model_dir", f"cannot read checkpoint {latest}: {first_line(e)}") from None
    return latest


def last_complete(manager: tf.train.CheckpointManager) -> str:
    """The newest complete checkpoint, as error messages name it."""
    return manager.latest_checkpoint or "none (no checkpoint was written yet)"


def save_if_finite(manager: tf.train.CheckpointManager, step: int, variables: list) -> None:
    """Saves checkpoint `step`, unless one of `variables` holds NaN/Inf or the directory cannot be written.

    Raises NonFiniteLossError or UsageError (naming --model_dir); either way the last complete checkpoint is
    untouched.
    """
    last = last_complete(manager)
    # A finite loss can still leave Inf behind (BN moving statistics, an overflowing update), and the loss
    # check only sees it one step later: never let such weights become a checkpoint.
    bad = first_non_finite(variables)
    if bad is not None:
        raise NonFiniteLossError(f"non-finite values in {bad} after step {step}; training stopped without "
                                 f"saving. Last good checkpoint: {last}")
    try:
        manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        raise UsageError("--model_dir", f"cannot write the checkpoint of step {step} to {manager.directory} "
                         f"({first_line(e)}); the last complete checkpoint, {last}, is untouched") from None


def first_non_finite(variables: list) -> Optional[str]:
    """The path of the first floating-point variable holding NaN or Inf, or None."""
    floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
    if not floats:
        return None
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in floats]).numpy()
    for v, ok in zip(floats, finite):
        if not ok:
            return getattr(v, "path", None) or v.name
    return None


def initialise(model, path: Optional[str], *, use_ema: bool = False, zero_init_logits_layer: bool = False) -> str:
    """A fresh run's starting weights: from checkpoint `path` if given, else the random initialisation.

    Args:
        model: the SimCLRModel.
        path: a simclr_tf run or checkpoint, an official TF1 checkpoint, or None.
        use_ema: read the official checkpoint's moving-average weights.
        zero_init_logits_layer: zero the supervised head afterwards.

    Returns what was done, for the log.
    """
    what = "starting from random initialisation"
    if path:
        what = f"initialised model weights from {initialise_from_checkpoint(model, path, use_ema=use_ema)}"
    if zero_init_logits_layer:
        zero_supervised_head(model)
    return what
