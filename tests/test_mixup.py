"""Mixup/CutMix against timm.data.Mixup: the same draws give the same images and targets bit for bit (in
every mode), the draws follow timm's distributions, and CutMix's lam is corrected for the clipped box."""
import numpy as np
import pytest
import scipy.stats

from minimlp.data import mixup as ours
from minimlp.backend import to_numpy
from minimlp.tools.pytorch_references import torch  # noqa: F401  (and timm through the torchvision workaround)
import timm.data.mixup as timm_mixup  # noqa: E402


class ScriptedRandom:
    """Plays back given uniforms, beta values and integer fractions, through numpy's legacy API (what
    timm calls: rand, beta, randint) and the Generator API (what we call: random, beta, integers), and
    logs each call, so that the two libraries can be checked to ask for the same draws in the same order.
    An integer draw in [low, high) is low + int(fraction * (high - low))."""

    def __init__(self, uniforms, betas, integer_fractions):
        self.queues = {"uniform": list(uniforms), "beta": list(betas), "integer": list(integer_fractions)}
        self.log = []

    def take(self, kind, size, convert=float):
        values = [convert(self.queues[kind].pop(0)) for _ in range(1 if size is None else size)]
        return values[0] if size is None else np.array(values)

    def random(self, size=None):
        self.log.append(("uniform", size))
        return self.take("uniform", size)

    def rand(self, *shape):
        return self.random(shape[0] if shape else None)

    def beta(self, a, b, size=None):
        self.log.append(("beta", a, b, size))
        return self.take("beta", size)

    def integers(self, low, high, size=None):
        self.log.append(("integer", low, high, size))
        return self.take("integer", size, lambda fraction: low + int(fraction * (high - low)))

    def randint(self, low, high=None, size=None):
        return self.integers(low, high, size)


class NumpyWithScriptedRandom:
    """numpy, except that .random is a ScriptedRandom: stands in for the `np` that timm's mixup module uses."""

    def __init__(self, script):
        self.random = script

    def __getattr__(self, name):
        return getattr(np, name)


def script(seed, count=64):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=count), rng.uniform(0.02, 0.98, size=count), rng.uniform(size=count))


def run_timm(monkeypatch, settings, images, labels, draws):
    scripted = ScriptedRandom(*draws)
    monkeypatch.setattr(timm_mixup, "np", NumpyWithScriptedRandom(scripted))
    mix = timm_mixup.Mixup(**settings)
    mixed, targets = mix(torch.from_numpy(images.copy()), torch.from_numpy(labels))
    monkeypatch.setattr(timm_mixup, "np", np)
    return mixed.numpy(), targets.numpy(), scripted.log


def run_ours(xp, settings, images, labels, draws):
    scripted = ScriptedRandom(*draws)
    mix = ours.Mixup(**settings)  # the same keywords as timm's
    mixed, targets = mix(xp.array(images), xp.asarray(labels), scripted)
    return to_numpy(mixed), to_numpy(targets), scripted.log


def with_defaults(settings):
    """DeiT's settings (on 5 classes), changed by `settings`."""
    return dict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=0.1, num_classes=5), **settings)


SETTINGS = [dict(), dict(cutmix_alpha=0.0), dict(mixup_alpha=0.0), dict(prob=0.6, switch_prob=0.3),
            dict(cutmix_minmax=(0.2, 0.8)), dict(label_smoothing=0.0), dict(correct_lam=False, mixup_alpha=0.0)]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_same_draws_give_timms_images_and_targets(xp, monkeypatch, mode, settings):
    settings = with_defaults(dict(settings, mode=mode))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 3, 10, 14)).astype(np.float32)  # H != W: a swapped axis shows
    labels = rng.integers(0, 5, size=6)
    for seed in range(12):  # enough scripts to reach every branch: mixup, cutmix, and no mixing
        draws = script(seed)
        expected_images, expected_targets, timm_log = run_timm(monkeypatch, settings, images, labels, draws)
        mixed, targets, our_log = run_ours(xp, settings, images, labels, draws)
        assert our_log == timm_log  # the same draws, in the same order
        assert targets.dtype == np.float32 and targets.shape == (6, 5)
        assert np.array_equal(targets, expected_targets), (seed, targets, expected_targets)
        assert np.array_equal(mixed, expected_images), seed
        np.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-6)


def test_scripts_reach_mixup_cutmix_and_no_mixing():
    """The scripts above are not all alike: per batch, they give each of the three outcomes."""
    mix = ours.Mixup(5, prob=0.6, switch_prob=0.3)
    kinds = {int(mix.draw(6, 10, 14, ScriptedRandom(*script(seed))).kinds[0]) for seed in range(12)}
    assert kinds == {ours.KEEP, ours.MIXUP, ours.CUTMIX}


