"""Runs `fit()` on `simclr_tf.SimCLR` (our ResNet) under a Keras backend chosen by KERAS_BACKEND, with
TensorFlow made unimportable when that backend is not TensorFlow: proof that the model, NT-Xent, LARS and the
schedule need Keras only (the road onto machines that have JAX and no TensorFlow).

Loads the initial weights and one fixed batch from --inputs, trains --steps steps on that batch (one per
epoch) and saves each step's loss and the final weights to --out. tests/test_keras_fit.py runs it under JAX
and compares with the same steps under TensorFlow.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(inputs: str, steps: int):
    """(losses, final weights) of `steps` fit() steps from the weights and batch in `inputs`."""
    import keras
    import numpy as np

    import simclr_tf
    from simclr_tf.models import ResNet

    data = np.load(inputs)
    images, labels = data["images"], data["labels"]
    encoder = ResNet(18, 0.125, cifar_stem=True, name="resnet")
    model = simclr_tf.SimCLR(encoder, projection_layers=2, temperature=0.5, num_classes=4)
    model.build((None,) + images.shape[1:])
    weights = [data[f"w{i}"] for i in range(len(model.weights))]
    model.set_weights(weights)
    model.compile(optimizer=simclr_tf.LARS(simclr_tf.WarmupCosine(0.5, 1, steps), weight_decay=1e-3))
    history = model.fit(images, labels, batch_size=len(images), epochs=steps, shuffle=False, verbose=0)
    assert keras.backend.backend() == os.environ.get("KERAS_BACKEND", "tensorflow")
    return np.asarray(history.history["loss"], np.float32), [np.asarray(w) for w in model.get_weights()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True, help="npz: images [b, S, S, 6], labels [b], w0..wN")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.modules["tensorflow"] = None  # any `import tensorflow` now fails: the core must not need it
    import numpy as np

    losses, weights = run(args.inputs, args.steps)
    np.savez(args.out, losses=losses, **{f"w{i}": w for i, w in enumerate(weights)})


if __name__ == "__main__":
    main()
