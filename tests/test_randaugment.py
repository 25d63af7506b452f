"""RandAugment against timm.data.auto_augment: every op pixel for pixel, the config grammar, and the
distribution of the ops, magnitudes, signs and filters that the policy draws."""
import random

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from minimlp.data.randaugment import (OPS, RAND_INCREASING_OPS, RAND_OPS, RandAugment, apply_op, op_argument,
                                 parse_config)
from minimlp.tools.pytorch_references import timm  # noqa: F401  (imports timm.data through the torchvision workaround)
from timm.data import auto_augment as timm_aa  # noqa: E402

IMG_MEAN = (0.485, 0.456, 0.406)
FILL = (124, 116, 104)  # timm: tuple(min(255, round(255 * x)) for x in mean)
GEOMETRIC = {name for name, (_, _, geometric) in OPS.items() if geometric}


def make_test_image(size=(48, 36), seed=0):
    """Values spread over 10..240 (so AutoContrast and the high Solarize thresholds both change it), a
    ramp, waves and pixel noise (so a one-pixel shift or a wrong filter shows)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    channels = [x, 0.5 + 0.5 * np.sin(6 * x + 9 * y), (x + y) / 2]
    image = np.stack(channels, axis=-1) * 230 + 10 + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.round(image), 10, 240).astype(np.uint8))


def timm_hparams(interpolation=Image.Resampling.BICUBIC, img_size=224):
    """What timm's create_transform (and so DeiT) hands to rand_augment_transform."""
    return dict(translate_const=int(img_size * 0.45), img_mean=FILL, interpolation=interpolation)


def python_random_sign(seed):
    """The sign timm's _randomly_negate draws first after random.seed(seed)."""
    return -1 if random.Random(seed).random() > 0.5 else 1


# ---------------------------------------------------------------- every op, pixel for pixel

@pytest.mark.parametrize("name", sorted(set(RAND_OPS) | set(RAND_INCREASING_OPS)))
def test_each_op_gives_timms_pixels(name):
    image = make_test_image()
    resamples = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR] if name in GEOMETRIC else [None]
    compared = 0
    for magnitude in (0, 2.5, 5, 9, 10):
        for seed in (0, 1, 2, 3):  # both signs: python_random_sign is -1 for some, +1 for others
            for resample in resamples:
                hparams = timm_hparams(resample or Image.Resampling.BICUBIC)
                random.seed(seed)
                argument = op_argument(name, magnitude, python_random_sign(seed))
                if name.startswith("Posterize") and argument == 0:  # timm raises on Pillow >= 13: see below
                    continue
                expected = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image)
                ours = apply_op(image, name, argument, resample, FILL)
                assert ours.mode == "RGB" and ours.size == image.size
                assert np.array_equal(np.asarray(ours), np.asarray(expected)), (name, magnitude, seed, resample)
                compared += 1
    assert {python_random_sign(seed) for seed in range(4)} == {-1, 1}
    assert compared >= 16
    assert not np.array_equal(np.asarray(apply_op(image, name, op_argument(name, 9), Image.Resampling.BICUBIC,
                                                  FILL)), np.asarray(image))  # the op does something at m9


def test_posterize_to_zero_bits_is_black():
    """timm's PosterizeIncreasing at magnitude 10 (reached by m9-mstd0.5 about 2% of the time) keeps 0 bits.
    Pillow 13 refuses that, so timm raises; TensorFlow's RandAugment and older Pillow give a black image."""
    image = make_test_image()
    assert op_argument("PosterizeIncreasing", 10) == 0 and op_argument("Posterize", 0) == 0
    assert np.asarray(apply_op(image, "PosterizeIncreasing", 0)).max() == 0
    one_bit = np.asarray(apply_op(image, "PosterizeIncreasing", 1))
    assert set(np.unique(one_bit)) == {0, 128} and np.array_equal(one_bit, np.asarray(image) & 128)


def test_geometric_ops_fill_with_the_mean():
    image = make_test_image()
    rotated = np.asarray(apply_op(image, "Rotate", op_argument("Rotate", 10), Image.Resampling.BICUBIC, FILL))
    assert tuple(rotated[0, 0]) == FILL and tuple(rotated[-1, -1]) == FILL
    shifted = np.asarray(apply_op(image, "TranslateXRel", op_argument("TranslateXRel", 10, sign=-1),
                                  Image.Resampling.BILINEAR, FILL))
    # -45% of 48 px: output x samples input x - 21.6, so the left 21 columns are fill, the rest the input
    assert (shifted[:, :21] == FILL).all() and not (shifted[:, 23:] == FILL).all(axis=-1).any()


# ---------------------------------------------------------------- the configuration string

@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-n3-m5", "rand-m7-p0.8-mmax12-inc0",
                                    "rand-mstd101-m6", "rand", "rand-inc1-n1-p1.0-mstd0"])
def test_config_is_read_as_timm_reads_it(config):
    theirs = timm_aa.rand_augment_transform(config, timm_hparams())
    ours = RandAugment(config, IMG_MEAN)
    assert ours.num_layers == theirs.num_layers
    assert list(ours.op_names) == [op.name for op in theirs.ops]
    for op in theirs.ops:
        assert ours.magnitude == op.magnitude and ours.prob == op.prob
        assert ours.magnitude_std == op.magnitude_std
        assert ours.magnitude_max == (op.magnitude_max or 10)
    assert ours.fill == FILL


def test_deit_config_settings():
    assert parse_config("rand-m9-mstd0.5-inc1") == dict(magnitude=9, num_layers=2, prob=0.5, magnitude_std=0.5,
                                                       magnitude_max=10, increasing=True)
    assert parse_config("rand-mstd200")["magnitude_std"] == np.inf  # timm: uniform magnitude


