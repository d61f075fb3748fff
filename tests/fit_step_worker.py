"""Runs the same two pretraining steps through the CLI's loop (`Trainer.run_steps`) and through Keras `fit()` on
`simclr_tf.SimCLR` with our ResNet, for 1 and 2 logical CPU replicas; saves what both produced.

Executed in its own process by tests/test_keras_fit.py because logical devices must be configured before
TensorFlow starts. Both replica counts start from the same weights. For each replica count R it saves, prefixed `cli{R}_` and `fit{R}_`: the gradients of the
first batch (before any step; one device only, see below), the loss of each step, and all weights and optimizer slots
after each step; and, prefixed `jit1_`, the CLI's XLA-compiled step (`--jit_compile`) on one device.
"""
import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="npz dataset (only its size and classes matter here)")
    parser.add_argument("--batches", required=True, help="npz with two global batches: images0/1, labels0/1")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from simclr_tf.strategy import split_cpu

    split_cpu(2)
    import numpy as np
    import tensorflow as tf

    import simclr_tf
    from simclr_tf.config import Config
    from simclr_tf.data.sources import build_source
    from simclr_tf.models.resnet import ResNet
    from simclr_tf.strategy import build_strategy
    from simclr_tf.train import Trainer

    batches = np.load(args.batches)
    steps = [(batches[f"images{i}"], batches[f"labels{i}"]) for i in range(2)]
    global_batch = steps[0][0].shape[0]
    result = {}

    for replicas in (1, 2):
        config = Config(
            model_dir=os.path.join(args.model_dir, f"cli{replicas}"), dataset=f"npz:{args.data}",
            train_split="train", eval_split="test", resnet_depth=18, width_multiplier=0.125,
            image_size=steps[0][0].shape[1], train_batch_size=global_batch, train_steps=2, warmup_epochs=0,
            learning_rate=1.0, weight_decay=1e-3, temperature=0.5, num_proj_layers=2, optimizer="lars",
            global_bn=True, seed=0, strategy="mirrored" if replicas > 1 else "one_device",
            num_cpu_replicas=replicas)
        strategy = build_strategy(config.strategy, num_cpu_replicas=config.num_cpu_replicas)
        assert strategy.num_replicas_in_sync == replicas
        source = build_source(config.dataset, None, config.train_split, config.eval_split)
        tf.keras.utils.set_random_seed(0)
        trainer = Trainer(config, strategy, source, log=lambda _: None)
        if replicas == 1:
            init = [w.numpy() for w in trainer.model.weights]
        else:  # the same start as on one device, so the CLI's own R-replica step can be checked against it
            for w, value in zip(trainer.model.weights, init):
                w.assign(value)

        # The fit() side: the same network as a Keras encoder + heads, the same optimizer and schedule.
        with strategy.scope():
            encoder = ResNet(18, 0.125, cifar_stem=True, batch_norm_decay=0.9, global_bn=True, name="resnet")
            model = simclr_tf.SimCLR(encoder, projection_layers=2, projection_dim=128, temperature=0.5,
                                     num_classes=source.num_classes, global_bn=True)
            model.build((None,) + steps[0][0].shape[1:])
            schedule = simclr_tf.WarmupCosine(trainer.schedule.learning_rate, trainer.schedule.warmup_steps,
                                              trainer.schedule.train_steps)
            model.compile(optimizer=simclr_tf.LARS(schedule, momentum=0.9, weight_decay=1e-3))
        assert len(model.weights) == len(init)
        for w, value in zip(model.weights, init):
            w.assign(value)

        # Gradients are compared directly on one device. On two, tracing them costs half a minute more, and the
        # first step's slots compare them anyway: from zero momentum a LARS slot is lr * g (excluded variables)
        # or lr * trust * (g + wd * w) (the others), so equal slots after step 1 mean equal gradients.
        if replicas == 1:
            cli_grads = trainer.gradients_fn()

            def fit_grads(images, labels):
                with tf.GradientTape() as tape:
                    loss = model.compute_loss(images, labels, model(images, training=True))
                return tape.gradient(loss, model.trainable_weights)

            @tf.function
            def gradients(images, labels):
                _, cli = strategy.run(cli_grads, args=(images, labels))
                return cli, strategy.run(fit_grads, args=(images, labels))

            cli, fit = gradients(tf.constant(steps[0][0]), tf.constant(steps[0][1]))
            for i, (g_cli, g_fit) in enumerate(zip(cli, fit)):
                result[f"cli{replicas}_g{i}"] = g_cli.numpy()
                result[f"fit{replicas}_g{i}"] = g_fit.numpy()
            # Gradients in training mode moved the BN statistics: back to the initial weights for the real steps.
            for w, value in zip(trainer.model.weights + model.weights, init + init):
                w.assign(value)

        for step, (images, labels) in enumerate(steps, start=1):
            cli_loss = trainer.run_steps([(images, labels)])["total_loss"]
            history = model.fit(tf.data.Dataset.from_tensors((images, labels)), epochs=1, verbose=0)
            result[f"cli{replicas}_loss{step}"] = np.float32(cli_loss)
            result[f"fit{replicas}_loss{step}"] = np.float32(history.history["loss"][0])
            for side, net, optimizer in (("cli", trainer.model, trainer.optimizer), ("fit", model, model.optimizer)):
                for i, w in enumerate(net.weights):
                    result[f"{side}{replicas}_s{step}_w{i}"] = w.numpy()
                slots = [v for v in optimizer.variables if len(v.shape) > 0]
                for i, v in enumerate(slots):
                    result[f"{side}{replicas}_s{step}_slot{i}"] = v.numpy()
        result[f"init{replicas}"] = np.concatenate([np.ravel(v) for v in init])

    # The CLI's XLA step (--jit_compile) on one device, from the same weights on the same batches.
    config = dataclasses.replace(config, model_dir=os.path.join(args.model_dir, "jit1"), jit_compile=True,
                                 strategy="one_device", num_cpu_replicas=1)
    trainer = Trainer(config, build_strategy("one_device"), source, log=lambda _: None)
    for w, value in zip(trainer.model.weights, init):
        w.assign(value)
    for step, (images, labels) in enumerate(steps, start=1):
        result[f"jit1_loss{step}"] = np.float32(trainer.run_steps([(images, labels)])["total_loss"])
        for i, w in enumerate(trainer.model.weights):
            result[f"jit1_s{step}_w{i}"] = w.numpy()
        for i, v in enumerate(v for v in trainer.optimizer.variables if len(v.shape) > 0):
            result[f"jit1_s{step}_slot{i}"] = v.numpy()
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
