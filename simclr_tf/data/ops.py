"""Image ops of the augmentations: Inception crop and bicubic resize (stage 1), the eval centre crop, and the
colour, grayscale and Gaussian-blur ops that `augment.py` chains into its compiled stage-2 programs.

Stage-2 ops work on one planar image `[3, H, W]` with scalar parameters: with channels as the outer axis
every per-pixel formula reads three contiguous planes, which XLA vectorises (channel-last strided access
made the same ops about 3x slower). Each matches the tf.image op named in its docstring.
"""
from __future__ import annotations

import tensorflow as tf

CROP_AREA_RANGE = (0.08, 1.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 100
CENTER_CROP_PROPORTION = 0.875
# Same weights as tf.image.rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# The box `sample_distorted_bounding_box` starts from: the whole image.
WHOLE_IMAGE_BOX = (((0.0, 0.0, 1.0, 1.0),),)
# A tap is left out when all taps beyond it together weigh at most this (of a normalised kernel): on [0, 1]
# pixels that moves a result by at most 1e-7, below float32 resolution near 1 (1.2e-7).
BLUR_TAIL_TOLERANCE = 1e-7


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 in [0, 1] (what `convert_image_dtype` does)."""
    return tf.image.convert_image_dtype(image, tf.float32)


def input_scale(dtype: tf.DType) -> float:
    """Factor from an image dtype's range to [0, 1] (what `convert_image_dtype` multiplies by)."""
    return 1.0 / 255.0 if dtype == tf.uint8 else 1.0


def clip(x: tf.Tensor) -> tf.Tensor:
    """Clips to [0, 1]."""
    return tf.clip_by_value(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Crop and resize


def resize_bicubic(image: tf.Tensor, image_size: int, rescale: bool = True) -> tf.Tensor:
    """Bicubic resize of one image to float32 [S, S, 3], in the [0, 1] scale unless `rescale=False`
    (then in the image dtype's own range, e.g. 0..255 for uint8).

    Resizing is linear, so resizing the uint8 crop and then scaling by 1/255 equals (up to float rounding)
    the reference's convert-then-resize, without converting the whole source image first.
    """
    resized = tf.image.resize(tf.cast(image, tf.float32)[tf.newaxis], [image_size, image_size],
                              method=tf.image.ResizeMethod.BICUBIC)[0]
    scale = input_scale(image.dtype)
    return resized * scale if rescale and scale != 1.0 else resized


def crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Inception-crop window `(begin [3], size [3])` for an image of `image_shape` [H, W, C].

    Target views are square, so the aspect-ratio range (scaled by the target's W/H in the reference) is
    (3/4, 4/3) as is.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=tf.constant(WHOLE_IMAGE_BOX, tf.float32), seed=seed,
        min_object_covered=CROP_MIN_OBJECT_COVERED, aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE, max_attempts=CROP_MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    return begin, size


def random_crop_resize(image: tf.Tensor, image_size: int, seed: tf.Tensor, rescale: bool = True) -> tf.Tensor:
    """Stage 1 of a training view: Inception crop + bicubic resize. Not clipped (bicubic may overshoot [0,1]
    slightly; the reference clips only later, and so do we).

    `rescale=False` leaves the view in the image dtype's range: the input pipeline folds the 1/255 into the
    first pass of its compiled stage 2 (`make_batch_augmenter(input_scale=...)`) instead of paying a
    separate multiply over every view here."""
    begin, size = crop_window(tf.shape(image), seed)
    return resize_bicubic(tf.slice(image, begin, size), image_size, rescale)


def center_crop_window(height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Eval crop `(offset_y, offset_x, side)`: side round-half-even(0.875 * min(H, W)), centred as in the
    reference (`((H - side) + 1) // 2`)."""
    short = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.cast(tf.math.rint(CENTER_CROP_PROPORTION * short), tf.int32)
    return (height - side + 1) // 2, (width - side + 1) // 2, side


# ---------------------------------------------------------------------------------------------------------------
# Colour ops on one planar image [3, H, W]


def _channel_max_min(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-pixel max and min over the three planes, as element-wise ops (XLA turns a reduce over the outer
    axis into a slower loop)."""
    r, g, b = x[0], x[1], x[2]
    return tf.maximum(r, tf.maximum(g, b)), tf.minimum(r, tf.minimum(g, b))


def adjust_brightness(x: tf.Tensor, value: tf.Tensor, brightness: str) -> tf.Tensor:
    """v2: x * factor (the reference's multiplicative brightness); v1: tf.image.adjust_brightness (x + delta)."""
    return x * value if brightness == "v2" else x + value


def adjust_contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_contrast: (x - channel mean) * factor + channel mean."""
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return (x - mean) * factor + mean


def adjust_saturation(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_saturation (HSV, s <- clip(s * f, 0, 1)), computed in RGB.

    With hue and value fixed every channel is c = v - v*s*g(hue), so scaling s by r moves each channel to
    v - (v - c) * r, with r = min(f, 1/s) = min(f, v / (max - min)). Where v <= 0 the kernel sets s = 0,
    which maps the pixel to (v, v, v), i.e. r = 0.
    """
    vmax, vmin = _channel_max_min(x)
    ratio = tf.minimum(factor, tf.math.divide_no_nan(vmax, vmax - vmin))
    ratio = tf.where(vmax > 0, ratio, 0.0)
    return vmax - (vmax - x) * ratio


def adjust_hue(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_hue: like the AdjustHue kernel it keeps each pixel's min and max channel and rotates
    the hue (in sextants) between them."""
    r, g, b = x[0], x[1], x[2]
    vmax, vmin = _channel_max_min(x)
    chroma = vmax - vmin
    inverse = 1.0 / tf.where(chroma > 0, chroma, 1.0)
    h = tf.where(tf.equal(r, vmax), (g - b) * inverse,
                 tf.where(tf.equal(g, vmax), 2.0 + (b - r) * inverse, 4.0 + (r - g) * inverse))
    h = h + 6.0 * delta
    h = h - 6.0 * tf.floor(h / 6.0)
    # HSV -> RGB: channel n is vmax - chroma * clip(min(k, 4 - k), 0, 1) with k = (offset_n + h) mod 6,
    # broadcast over the planes (a stack of three planes compiles to a slower concatenation).
    k = tf.reshape(tf.constant([5.0, 3.0, 1.0]), [3, 1, 1]) + h
    k = k - 6.0 * tf.floor(k / 6.0)
    return vmax - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)


def to_grayscale(x: tf.Tensor) -> tf.Tensor:
    """tf.image.rgb_to_grayscale tiled to 3 channels (R = G = B exactly)."""
    gray = GRAY_WEIGHTS[0] * x[0] + GRAY_WEIGHTS[1] * x[1] + GRAY_WEIGHTS[2] * x[2]
    return tf.stack([gray, gray, gray])


# ---------------------------------------------------------------------------------------------------------------
# Gaussian blur


def blur_radius(image_size: int) -> int:
    """Kernel radius of the reference: kernel_size = image_size // 10, radius = int(kernel_size / 2)."""
    return (image_size // 10) // 2


def gaussian_kernels(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Normalised 1-D Gaussian taps `[n, 2r+1]`, one row per sigma."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(taps)[tf.newaxis] / (2.0 * tf.square(sigma[:, tf.newaxis])))
    return kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)


def separable_blur(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Both 1-D passes of `kernel` (static length 2r+1) over a planar image `[3, H, W]` with SAME zero
    padding (the reference's depthwise conv pair), as sums of shifted copies, which XLA fuses into one loop
    per direction."""
    size = int(kernel.shape[0])
    radius = size // 2
    height, width = x.shape[1], x.shape[2]
    padded = tf.pad(x, [[0, 0], [0, 0], [radius, radius]])
    x = tf.add_n([padded[:, :, i:i + width] * kernel[i] for i in range(size)])
    padded = tf.pad(x, [[0, 0], [radius, radius], [0, 0]])
    return tf.add_n([padded[:, i:i + height, :] * kernel[i] for i in range(size)])


def blur_radius_buckets(radius: int) -> list[int]:
    """The shortened radii `maybe_blur` may use (ascending, ending with the full radius): about six, so that
    the compiled program stays small while the expected tap count drops by about 40%."""
    return sorted({max(1, round(radius * i / 6)) for i in range(1, 7)})


def maybe_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int, apply: tf.Tensor, clip_result: bool) -> tf.Tensor:
    """Gaussian blur of a planar image `[3, H, W]` where `apply`, else `x`, as one conditional; with
    `clip_result` the clip to [0, 1] is inside the blur branches, where XLA fuses it into the last pass.

    The reference always convolves with 2r+1 taps (23 at 224 px), but for sigma = 1 the outer ten taps
    together weigh 4e-9. Of the normalised full kernel this keeps the shortest centre part (from
    `blur_radius_buckets`) whose left-out taps weigh at most BLUR_TAIL_TOLERANCE, so results match the
    full blur to within that on [0, 1] images; cost is proportional to the taps kept.
    """
    if radius == 0:
        return x
    kernel = gaussian_kernels(sigma[tf.newaxis], radius)[0]
    buckets = blur_radius_buckets(radius)
    finish = clip if clip_result else (lambda y: y)
    return tf.switch_case(tf.where(apply, shortest_bucket(kernel, buckets) + 1, 0), [lambda: x] + [
        lambda r=r: finish(separable_blur(x, kernel[radius - r:radius + r + 1])) for r in buckets])


def shortest_bucket(kernel: tf.Tensor, buckets: list[int]) -> tf.Tensor:
    """Index in `buckets` of the shortest radius whose left-out taps of `kernel` weigh <= the tolerance."""
    radius = int(kernel.shape[0]) // 2
    # Weight beyond distance r, for r = 1..radius, summed from the outside in (small terms first).
    outer = kernel[:radius][::-1] + kernel[radius + 1:]
    tails = tf.concat([tf.cumsum(outer, reverse=True)[1:], [0.0]], 0)
    fits = tf.stack([tails[r - 1] <= BLUR_TAIL_TOLERANCE for r in buckets])
    return tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # first fit; the last always fits