@pytest.mark.parametrize("config, complaint", [
    ("augmix-m5", "must start with 'rand'"), ("rand-m9x", "needs an integer after 'm'"),
    ("rand-q3", "unknown section 'q3'"), ("rand-m", "unknown section 'm'"),
    ("rand-pfoo", "unknown section 'pfoo'"), ("rand-p1.5", "p within 0..1"), ("rand-n0", "n must be at least 1"),
    ("rand-tweights", "unknown section 'tweights'")])
def test_bad_config_is_a_value_error_naming_it(config, complaint):
    with pytest.raises(ValueError, match=rf"RandAugment config '{config}'.*{complaint}"):
        RandAugment(config)


def test_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation 'nearest'"):
        RandAugment("rand-m9", interpolation="nearest")


# ---------------------------------------------------------------- the policy's distribution

class Recorder:
    """What a policy did to many images: how many layers it drew, and (name, argument, resample) of each
    op it applied."""

    def __init__(self):
        self.layers, self.applied = 0, []

    def arguments(self, name):
        return np.array([argument for op, argument, _ in self.applied if op == name], dtype=np.float64)


def draw_timm(config, interpolation, images, seed=0):
    """timm's policy on `images` images, each of its ops wrapped: choosing one counts a layer; applying it
    records the argument and the filter timm's op function would use, and leaves the image as it is
    (only the draws matter here)."""
    random.seed(seed)
    np.random.seed(seed)
    recorder = Recorder()
    hparams = timm_hparams(interpolation) if interpolation is not None else dict(translate_const=100, img_mean=FILL)
    policy = timm_aa.rand_augment_transform(config, hparams)

    class RecordingOp:
        def __init__(self, op):
            self.op = op
            op.aug_fn = self.record_application

        def record_application(self, image, *arguments, **kwargs):
            resample = timm_aa._interpolation(dict(kwargs)) if self.op.name in GEOMETRIC else None
            recorder.applied.append((self.op.name, arguments[0] if arguments else None, resample))
            return image

        def __call__(self, image):
            recorder.layers += 1
            return self.op(image)

    policy.ops = [RecordingOp(op) for op in policy.ops]
    image = Image.new("RGB", (4, 4))
    for _ in range(images):
        policy(image)
    return recorder


def draw_ours(config, interpolation, images, seed=0):
    rng = np.random.default_rng(seed)
    recorder = Recorder()
    policy = RandAugment(config, IMG_MEAN, interpolation)
    for _ in range(images):
        recorder.applied += policy.draw(rng)
        recorder.layers += policy.num_layers
    return recorder


def distribution_p_values(ours, theirs, op_names):
    """p-values of tests that both recorders sample the same distribution: which ops are applied how often
    (chi-square on the counts, with 'layer left out' as one more category) and, per op with an argument,
    the distribution of its argument (two-sample Kolmogorov-Smirnov)."""
    counts = [[sum(op == name for op, _, _ in recorder.applied) for name in op_names]
              + [recorder.layers - len(recorder.applied)] for recorder in (ours, theirs)]
    p_values = {"op counts": scipy.stats.chi2_contingency(counts).pvalue}
    for name in op_names:
        if OPS[name][0] is not None:
            p_values[name] = scipy.stats.ks_2samp(ours.arguments(name), theirs.arguments(name)).pvalue
    return p_values


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101-p0.7"])
def test_policy_draws_timms_distribution(config):
    images = 4000
    theirs = draw_timm(config, Image.Resampling.BICUBIC, images)
    ours = draw_ours(config, "bicubic", images)
    op_names = RandAugment(config).op_names
    assert theirs.layers == ours.layers == images * RandAugment(config).num_layers
    # Each test at p > 1e-4: with ~16 tests, a false failure has odds under 0.2% for a fixed seed.
    p_values = distribution_p_values(ours, theirs, op_names)
    assert min(p_values.values()) > 1e-4, p_values
    assert {resample for _, _, resample in ours.applied if resample is not None} == {Image.Resampling.BICUBIC}

    # The same statistics do notice a policy one magnitude step away: the test can fail.
    other = draw_ours(config.replace("m9", "m8").replace("m7", "m6"), "bicubic", images)
    assert min(distribution_p_values(other, theirs, op_names).values()) < 1e-6


def test_random_interpolation_draws_bilinear_and_bicubic_evenly():
    theirs = draw_timm("rand-m9-mstd0.5-inc1", None, 3000)  # no interpolation hparam: timm's random choice
    ours = draw_ours("rand-m9-mstd0.5-inc1", "random", 3000)
    for recorder in (ours, theirs):
        filters = [resample for name, _, resample in recorder.applied if name in GEOMETRIC]
        assert set(filters) == {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}
        bicubic = sum(resample == Image.Resampling.BICUBIC for resample in filters)
        assert scipy.stats.binomtest(bicubic, len(filters), 0.5).pvalue > 1e-4


def test_plan_is_a_function_of_the_generator():
    policy = RandAugment("rand-m9-mstd0.5-inc1")
    image = make_test_image()
    first = policy(image, np.random.default_rng(5))
    assert np.array_equal(np.asarray(first), np.asarray(policy(image, np.random.default_rng(5))))
    plans = {str(policy.draw(np.random.default_rng(seed))) for seed in range(20)}
    assert len(plans) > 15
    plan = policy.draw(np.random.default_rng(5))
    by_hand = image
    for name, argument, resample in plan:
        by_hand = apply_op(by_hand, name, argument, resample, FILL)
    assert np.array_equal(np.asarray(first), np.asarray(by_hand))
