"""The SimCLR augmentations of docs/design.md §2, split in two stages for speed.

Stage 1 runs per element inside `Dataset.map` because sources may have images of any size: the Inception
crop (the real `stateless_sample_distorted_bounding_box` op, so the box distribution is TF's own) and the
bicubic resize to `image_size` (`ops.random_crop_resize`). Stage 2 is flip, colour jitter in a per-image random
order, grayscale, clip and Gaussian blur, with per-image parameters drawn by `sample_params` and applied by
`apply_with_params`, as one XLA-compiled program: per batch after `batch()` (`make_batch_augmenter`) or, for
large views, per example at the end of the per-element map (`make_example_augmenter`; the input pipeline
picks). Per-image op chains fuse into a few cache-resident passes and only the ops an image drew are computed,
which is where the speed-up over the reference's one-image-at-a-time `map` comes from. The ops themselves are
in `ops.py`.

Randomness is stateless and keyed by explicit seeds, so the same seed gives the same batch.

Deliberate difference from the reference: the reference blurs a device batch with one sigma per view; we draw
sigma per image, as the paper describes (see docs/design.md §2.4).

`tests/reference_augment.py` keeps a literal per-image implementation (stateful `tf.random`, `tf.cond`,
`tf.image.*`) that mirrors the official code; the benchmark and the distribution tests compare against it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from simclr_tf.data import ops
from simclr_tf.errors import UsageError
from simclr_tf.sections import BRIGHTNESS_IMPLS, AugmentConfig

FLIP_PROB = 0.5
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Op ids used in ViewParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def check_brightness_impl(brightness: str) -> None:
    """Raises the `UsageError` naming `--brightness` unless `brightness` is "v1" or "v2"."""
    if brightness not in BRIGHTNESS_IMPLS:
        raise UsageError("--brightness", f"must be one of {BRIGHTNESS_IMPLS}, got {brightness!r}")


def eval_view(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Eval view of one uint8 or float image: centre crop + bicubic resize when image_size > 32, else no crop.

    At <= 32 px the reference assumes the source already is S x S; we resize (bicubic) only when it is not.

    Args:
        image: one image [H, W, 3], uint8 or float in [0, 1].
        image_size: side S of the square view.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if image_size > 32:
        offset_y, offset_x, side = ops.center_crop_window(height, width)
        view = ops.resize_bicubic(tf.image.crop_to_bounding_box(image, offset_y, offset_x, side, side),
                                  image_size)
    else:
        same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
        view = tf.cond(same, lambda: ops.to_float(image), lambda: ops.resize_bicubic(image, image_size))
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

    Args:
        n: number of views.
        seed: stateless seed, int [2].
        color_jitter_strength: s of the colour jitter.
        use_blur: draw blur (with probability BLUR_PROB); False: never.
        brightness: "v2" multiplicative or "v1" additive brightness.
        color: False: no jitter and no grayscale, whatever s (the fine-tune view).
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


def _sample(n: tf.Tensor | int, seed: tf.Tensor, augment: AugmentConfig, color: bool) -> ViewParams:
    return sample_params(n, seed, color_jitter_strength=augment.color_jitter_strength, use_blur=augment.use_blur,
                         brightness=augment.brightness, color=color)


def _jitter_one(x: tf.Tensor, p: ViewParams, brightness: str) -> tf.Tensor:
    """The four jitter ops of one image in its own order, clipping after each; only the drawn op runs.

    The clip sits inside each branch so that XLA fuses it into the op's last pass (a clip after the
    conditional would be a pass of its own)."""

    def step(i: tf.Tensor, x: tf.Tensor) -> tuple:
        return i + 1, tf.switch_case(p.order[i], [
            lambda: ops.clip(ops.adjust_brightness(x, p.brightness, brightness)),
            lambda: ops.clip(ops.adjust_contrast(x, p.contrast)),
            lambda: ops.clip(ops.adjust_saturation(x, p.saturation)),
            lambda: ops.clip(ops.adjust_hue(x, p.hue)),
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
    x = ops.clip(tf.where(p.grayscale, ops.to_grayscale(x), x))
    return ops.maybe_blur(x, p.sigma, radius, p.blur, clip_result=True)


def apply_with_params(images: tf.Tensor, params: ViewParams, *, brightness: str = "v2") -> tf.Tensor:
    """Stage 2 on a batch `[n, S, S, 3]` (output of stage 1): flip, colour jitter in each image's order with a
    clip after each op, grayscale, clip, blur, clip. Returns float32 in [0, 1].

    The batch is walked image by image inside one program (compiled by XLA in `make_batch_augmenter`): each
    image's chain of ops fuses into a few passes over a cache-resident image and only the ops it drew run.
    At 224 px this measured about 3x faster than a select-based vectorisation over the batch, which has to
    evaluate all four jitter ops at each of the four steps for every image.

    Args:
        images: float32 [n, S, S, 3].
        params: the draws of `sample_params(n, ...)`.
        brightness: the brightness the params were drawn for.
    """
    check_brightness_impl(brightness)
    images = tf.convert_to_tensor(images, tf.float32)
    return tf.ensure_shape(tf.transpose(_apply_planar(images, params, brightness), [0, 2, 3, 1]), images.shape)


def apply_pairs_with_params(images: tf.Tensor, params: ViewParams, *, brightness: str = "v2") -> tf.Tensor:
    """`apply_with_params` on `[2b, S, S, 3]` (view-1 rows, then view-2 rows) returning the pretraining layout
    `[b, S, S, 6]` (view 1 in channels 0:3, view 2 in 3:6): the same values as applying `apply_with_params`
    and concatenating the halves on the channel axis, with the channel interleave folded into the transpose
    back from planar layout instead of a separate copy with 3-float strides.

    Args:
        images: float32 [2b, S, S, 3].
        params: the draws of `sample_params(2b, ...)`.
        brightness: the brightness the params were drawn for.
    """
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
    radius = ops.blur_radius(int(x.shape[2]))

    def one(args: tuple) -> tf.Tensor:
        return _augment_one(args[0], ViewParams(*args[1:]), brightness, radius)

    return tf.map_fn(one, (x,) + tuple(params), fn_output_signature=tf.TensorSpec(x.shape[1:], tf.float32))


def flip_and_clip(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """The fine-tune view's stage 2 (crop was stage 1): flip with per-image masks, clip.

    Args:
        images: [n, S, S, 3].
        flip: bool [n], True where the image is flipped left-right.
    """
    return ops.clip(_flip(images, flip))


def _flip(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """Left-right flip of the images `[n, S, S, 3]` whose `flip` [n] is True, as a select."""
    return tf.where(tf.reshape(flip, [-1, 1, 1, 1]), tf.reverse(images, axis=[2]), images)


def _scaled(images: tf.Tensor, input_scale: float) -> tf.Tensor:
    return images * input_scale if input_scale != 1.0 else images


def _colour_or_blur(color: bool, augment: AugmentConfig) -> bool:
    """Whether stage 2 does more than flip + clip."""
    return (color and augment.color_jitter_strength > 0) or augment.use_blur


def make_batch_augmenter(augment: AugmentConfig, *, color: bool = True, jit: bool = True, pairs: bool = False,
                         input_scale: float = 1.0) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Returns `augment(images [n,S,S,3], seed int[2]) -> [n,S,S,3]`: sample_params + apply_with_params, the
    latter XLA-compiled (jit=True) for speed. With no colour and no blur (fine-tune) it is flip + clip, also
    compiled (as separate eager ops it cost a third of the whole fine-tune input pipeline at 224 px).

    `pairs=True`: the images are two views of n/2 examples (view-1 rows first) and the result is the
    pretraining layout `[n/2, S, S, 6]` (`apply_pairs_with_params`), with the same draws for the same seed.

    `images` may also be a list of tensors that together form the batch (concatenated on axis 0); inside the
    compiled program the concatenation fuses into the first pass instead of being a copy of its own.

    Args:
        augment: colour jitter strength, blur and brightness of the views (S is the images' own size, not
            `augment.image_size`).
        color: False: no jitter and no grayscale (the fine-tune view, whose settings also have use_blur off).
        jit: XLA-compile stage 2.
        pairs: return the two-view pretraining layout.
        input_scale: factor from the images' range to [0, 1] (`ops.input_scale`), folded into the first pass.
    """
    apply_fn = apply_pairs_with_params if pairs else apply_with_params
    brightness = augment.brightness
    colour_or_blur = _colour_or_blur(color, augment)

    def batch_of(parts: list) -> tf.Tensor:
        return _scaled(tf.concat(parts, axis=0), input_scale)

    def apply(parts: list, params: ViewParams) -> tf.Tensor:
        if colour_or_blur:
            return apply_fn(batch_of(parts), params, brightness=brightness)
        out = flip_and_clip(batch_of(parts), params.flip)
        return tf.concat(tf.split(out, 2, axis=0), axis=-1) if pairs else out

    compiled = tf.function(apply, jit_compile=True, autograph=False) if jit else apply

    def run(images, seed: tf.Tensor) -> tf.Tensor:
        parts = list(images) if isinstance(images, (list, tuple)) else [images]
        n = tf.add_n([tf.shape(p)[0] for p in parts])
        return compiled(parts, _sample(n, seed, augment, color))

    return run


