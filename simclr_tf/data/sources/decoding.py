"""Decoding file records in the tf.data graph, skipping (and reporting) the ones that cannot be decoded.

Sources stored as files (image folders, TFRecord shards) hand out cheap records (a path, a serialized example)
that the pipeline shuffles, shards and skips before any image is decoded; `decode_skipping` then decodes them
in parallel. A corrupt, truncated or non-image file must not stop a week-long run, nor silently disappear: its
record is dropped, counted and written, with its stream position, to a list file (`SkippedFiles`). The stream
positions also let a resumed run find where it stopped when files were skipped before that point (see
`SkippedFiles.record_position`).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import tensorflow as tf
from absl import logging

_LIST_HEADER = "position\tfile\n"


class SkippedFiles:
    """Counts the records an input pipeline could not decode and lists them in `path` (when given).

    One object per input pipeline; several may share a process. `count`, the distinct files skipped, is what
    the progress line and TensorBoard show. The list file holds a `position<TAB>file` line for every skip
    (a file is met again every epoch), where position is the record's place in the pipeline's training
    stream (-1 outside training); it is appended to as files are met, so it survives a crash and a resumed
    run reads it back.

    Args:
        path: the list file; None: only count and log.
        log_limit: how many skipped files are logged one by one before the log falls silent (the list file
            still gets every one).
    """

    def __init__(self, path: Optional[str] = None, log_limit: int = 20) -> None:
        self.path = path
        self.names: set[str] = set()
        self._log_limit = log_limit
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Distinct files skipped so far."""
        return len(self.names)

    def add(self, name: str, position: int) -> None:
        """Counts one skipped record (called from the tf.data graph through `tf.py_function`)."""
        with self._lock:
            new_name = name not in self.names
            self.names.add(name)
            if new_name and self.count <= self._log_limit:
                logging.warning("skipped unreadable image %s (corrupt, truncated or not an image)%s", name,
                                f"; listed in {self.path}" if self.path else "")
            if self.path:
                new = not os.path.exists(self.path)
                with open(self.path, "a", encoding="utf-8") as f:
                    if new:
                        f.write(_LIST_HEADER)
                    f.write(f"{position}\t{name}\n")
                    f.flush()

    def positions(self) -> list[int]:
        """The distinct stream positions listed so far (by this run or an earlier one), sorted."""
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            found = set()
            for line in f:
                head = line.split("\t", 1)[0]
                if head.lstrip("-").isdigit() and int(head) >= 0:
                    found.add(int(head))
        return sorted(found)

    def record_position(self, examples: int) -> int:
        """The stream position of the record that yields example number `examples` (0-based) of the stream.

        Without skipped records the two are equal. Each listed position before it moves it one further: the
        earlier run read (and listed) every record up to the one it stopped at, so the list is complete there.

        Args:
            examples: how many decoded examples come before it (e.g. steps done x examples per step).
        """
        position = examples
        for skipped in self.positions():
            if skipped > position:
                break
            position += 1
        return position


class SkippedImages:
    """The skipped-file lists of a run's input pipelines, `<directory>/skipped_images-<pipeline id>.tsv`.

    Args:
        directory: where the lists go (the run's model_dir); None: count and log only.
    """

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory
        self._lists: dict[int, SkippedFiles] = {}

    def pipeline(self, pipeline_id: int) -> SkippedFiles:
        """The list of input pipeline `pipeline_id` (made on first use)."""
        if pipeline_id not in self._lists:
            path = (None if self.directory is None else
                    os.path.join(self.directory, f"skipped_images-{pipeline_id}.tsv"))
            self._lists[pipeline_id] = SkippedFiles(path)
        return self._lists[pipeline_id]

    @property
    def count(self) -> int:
        """Distinct files skipped so far by this process's pipelines."""
        return len(set().union(*(skipped.names for skipped in self._lists.values())))


def decode_skipping(dataset: tf.data.Dataset, source, skipped: Optional[SkippedFiles] = None,
                    first_position: int = 0) -> tf.data.Dataset:
    """`(record, position)` elements -> `((image, label), position)`, the records that fail to decode dropped.

    Positions must count up by one from the first element (a stream position or a `Dataset.counter`). Records
    are decoded by one parallel, order-keeping `map`, whose failures `ignore_errors` drops. Dropping an element
    drops its name too, so each record's name is first put in a table under its position; a sequential `scan`
    then sees the positions that went missing between two decoded records, takes their names from the table
    and reports them (the table forgets every position the scan has passed). A finite dataset gets one
    end marker so that failures among its last records are reported too. Per record this costs a table insert
    and remove, not a dataset of its own.

    Args:
        dataset: `(record, position int64)` pairs, positions `first_position, first_position + 1, ...`.
        source: the `DataSource` whose `decode` and `describe` apply to the records.
        skipped: where skipped records are counted and listed; None: logged only.
        first_position: the first element's position.
    """
    decode, describe = source.decode, source.describe
    skipped = skipped or SkippedFiles()
    names = tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, default_value="")
    length = int(dataset.cardinality())  # an infinite stream (training) needs no end marker

    def load(record, position):
        noted = names.insert(position[tf.newaxis], describe(record)[tf.newaxis])
        with tf.control_dependencies([noted]):  # the name is in the table before the decode can fail
            image, label = decode(record)
        return (image, label), position, tf.constant(True)

    examples = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    if length >= 0:  # a marker after the last record, which no decoded record follows
        (image_spec, label_spec), _, _ = examples.element_spec
        marker = tf.constant(first_position + length, tf.int64)
        examples = examples.concatenate(tf.data.Dataset.from_tensors(
            ((tf.zeros([0, 0, 3], image_spec.dtype), tf.constant(-1, label_spec.dtype)), marker, tf.constant(False))))

    def report(missing_names: tf.Tensor, missing: tf.Tensor) -> tf.Tensor:
        for name, position in zip(missing_names.numpy(), missing.numpy()):
            skipped.add(name.decode("utf-8", "replace"), int(position))
        return tf.constant(0, tf.int64)

    def check(last, element):
        example, position, decoded = element
        missing = tf.range(last + 1, position, dtype=tf.int64)
        reported = tf.cond(tf.size(missing) > 0,
                           lambda: tf.py_function(report, [names.lookup(missing), missing], tf.int64),
                           lambda: tf.constant(0, tf.int64))
        with tf.control_dependencies([reported]):
            forgotten = names.remove(tf.concat([missing, position[tf.newaxis]], 0))
        with tf.control_dependencies([forgotten]):
            return tf.identity(position), (example, position, decoded)

    checked = examples.scan(tf.constant(first_position - 1, tf.int64), check)
    return checked.filter(lambda example, position, decoded: decoded).map(
        lambda example, position, decoded: (example, position))
