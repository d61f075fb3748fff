"""Per-image reference of the augmentations: one image at a time, stateful randomness, `tf.cond` and the
`tf.image` ops, as the official code does it. Slow on purpose; `simclr_tf/data/augment.py` is tested
against it (tests/test_augment.py) and bench/augment.py measures against it.

Also the blur entry points the tests probe directly (`gaussian_blur`, `fast_gaussian_blur`,
`blur_taps_radius`): thin wrappers over the production ops in `simclr_tf/data/ops.py`.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from simclr_tf.data import ops
from simclr_tf.data.augment import (BLUR_PROB, BLUR_SIGMA_RANGE, BRIGHTNESS, CONTRAST, GRAYSCALE_PROB,
                                    JITTER_PROB, SATURATION, ViewParams)
from simclr_tf.sections import AugmentConfig


def _random_apply(fn: Callable[[tf.Tensor], tf.Tensor], p: float, x: tf.Tensor) -> tf.Tensor:
    return tf.cond(tf.random.uniform([]) < p, lambda: fn(x), lambda: x)


def reference_color_jitter(x: tf.Tensor, strength: float, brightness: str) -> tf.Tensor:
    """Brightness, contrast, saturation, hue in a random order, clipping after each (official color_jitter_rand)."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength

    def bright(y: tf.Tensor) -> tf.Tensor:
        if brightness == "v2":
            return y * tf.random.uniform([], max(0.0, 1.0 - b), 1.0 + b)
        return tf.image.random_brightness(y, max_delta=b)

    jitter_ops = [bright,
                  lambda y: tf.image.random_contrast(y, 1.0 - c, 1.0 + c),
                  lambda y: tf.image.random_saturation(y, 1.0 - s, 1.0 + s),
                  lambda y: tf.image.random_hue(y, max_delta=h)]
    perm = tf.random.shuffle(tf.range(4))
    for i in range(4):
        x = tf.switch_case(perm[i], [lambda f=f: f(x) for f in jitter_ops])
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


def reference_blur(x: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image, one sigma: depthwise separable conv as in the official gaussian_blur."""
    radius = ops.blur_radius(image_size)
    if radius == 0:
        return x
    sigma = tf.random.uniform([], *BLUR_SIGMA_RANGE)
    kernel = ops.gaussian_kernels(sigma[tf.newaxis], radius)[0]
    size = 2 * radius + 1
    horizontal = tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, 3, 1])
    vertical = tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, 3, 1])
    y = tf.nn.depthwise_conv2d(x[tf.newaxis], horizontal, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(y, vertical, [1, 1, 1, 1], "SAME")[0]


def reference_view(image: tf.Tensor, augment: AugmentConfig, *, color: bool = True) -> tf.Tensor:
    """One training view of one uint8 image, literally as the reference: convert, crop, resize, flip,
    colour distortion, clip, blur (p 0.5), clip.

    Args:
        image: uint8 [H, W, 3].
        augment: the view's size, jitter strength, blur and brightness.
        color: False: no colour distortion (the fine-tune view).
    """
    image_size, strength = augment.image_size, augment.color_jitter_strength
    x = ops.to_float(image)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(x), bounding_boxes=tf.constant(ops.WHOLE_IMAGE_BOX, tf.float32),
        min_object_covered=ops.CROP_MIN_OBJECT_COVERED, aspect_ratio_range=ops.CROP_ASPECT_RANGE,
        area_range=ops.CROP_AREA_RANGE, max_attempts=ops.CROP_MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    x = tf.image.resize(tf.slice(x, begin, size)[tf.newaxis], [image_size, image_size],
                        method=tf.image.ResizeMethod.BICUBIC)[0]
    x = tf.image.random_flip_left_right(x)
    if color and strength > 0:
        x = _random_apply(lambda y: reference_color_jitter(y, strength, augment.brightness), JITTER_PROB, x)
        x = _random_apply(lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3]), GRAYSCALE_PROB, x)
    x = tf.clip_by_value(tf.reshape(x, [image_size, image_size, 3]), 0.0, 1.0)
    if augment.use_blur and ops.blur_radius(image_size) > 0:
        x = _random_apply(lambda y: reference_blur(y, image_size), BLUR_PROB, x)
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


def reference_apply_one(image: tf.Tensor, params: ViewParams, index: int, *, brightness: str = "v2") -> tf.Tensor:
    """Stage 2 for image `index` of a batch with given params, using the tf.image ops of the reference; the
    oracle that `apply_with_params` is tested against."""
    x = tf.convert_to_tensor(image, tf.float32)
    p = ViewParams(*[t[index] for t in params])
    if p.flip:
        x = tf.image.flip_left_right(x)
    if p.jitter:
        for op in p.order.numpy():
            if op == BRIGHTNESS:
                x = x * p.brightness if brightness == "v2" else tf.image.adjust_brightness(x, p.brightness)
            elif op == CONTRAST:
                x = tf.image.adjust_contrast(x, p.contrast)
            elif op == SATURATION:
                x = tf.image.adjust_saturation(x, p.saturation)
            else:
                x = tf.image.adjust_hue(x, p.hue)
            x = tf.clip_by_value(x, 0.0, 1.0)
    if p.grayscale:
        x = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])
    x = tf.clip_by_value(x, 0.0, 1.0)
    radius = ops.blur_radius(int(x.shape[0]))
    if p.blur and radius > 0:
        size = 2 * radius + 1
        kernel = ops.gaussian_kernels(p.sigma[tf.newaxis], radius)[0]
        y = tf.nn.depthwise_conv2d(x[tf.newaxis], tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, 3, 1]),
                                   [1, 1, 1, 1], "SAME")
        x = tf.nn.depthwise_conv2d(y, tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, 3, 1]),
                                   [1, 1, 1, 1], "SAME")[0]
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Blur entry points of the tests, over the production ops


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur (the reference's depthwise conv pair) of a planar image `[3, H, W]` with SAME
    zero padding and all 2r+1 taps: `ops.separable_blur` with the full kernel."""
    if radius == 0:
        return x
    return ops.separable_blur(x, ops.gaussian_kernels(sigma[tf.newaxis], radius)[0])


def fast_gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """The blur stage 2 applies (`ops.maybe_blur`, which skips the outer taps a small sigma leaves
    negligible), always applied and unclipped."""
    return ops.maybe_blur(x, sigma, radius, tf.constant(True), clip_result=False)


def blur_taps_radius(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """The radius `ops.maybe_blur` convolves with for `sigma` (int32 scalar; 0 when radius is 0)."""
    if radius == 0:
        return tf.constant(0, tf.int32)
    buckets = ops.blur_radius_buckets(radius)
    kernel = ops.gaussian_kernels(sigma[tf.newaxis], radius)[0]
    return tf.gather(tf.constant(buckets, tf.int32), ops.shortest_bucket(kernel, buckets))
