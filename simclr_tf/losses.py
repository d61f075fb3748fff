"""Contrastive (NT-Xent) and distillation losses, always computed in float32.

NT-Xent follows docs/design.md §4 (SimCLRv2's memory of negatives: §4.4). Under tf.distribute the negatives
come from the whole global batch: both halves of the local projections are gathered from every replica with
`ReplicaContext.all_gather`, whose gradient all-reduces the upstream gradient and hands each replica the slice
of its own rows. The per-replica loss is the mean over *local* rows, so the caller must divide it by `num_replicas_in_sync`
(as `Trainer.gradients_fn` does) before taking gradients: the optimizer then sums the replica gradients,
which gives the gradient of the global mean, i.e. an R-replica step equals a one-device step on the same
global batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import keras
from keras import ops

from simclr_tf.errors import UsageError

# Large enough to push exp(logit) to exactly 0 in float32, small enough not to overflow it (float16 would).
_LARGE_NUM = 1e9
_NORM_EPSILON = 1e-12


class NTXentOutput(NamedTuple):
    """NT-Xent results for the local rows of one replica (NamedTuple, so tf.function can return it).

    loss: scalar float32, mean over local rows of CE([ab|aa], g) + CE([ba|bb], g) -- twice the paper's L,
        the scale the reference's learning rates are tuned for. NOT divided by the number of replicas.
        With a memory M: CE([ab|aa|am], g) + CE([ba|bb|bm], g), am = z1 M^T / tau (unfilled rows masked).
    logits_ab: [B, R*B] float32, view-1 rows against all view-2 rows of the global batch, divided by tau.
    labels: [B] int32, global index g = replica_id * B + i of each local row (the positive's column).
    contrast_acc: scalar float32, mean(argmax(logits_ab) == g) over local rows ([ab|am] with a memory).
    contrast_entropy: scalar float32, mean entropy (nats) of softmax(logits_ab) over local rows ([ab|am]
        with a memory).
    """

    loss: Any
    logits_ab: Any
    labels: Any
    contrast_acc: Any
    contrast_entropy: Any


def gather_from_replicas(x: Any) -> tuple[Any, Any]:
    """Concatenates `x` over all replicas (replica order); returns it and this replica's id.

    Replicas exist only under a multi-replica tf.distribute strategy (TensorFlow backend). Outside one (no
    strategy, one device, cross-replica context, or another Keras backend) the local batch is the global
    batch and the replica id is 0.

    Args:
        x: this replica's rows; every replica must pass the same shape.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # only here: the rest of this module runs on any Keras backend

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
            return context.all_gather(x, axis=0), replica_id
    return x, ops.convert_to_tensor(0, "int32")


def l2_normalize(x: Any, epsilon: float = _NORM_EPSILON) -> Any:
    """x / max(||x||, sqrt(epsilon)) over the last axis (tf.math.l2_normalize's formula, on any backend)."""
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), epsilon))


def _cross_entropy(labels: Any, logits: Any) -> Any:
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _extra_normaliser(extra: Any, log_normaliser: Any) -> Any:
    """log(e^a + e^b) - a per row, for a = `log_normaliser` and b = log sum exp of the columns of `extra`:
    what adding `extra`'s columns to a softmax adds to its log-normaliser. a + log1p(e^(b - a)) is exact
    when every entry of `extra` is masked (-1e9) or it has no columns: e^(b - a) is then exactly 0."""
    return ops.log1p(ops.exp(ops.logsumexp(extra, axis=1) - log_normaliser))


def _entropy_terms(log_prob: Any) -> Any:
    """-sum p log p per row, from log-probabilities."""
    return -ops.sum(ops.exp(log_prob) * log_prob, axis=1)


