"""Runs one full pretraining step (sync BN, NT-Xent over all replicas, LARS) on R logical CPU replicas.

Executed in its own process by tests/test_train.py because logical devices must be configured before
TensorFlow starts. Saves the loss, the replica-summed gradients and the weights after the step.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--data", required=True, help="npz dataset (only its size matters here)")
    parser.add_argument("--batch", required=True, help="npz with the fixed global batch: images, labels")
    parser.add_argument("--init", default="", help="npz of initial weights to load (else save them there)")
    parser.add_argument("--save_init", default="")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--optimizer", default="lars")
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the train step")
    parser.add_argument("--recompute", action="store_true", help="recompute the residual blocks (--recompute)")
    args = parser.parse_args()

    from simclr_tf.strategy import split_cpu

    split_cpu(args.replicas)
    import numpy as np
    import tensorflow as tf

    from simclr_tf.config import Config
    from simclr_tf.data.sources import build_source
    from simclr_tf.strategy import build_strategy
    from simclr_tf.train import Trainer

    batch = np.load(args.batch)
    images, labels = batch["images"], batch["labels"]
    global_batch = images.shape[0]
    config = Config(
        model_dir=args.model_dir, dataset=f"npz:{args.data}", train_split="train", eval_split="test",
        resnet_depth=18, width_multiplier=0.125, image_size=images.shape[1], train_batch_size=global_batch,
        train_steps=1, warmup_epochs=0, learning_rate=1.0, weight_decay=1e-3, temperature=0.5,
        num_proj_layers=2, optimizer=args.optimizer, global_bn=True, seed=0, jit_compile=args.jit_compile,
        recompute=args.recompute,
        strategy="mirrored" if args.replicas > 1 else "one_device", num_cpu_replicas=args.replicas)
    strategy = build_strategy(config.strategy, num_cpu_replicas=config.num_cpu_replicas)
    assert strategy.num_replicas_in_sync == args.replicas
    source = build_source(config.dataset, None, config.train_split, config.eval_split)
    tf.keras.utils.set_random_seed(0)
    trainer = Trainer(config, strategy, source, log=lambda _: None)
    weights = trainer.model.weights
    if args.init:
        init = np.load(args.init)
        for i, w in enumerate(weights):
            w.assign(init[f"w{i}"])
    else:
        np.savez(args.save_init, **{f"w{i}": w.numpy() for i, w in enumerate(weights)})
    init_values = [w.numpy() for w in weights]

    per_replica = global_batch // args.replicas

    def shard(ctx):
        lo = ctx.replica_id_in_sync_group * per_replica
        return tf.constant(images[lo:lo + per_replica]), tf.constant(labels[lo:lo + per_replica])

    distributed = strategy.experimental_distribute_values_from_function(shard)
    compute = trainer.gradients_fn()

    @tf.function
    def gradients(batch_):
        metrics, grads = strategy.run(compute, args=batch_)
        loss = strategy.reduce(tf.distribute.ReduceOp.MEAN, metrics["total_loss"], axis=None)
        return loss, [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]

    loss, grads = gradients(distributed)
    # Computing gradients in training mode moved the BN statistics: put everything back before the real step.
    for w, value in zip(weights, init_values):
        w.assign(value)
    # The real training step (the same compiled loop as training), on the same global batch.
    step_loss = trainer.run_steps([(images, labels)])["total_loss"]
    result = {"loss": loss.numpy(), "step_loss": step_loss}
    result.update({f"g{i}": g.numpy() for i, g in enumerate(grads)})
    result.update({f"w{i}": w.numpy() for i, w in enumerate(weights)})
    result.update({f"slot{i}": v.numpy() for i, v in enumerate(trainer.optimizer.variables)
                   if v.shape.rank and v.shape.rank > 0})
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
