"""Augmentations (docs/design.md §2): parameters, distributions and pixels, on generated images.

Oracles: TF's own `sample_distorted_bounding_box` (crop distribution), the per-image `tf.image` ops of the
reference (`reference_apply_one`, stage 2 pixels), NumPy (blur, centre crop), the formulas of docs/design.md §2
(parameter ranges and rates), and the literal per-image `reference_view` (distribution of whole views); the
per-image reference is in tests/reference_augment.py.
"""
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import augment as A
from simclr_tf.data import ops
from simclr_tf.errors import UsageError
from simclr_tf.sections import AugmentConfig
from tests import reference_augment as R

N_DRAWS = 4000


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _ks_critical(n: int, m: int, coefficient: float = 1.95) -> float:
    """alpha = 0.001."""
    return coefficient * np.sqrt((n + m) / (n * m))


def _rate_tolerance(p: float, n: int) -> float:
    return 4.5 * np.sqrt(p * (1 - p) / n)


def _smooth_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(n, 4, 5, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [height, width], method="bicubic").numpy()
    noisy = smooth + rng.normal(0, 0.05, size=smooth.shape)
    return np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ crop (stage 1)

@tf.function
def _our_windows(shape: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    def one(seed):
        begin, size = ops.crop_window(shape, seed)
        return tf.concat([begin[:2], size[:2]], 0)
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)


@tf.function
def _tf_windows(shape: tf.Tensor, n: int) -> tf.Tensor:
    def one(_):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.1,
            aspect_ratio_range=(0.75, 4.0 / 3.0), area_range=(0.08, 1.0), max_attempts=100,
            use_image_if_no_bounding_boxes=True)
        return tf.concat([begin[:2], size[:2]], 0)
    # One iteration at a time: parallel iterations share the stateful sampler and interleave its draws
    # differently from run to run, which made this reference sample (and the KS test on it) vary.
    return tf.map_fn(one, tf.range(n), fn_output_signature=tf.int32, parallel_iterations=1)


def test_crop_windows_follow_sample_distorted_bounding_box():
    height, width = 60, 80
    shape = tf.constant([height, width, 3])
    seeds = tf.random.stateless_uniform([N_DRAWS, 2], seed=[7, 7], minval=0, maxval=2**30, dtype=tf.int32)
    ours = _our_windows(shape, seeds).numpy()
    tf.random.set_seed(1)
    theirs = _tf_windows(shape, N_DRAWS).numpy()

    y, x, h, w = ours.T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
    area = h * w / (height * width)
    # min_object_covered=0.1 makes 0.1 the effective minimum; 1.0 is the whole-image fallback or a full box.
    assert area.min() >= 0.1 - 1e-6 and area.max() <= 1.0
    assert area.min() < 0.12, "the small-crop end of the range is never reached"
    partial = area < 1.0
    aspect = w[partial] / h[partial]
    # width = round(height * ratio): the ratio range widens by at most half a pixel over the height.
    assert (aspect >= 0.75 - 0.5 / h[partial]).all() and (aspect <= 4 / 3 + 0.5 / h[partial]).all()
    assert aspect.min() < 0.8 and aspect.max() > 1.25

    their_area = theirs[:, 2] * theirs[:, 3] / (height * width)
    their_aspect = theirs[:, 3] / theirs[:, 2]
    crit = _ks_critical(N_DRAWS, N_DRAWS)
    assert _ks_statistic(area, their_area) < crit
    assert _ks_statistic(w / h, their_aspect) < crit
    assert _ks_statistic(y / np.maximum(height - h, 1), theirs[:, 0] / np.maximum(height - theirs[:, 2], 1)) < crit
    # The same test rejects a plausible wrong sampler: area uniform on [0.1, 1].
    uniform_area = np.random.default_rng(0).uniform(0.1, 1.0, N_DRAWS)
    assert _ks_statistic(uniform_area, their_area) > crit


def test_random_crop_resize_is_window_then_bicubic():
    image = _smooth_images(1, 50, 70)[0]
    seed = tf.constant([3, 4], tf.int64)
    view = ops.random_crop_resize(tf.constant(image), 24, seed).numpy()
    begin, size = ops.crop_window(tf.constant([50, 70, 3]), seed)
    y, x, h, w = int(begin[0]), int(begin[1]), int(size[0]), int(size[1])
    crop = image[y:y + h, x:x + w].astype(np.float32) / 255.0
    expected = tf.image.resize(crop[None], [24, 24], method="bicubic")[0].numpy()
    assert view.shape == (24, 24, 3) and view.dtype == np.float32
    np.testing.assert_allclose(view, expected, atol=1e-5)


