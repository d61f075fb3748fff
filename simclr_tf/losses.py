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

from typing import NamedTuple, Optional

import tensorflow as tf

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

    loss: tf.Tensor
    logits_ab: tf.Tensor
    labels: tf.Tensor
    contrast_acc: tf.Tensor
    contrast_entropy: tf.Tensor


def gather_from_replicas(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Concatenates `x` over all replicas (replica order); returns it and this replica's id.

    Outside a multi-replica replica context (no strategy, one device, or cross-replica context) the
    local batch is the global batch and the replica id is 0.

    Args:
        x: this replica's rows; every replica must pass the same shape.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x, tf.constant(0, tf.int32)
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return context.all_gather(x, axis=0), replica_id


def nt_xent(z: tf.Tensor, *, temperature: float, hidden_norm: bool = True,
            memory: Optional[tf.Tensor] = None, memory_filled: Optional[tf.Tensor] = None) -> NTXentOutput:
    """NT-Xent over the global batch for the local projections `z` of shape [2B, d].

    Rows 0..B-1 of `z` are the view-1 projections and rows B..2B-1 the view-2 projections of the same B
    images. Every replica must hold the same B (pipelines batch with drop_remainder), because the global
    index of local row i is replica_id * B + i. `z` may be float16/bfloat16; it is cast to float32 first.

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
    z = tf.cast(z, tf.float32)
    if hidden_norm:
        z = tf.math.l2_normalize(z, axis=-1, epsilon=_NORM_EPSILON)
    z1, z2 = tf.split(z, 2, axis=0)
    local_batch = tf.shape(z1)[0]

    z1_all, replica_id = gather_from_replicas(z1)
    z2_all, _ = gather_from_replicas(z2)
    global_batch = tf.shape(z1_all)[0]

    labels = replica_id * local_batch + tf.range(local_batch, dtype=tf.int32)
    self_mask = tf.one_hot(labels, global_batch, dtype=tf.float32) * _LARGE_NUM

    inv_t = tf.constant(1.0 / temperature, tf.float32)
    logits_aa = tf.matmul(z1, z1_all, transpose_b=True) * inv_t - self_mask
    logits_bb = tf.matmul(z2, z2_all, transpose_b=True) * inv_t - self_mask
    logits_ab = tf.matmul(z1, z2_all, transpose_b=True) * inv_t
    logits_ba = tf.matmul(z2, z1_all, transpose_b=True) * inv_t

    blocks_a, blocks_b, candidates = [logits_ab, logits_aa], [logits_ba, logits_bb], logits_ab
    if memory is not None:  # without one, the blocks and metrics are exactly those of plain NT-Xent
        if memory_filled is None:
            raise ValueError("memory_filled: required with memory")
        memory = tf.stop_gradient(tf.cast(memory, tf.float32))
        # Rows not written yet hold zeros, not keys: the same -1e9 as the self term makes their exp exactly 0.
        empty = tf.cast(tf.range(tf.shape(memory)[0]) >= tf.cast(memory_filled, tf.int32), tf.float32) * _LARGE_NUM
        logits_am = tf.matmul(z1, memory, transpose_b=True) * inv_t - empty
        logits_bm = tf.matmul(z2, memory, transpose_b=True) * inv_t - empty
        # The memory's columns come after both in-batch blocks, so the label g still points at the positive.
        blocks_a.append(logits_am)
        blocks_b.append(logits_bm)
        candidates = tf.concat([logits_ab, logits_am], 1)

    # The positive sits in column g of the first (cross-view) block, so the sparse label is g itself.
    loss_a = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.concat(blocks_a, 1))
    loss_b = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.concat(blocks_b, 1))
    loss = tf.reduce_mean(loss_a + loss_b)

    predicted = tf.argmax(candidates, axis=1, output_type=tf.int32)
    contrast_acc = tf.reduce_mean(tf.cast(tf.equal(predicted, labels), tf.float32))
    # Exact entropy from log-softmax; the reference adds 1e-8 inside the log, a difference below 1e-7.
    log_prob = tf.nn.log_softmax(candidates, axis=1)
    contrast_entropy = tf.reduce_mean(-tf.reduce_sum(tf.exp(log_prob) * log_prob, axis=1))
    return NTXentOutput(loss, logits_ab, labels, contrast_acc, contrast_entropy)


def distillation_loss(
    teacher_logits: tf.Tensor,
    student_logits: tf.Tensor,
    temperature: float,
    *,
    scale_by_temperature_squared: bool = False,
    reduction: str = "mean",
) -> tf.Tensor:
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
    teacher = tf.stop_gradient(tf.cast(teacher_logits, tf.float32)) / temperature
    student = tf.cast(student_logits, tf.float32) / temperature
    per_example = -tf.reduce_sum(tf.nn.softmax(teacher, axis=-1) * tf.nn.log_softmax(student, axis=-1), -1)
    if scale_by_temperature_squared:
        per_example = per_example * (temperature * temperature)
    return tf.reduce_mean(per_example) if reduction == "mean" else per_example
