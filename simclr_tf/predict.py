"""Top-k classes or representations from an exported SavedModel.

    python -m simclr_tf.predict --saved_model=DIR --images a.jpg b.png [--top_k 5] [--embed_out reps.npy]
    python -m simclr_tf.predict --saved_model=DIR --dataset=NAME --split=test [--data_dir=D] [--embed_out r.npy]

`DIR` is an export (`model_dir/saved_model/<step>`) or a model_dir (its newest export is used). Image files go
through the `serving_default` signature (decoding and centre crop happen inside the SavedModel, as a TF
Serving client would send them); datasets go through the eval pipeline and `serving_float`, so the numbers
match `--mode=eval`. `--embed_out` writes h (`final_avg_pool`, float32 [N, d]) in input order; for a dataset
the labels go next to it as `<name>_labels.npy`.

Each image prints `path: cat (0.9132), dog (0.0501), ...`: the class names stored in the export (class folders,
TFDS label names), or the class indices when it has none. Every readable image is predicted; each image that
is not gets one line on stderr naming the file and why (missing, not an image, corrupt or truncated), and the
exit status is 1 (2 when an argument is no image file at all, or for any other usage error). With
`--embed_out`, the rows are then those of the readable images, in the order given.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from simclr_tf.errors import UsageError, first_line
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


class Unreadable(NamedTuple):
    """An input image that could not be predicted, and why (`reason`, one line)."""

    index: int  # position in the paths given
    path: str
    reason: str
    # A directory or a file that is no image at all: a wrong argument (exit status 2) rather than a missing
    # or damaged image (1).
    not_an_image: bool = False


def _top_k(probabilities: np.ndarray, k: int) -> List[List[tuple]]:
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, probabilities)]


def _read_image_file(index: int, path: str) -> Union[bytes, Unreadable]:
    """The file's bytes, or why they cannot be an image."""
    import tensorflow as tf

    try:
        if not tf.io.gfile.exists(path):
            return Unreadable(index, path, "no such file")
        if tf.io.gfile.isdir(path):
            return Unreadable(index, path, "is a directory, not an image file", not_an_image=True)
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as e:
        return Unreadable(index, path, f"cannot read image file: {first_line(e)}")
    if not looks_like_image(data):
        return Unreadable(index, path, "not a JPEG, PNG, GIF or BMP file", not_an_image=True)
    return data


# Lines of a TF graph-execution error that say where, not what.
_TF_PREAMBLE = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")


def _decode_error(e: Exception) -> str:
    """The decoder's own words from a failed serving call (its first lines are TF's generic preamble)."""
    lines = [line.strip() for line in str(getattr(e, "message", e)).splitlines()]
    said = [line for line in lines if line and not line.startswith(_TF_PREAMBLE)]
    return first_line(Exception(said[-1])) if said else first_line(e)



