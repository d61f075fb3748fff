"""Top-k classes or representations from an exported SavedModel.

    python -m simclr_tf.predict --saved_model=DIR --images a.jpg b.png [--top_k 5] [--embed_out reps.npy]
    python -m simclr_tf.predict --saved_model=DIR --dataset=NAME --split=test [--data_dir=D] [--embed_out r.npy]

`DIR` is an export (`model_dir/saved_model/<step>`) or a model_dir (its newest export is used). Image files go
through the `serving_default` signature (decoding and centre crop happen inside the SavedModel, as a TF
Serving client would send them); datasets go through the eval pipeline and `serving_float`, so the numbers
match `--mode=eval`. `--embed_out` writes h (`final_avg_pool`, float32 [N, d]) in input order; for a dataset
the labels go next to it as `<name>_labels.npy`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from simclr_tf.errors import UsageError
from simclr_tf.image_formats import looks_like_image


def resolve_saved_model(path: str) -> str:
    import tensorflow as tf

    from simclr_tf.export import latest_export

    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    latest = latest_export(path) if tf.io.gfile.isdir(path) else None
    if latest is None:
        raise UsageError("--saved_model", f"{path} is neither a SavedModel nor a model_dir with "
                                          f"saved_model/<step>/")
    return latest


def load(path: str):
    import tensorflow as tf

    loaded = tf.saved_model.load(resolve_saved_model(path))
    if "serving_default" not in loaded.signatures or "serving_float" not in loaded.signatures:
        raise UsageError("--saved_model", f"{path} is not a simclr_tf export (signatures: "
                                          f"{', '.join(loaded.signatures) or 'none'})")
    return loaded


def _top_k(probabilities: np.ndarray, k: int) -> List[List[tuple]]:
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, probabilities)]


def predict_images(loaded, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 32) -> Dict[str, object]:
    """`{'h': [N, d], 'top_k': [[(class, probability), ...], ...] or None}` for image files, in order."""
    import tensorflow as tf

    blobs = []
    for path in paths:
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
        except (tf.errors.OpError, OSError) as e:
            raise UsageError(path, f"cannot read image file: {e}") from None
        if not looks_like_image(data):
            raise UsageError(path, "not a JPEG, PNG, GIF or BMP file")
        blobs.append(data)
    serve = loaded.signatures["serving_default"]
    features, probabilities = [], []
    for start in range(0, len(blobs), batch_size):
        chunk = blobs[start:start + batch_size]
        try:
            out = serve(image_bytes=tf.constant(chunk))
        except tf.errors.InvalidArgumentError as e:
            names = ", ".join(paths[start:start + batch_size])
            raise UsageError("--images", f"could not decode one of {names}: {str(e).splitlines()[0]}") from None
        features.append(out["final_avg_pool"].numpy())
        if "probabilities" in out:
            probabilities.append(out["probabilities"].numpy())
    h = np.concatenate(features) if features else np.zeros([0, 0], np.float32)
    ranked = _top_k(np.concatenate(probabilities), top_k) if probabilities else None
    return {"h": h, "top_k": ranked}


def predict_dataset(loaded, dataset: str, split: str, *, data_dir: Optional[str] = None, top_k: int = 5,
                    batch_size: int = 256) -> Dict[str, object]:
    """h, labels and (with a supervised head) top-1 / top-k accuracy over every example of a split."""
    import tensorflow as tf

    from simclr_tf.data.sources import build_source
    from simclr_tf.features import eval_input_fn

    source = build_source(dataset, data_dir, split, split)
    image_size = int(loaded.image_size.numpy())
    serve = loaded.signatures["serving_float"]
    input_fn = eval_input_fn(source, "eval", image_size=image_size, batch_size=batch_size)
    features, labels, correct1, correctk = [], [], 0, 0
    for images, y in input_fn(tf.distribute.InputContext()):
        out = serve(images=images)
        features.append(out["final_avg_pool"].numpy())
        y = y.numpy()
        labels.append(y)
        if "probabilities" in out and source.eval_has_labels:
            p = out["probabilities"].numpy()
            k = min(top_k, p.shape[-1])
            ranked = np.argsort(-p, axis=-1, kind="stable")[:, :k]
            correct1 += int(np.sum(ranked[:, 0] == y))
            correctk += int(np.sum(np.any(ranked == y[:, None], axis=-1)))
    h = np.concatenate(features)
    y = np.concatenate(labels)
    result: Dict[str, object] = {"h": h, "labels": y, "num_examples": len(y)}
    if int(loaded.num_classes.numpy()) > 0 and source.eval_has_labels:
        result["top1"] = correct1 / len(y)
        result[f"top{top_k}"] = correctk / len(y)
    return result


def _write_npy(path: str, array: np.ndarray) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simclr_tf.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--saved_model", required=True, help="an export folder or a model_dir")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", help="image files (JPEG, PNG, GIF, BMP; any size)")
    inputs.add_argument("--dataset", help="as run.py's --dataset (TFDS name, folder:PATH, npz:PATH, mnist_5k)")
    parser.add_argument("--split", default="test", help="split of --dataset (TFDS slicing works)")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--embed_out", default=None, help="write h (final_avg_pool) as float32 [N, d] .npy")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top_k must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.embed_out and not args.embed_out.endswith(".npy"):
        parser.error("--embed_out must end in .npy")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    try:
        loaded = load(args.saved_model)
        if args.images:
            result = predict_images(loaded, args.images, top_k=args.top_k, batch_size=args.batch_size)
            if result["top_k"] is None:
                print("the model has no supervised head: no class predictions (use --embed_out)")
            else:
                for path, ranked in zip(args.images, result["top_k"]):
                    print(f"{path}: " + ", ".join(f"{c} ({p:.4f})" for c, p in ranked))
        else:
            result = predict_dataset(loaded, args.dataset, args.split, data_dir=args.data_dir,
                                     top_k=args.top_k, batch_size=args.batch_size)
            summary = f"{args.dataset} {args.split}: {result['num_examples']} examples"
            if "top1" in result:
                summary += f", top-1 {result['top1']:.4f}, top-{args.top_k} {result[f'top{args.top_k}']:.4f}"
            print(summary)
        if args.embed_out:
            _write_npy(args.embed_out, result["h"].astype(np.float32))
            message = f"wrote {result['h'].shape} representations to {args.embed_out}"
            if "labels" in result:
                labels_path = args.embed_out[: -len(".npy")] + "_labels.npy"
                _write_npy(labels_path, result["labels"])
                message += f" and labels to {labels_path}"
            print(message)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