def test_cutmix_lam_is_corrected_for_the_clipped_box():
    # lam 0.5 on 10 x 14: sides int(10 * 0.7071) = 7, int(14 * 0.7071) = 9; centre (0, 0) clips to rows 0..3,
    # columns 0..4: 4 x 5 = 20 of 140 pixels replaced, so lam = 1 - 20/140, not 0.5
    corner = ScriptedRandom([], [], [0.0, 0.0])
    assert ours.cutmix_box(0.5, 10, 14, corner) == (0, 4, 0, 5)
    assert ours.box_lam((0, 4, 0, 5), 10, 14) == pytest.approx(1 - 20 / 140)
    middle = ScriptedRandom([], [], [0.5, 0.5])  # centre (5, 7): rows 2..8, columns 3..11, unclipped
    assert ours.cutmix_box(0.5, 10, 14, middle) == (2, 9, 3, 12)

    images = np.arange(4 * 3 * 10 * 14, dtype=np.float64).reshape(4, 3, 10, 14)
    mix = ours.Mixup(3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    plan = ours.MixPlan(np.full(4, ours.CUTMIX, np.int8), np.full(4, 1 - 20 / 140), np.tile([0, 4, 0, 5], (4, 1)))
    mixed, targets = mix.apply(images.copy(), np.array([0, 1, 2, 0]), plan)
    assert np.array_equal(mixed[0, :, :4, :5], images[3, :, :4, :5])
    assert np.array_equal(mixed[0, :, 4:], images[0, :, 4:]) and np.array_equal(mixed[0, :, :, 5:], images[0, :, :, 5:])
    np.testing.assert_allclose(targets[0], [1 - 20 / 140 + 20 / 140, 0, 0], rtol=1e-6)  # labels 0 and 0
    np.testing.assert_allclose(targets[1], [0, 1 - 20 / 140, 20 / 140], rtol=1e-6)  # own label 1, partner's 2


def test_mixup_by_hand_with_smoothing():
    images = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
    mix = ours.Mixup(4, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.2)
    plan = ours.MixPlan(np.full(2, ours.MIXUP, np.int8), np.full(2, 0.7), np.zeros((2, 4), np.int64))
    mixed, targets = mix.apply(images.copy(), np.array([1, 3]), plan)
    np.testing.assert_allclose(mixed[0], 0.7 * images[0] + 0.3 * images[1], rtol=1e-12)
    smoothed = np.full((2, 4), 0.05)
    smoothed[[0, 1], [1, 3]] = 0.85
    np.testing.assert_allclose(targets[0], 0.7 * smoothed[0] + 0.3 * smoothed[1], rtol=1e-6)


def test_pair_mode_with_an_odd_batch_leaves_the_middle_image():
    mix = ours.Mixup(3, mode="pair", prob=1.0)
    plan = mix.draw(5, 8, 8, np.random.default_rng(0))
    assert plan.kinds[2] == ours.KEEP and plan.lams[2] == 1
    assert np.array_equal(plan.kinds[[0, 1]], plan.kinds[[4, 3]])  # image i and B-1-i share their draw
    assert np.array_equal(plan.lams[[0, 1]], plan.lams[[4, 3]])
    images = np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)
    mixed, targets = mix.apply(images.copy(), np.arange(5) % 3, plan)
    assert np.array_equal(mixed[2], images[2])


# ---------------------------------------------------------------- distributions (real generators)

def test_lam_follows_beta_and_switch_prob():
    mix = ours.Mixup(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    rng = np.random.default_rng(3)
    draws = [mix.draw_for_batch(rng) for _ in range(8000)]
    mixup_lams = np.array([lam for lam, cutmix in draws if not cutmix])
    cutmix_lams = np.array([lam for lam, cutmix in draws if cutmix])
    assert scipy.stats.binomtest(len(cutmix_lams), len(draws), 0.5).pvalue > 1e-4
    assert scipy.stats.kstest(mixup_lams, scipy.stats.beta(0.8, 0.8).cdf).pvalue > 1e-4
    assert scipy.stats.kstest(cutmix_lams, scipy.stats.beta(1.0, 1.0).cdf).pvalue > 1e-4
    assert scipy.stats.kstest(mixup_lams, scipy.stats.beta(1.0, 1.0).cdf).pvalue < 1e-4  # it can tell

    lam, use_cutmix = mix.draw_per_element(8000, rng)
    assert lam.dtype == np.float32
    assert scipy.stats.kstest(lam[~use_cutmix], scipy.stats.beta(0.8, 0.8).cdf).pvalue > 1e-4


def test_mixup_prob_leaves_that_share_unmixed():
    mix = ours.Mixup(10, prob=0.3)
    rng = np.random.default_rng(4)
    kept = sum(mix.draw(8, 16, 16, rng).kinds[0] == ours.KEEP for _ in range(4000))
    assert scipy.stats.binomtest(kept, 4000, 0.7).pvalue > 1e-4


def test_corrected_cutmix_lam_distribution_equals_timms():
    """lam ~ Beta(1, 1), box from it, lam corrected: our corrected lams and timm's have one distribution."""
    height, width, count = 24, 32, 6000
    rng = np.random.default_rng(5)
    our_lams = [ours.box_lam(ours.cutmix_box(lam, height, width, rng), height, width) for lam in rng.beta(1, 1, count)]
    np.random.seed(5)
    timm_lams = [timm_mixup.cutmix_bbox_and_lam((3, height, width), lam)[1] for lam in np.random.beta(1, 1, count)]
    assert scipy.stats.ks_2samp(our_lams, timm_lams).pvalue > 1e-4
    assert np.mean(our_lams) > 0.5  # clipping only ever shrinks the box


# ---------------------------------------------------------------- errors for people

@pytest.mark.parametrize("settings, complaint", [
    (dict(mode="row"), r"--mixup-mode 'row'"), (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "both 0"),
    (dict(prob=1.5), r"--mixup-prob 1.5"), (dict(switch_prob=-0.1), r"--mixup-switch-prob -0.1"),
    (dict(cutmix_minmax=(0.8, 0.2)), r"--cutmix-minmax"), (dict(label_smoothing=1.0), r"--smoothing 1.0")])
def test_bad_settings_are_named(settings, complaint):
    with pytest.raises(ValueError, match=complaint):
        ours.Mixup(10, **settings)