def predict_images(loaded, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 32) -> Dict[str, object]:
    """Predicts every readable image of `paths`; the others are listed with the reason.

    Images go through `serving_default` in batches. A file the decoder rejects (corrupt or truncated, though it
    starts like an image) fails its whole batch, so a failed batch is retried one image at a time and only
    that file is lost.

    Args:
        loaded: the loaded export (`load`).
        paths: image files (JPEG, PNG, GIF, BMP; any size).
        top_k: classes per image.
        batch_size: images per serving call.

    Returns:
        `predicted`: the indices in `paths` of the predicted images, in order; `h`: their representations
        [len(predicted), d]; `top_k`: their `[(class, probability), ...]` lists, or None for a model without a
        supervised head; `unreadable`: an `Unreadable` for each other path, in order.
    """
    import tensorflow as tf

    readable: List[tuple] = []  # (index, bytes)
    unreadable: List[Unreadable] = []
    for index, path in enumerate(paths):
        data = _read_image_file(index, path)
        if isinstance(data, Unreadable):
            unreadable.append(data)
        else:
            readable.append((index, data))
    serve = loaded.signatures["serving_default"]

    def run(items: List[tuple]) -> None:
        out = serve(image_bytes=tf.constant([data for _, data in items]))
        rows.append(([index for index, _ in items], out["final_avg_pool"].numpy(),
                     out["probabilities"].numpy() if "probabilities" in out else None))

    rows: List[tuple] = []  # (indices, h, probabilities or None) of each successful call
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        try:
            run(chunk)
            continue
        except tf.errors.InvalidArgumentError as e:
            if len(chunk) == 1:
                unreadable.append(Unreadable(chunk[0][0], paths[chunk[0][0]],
                                             f"corrupt or truncated image: {_decode_error(e)}"))
                continue
        for item in chunk:  # which image(s) broke the batch
            try:
                run([item])
            except tf.errors.InvalidArgumentError as e:
                unreadable.append(Unreadable(item[0], paths[item[0]],
                                             f"corrupt or truncated image: {_decode_error(e)}"))
    predicted = [index for indices, _, _ in rows for index in indices]
    h = np.concatenate([h for _, h, _ in rows]) if rows else np.zeros([0, 0], np.float32)
    ranked = None
    if int(loaded.num_classes.numpy()) > 0:
        ranked = _top_k(np.concatenate([p for _, _, p in rows]), top_k) if rows else []
    return {"predicted": predicted, "h": h, "top_k": ranked,
            "unreadable": sorted(unreadable, key=lambda u: u.index)}


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
    """The command line (see the module docstring).

    Args:
        argv: the arguments after the program name; None: sys.argv's.

    Returns:
        The exit status: 0; 1 when an image was missing or could not be decoded (every other image is still
        predicted); 2 for a usage error, including an argument that is not an image file at all.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    status = 0
    try:
        loaded = load(args.saved_model)
        if args.images:
            result = predict_images(loaded, args.images, top_k=args.top_k, batch_size=args.batch_size)
            _print_image_results(args.images, result, class_names(loaded))
            if result["unreadable"]:
                status = 2 if any(u.not_an_image for u in result["unreadable"]) else 1
        else:
            result = predict_dataset(loaded, args.dataset, args.split, data_dir=args.data_dir,
                                     top_k=args.top_k, batch_size=args.batch_size)
            summary = f"{args.dataset} {args.split}: {result['num_examples']} examples"
            if "top1" in result:
                summary += f", top-1 {result['top1']:.4f}, top-{args.top_k} {result[f'top{args.top_k}']:.4f}"
            print(summary)
        if args.embed_out and len(result["h"]):
            _write_npy(args.embed_out, result["h"].astype(np.float32))
            message = f"wrote {result['h'].shape} representations to {args.embed_out}"
            if "labels" in result:
                labels_path = args.embed_out[: -len(".npy")] + "_labels.npy"
                _write_npy(labels_path, result["labels"])
                message += f" and labels to {labels_path}"
            if result.get("unreadable"):
                message += " (one row per readable image, in the order given)"
            print(message)
        elif args.embed_out:
            print(f"nothing written to {args.embed_out}: no image could be read")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status


def class_names(loaded) -> List[str]:
    """The class names of a loaded export, or the class indices as text when it stores none.

    Args:
        loaded: the loaded export (`load`).
    """
    from simclr_tf.export import exported_class_names

    names = list(exported_class_names(loaded))
    num_classes = int(loaded.num_classes.numpy())
    return names if len(names) == num_classes else [str(c) for c in range(num_classes)]


def _print_image_results(paths: Sequence[str], result: Dict[str, object], names: Sequence[str]) -> None:
    """One line per image in the order given: its classes on stdout, or why it was not predicted on stderr."""
    if result["top_k"] is None:
        print("the model has no supervised head: no class predictions (use --embed_out)")
    ranked = dict(zip(result["predicted"], result["top_k"] or []))
    unreadable = {u.index: u for u in result["unreadable"]}
    for index, path in enumerate(paths):
        if index in unreadable:
            print(f"error: {path}: {unreadable[index].reason}", file=sys.stderr)
        elif index in ranked:
            print(f"{path}: " + ", ".join(f"{names[c]} ({p:.4f})" for c, p in ranked[index]))


if __name__ == "__main__":
    sys.exit(main())