# ----------------------------------------------------------------------------------- eval centre crop

def test_center_crop_window_formula():
    for height, width in [(50, 70), (36, 36), (37, 100), (256, 320), (9, 7)]:
        off_y, off_x, side = [int(v) for v in ops.center_crop_window(tf.constant(height), tf.constant(width))]
        expected_side = int(np.rint(0.875 * min(height, width)))  # round half to even, as tf.math.rint
        assert side == expected_side
        assert (off_y, off_x) == ((height - side + 1) // 2, (width - side + 1) // 2)


def test_eval_view_matches_hand_computed_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    # side = rint(0.875 * 50) = 44, offsets ((50-44+1)//2, (70-44+1)//2) = (3, 13). Resizing to the crop's own
    # size is the identity for bicubic with half-pixel centres, so the comparison is exact.
    view = A.eval_view(tf.constant(image), 44).numpy()
    np.testing.assert_allclose(view, image[3:47, 13:57].astype(np.float32) / 255.0, atol=1e-6)
    # Resized to another size: bicubic of the same hand-computed crop.
    view = A.eval_view(tf.constant(image), 40).numpy()
    expected = tf.image.resize(image[3:47, 13:57][None].astype(np.float32) / 255.0, [40, 40],
                               method="bicubic")[0].numpy()
    np.testing.assert_allclose(view, np.clip(expected, 0, 1), atol=1e-5)
    assert view.min() >= 0.0 and view.max() <= 1.0


def test_eval_view_no_crop_at_32_px():
    image = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(A.eval_view(tf.constant(image), 32).numpy(), image / 255.0, atol=1e-7)
    other = np.random.default_rng(3).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    view = A.eval_view(tf.constant(other), 16).numpy()
    expected = np.clip(tf.image.resize(other[None] / 255.0, [16, 16], method="bicubic")[0].numpy(), 0, 1)
    np.testing.assert_allclose(view, expected, atol=1e-5)


# ------------------------------------------------------------------------------ stage-2 parameters

def test_sample_params_rates_and_ranges():
    s = 0.5
    p = A.sample_params(N_DRAWS, tf.constant([1, 2]), color_jitter_strength=s)
    p = A.ViewParams(*[t.numpy() for t in p])
    for rate, expected in [(p.flip.mean(), 0.5), (p.jitter.mean(), 0.8), (p.grayscale.mean(), 0.2),
                           (p.blur.mean(), 0.5)]:
        assert abs(rate - expected) < _rate_tolerance(expected, N_DRAWS)
    assert (np.sort(p.order, axis=1) == np.arange(4)).all(), "orders must be permutations"
    first = p.order[p.jitter, 0]
    for op in range(4):  # every op is seen first, each about a quarter of the time
        assert abs((first == op).mean() - 0.25) < _rate_tolerance(0.25, first.size)
    n = N_DRAWS
    for values, lo, hi in [(p.brightness, 1 - 0.8 * s, 1 + 0.8 * s), (p.contrast, 1 - 0.8 * s, 1 + 0.8 * s),
                           (p.saturation, 1 - 0.8 * s, 1 + 0.8 * s), (p.hue, -0.2 * s, 0.2 * s),
                           (p.sigma, 0.1, 2.0)]:
        assert values.min() >= lo and values.max() <= hi
        assert _ks_statistic(values, np.random.default_rng(5).uniform(lo, hi, n)) < _ks_critical(n, n)
    # Independent draws: e.g. flip and grayscale uncorrelated.
    assert abs(np.corrcoef(p.flip, p.grayscale)[0, 1]) < 0.07


def test_brightness_variants_and_switches():
    v2 = A.sample_params(N_DRAWS, tf.constant([3, 4]), color_jitter_strength=1.5, brightness="v2")
    assert v2.brightness.numpy().min() >= 0.0 and v2.brightness.numpy().max() <= 2.2
    assert v2.brightness.numpy().min() < 0.05  # max(0, 1 - 1.2) = 0 is the lower end
    v1 = A.sample_params(N_DRAWS, tf.constant([3, 4]), color_jitter_strength=1.0, brightness="v1")
    b = v1.brightness.numpy()
    assert b.min() >= -0.8 and b.max() <= 0.8 and b.min() < -0.75 and b.max() > 0.75
    none = A.sample_params(100, tf.constant([3, 4]), color_jitter_strength=0.0, use_blur=False)
    assert not none.jitter.numpy().any() and not none.grayscale.numpy().any() and not none.blur.numpy().any()
    finetune = A.sample_params(100, tf.constant([3, 4]), color=False, use_blur=False)
    assert not finetune.jitter.numpy().any() and not finetune.grayscale.numpy().any()
    with pytest.raises(UsageError, match="--brightness"):
        A.sample_params(4, tf.constant([1, 1]), brightness="v3")


# ---------------------------------------------------------------------------------- stage-2 pixels

@pytest.mark.parametrize("brightness", ["v2", "v1"])
def test_apply_with_params_matches_per_image_tf_image_ops(brightness):
    n, size = 24, 40  # radius (40 // 10) // 2 = 2
    rng = np.random.default_rng(4)
    # Bicubic overshoot reaches stage 2 unclipped: include values outside [0, 1] and an all-negative image.
    images = rng.uniform(-0.05, 1.05, size=(n, size, size, 3)).astype(np.float32)
    images[-1] = -rng.uniform(0, 0.05, size=(size, size, 3))
    params = A.sample_params(n, tf.constant([5, 6]), color_jitter_strength=1.0, brightness=brightness)
    compiled = tf.function(lambda x, p: A.apply_with_params(x, p, brightness=brightness), jit_compile=True)
    out = compiled(tf.constant(images), params).numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    for i in range(n):
        expected = R.reference_apply_one(images[i], params, i, brightness=brightness).numpy()
        np.testing.assert_allclose(out[i], expected, atol=2e-5, err_msg=f"image {i}")
    # Grayscale views have R = G = B exactly (blur treats the channels identically).
    gray = params.grayscale.numpy()
    assert gray.any() and (~gray).any()
    assert (out[gray][..., 0] == out[gray][..., 1]).all() and (out[gray][..., 1] == out[gray][..., 2]).all()
    colour_jittered = params.jitter.numpy() & ~gray
    colour_jittered[-1] = False  # the all-negative image clips to black
    assert all(np.abs(out[i][..., 0] - out[i][..., 1]).max() > 0.01 for i in np.flatnonzero(colour_jittered))


def test_gaussian_blur_against_numpy():
    rng = np.random.default_rng(6)
    image = rng.uniform(0, 1, size=(3, 20, 24)).astype(np.float32)
    sigma, radius = 1.3, 3
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(image, [(0, 0), (radius, radius), (radius, radius)])
    horizontal = sum(taps[i] * padded[:, :, i:i + 24] for i in range(2 * radius + 1))
    expected = sum(taps[i] * horizontal[:, i:i + 20, :] for i in range(2 * radius + 1))
    out = R.gaussian_blur(tf.constant(image), tf.constant(sigma), radius).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert ops.blur_radius(224) == 11 and ops.blur_radius(32) == 1 and ops.blur_radius(19) == 0


def test_fast_blur_skips_only_negligible_taps():
    """The shortened blur equals the full 2r+1-tap blur (NumPy, float64) to within the tail tolerance, and
    the radius it picks is the shortest bucket whose left-out weight (float64) is within that tolerance."""
    rng = np.random.default_rng(16)
    radius = ops.blur_radius(224)  # 11, the reference's kernel at 224 px
    image = rng.uniform(0, 1, size=(3, 30, 34))
    buckets = ops.blur_radius_buckets(radius)
    assert buckets[-1] == radius and buckets == sorted(set(buckets)) and len(buckets) > 3
    picked = []
    for sigma in np.linspace(*A.BLUR_SIGMA_RANGE, 25):
        taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * np.float32(sigma) ** 2))
        taps /= taps.sum()
        padded = np.pad(image, [(0, 0), (0, 0), (radius, radius)])
        horizontal = sum(taps[i] * padded[:, :, i:i + 34] for i in range(2 * radius + 1))
        padded = np.pad(horizontal, [(0, 0), (radius, radius), (0, 0)])
        expected = sum(taps[i] * padded[:, i:i + 30, :] for i in range(2 * radius + 1))
        out = R.fast_gaussian_blur(tf.constant(image, tf.float32), tf.constant(sigma, tf.float32), radius)
        np.testing.assert_allclose(out.numpy(), expected, atol=ops.BLUR_TAIL_TOLERANCE + 3e-7, err_msg=str(sigma))
        used = int(R.blur_taps_radius(tf.constant(sigma, tf.float32), radius))
        tail = lambda r: taps[:radius - r].sum() + taps[radius + r + 1:].sum()  # noqa: E731
        fitting = [r for r in buckets if tail(r) <= ops.BLUR_TAIL_TOLERANCE * (1 + 1e-3)]
        assert used == fitting[0] or (used in fitting and tail(fitting[0]) > ops.BLUR_TAIL_TOLERANCE * 0.999)
        picked.append(used)
    # Small sigmas really use fewer taps (that is the point), the largest need them all.
    assert picked[0] == buckets[0] and picked[-1] == radius and np.mean(picked) < 0.75 * radius


