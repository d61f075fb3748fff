"""The `tfrecord:GLOB` source: sharded TFRecord files of `tf.train.Example`s holding encoded images.

The layout most ImageNet copies already have (the TPU reference pipelines' `train-00000-of-01024`,
`validation-00000-of-00128`), and what `python -m simclr_tf.make_tfrecords` writes:

* `image/encoded`: the JPEG or PNG file's bytes (required);
* `image/class/label`: int64, taken as stored (optional; -1 where absent). The TPU ImageNet files number their
  classes 1..1000 (0 was "background"), so they give `num_classes` 1001 as in those pipelines; the converter
  writes 0-based labels.

Splits: a file's split is its name up to the first `-` or `.` (`train-00000-of-01024`, `val.tfrecord`;
a trailing `_<digits>` is dropped: `train_003.tfrecord`), when those names look like splits (one of them is
the train split named by `--train_split`, or a usual split name such as `validation`); otherwise every
matched file is in the one split `train`. A split's examples are its files' records, files in sorted name
order, so that `train[:10%]` and `train[10%:]` are decided by record counts alone: whole files, and the
records `[a:b]` of the files at the boundaries.

Start-up decodes nothing and parses nearly nothing. Records are counted from the TFRecord framing alone (each
record starts with its length and a checksum of it, so a file is walked by seeking from header to header),
files in parallel threads, and with an `index_dir` the counts are kept in an index file there, reused while
each file keeps its size and modification time. `num_classes` and `class_names` come from the
`dataset_info.json` the converter writes next to the shards, when its record counts match the files (for
shards from elsewhere, a hand-written `{"format": "simclr_tf tfrecords v1", "num_classes": 1001}` there will
do); without it the labels are read once (only the label feature is parsed) and the largest one per file is
kept in the index too. A file whose framing is wrong (not a TFRecord file, GZIP-compressed, truncated) is a
`UsageError` naming it; the records' data checksums are not verified here (TF's reader checks them when it
reads, and fails the run on a mismatch: such a file must be rewritten).

A record is the serialized example with where it came from, `(serialized tf.string, file tf.string, index
int64)`: cheap to shuffle (the image stays encoded), and `describe` names a record that fails to decode
as `FILE[INDEX]`, the record's place in its file.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
from typing import Optional, Sequence

import tensorflow as tf
from absl import logging

from simclr_tf.data.sources.base import DataSource, EvalSplit, FileSeed, SplitKind, read_shuffled
from simclr_tf.data.sources.splits import SPLIT_FLAG, names_are_splits, resolve_split, role_names, spec_names
from simclr_tf.errors import UsageError

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
FORMAT_KEY = "image/format"
FILENAME_KEY = "image/filename"
CLASS_TEXT_KEY = "image/class/text"
# Written by the converter next to the shards; read by the source for the class count and names.
INFO_FILE = "dataset_info.json"
INFO_FORMAT = "simclr_tf tfrecords v1"
# The one split of a glob whose file names have no split prefixes.
_WHOLE_GLOB_SPLIT = "train"
_EXTENSIONS = (".tfrecord", ".tfrecords", ".tfr")
_INDEX_VERSION = "simclr_tf tfrecord index v1"
_SCAN_THREADS = 16
# Files read at once by `interleave`; each keeps a read buffer of _READ_BUFFER bytes.
_CYCLE_LENGTH = 8
_READ_BUFFER = 1 << 20
# TFRecord framing: uint64 length, uint32 masked crc32c of the length, data, uint32 masked crc32c of the data.
_HEADER = struct.Struct("<QI")
_FOOTER_BYTES = 4


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Records `[start, stop)` of one file."""

    path: str
    start: int
    stop: int


