"""The SimCLR augmentations of DESIGN.md section 2, split in two stages for speed.

Stage 1 runs per element inside `Dataset.map` because sources may have images of any size: the Inception
crop (the real `stateless_sample_distorted_bounding_box` op, so the box distribution is TF's own) and the
bicubic resize to `image_size`. Stage 2 is flip, colour jitter in a per-image random order, grayscale, clip
and Gaussian blur, with per-image parameters drawn by `sample_params` and applied by `apply_with_params`, as
one XLA-compiled program: per batch after `batch()` (`make_batch_augmenter`) or, for large views, per
example at the end of the per-element map (`make_example_augmenter`; the input pipeline picks). Per-image op
chains fuse into a few cache-resident passes and only the ops an image drew are computed, which is where the
speed-up over the reference's one-image-at-a-time `map` comes from.

Randomness is stateless and keyed by explicit seeds, so the same seed gives the same batch.

Deliberate difference from the reference: the reference blurs a device batch with one sigma per view; we draw
sigma per image, as the paper describes (DESIGN.md allows either).

`reference_view` keeps a literal per-image implementation (stateful `tf.random`, `tf.cond`, `tf.image.*`) that
mirrors the official code; the benchmark and the distribution tests compare against it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import tensorflow as tf

from simclr_tf.errors import UsageError

CROP_AREA_RANGE = (0.08, 1.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 100
CENTER_CROP_PROPORTION = 0.875
FLIP_PROB = 0.5
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
BRIGHTNESS_IMPLS = ("v1", "v2")
# Same weights as tf.image.rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Op ids used in ViewParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

_WHOLE_IMAGE_BOX = (((0.0, 0.0, 1.0, 1.0),),)


def check_brightness_impl(brightness: str) -> None:
    if brightness not in BRIGHTNESS_IMPLS:
        raise UsageError("--brightness", f"must be one of {BRIGHTNESS_IMPLS}, got {brightness!r}")


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 in [0, 1] (what `convert_image_dtype` does)."""
    return tf.image.convert_image_dtype(image, tf.float32)


def input_scale(dtype: tf.DType) -> float:
    """Factor from an image dtype's range to [0, 1] (what `convert_image_dtype` multiplies by)."""
    return 1.0 / 255.0 if dtype == tf.uint8 else 1.0


def _resize_bicubic(image: tf.Tensor, image_size: int, rescale: bool = True) -> tf.Tensor:
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
        image_shape, bounding_boxes=tf.constant(_WHOLE_IMAGE_BOX, tf.float32), seed=seed,
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
    return _resize_bicubic(tf.slice(image, begin, size), image_size, rescale)