def test_blur_applied_only_where_drawn():
    n, size = 64, 32
    # Constant-colour images: jitter off, so only blur (zero padding darkens the border) can change pixels.
    colours = np.random.default_rng(7).uniform(0.2, 0.9, size=(n, 1, 1, 3)).astype(np.float32)
    images = np.broadcast_to(colours, (n, size, size, 3)).copy()
    params = A.sample_params(n, tf.constant([8, 9]), color=False, use_blur=True)
    out = A.apply_with_params(tf.constant(images), params).numpy()
    changed = np.abs(out - images).reshape(n, -1).max(axis=1) > 1e-4
    blurred = params.blur.numpy()
    # sigma 0.1 leaves a 3-tap kernel ~ [0, 1, 0]: only blurred images with a visible sigma change.
    visible = blurred & (params.sigma.numpy() > 0.3)
    assert (changed <= blurred).all() and (changed >= visible).all() and visible.any()


def test_finetune_augmenter_only_flips():
    n, size = 16, 24
    images = tf.constant(np.random.default_rng(8).uniform(-0.02, 1.02, size=(n, size, size, 3)), tf.float32)
    augment = A.make_batch_augmenter(AugmentConfig(size, use_blur=False), color=False)
    seed = tf.constant([1, 2], tf.int64)
    out = augment(images, seed).numpy()
    flip = A.sample_params(n, seed, color=False, use_blur=False).flip.numpy()
    expected = np.clip(np.where(flip[:, None, None, None], images.numpy()[:, :, ::-1], images.numpy()), 0, 1)
    np.testing.assert_array_equal(out, expected)
    assert flip.any() and (~flip).any()


