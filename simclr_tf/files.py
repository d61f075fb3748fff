"""Small files (flags.json, result.json, a TFRecord folder's info) written so that no reader sees half of one."""
import os
import uuid

import tensorflow as tf


def write_text_atomically(path: str, text: str) -> None:
    """Writes next to `path`, then renames over it (atomic on local disks; GCS replaces the object whole).

    Args:
        path: the file to (re)place.
        text: its whole new content.
    """
    # The temporary name is unique to this call: the workers of a multi-worker run write the same flags.json
    # at the same moment, and with one shared name one worker's rename takes the other's file away.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise
