"""The encoded image formats `tf.io.decode_image` reads, told apart by their leading bytes.

One table for the SavedModel's `serving_default` input check (export.py) and for `predict --images`
(predict.py), so that both accept the same files. It imports nothing heavy: predict checks its files before
TensorFlow is loaded.
"""

# Leading bytes of JPEG, PNG, GIF and BMP files.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def looks_like_image(data: bytes) -> bool:
    """Whether `data` starts like a JPEG, PNG, GIF or BMP file.

    Args:
        data: the file's bytes (or at least its first four).
    """
    return data.startswith(IMAGE_MAGIC)