def test_batch_augmenter_seeded():
    images = tf.constant(_smooth_images(8, 24, 24) / 255.0, tf.float32)
    augment = A.make_batch_augmenter(AugmentConfig(24))
    a = augment(images, tf.constant([1, 2], tf.int64)).numpy()
    b = augment(images, tf.constant([1, 2], tf.int64)).numpy()
    c = augment(images, tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


@pytest.mark.parametrize("options", [dict(), dict(color=False, use_blur=False), dict(brightness="v1")])
def test_example_augmenter_equals_batch_pixels(options):
    """The per-example program (used by the pipeline for large views) gives, for the same draws, the pixels
    of `apply_with_params` on the rescaled views, side by side on the channel axis."""
    size = 40  # blur radius 2
    rng = np.random.default_rng(17)
    views = [tf.constant(rng.uniform(-5, 260, size=(size, size, 3)), tf.float32) for _ in range(2)]
    seed = tf.constant([21, 22], tf.int64)
    brightness = options.get("brightness", "v2")
    settings = AugmentConfig(size, use_blur=options.get("use_blur", True), brightness=brightness)
    color = options.get("color", True)
    augment = A.make_example_augmenter(settings, color=color, input_scale=1 / 255)
    out = augment(views, seed).numpy()
    assert out.shape == (size, size, 6) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    params = A.sample_params(2, seed, **options)
    batch = A.apply_with_params(tf.stack(views) / 255.0, params, brightness=brightness).numpy()
    np.testing.assert_allclose(out, np.concatenate([batch[0], batch[1]], axis=-1), atol=2e-5)
    single = A.make_example_augmenter(settings, color=color, input_scale=1 / 255)(views[:1], seed).numpy()
    assert single.shape == (size, size, 3)


# ------------------------------------------------------- whole views: ours vs the literal reference

def test_view_distribution_matches_per_image_reference():
    """Summary statistics of whole views (crop + colour + blur) from our two stages and from the literal
    per-image reference agree in distribution."""
    size, n = 24, 1200
    sources = tf.constant(_smooth_images(16, 40, 48, seed=9))
    idx = np.arange(n) % 16
    tf.random.set_seed(3)
    reference = tf.function(lambda im: tf.map_fn(lambda x: R.reference_view(x, AugmentConfig(size)), im,
                                                 fn_output_signature=tf.float32))
    ref = reference(tf.gather(sources, idx)).numpy()

    @tf.function
    def ours(images, seeds):
        stage1 = tf.map_fn(lambda a: ops.random_crop_resize(a[0], size, a[1]), (images, seeds),
                           fn_output_signature=tf.float32)
        return A.make_batch_augmenter(AugmentConfig(size))(stage1, tf.constant([11, 12], tf.int64))

    seeds = tf.random.stateless_uniform([n, 2], seed=[4, 4], minval=0, maxval=2**30, dtype=tf.int64)
    our = ours(tf.gather(sources, idx), seeds).numpy()
    assert our.shape == ref.shape == (n, size, size, 3)
    crit = _ks_critical(n, n)

    def stats(views):
        gray = views.std(axis=-1).mean(axis=(1, 2))          # 0 for grayscale views
        edges = np.abs(np.diff(views, axis=2)).mean(axis=(1, 2, 3))  # lowered by blur and small crops' zoom
        return {"mean": views.mean(axis=(1, 2, 3)), "spread": views.std(axis=(1, 2, 3)), "chroma": gray,
                "edges": edges, "red-blue": (views[..., 0] - views[..., 2]).mean(axis=(1, 2))}

    ours_stats, ref_stats = stats(our), stats(ref)
    for name in ours_stats:
        assert _ks_statistic(ours_stats[name], ref_stats[name]) < crit, name
    # Sanity of the test's power: a weaker colour distortion (s = 0.5 instead of 1) is detected.
    weaker = A.make_batch_augmenter(AugmentConfig(size, color_jitter_strength=0.5))
    stage1 = tf.map_fn(lambda a: ops.random_crop_resize(a[0], size, a[1]), (tf.gather(sources, idx), seeds),
                       fn_output_signature=tf.float32)
    weak_stats = stats(weaker(stage1, tf.constant([11, 12], tf.int64)).numpy())
    assert max(_ks_statistic(weak_stats[k], ref_stats[k]) for k in ref_stats) > crit


def test_paired_layout_equals_per_view_application_then_channel_concat():
    """The pretraining fast path ([b,S,S,6] written inside the program) == apply_with_params + concat."""
    import tensorflow as tf

    from simclr_tf.data import augment

    rng = np.random.RandomState(3)
    images = tf.constant(rng.rand(8, 12, 12, 3).astype(np.float32))  # 4 examples x 2 views
    seed = tf.constant([5, 9], tf.int64)
    params = augment.sample_params(8, seed, color_jitter_strength=1.0, use_blur=True)
    single = augment.apply_with_params(images, params).numpy()
    paired = augment.apply_pairs_with_params(images, params).numpy()
    assert paired.shape == (4, 12, 12, 6)
    np.testing.assert_allclose(paired, np.concatenate([single[:4], single[4:]], axis=-1), atol=1e-6)
    # The batch augmenter takes the two views as a list of tensors and gives the same pairs.
    augmenter = augment.make_batch_augmenter(AugmentConfig(12, color_jitter_strength=1.0, use_blur=True),
                                             pairs=True)
    from_list = augmenter([images[:4], images[4:]], seed).numpy()
    from_tensor = augmenter(images, seed).numpy()
    np.testing.assert_allclose(from_list, from_tensor, atol=1e-6)
    np.testing.assert_allclose(from_tensor, paired, atol=2e-5)  # XLA-compiled vs eager