def center_crop_window(height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Eval crop `(offset_y, offset_x, side)`: side round-half-even(0.875 * min(H, W)), centred as in the
    reference (`((H - side) + 1) // 2`)."""
    short = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.cast(tf.math.rint(CENTER_CROP_PROPORTION * short), tf.int32)
    return (height - side + 1) // 2, (width - side + 1) // 2, side


def eval_view(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Eval view of one uint8 or float image: centre crop + bicubic resize when image_size > 32, else no crop.

    At <= 32 px the reference assumes the source already is S x S; we resize (bicubic) only when it is not.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if image_size > 32:
        offset_y, offset_x, side = center_crop_window(height, width)
        view = _resize_bicubic(tf.image.crop_to_bounding_box(image, offset_y, offset_x, side, side), image_size)
    else:
        same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
        view = tf.cond(same, lambda: to_float(image), lambda: _resize_bicubic(image, image_size))
        view = tf.ensure_shape(view, [image_size, image_size, 3])
    return tf.clip_by_value(view, 0.0, 1.0)


class ViewParams(NamedTuple):
    """Per-image random choices of stage 2, each with leading dimension n."""

    flip: tf.Tensor        # bool
    jitter: tf.Tensor      # bool: colour jitter applied
    order: tf.Tensor       # int32 [n, 4]: op ids (BRIGHTNESS, CONTRAST, SATURATION, HUE) in application order
    brightness: tf.Tensor  # float32: factor (v2) or additive delta (v1)
    contrast: tf.Tensor    # float32 factor
    saturation: tf.Tensor  # float32 factor
    hue: tf.Tensor         # float32 delta (fraction of a full turn)
    grayscale: tf.Tensor   # bool
    blur: tf.Tensor        # bool
    sigma: tf.Tensor       # float32 blur sigma (drawn for every image; used where blur is True)


def sample_params(n: tf.Tensor | int, seed: tf.Tensor, *, color_jitter_strength: float = 1.0,
                  use_blur: bool = True, brightness: str = "v2", color: bool = True) -> ViewParams:
    """Draws the stage-2 parameters of n views from a stateless `seed` (int [2]).

    Strength s = 0 (or color=False, the fine-tune view) switches off jitter and grayscale together: they
    form the reference's colour-distortion step, which requires s > 0.
    """
    check_brightness_impl(brightness)
    s = float(color_jitter_strength)
    u = tf.random.stateless_uniform([n, 13], seed=seed, dtype=tf.float32)
    lo_b = max(0.0, 1.0 - 0.8 * s) if brightness == "v2" else -0.8 * s
    hi_b = 1.0 + 0.8 * s if brightness == "v2" else 0.8 * s
    color = color and s > 0
    no = tf.zeros([n], tf.bool)
    return ViewParams(
        flip=u[:, 0] < FLIP_PROB,
        jitter=u[:, 1] < JITTER_PROB if color else no,
        # argsort of i.i.d. uniforms is a uniformly random permutation, like tf.random.shuffle(range(4)).
        order=tf.cast(tf.argsort(u[:, 2:6], axis=1), tf.int32),
        brightness=lo_b + (hi_b - lo_b) * u[:, 6],
        contrast=(1.0 - 0.8 * s) + 1.6 * s * u[:, 7],
        saturation=(1.0 - 0.8 * s) + 1.6 * s * u[:, 8],
        hue=-0.2 * s + 0.4 * s * u[:, 9],
        grayscale=u[:, 10] < GRAYSCALE_PROB if color else no,
        blur=u[:, 11] < BLUR_PROB if use_blur else no,
        sigma=BLUR_SIGMA_RANGE[0] + (BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0]) * u[:, 12],
    )


# Stage-2 ops work on one planar image `[3, H, W]` with scalar parameters: with channels as the outer axis
# every per-pixel formula reads three contiguous planes, which XLA vectorises (channel-last strided access
# made the same ops about 3x slower). Each matches the tf.image op named in its docstring.

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


def blur_radius(image_size: int) -> int:
    """Kernel radius of the reference: kernel_size = image_size // 10, radius = int(kernel_size / 2)."""
    return (image_size // 10) // 2


def gaussian_kernels(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Normalised 1-D Gaussian taps `[n, 2r+1]`, one row per sigma."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(taps)[tf.newaxis] / (2.0 * tf.square(sigma[:, tf.newaxis])))
    return kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur (the reference's depthwise conv pair) of a planar image `[3, H, W]` with SAME
    zero padding and all 2r+1 taps."""
    if radius == 0:
        return x
    return _separable_blur(x, gaussian_kernels(sigma[tf.newaxis], radius)[0])


def _separable_blur(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Both 1-D passes of `kernel` (static length 2r+1) as sums of shifted copies, which XLA fuses into one
    loop per direction."""
    size = int(kernel.shape[0])
    radius = size // 2
    height, width = x.shape[1], x.shape[2]
    padded = tf.pad(x, [[0, 0], [0, 0], [radius, radius]])
    x = tf.add_n([padded[:, :, i:i + width] * kernel[i] for i in range(size)])
    padded = tf.pad(x, [[0, 0], [radius, radius], [0, 0]])
    return tf.add_n([padded[:, i:i + height, :] * kernel[i] for i in range(size)])


# A tap is left out when all taps beyond it together weigh at most this (of a normalised kernel): on [0, 1]
# pixels that moves a result by at most 1e-7, below float32 resolution near 1 (1.2e-7).
BLUR_TAIL_TOLERANCE = 1e-7


def blur_radius_buckets(radius: int) -> list[int]:
    """The shortened radii `fast_gaussian_blur` may use (ascending, ending with the full radius): about six,
    so that the compiled program stays small while the expected tap count drops by about 40%."""
    return sorted({max(1, round(radius * i / 6)) for i in range(1, 7)})


def fast_gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """`gaussian_blur` that skips the outer taps a small sigma leaves negligible.

    The reference always convolves with 2r+1 taps (23 at 224 px), but for sigma = 1 the outer ten taps
    together weigh 4e-9. Of the normalised full kernel this keeps the shortest centre part (from
    `blur_radius_buckets`) whose left-out taps weigh at most BLUR_TAIL_TOLERANCE, so results match the
    full blur to within that on [0, 1] images; cost is proportional to the taps kept.
    """
    return _maybe_blur(x, sigma, radius, tf.constant(True), clip=False)


def _maybe_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int, apply: tf.Tensor, clip: bool) -> tf.Tensor:
    """`fast_gaussian_blur` where `apply`, else `x`, as one conditional; with `clip` the clip to [0, 1] is
    inside the blur branches, where XLA fuses it into the last pass."""
    if radius == 0:
        return x
    kernel = gaussian_kernels(sigma[tf.newaxis], radius)[0]
    buckets = blur_radius_buckets(radius)
    finish = _clip if clip else (lambda y: y)
    return tf.switch_case(tf.where(apply, _shortest_bucket(kernel, buckets) + 1, 0), [lambda: x] + [
        lambda r=r: finish(_separable_blur(x, kernel[radius - r:radius + r + 1])) for r in buckets])


def _shortest_bucket(kernel: tf.Tensor, buckets: list[int]) -> tf.Tensor:
    """Index in `buckets` of the shortest radius whose left-out taps of `kernel` weigh <= the tolerance."""
    radius = int(kernel.shape[0]) // 2
    # Weight beyond distance r, for r = 1..radius, summed from the outside in (small terms first).
    outer = kernel[:radius][::-1] + kernel[radius + 1:]
    tails = tf.concat([tf.cumsum(outer, reverse=True)[1:], [0.0]], 0)
    fits = tf.stack([tails[r - 1] <= BLUR_TAIL_TOLERANCE for r in buckets])
    return tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # first fit; the last always fits


def blur_taps_radius(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """The radius `fast_gaussian_blur` convolves with for `sigma` (int32 scalar; 0 when radius is 0)."""
    if radius == 0:
        return tf.constant(0, tf.int32)
    buckets = blur_radius_buckets(radius)
    kernel = gaussian_kernels(sigma[tf.newaxis], radius)[0]
    return tf.gather(tf.constant(buckets, tf.int32), _shortest_bucket(kernel, buckets))


def _clip(x: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(x, 0.0, 1.0)


def _jitter_one(x: tf.Tensor, p: ViewParams, brightness: str) -> tf.Tensor:
    """The four jitter ops of one image in its own order, clipping after each; only the drawn op runs.

    The clip sits inside each branch so that XLA fuses it into the op's last pass (a clip after the
    conditional would be a pass of its own)."""

    def step(i: tf.Tensor, x: tf.Tensor) -> tuple:
        return i + 1, tf.switch_case(p.order[i], [
            lambda: _clip(adjust_brightness(x, p.brightness, brightness)),
            lambda: _clip(adjust_contrast(x, p.contrast)),
            lambda: _clip(adjust_saturation(x, p.saturation)),
            lambda: _clip(adjust_hue(x, p.hue)),
        ])

    # A loop over the four steps rather than four unrolled conditionals: the same speed (the image is
    # materialised between ops either way) with a quarter of the code for XLA to compile.
    return tf.while_loop(lambda i, x: i < 4, step, (tf.constant(0), x))[1]


def _augment_one(x: tf.Tensor, p: ViewParams, brightness: str, radius: int) -> tf.Tensor:
    """Stage 2 after the flip of one planar image `[3, S, S]` with scalar params: jitter, grayscale, clip,
    blur, clip -- each clip fused into the pass before it."""
    x = tf.cond(p.jitter, lambda: _jitter_one(x, p, brightness), lambda: x)
    # A select, not a cond: grayscale is three multiply-adds per pixel, cheaper than a conditional's copies,
    # and the select fuses with the clip into one pass.
    x = _clip(tf.where(p.grayscale, to_grayscale(x), x))
    return _maybe_blur(x, p.sigma, radius, p.blur, clip=True)


def apply_with_params(images: tf.Tensor, params: ViewParams, *, brightness: str = "v2") -> tf.Tensor:
    """Stage 2 on a batch `[n, S, S, 3]` (output of stage 1): flip, colour jitter in each image's order with a
    clip after each op, grayscale, clip, blur, clip. Returns float32 in [0, 1].

    The batch is walked image by image inside one program (compiled by XLA in `make_batch_augmenter`): each
    image's chain of ops fuses into a few passes over a cache-resident image and only the ops it drew run.
    At 224 px this measured about 3x faster than a select-based vectorisation over the batch, which has to
    evaluate all four jitter ops at each of the four steps for every image.
    """
    check_brightness_impl(brightness)
    images = tf.convert_to_tensor(images, tf.float32)
    return tf.ensure_shape(tf.transpose(_apply_planar(images, params, brightness), [0, 2, 3, 1]), images.shape)


def apply_pairs_with_params(images: tf.Tensor, params: ViewParams, *, brightness: str = "v2") -> tf.Tensor:
    """`apply_with_params` on `[2b, S, S, 3]` (view-1 rows, then view-2 rows) returning the pretraining layout
    `[b, S, S, 6]` (view 1 in channels 0:3, view 2 in 3:6): the same values as applying `apply_with_params`
    and concatenating the halves on the channel axis, with the channel interleave folded into the transpose
    back from planar layout instead of a separate copy with 3-float strides."""
    check_brightness_impl(brightness)
    images = tf.convert_to_tensor(images, tf.float32)
    n, size = images.shape[0], images.shape[1]
    out = _apply_planar(images, params, brightness)                     # [2b, 3, S, S]
    out = tf.reshape(out, [2, -1, 3, size, size])
    out = tf.reshape(tf.transpose(out, [1, 3, 4, 0, 2]), [-1, size, size, 6])
    return tf.ensure_shape(out, [None if n is None else n // 2, size, size, 6])


def _apply_planar(images: tf.Tensor, params: ViewParams, brightness: str) -> tf.Tensor:
    """Stage 2 of `[n, S, S, 3]`; returns the planar result `[n, 3, S, S]`."""
    # The flip is a select over the batch that fuses into the transpose to planar layout.
    x = _flip(images, params.flip)
    x = tf.transpose(x, [0, 3, 1, 2])
    radius = blur_radius(int(x.shape[2]))

    def one(args: tuple) -> tf.Tensor:
        return _augment_one(args[0], ViewParams(*args[1:]), brightness, radius)

    return tf.map_fn(one, (x,) + tuple(params), fn_output_signature=tf.TensorSpec(x.shape[1:], tf.float32))


def flip_and_clip(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """The fine-tune view's stage 2 (crop was stage 1): flip with per-image masks, clip."""
    return _clip(_flip(images, flip))


def _flip(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """Left-right flip of the images `[n, S, S, 3]` whose `flip` [n] is True, as a select."""
    return tf.where(tf.reshape(flip, [-1, 1, 1, 1]), tf.reverse(images, axis=[2]), images)


def _scaled(images: tf.Tensor, input_scale: float) -> tf.Tensor:
    return images * input_scale if input_scale != 1.0 else images


def _colour_or_blur(color: bool, color_jitter_strength: float, use_blur: bool) -> bool:
    """Whether stage 2 does more than flip + clip."""
    return (color and color_jitter_strength > 0) or use_blur


def make_batch_augmenter(*, color_jitter_strength: float = 1.0, use_blur: bool = True, brightness: str = "v2",
                         color: bool = True, jit: bool = True, pairs: bool = False,
                         input_scale: float = 1.0) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Returns `augment(images [n,S,S,3], seed int[2]) -> [n,S,S,3]`: sample_params + apply_with_params, the
    latter XLA-compiled (jit=True) for speed. With no colour and no blur (fine-tune) it is flip + clip, also
    compiled (as separate eager ops it cost a third of the whole fine-tune input pipeline at 224 px).

    `pairs=True`: the images are two views of n/2 examples (view-1 rows first) and the result is the
    pretraining layout `[n/2, S, S, 6]` (`apply_pairs_with_params`), with the same draws for the same seed.

    `images` may also be a list of tensors that together form the batch (concatenated on axis 0); inside the
    compiled program the concatenation fuses into the first pass instead of being a copy of its own."""
    check_brightness_impl(brightness)
    apply_fn = apply_pairs_with_params if pairs else apply_with_params

    colour_or_blur = _colour_or_blur(color, color_jitter_strength, use_blur)

    def batch_of(parts: list) -> tf.Tensor:
        return _scaled(tf.concat(parts, axis=0), input_scale)

    def apply(parts: list, params: ViewParams) -> tf.Tensor:
        if colour_or_blur:
            return apply_fn(batch_of(parts), params, brightness=brightness)
        out = flip_and_clip(batch_of(parts), params.flip)
        return tf.concat(tf.split(out, 2, axis=0), axis=-1) if pairs else out

    compiled = tf.function(apply, jit_compile=True, autograph=False) if jit else apply

    def augment(images, seed: tf.Tensor) -> tf.Tensor:
        parts = list(images) if isinstance(images, (list, tuple)) else [images]
        n = tf.add_n([tf.shape(p)[0] for p in parts])
        params = sample_params(n, seed, color_jitter_strength=color_jitter_strength,
                               use_blur=use_blur, brightness=brightness, color=color)
        return compiled(parts, params)

    return augment


def make_example_augmenter(*, color_jitter_strength: float = 1.0, use_blur: bool = True, brightness: str = "v2",
                           color: bool = True, input_scale: float = 1.0
                           ) -> Callable[[list, tf.Tensor], tf.Tensor]:
    """Returns `augment(views, seed int[2]) -> [S, S, 3k]`: stage 2 of one example's k views (a list of
    `[S, S, 3]` stage-1 outputs), XLA-compiled, with the views side by side on the channel axis (the
    pretraining layout for k = 2). Draws as `sample_params(k, seed)`; pixels as `apply_with_params`.

    Runs inside the per-example `Dataset.map`: with static shapes and a python loop over the k views, every
    op compiles to straight-line fused loops (the batch program's `map_fn` indexes images dynamically,
    which XLA compiles to slower loops), and the stage-1 output is consumed while still in cache.
    """
    check_brightness_impl(brightness)
    colour_or_blur = _colour_or_blur(color, color_jitter_strength, use_blur)

    def apply(views: list, params: ViewParams) -> tf.Tensor:
        x = _scaled(tf.stack(views), input_scale)
        if not colour_or_blur:
            return tf.concat(tf.unstack(flip_and_clip(x, params.flip)), axis=-1)
        x = tf.transpose(_flip(x, params.flip), [0, 3, 1, 2])
        radius = blur_radius(int(x.shape[2]))
        out = [_augment_one(x[i], ViewParams(*[t[i] for t in params]), brightness, radius)
               for i in range(len(views))]
        return tf.transpose(tf.concat(out, axis=0), [1, 2, 0])

    compiled = tf.function(apply, jit_compile=True, autograph=False)

    def augment(views: list, seed: tf.Tensor) -> tf.Tensor:
        params = sample_params(len(views), seed, color_jitter_strength=color_jitter_strength,
                               use_blur=use_blur, brightness=brightness, color=color)
        return compiled(list(views), params)

    return augment


# ----------------------------------------------------------------------------------------------------------
# Per-image reference: one image at a time, stateful randomness, tf.cond, tf.image ops, as the official code.
# ----------------------------------------------------------------------------------------------------------

def _random_apply(fn: Callable[[tf.Tensor], tf.Tensor], p: float, x: tf.Tensor) -> tf.Tensor:
    return tf.cond(tf.random.uniform([]) < p, lambda: fn(x), lambda: x)


def reference_color_jitter(x: tf.Tensor, strength: float, brightness: str) -> tf.Tensor:
    """Brightness, contrast, saturation, hue in a random order, clipping after each (official color_jitter_rand)."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength

    def bright(y: tf.Tensor) -> tf.Tensor:
        if brightness == "v2":
            return y * tf.random.uniform([], max(0.0, 1.0 - b), 1.0 + b)
        return tf.image.random_brightness(y, max_delta=b)

    ops = [bright,
           lambda y: tf.image.random_contrast(y, 1.0 - c, 1.0 + c),
           lambda y: tf.image.random_saturation(y, 1.0 - s, 1.0 + s),
           lambda y: tf.image.random_hue(y, max_delta=h)]
    perm = tf.random.shuffle(tf.range(4))
    for i in range(4):
        x = tf.switch_case(perm[i], [lambda f=f: f(x) for f in ops])
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


def reference_blur(x: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image, one sigma: depthwise separable conv as in the official gaussian_blur."""
    radius = blur_radius(image_size)
    if radius == 0:
        return x
    sigma = tf.random.uniform([], *BLUR_SIGMA_RANGE)
    kernel = gaussian_kernels(sigma[tf.newaxis], radius)[0]
    size = 2 * radius + 1
    horizontal = tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, 3, 1])
    vertical = tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, 3, 1])
    y = tf.nn.depthwise_conv2d(x[tf.newaxis], horizontal, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(y, vertical, [1, 1, 1, 1], "SAME")[0]


def reference_view(image: tf.Tensor, image_size: int, *, color_jitter_strength: float = 1.0,
                   use_blur: bool = True, brightness: str = "v2", color: bool = True) -> tf.Tensor:
    """One training view of one uint8 image, literally as the reference: convert, crop, resize, flip,
    colour distortion, clip, blur (p 0.5), clip."""
    check_brightness_impl(brightness)
    x = to_float(image)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(x), bounding_boxes=tf.constant(_WHOLE_IMAGE_BOX, tf.float32),
        min_object_covered=CROP_MIN_OBJECT_COVERED, aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE, max_attempts=CROP_MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    x = tf.image.resize(tf.slice(x, begin, size)[tf.newaxis], [image_size, image_size],
                        method=tf.image.ResizeMethod.BICUBIC)[0]
    x = tf.image.random_flip_left_right(x)
    if color and color_jitter_strength > 0:
        x = _random_apply(lambda y: reference_color_jitter(y, color_jitter_strength, brightness), JITTER_PROB, x)
        x = _random_apply(lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3]), GRAYSCALE_PROB, x)
    x = tf.clip_by_value(tf.reshape(x, [image_size, image_size, 3]), 0.0, 1.0)
    if use_blur and blur_radius(image_size) > 0:
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
    radius = blur_radius(int(x.shape[0]))
    if p.blur and radius > 0:
        size = 2 * radius + 1
        kernel = gaussian_kernels(p.sigma[tf.newaxis], radius)[0]
        y = tf.nn.depthwise_conv2d(x[tf.newaxis], tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, 3, 1]),
                                   [1, 1, 1, 1], "SAME")
        x = tf.nn.depthwise_conv2d(y, tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, 3, 1]),
                                   [1, 1, 1, 1], "SAME")[0]
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


def optional_seed(seed: Optional[int]) -> Optional[int]:
    """Validates a user seed (None = nondeterministic)."""
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise UsageError("--seed", f"must be a non-negative integer, got {seed!r}")
    return seed
