"""Top-1 / top-5 of the supervised head on the eval split, every example counted exactly once."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import tensorflow as tf

from simclr_tf.data import pipeline
from simclr_tf.files import write_text_atomically
from simclr_tf.data.sources import DataSource
from simclr_tf.features import call_inference
from simclr_tf.sections import AugmentConfig


def evaluate(model, source: DataSource, strategy: tf.distribute.Strategy, *, image_size: int,
             eval_batch_size: int, eval_steps: int = 0) -> Dict[str, float]:
    """Counts correct predictions over the whole eval split (or `eval_steps` batches when > 0).

    The eval pipeline keeps the last partial batch, so the count equals the split's size.
    """
    # The eval view is a centre crop: of the augmentation settings only the size applies.
    input_fn = pipeline.build_input_fn(source, mode="eval", global_batch_size=eval_batch_size,
                                       augment=AugmentConfig(image_size))
    dataset = strategy.distribute_datasets_from_function(input_fn)

    def replica_step(images, labels):
        logits = tf.cast(call_inference(model, images)["logits_sup"], tf.float32)  # empty batches too
        labels = tf.cast(labels, tf.int32)
        k5 = min(5, logits.shape[-1])
        top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.int64))
        top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k5), tf.int64))
        return tf.stack([top1, top5, tf.cast(tf.shape(labels)[0], tf.int64)])

    @tf.function(reduce_retracing=True)
    def step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    totals = tf.zeros([3], tf.int64)
    for i, batch in enumerate(dataset):
        if eval_steps and i >= eval_steps:
            break
        totals += step(batch)
    top1, top5, count = (int(x) for x in totals.numpy())
    return {"top1": top1 / max(count, 1), "top5": top5 / max(count, 1), "num_examples": count}


def write_results(model_dir: str, result: Dict[str, float], step: int, name: Optional[str] = None) -> None:
    """`result.json` (latest) and `result_<step>.json`, written atomically; plus summaries."""
    record = dict(result, global_step=step)
    suffix = f"_{name}" if name else ""
    for filename in (f"result{suffix}.json", f"result{suffix}_{step}.json"):
        write_text_atomically(os.path.join(model_dir, filename), json.dumps(record, indent=2))
    writer = tf.summary.create_file_writer(os.path.join(model_dir, f"eval{suffix}"))
    with writer.as_default(step=step):
        for key in ("top1", "top5"):
            if key in result:
                tf.summary.scalar(f"eval/label_{key}_accuracy", result[key])
        if "knn_top1" in result:
            tf.summary.scalar("eval/knn_top1", result["knn_top1"])
    writer.flush()