def make_example_augmenter(augment: AugmentConfig, *, color: bool = True, input_scale: float = 1.0
                           ) -> Callable[[list, tf.Tensor], tf.Tensor]:
    """Returns `augment(views, seed int[2]) -> [S, S, 3k]`: stage 2 of one example's k views (a list of
    `[S, S, 3]` stage-1 outputs), XLA-compiled, with the views side by side on the channel axis (the
    pretraining layout for k = 2). Draws as `sample_params(k, seed)`; pixels as `apply_with_params`.

    Runs inside the per-example `Dataset.map`: with static shapes and a python loop over the k views, every
    op compiles to straight-line fused loops (the batch program's `map_fn` indexes images dynamically,
    which XLA compiles to slower loops), and the stage-1 output is consumed while still in cache.

    Args:
        augment: colour jitter strength, blur and brightness of the views (S is the views' own size).
        color: False: no jitter and no grayscale (the fine-tune view).
        input_scale: factor from the views' range to [0, 1] (`ops.input_scale`), folded into the first pass.
    """
    brightness = augment.brightness
    colour_or_blur = _colour_or_blur(color, augment)

    def apply(views: list, params: ViewParams) -> tf.Tensor:
        x = _scaled(tf.stack(views), input_scale)
        if not colour_or_blur:
            return tf.concat(tf.unstack(flip_and_clip(x, params.flip)), axis=-1)
        x = tf.transpose(_flip(x, params.flip), [0, 3, 1, 2])
        radius = ops.blur_radius(int(x.shape[2]))
        out = [_augment_one(x[i], ViewParams(*[t[i] for t in params]), brightness, radius)
               for i in range(len(views))]
        return tf.transpose(tf.concat(out, axis=0), [1, 2, 0])

    compiled = tf.function(apply, jit_compile=True, autograph=False)

    def run(views: list, seed: tf.Tensor) -> tf.Tensor:
        return compiled(list(views), _sample(len(views), seed, augment, color))

    return run