def nt_xent(z: Any, *, temperature: float, hidden_norm: bool = True,
            memory: Optional[Any] = None, memory_filled: Optional[Any] = None) -> NTXentOutput:
    """NT-Xent over the global batch for the local projections `z` of shape [2B, d].

    Rows 0..B-1 of `z` are the view-1 projections and rows B..2B-1 the view-2 projections of the same B
    images. Every replica must hold the same B (pipelines batch with drop_remainder), because the global
    index of local row i is replica_id * B + i. `z` may be float16/bfloat16; it is cast to float32 first.
    Written in keras.ops: the same function serves the CLI's tf.distribute step and `fit()` on any backend.

    Args:
        z: the local projections [2B, d].
        temperature: tau.
        hidden_norm: L2-normalise `z` first.
        memory: [K, d] extra negatives for every anchor (SimCLRv2's memory, docs/design.md §4.4), already
            normalised as `z` is (a constant: no gradient flows into it). None: plain NT-Xent, the exact
            computation without a memory.
        memory_filled: scalar int, how many leading rows of `memory` hold keys; the others are masked out.
            Required with `memory`.

    Returns:
        The loss and metrics; with a memory the metrics' candidates are the cross-view block and the memory.
    """
    if temperature <= 0:
        raise UsageError("--temperature", f"must be > 0, got {temperature}")
    z = ops.cast(z, "float32")
    if hidden_norm:
        z = l2_normalize(z)
    z1, z2 = ops.split(z, 2, axis=0)
    local_batch = ops.shape(z1)[0]

    z1_all, replica_id = gather_from_replicas(z1)
    z2_all, _ = gather_from_replicas(z2)
    global_batch = ops.shape(z1_all)[0]

    labels = replica_id * local_batch + ops.arange(local_batch, dtype="int32")
    self_mask = ops.one_hot(labels, global_batch, dtype="float32") * _LARGE_NUM

    inv_t = 1.0 / temperature

    def similarities(rows: Any, columns: Any) -> Any:
        return ops.matmul(rows, ops.transpose(columns)) * inv_t

    logits_aa = similarities(z1, z1_all) - self_mask
    logits_bb = similarities(z2, z2_all) - self_mask
    logits_ab = similarities(z1, z2_all)
    logits_ba = similarities(z2, z1_all)

    logits_am = logits_bm = None
    if memory is not None:  # without one, everything below is exactly plain NT-Xent
        if memory_filled is None:
            raise ValueError("memory_filled: required with memory")
        memory = ops.stop_gradient(ops.cast(memory, "float32"))
        # Rows not written yet hold zeros, not keys: the same -1e9 as the self term makes their exp exactly 0.
        unfilled = ops.arange(ops.shape(memory)[0], dtype="int32") >= ops.cast(memory_filled, "int32")
        empty = ops.cast(unfilled, "float32") * _LARGE_NUM
        logits_am = similarities(z1, memory) - empty
        logits_bm = similarities(z2, memory) - empty

    # The positive sits in column g of the first (cross-view) block, so the sparse label is g itself.
    loss_a = _cross_entropy(labels, ops.concatenate([logits_ab, logits_aa], 1))
    loss_b = _cross_entropy(labels, ops.concatenate([logits_ba, logits_bb], 1))
    if logits_am is not None:
        # The memory's columns join the normaliser as a separate term, on top of the plain cross-entropy (whose
        # normaliser is CE + the positive logit): an empty or unfilled memory adds exactly 0, and the fused
        # cross-entropy kernel keeps its memory footprint.
        for_a = loss_a + ops.take_along_axis(logits_ab, labels[:, None], axis=1)[:, 0]
        for_b = loss_b + ops.take_along_axis(logits_ba, labels[:, None], axis=1)[:, 0]
        loss_a = loss_a + _extra_normaliser(logits_am, for_a)
        loss_b = loss_b + _extra_normaliser(logits_bm, for_b)
    loss = ops.mean(loss_a + loss_b)

    # Metrics over the candidates a view-1 row can pick: the view-2 rows (and the memory).
    candidates = logits_ab if logits_am is None else ops.concatenate([logits_ab, logits_am], 1)
    predicted = ops.cast(ops.argmax(candidates, axis=1), "int32")
    contrast_acc = ops.mean(ops.cast(ops.equal(predicted, labels), "float32"))
    # Exact entropy from log-softmax; the reference adds 1e-8 inside the log, a difference below 1e-7.
    log_prob = ops.log_softmax(logits_ab, axis=1)
    entropy = _entropy_terms(log_prob)
    if logits_am is not None:  # the same split of the normaliser: an empty memory leaves the entropy as it is
        normaliser = logits_ab[:, 0] - log_prob[:, 0]
        shift = _extra_normaliser(logits_am, normaliser)[:, None]
        entropy = (_entropy_terms(log_prob - shift)
                   + _entropy_terms(logits_am - (normaliser[:, None] + shift)))  # masked columns: exp 0, add 0
    contrast_entropy = ops.mean(entropy)
    return NTXentOutput(loss, logits_ab, labels, contrast_acc, contrast_entropy)