def tfrecord_source(pattern: str, train_split: str, eval_split: EvalSplit, *,
                    index_dir: Optional[str] = None) -> DataSource:
    """The source over the TFRecord files matched by `pattern` (see the module docstring).

    Args:
        pattern: a glob of TFRecord files (`/data/imagenet/train-*`, `/data/shards/*`), or a folder, which
            stands for every file in it.
        train_split: spec of the train role, e.g. `train[:10%]`.
        eval_split: the eval role (see `build_source`).
        index_dir: a local folder where the record counts are kept and reused (the run's model_dir); None: the
            files are scanned every time.
    """
    files = _match(pattern)
    train_names = spec_names(train_split, "--train_split")
    splits = _group_by_split(files, train_names)
    eval_split, names = role_names(train_split, eval_split, splits, where=f" in tfrecord:{pattern}")
    used_splits = sorted(set(names["train"]) | set(names.get("eval", ())))

    # Only the files of the splits in use are counted (a glob may match test splits nobody reads).
    splits = {name: splits[name] for name in used_splits}
    index = _Index(_index_path(pattern, index_dir), pattern)
    counts = index.counts([f for name in used_splits for f in splits[name]], matched=files)
    index.save()  # now: a failure below should not cost the scan
    sizes = {name: sum(counts[f] for f in split_files) for name, split_files in splits.items()}
    labelled = {name: _split_is_labelled(splits[name], counts) for name in used_splits}

    selected = {}
    for kind, spec in (("train", train_split), ("eval", eval_split)):
        if spec is None:
            continue
        pieces = []
        for piece in resolve_split(spec, sizes, SPLIT_FLAG[kind]):
            pieces += _pieces_of(splits[piece.split], counts, piece.start, piece.stop)
        _check_readable(pieces, SPLIT_FLAG[kind], f"tfrecord:{pattern} split {spec}")
        selected[kind] = pieces

    num_classes, class_names = _classes(files, splits, counts, labelled, index)
    index.save()

    parts: dict = {}

    def pipeline_part(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext]):
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        pipeline_id = input_context.input_pipeline_id if input_context is not None else 0
        key = (split_kind, pipelines, pipeline_id)
        if key not in parts:
            pieces = selected[split_kind]
            total = sum(p.stop - p.start for p in pieces)
            # By file when every pipeline gets a file: each host then reads only its files (as the reference
            # does with TFDS). Otherwise every pipeline reads all files in one order and keeps every n-th record.
            by_file = len(pieces) >= pipelines
            if by_file:
                pieces = pieces[pipeline_id::pipelines]
                count = sum(p.stop - p.start for p in pieces)
            else:
                count = len(range(pipeline_id, total, pipelines))
            # Made eagerly even when first asked for inside a tf.data function (a reshuffled epoch), so the
            # function captures the tensors instead of embedding the file list in its graph.
            with tf.init_scope():
                tensors = (tf.constant([p.path for p in pieces], tf.string),
                           tf.constant([p.start for p in pieces], tf.int64),
                           tf.constant([p.stop for p in pieces], tf.int64))
            shard = None if by_file or pipelines == 1 else (pipelines, pipeline_id)
            parts[key] = (tensors, len(pieces), count, shard)
        return parts[key]

    def make_dataset(split_kind: SplitKind,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        tensors, num_pieces, count, shard = pipeline_part(split_kind, input_context)
        records = _read_pieces(*tensors, num_pieces)
        if shard is not None:
            records = records.shard(*shard)
        # interleave hides the length, which the replayable training stream needs to place a resumed step.
        return records.apply(tf.data.experimental.assert_cardinality(count))

    def make_file_shuffled(split_kind: SplitKind, input_context: Optional[tf.distribute.InputContext] = None,
                           seed: Optional[FileSeed] = None) -> tf.data.Dataset:
        tensors, num_pieces, count, shard = pipeline_part(split_kind, input_context)
        if shard is not None:
            # Every pipeline must read the files in the same order to keep every n-th record of one stream,
            # but pipelines get seeds of their own: such a small split keeps its stored order.
            return make_dataset(split_kind, input_context)
        return read_shuffled(tensors, seed, lambda *columns: _read_pieces(*columns, num_pieces), count)

    def count_of(kind: str) -> int:
        return sum(p.stop - p.start for p in selected[kind]) if kind in selected else 0

    return DataSource(
        name=f"tfrecord:{pattern}", train_split=train_split, eval_split=eval_split,
        num_train=count_of("train"), num_eval=count_of("eval"), num_classes=num_classes,
        eval_has_labels="eval" in selected and all(labelled[n] for n in names["eval"]),
        make_dataset=make_dataset, make_file_shuffled=make_file_shuffled, decode=decode_record,
        describe=describe_record, class_names=class_names)


def decode_record(record: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """`(serialized example, file, index)` -> `(image uint8 [H, W, 3], label int64)`, label -1 where absent.

    Fails on a record that is not an Example, has no `image/encoded`, or whose bytes are not a decodable image
    (the pipeline then skips it and reports `describe_record(record)`).

    Args:
        record: a record of the source.
    """
    serialized = record[0]
    features = tf.io.parse_single_example(serialized, {
        IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)})
    image = tf.io.decode_image(features[IMAGE_KEY], channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, features[LABEL_KEY]


def describe_record(record: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """`FILE[INDEX]`: the file a record was read from and its 0-based place there.

    Args:
        record: a record of the source.
    """
    _, path, index = record
    return tf.strings.join([path, "[", tf.strings.as_string(index), "]"])


def _read_pieces(paths: tf.Tensor, starts: tf.Tensor, stops: tf.Tensor, num_pieces: int) -> tf.data.Dataset:
    """The records of the pieces, several files read at once, in an order fixed by the pieces' order."""
    def read_piece(path, start, stop):
        records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).take(stop).enumerate()
        return records.skip(start).map(lambda index, serialized: (serialized, path, index))

    pieces = tf.data.Dataset.from_tensor_slices((paths, starts, stops))
    # A Python count: inside a tf.data function (a reshuffled epoch) the gathered paths' length is not static.
    return pieces.interleave(read_piece, cycle_length=max(1, min(_CYCLE_LENGTH, num_pieces)), block_length=1,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _pieces_of(files: Sequence[str], counts: dict, start: int, stop: int) -> list[_Piece]:
    """Records `[start, stop)` of the files' concatenation as whole files and the boundary files' parts."""
    pieces, offset = [], 0
    for path in files:
        n = counts[path]
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            pieces.append(_Piece(path, lo, hi))
        offset += n
    return pieces


# ---------------------------------------------------------------------------------------------------------------
# Files and splits


def _match(pattern: str) -> list[str]:
    if tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    try:
        matched = tf.io.gfile.glob(pattern)
    except tf.errors.OpError as e:
        raise UsageError("--dataset", f"cannot list tfrecord:{pattern} ({e.message.splitlines()[0]})") from None
    # The converter's temporary files are hidden; its dataset_info.json sits next to the shards.
    # Folders are left out where that is cheap to tell (a remote glob would need a request per file).
    files = sorted(f for f in matched if not os.path.basename(f).startswith(".")
                   and not f.endswith(".json") and ("://" in f or not os.path.isdir(f)))
    if not files:
        raise UsageError("--dataset", f"no files match tfrecord:{pattern} (expected a glob of TFRecord files, "
                                      f"e.g. tfrecord:/data/imagenet/*-of-*)")
    return files


def split_of_file(path: str) -> str:
    """The split a file name names: `train-00000-of-01024` -> `train`, `val.tfrecord` -> `val`.

    Args:
        path: a TFRecord file.
    """
    name = re.split(r"[-.]", os.path.basename(path), maxsplit=1)[0]
    return re.sub(r"_\d+$", "", name)


def _group_by_split(files: Sequence[str], train_names: Sequence[str]) -> dict[str, list[str]]:
    candidates = {f: split_of_file(f) for f in files}
    found = set(candidates.values())
    if names_are_splits(found, train_names):
        splits: dict[str, list[str]] = {}
        for f in files:  # files are sorted: each split keeps sorted file order
            splits.setdefault(candidates[f], []).append(f)
        return splits
    return {_WHOLE_GLOB_SPLIT: list(files)}


def _first_example(files: Sequence[str], counts: dict) -> Optional[tuple[str, tf.train.Example]]:
    """The first record of the first non-empty file, parsed; None when the files hold no records."""
    for path in files:
        if counts[path]:
            for serialized in tf.data.TFRecordDataset(path).take(1):
                try:
                    return path, tf.train.Example.FromString(serialized.numpy())
                except Exception:  # noqa: BLE001 -- protobuf's DecodeError; any failure means the same
                    raise UsageError(path, "the first record is not a tf.train.Example (expected Examples with "
                                           f"'{IMAGE_KEY}' image bytes)") from None
    return None


def _split_is_labelled(files: Sequence[str], counts: dict) -> bool:
    """Whether a split has labels, decided by its first record (which must hold an image)."""
    first = _first_example(files, counts)
    if first is None:
        return False
    path, example = first
    features = example.features.feature
    if IMAGE_KEY not in features:
        raise UsageError(path, f"records have no '{IMAGE_KEY}' feature (found: "
                               f"{', '.join(sorted(features)[:8]) or 'none'}); expected tf.train.Examples with "
                               f"encoded JPEG/PNG bytes, as python -m simclr_tf.make_tfrecords writes")
    return LABEL_KEY in features


def _check_readable(pieces: Sequence[_Piece], flag: str, where: str) -> None:
    """One clear error when a selection has no readable image; decodes records until one works (the first,
    usually), instead of a training stream that skips every record and never yields a batch."""
    tried = 0
    for piece in pieces:
        dataset = tf.data.TFRecordDataset(piece.path).take(piece.stop).enumerate().skip(piece.start)
        for index, serialized in dataset:
            tried += 1
            try:
                decode_record((serialized, tf.constant(piece.path), index))
                return
            except (tf.errors.OpError, ValueError):
                continue
    raise UsageError(flag, f"{where} holds no readable image: all {tried} records fail to decode")


# ---------------------------------------------------------------------------------------------------------------
# Classes: from the converter's dataset_info.json, else from the labels themselves


def _classes(files: Sequence[str], splits: dict, counts: dict, labelled: dict,
             index: "_Index") -> tuple[int, Optional[tuple[str, ...]]]:
    """(num_classes, class_names) of the splits in use (`splits`): from dataset_info.json, else their labels."""
    if not any(labelled.values()):
        return 0, None
    info = _read_info(files, splits, counts)
    if info is not None:
        names = info.get("class_names")
        return int(info["num_classes"]), tuple(names) if names else None
    scan = [f for name, split_files in splits.items() if labelled[name] for f in split_files]
    todo = [f for f in scan if index.max_label(f) is None]
    if todo:
        # A warning: on ImageNet-sized data this reads every file once, which takes a while.
        logging.warning("reading the labels of %d TFRecord file(s) for the class count, once (no %s describing "
                        "these files next to them; the result is kept in the index)", len(todo), INFO_FILE)
        with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
            for path, top in zip(todo, pool.map(_max_label, todo)):
                index.set_max_label(path, top)
    return max(index.max_label(f) for f in scan) + 1, None


def _read_info(files: Sequence[str], splits: dict, counts: dict) -> Optional[dict]:
    """The converter's dataset_info.json next to the files, when it describes them (same record counts)."""
    folders = {os.path.dirname(f) for f in files}
    if len(folders) != 1:
        return None
    path = os.path.join(folders.pop(), INFO_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            info = json.load(f)
    except (tf.errors.NotFoundError, FileNotFoundError):
        return None
    except (OSError, ValueError, tf.errors.OpError) as e:
        logging.warning("ignoring %s: cannot read it (%s)", path, e)
        return None
    try:
        if info.get("format") != INFO_FORMAT:
            raise ValueError(f"format is not '{INFO_FORMAT}'")
        for name, split_files in splits.items():
            entry = info.get("splits", {}).get(name, {})
            found = sum(counts[f] for f in split_files)
            # A glob may match some of a split's shards only; then the counts cannot be checked against it.
            if entry.get("num_shards") == len(split_files) and entry.get("num_examples") != found:
                raise ValueError(f"it lists {entry.get('num_examples')} examples in split '{name}', the files "
                                 f"hold {found}")
        if int(info["num_classes"]) < 0:
            raise ValueError("num_classes is negative")
        names = info.get("class_names")
        if names is not None and len(names) != int(info["num_classes"]):
            raise ValueError(f"{len(names)} class_names for {info['num_classes']} classes")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        logging.warning("ignoring %s: it does not describe these files (%s); reading the labels instead", path, e)
        return None
    return info


def _max_label(path: str) -> int:
    """The largest `image/class/label` in a file, -1 when none has one; only the label feature is parsed."""
    spec = {LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
    records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER)
    start = tf.constant(-1, tf.int64)
    try:
        labels = records.batch(1024).map(lambda batch: tf.io.parse_example(batch, spec)[LABEL_KEY])
        return int(labels.reduce(start, lambda top, batch: tf.maximum(top, tf.reduce_max(batch))))
    except tf.errors.InvalidArgumentError:
        # A record that is not an Example (it will be skipped when read): parse one by one, dropping it.
        labels = records.map(lambda one: tf.io.parse_single_example(one, spec)[LABEL_KEY]).ignore_errors()
        return int(labels.reduce(start, tf.maximum))


# ---------------------------------------------------------------------------------------------------------------
# Counting records from the framing, and the index file that keeps the counts


def count_records(path: str) -> int:
    """The number of records in a TFRecord file, from the record headers alone (a seek from one to the next).

    Args:
        path: a local or remote (gs://...) TFRecord file.

    Raises:
        UsageError: naming `path`, when the file is not a TFRecord file or is truncated.
    """
    try:
        if "://" in path:
            with tf.io.gfile.GFile(path, "rb") as f:
                return _walk_headers(path, tf.io.gfile.stat(path).length, lambda offset: _read_at(f, offset))
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            # pread: one system call per header, and no shared file position between threads.
            return _walk_headers(path, os.fstat(fd).st_size, lambda offset: os.pread(fd, _HEADER.size, offset))
    except OSError as e:
        raise UsageError(path, f"cannot read it ({e.strerror or e})") from None
    except tf.errors.OpError as e:
        raise UsageError(path, f"cannot read it ({e.message.splitlines()[0]})") from None


def _read_at(f, offset: int) -> bytes:
    f.seek(offset)
    return f.read(_HEADER.size)


def _walk_headers(path: str, size: int, read_header) -> int:
    offset = records = 0
    while offset < size:
        header = read_header(offset)
        if len(header) < _HEADER.size:
            raise UsageError(path, f"truncated TFRecord file: {size - offset} stray bytes after record {records} "
                                   f"(byte {offset})")
        length, length_crc = _HEADER.unpack(header)
        if _masked_crc32c(header[:8]) != length_crc:
            if records == 0:
                hint = " (it is GZIP-compressed: decompress it)" if header[:2] == b"\x1f\x8b" else ""
                raise UsageError(path, f"not a TFRecord file{hint}: its first record header is not valid")
            raise UsageError(path, f"corrupt TFRecord file: the header of record {records} (byte {offset}) is "
                                   f"not valid")
        offset += _HEADER.size + length + _FOOTER_BYTES
        if offset > size:
            raise UsageError(path, f"truncated TFRecord file: record {records} ends at byte {offset}, after the "
                                   f"end of the file ({size} bytes)")
        records += 1
    return records


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses; pure Python, meant for 8-byte headers.

    Args:
        data: the bytes.
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file."""
    try:
        if "://" in path:
            stat = tf.io.gfile.stat(path)
            return int(stat.length), int(stat.mtime_nsec)
        stat = os.stat(path)
    except OSError as e:  # e.g. a dangling link matched by the glob
        raise UsageError(path, f"cannot read it ({e.strerror or e})") from None
    except tf.errors.OpError as e:
        raise UsageError(path, f"cannot read it ({e.message.splitlines()[0]})") from None
    return stat.st_size, stat.st_mtime_ns


def _index_path(pattern: str, index_dir: Optional[str]) -> Optional[str]:
    if not index_dir or "://" in index_dir:
        return None  # remote model_dirs (gs://...) get no index
    absolute = pattern if "://" in pattern else os.path.abspath(pattern)
    digest = hashlib.sha1(absolute.encode("utf-8")).hexdigest()[:16]
    return os.path.join(index_dir, f"tfrecord_index-{digest}.json")


class _Index:
    """Per-file record counts (and largest labels, once read), reused while a file's size and mtime hold."""

    def __init__(self, path: Optional[str], pattern: str) -> None:
        self.path = path
        self.pattern = pattern
        self.entries: dict[str, dict] = {}
        self.changed = False
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("version") == _INDEX_VERSION and isinstance(data.get("files"), dict):
                    self.entries = data["files"]
            except (OSError, ValueError):
                pass  # missing or damaged: everything is scanned again

    def counts(self, files: Sequence[str], matched: Sequence[str]) -> dict[str, int]:
        """Record counts of `files`: from the index where still valid, the others scanned in parallel.

        Args:
            files: the files to count.
            matched: every file the glob matches; entries of other files are dropped from the index.
        """
        stats = {}
        with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
            for path, stat in zip(files, pool.map(_stat, files)):
                stats[path] = stat
        todo = [f for f in files if (self.entries.get(f, {}).get("size"), self.entries.get(f, {}).get("mtime_ns"))
                != stats[f]]
        if todo:
            logging.info("tfrecord:%s: counting the records of %d of %d files", self.pattern, len(todo), len(files))
            with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
                for path, count in zip(todo, pool.map(count_records, todo)):
                    size, mtime_ns = stats[path]
                    self.entries[path] = {"size": size, "mtime_ns": mtime_ns, "records": count, "max_label": None}
            self.changed = True
        for gone in set(self.entries) - set(matched):  # files no longer matched: not kept forever
            del self.entries[gone]
            self.changed = True
        return {f: int(self.entries[f]["records"]) for f in files}

    def max_label(self, path: str) -> Optional[int]:
        """The file's largest label (-1: none), None when not read yet."""
        value = self.entries[path].get("max_label")
        return None if value is None else int(value)

    def set_max_label(self, path: str, value: int) -> None:
        """Keeps a file's largest label."""
        self.entries[path]["max_label"] = int(value)
        self.changed = True

    def save(self) -> None:
        """Writes the index atomically (a temporary file renamed over it); a failure costs only the next start."""
        if self.path is None or not self.changed:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tfrecord_index-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": _INDEX_VERSION, "pattern": self.pattern, "files": self.entries}, f)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError as e:
            logging.warning("could not write the TFRecord index %s (%s); the files will be scanned again next "
                            "time", self.path, e)