def supervised_terms(logits: Any, labels: Any) -> dict[str, Any]:
    """Mean cross-entropy (`sup_loss`) and accuracy (`sup_acc`) over the examples with a label (label >= 0).

    Args:
        logits: [b, classes], any float dtype (computed in float32).
        labels: [b] int, -1 where an example has no label.
    """
    logits = ops.cast(logits, "float32")
    labels = ops.cast(labels, "int32")
    valid = labels >= 0
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    ce = _cross_entropy(safe, logits)
    w = ops.cast(valid, "float32")
    n = ops.maximum(ops.sum(w), 1.0)
    correct = ops.cast(ops.equal(ops.cast(ops.argmax(logits, -1), "int32"), safe), "float32")
    return {"sup_loss": ops.sum(ce * w) / n, "sup_acc": ops.sum(correct * w) / n}


def view_rows(images: Any) -> Any:
    """[b, S, S, 6] view pairs (two images on the channel axis, the input pipeline's layout) -> [2b, S, S, 3]:
    all first views, then all second views, the row order `nt_xent` expects."""
    first, second = ops.split(images, 2, axis=-1)
    return ops.concatenate([first, second], axis=0)


def pretraining_objective(outputs: dict[str, Any], labels: Any, *, temperature: float, hidden_norm: bool = True,
                          linear_eval: bool = False, memory: Optional[Any] = None,
                          memory_filled: Optional[Any] = None) -> tuple[Any, dict[str, Any]]:
    """The SimCLR pretraining loss of one per-replica batch of view pairs, and its metrics.

    The one definition both front doors use: the CLI's `PretrainTask` and `fit()`'s `SimCLR` model. Weight
    decay is not included (it depends on the optimizer; see optimizers.weight_decay_loss).

    Args:
        outputs: the network's outputs on [2B, ...] views (all first views, then all second views):
            `proj_head_output` [2B, d] and, with `linear_eval`, `logits_sup` [2B, classes] computed from
            stop_gradient(h).
        labels: [B] int labels of the images, -1 where unlabelled (read only with `linear_eval`).
        temperature, hidden_norm: NT-Xent's settings.
        linear_eval: add the online linear head's cross-entropy on the labelled rows (both views).
        memory, memory_filled: SimCLRv2's extra negatives (see nt_xent); None: plain SimCLR.

    Returns:
        (loss, metrics): `contrast_loss`, `contrast_acc`, `contrast_entropy`, and `sup_loss`, `sup_acc`
        with `linear_eval`.
    """
    con = nt_xent(outputs["proj_head_output"], temperature=temperature, hidden_norm=hidden_norm,
                  memory=memory, memory_filled=memory_filled)
    loss = con.loss
    metrics = dict(contrast_loss=con.loss, contrast_acc=con.contrast_acc, contrast_entropy=con.contrast_entropy)
    if linear_eval:
        sup = supervised_terms(outputs["logits_sup"], ops.concatenate([labels, labels], 0))
        loss = loss + sup["sup_loss"]
        metrics.update(sup)
    return loss, metrics


def distillation_loss(
    teacher_logits: Any,
    student_logits: Any,
    temperature: float,
    *,
    scale_by_temperature_squared: bool = False,
    reduction: str = "mean",
) -> Any:
    """SimCLRv2 distillation loss -sum_y softmax(t/tau)_y log softmax(s/tau)_y, in float32.

    The teacher is treated as a constant (stop_gradient). docs/design.md §9 specifies the plain loss, so
    the tau**2 factor of Hinton et al. (which keeps gradient magnitudes independent of tau) is off unless
    `scale_by_temperature_squared`. `reduction` is 'mean' (scalar over the local batch; scale it with
    the number of replicas like NT-Xent) or 'none' (per-example [N]).
    """
    if temperature <= 0:
        raise UsageError("--temperature", f"must be > 0, got {temperature}")
    if reduction not in ("mean", "none"):
        raise UsageError("distillation_loss", f"reduction must be 'mean' or 'none', got {reduction!r}")
    teacher = ops.stop_gradient(ops.cast(teacher_logits, "float32")) / temperature
    student = ops.cast(student_logits, "float32") / temperature
    per_example = -ops.sum(ops.softmax(teacher, axis=-1) * ops.log_softmax(student, axis=-1), -1)
    if scale_by_temperature_squared:
        per_example = per_example * (temperature * temperature)
    return ops.mean(per_example) if reduction == "mean" else per_example
