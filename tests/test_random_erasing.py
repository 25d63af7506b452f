"""Random erasing against timm.data.random_erasing.RandomErasing: the same draws erase the same pixels with
the same values, and the boxes follow timm's area, aspect and probability distributions."""
import math

import numpy as np
import pytest
import scipy.stats

from minimlp.backend import to_numpy
from minimlp.data.random_erasing import RandomErasing
from minimlp.tools.pytorch_references import torch  # noqa: F401  (and timm through the torchvision workaround)
import timm.data  # noqa: E402
import timm.data.random_erasing as timm_erasing  # noqa: E402


class ScriptedRandom:
    """Plays back uniform fractions through Python's `random` API (timm: random, uniform, randint with an
    inclusive end) and the numpy Generator API (ours: random, uniform, integers with an exclusive end),
    logging each call; noise comes from one fixed array in order, for both."""

    def __init__(self, fractions, noise):
        self.fractions, self.noise, self.log = list(fractions), noise, []
        self.noise_used = 0

    def next(self):
        return float(self.fractions.pop(0))

    def random(self, size=None):
        assert size is None
        self.log.append(("random",))
        return self.next()

    def uniform(self, low, high):
        self.log.append(("uniform", low, high))
        return low + self.next() * (high - low)

    def randint(self, low, high):  # Python's: both ends included
        return self.integers(low, high + 1)

    def integers(self, low, high):
        self.log.append(("integer", low, high))
        return low + int(self.next() * (high - low))

    def take_noise(self, size):
        values = self.noise[self.noise_used:self.noise_used + size]
        self.noise_used += size
        return values

    def standard_normal(self, size, dtype):
        assert dtype == np.float32
        return self.take_noise(size)


def run_timm(monkeypatch, settings, images, script):
    monkeypatch.setattr(timm_erasing, "random", script)

    def scripted_pixels(per_pixel, rand_color, patch_size, dtype, device):
        if per_pixel:
            return torch.from_numpy(script.take_noise(math.prod(patch_size)).reshape(patch_size))
        if rand_color:
            return torch.from_numpy(script.take_noise(patch_size[0]).reshape(patch_size[0], 1, 1))
        return torch.zeros((patch_size[0], 1, 1), dtype=dtype)

    monkeypatch.setattr(timm_erasing, "_get_pixels", scripted_pixels)
    erasing = timm_erasing.RandomErasing(device="cpu", **settings)
    return erasing(torch.from_numpy(images.copy())).numpy()


SETTINGS = [dict(probability=0.25, mode="pixel", max_count=1), dict(probability=0.7, mode="rand", max_count=3),
            dict(probability=0.9, mode="const", max_count=2, min_area=0.1, max_area=0.6, min_aspect=0.5)]


@pytest.mark.parametrize("settings", SETTINGS, ids=[s["mode"] for s in SETTINGS])
def test_same_draws_erase_timms_pixels(xp, monkeypatch, settings):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 3, 12, 20)).astype(np.float32)  # normalized-like; H != W
    noise = rng.normal(size=100_000).astype(np.float32)
    erased_somewhere = False
    for seed in range(6):
        fractions = np.random.default_rng(seed).uniform(size=400)
        theirs_script, our_script = ScriptedRandom(fractions, noise), ScriptedRandom(fractions, noise)
        expected = run_timm(monkeypatch, settings, images, theirs_script)
        ours = to_numpy(RandomErasing(**settings)(xp.array(images), [our_script] * len(images)))
        assert our_script.log == theirs_script.log and our_script.noise_used == theirs_script.noise_used
        assert np.array_equal(ours, expected), seed
        erased_somewhere |= not np.array_equal(ours, images)
    assert erased_somewhere


def test_box_and_fill_by_hand():
    images = np.ones((1, 3, 10, 10))
    # erase: 0.1 <= p; area U -> 0.02 + 0.5 * (1/3 - 0.02) of 100 px; aspect exp(0) = 1; top 2, left 6
    script = ScriptedRandom([0.1, 0.5, 0.5, 0.25, 0.75], np.zeros(0, np.float32))
    erased = RandomErasing(probability=0.25, mode="const")(images, [script])
    side = round(math.sqrt((0.02 + 0.5 * (1 / 3 - 0.02)) * 100))  # 4
    top, left = int(0.25 * (10 - side + 1)), int(0.75 * (10 - side + 1))
    expected = np.ones((1, 3, 10, 10))
    expected[0, :, top:top + side, left:left + side] = 0
    assert np.array_equal(erased, expected) and (top, left, side) == (1, 5, 4)


# ---------------------------------------------------------------- distributions (real generators)

def timm_boxes(settings, images, height, width):
    """Boxes timm erases on a batch of ones ('const' mode fills 0): (height, width) per erased image."""
    import random
    random.seed(0)
    ones = torch.ones((images, 3, height, width))
    erased = timm_erasing.RandomErasing(device="cpu", mode="const", **settings)(ones).numpy()[:, 0] == 0
    boxes = []
    for mask in erased:
        if mask.any():
            rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            boxes.append((rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1))
    return boxes


def test_box_distribution_equals_timms():
    settings, count, height, width = dict(probability=0.25), 8000, 40, 56
    ours = RandomErasing(mode="const", **settings)
    rng = np.random.default_rng(1)
    our_boxes = [(box_h, box_w) for _ in range(count) for _, _, box_h, box_w in ours.draw_boxes(height, width, rng)]
    their_boxes = timm_boxes(settings, count, height, width)
    assert scipy.stats.binomtest(len(our_boxes), count, 0.25).pvalue > 1e-4
    assert scipy.stats.binomtest(len(their_boxes), count, 0.25).pvalue > 1e-4
    areas = [[box_h * box_w / (height * width) for box_h, box_w in boxes] for boxes in (our_boxes, their_boxes)]
    aspects = [[math.log(box_h / box_w) for box_h, box_w in boxes] for boxes in (our_boxes, their_boxes)]
    assert scipy.stats.ks_2samp(*areas).pvalue > 1e-4
    assert scipy.stats.ks_2samp(*aspects).pvalue > 1e-4
    # log aspect is uniform on log 0.3 .. log(1/0.3), symmetric: as many tall boxes as wide ones
    assert abs(np.mean(aspects[0])) < 0.05 and np.ptp(aspects[0]) > 2 * math.log(1 / 0.3) * 0.9
    wrong = [math.log(box_h / box_w) for _ in range(count)
             for _, _, box_h, box_w in RandomErasing(mode="const", min_aspect=0.5, **settings).draw_boxes(
                 height, width, rng)]
    assert scipy.stats.ks_2samp(wrong, aspects[1]).pvalue < 1e-4  # the test can tell another aspect range


def test_recount_scales_each_box_area():
    erasing = RandomErasing(probability=1.0, mode="const", max_count=3)
    rng = np.random.default_rng(2)
    counts = [len(erasing.draw_boxes(64, 64, rng)) for _ in range(3000)]
    assert set(counts) == {1, 2, 3}
    assert scipy.stats.chisquare(np.bincount(counts)[1:]).pvalue > 1e-4  # uniform over 1..3


def test_the_flags_build_what_timms_create_transform_builds():
    # DeiT passes --reprob/--remode/--recount to timm's create_transform: --recount is the most boxes, not the fewest
    transform = timm.data.create_transform(32, is_training=True, re_prob=0.25, re_mode="pixel", re_count=3)
    theirs = next(t for t in transform.transforms if isinstance(t, timm_erasing.RandomErasing))
    ours = RandomErasing.from_flags(0.25, "pixel", 3)
    assert (ours.probability, ours.min_count, ours.max_count, ours.min_area, ours.max_area, ours.log_aspect) == (
        theirs.probability, theirs.min_count, theirs.max_count, theirs.min_area, theirs.max_area,
        theirs.log_aspect_ratio)
    assert theirs.mode == ours.mode == "pixel" and (ours.min_count, ours.max_count) == (1, 3)


def generators(seed, count):
    return [np.random.default_rng([seed, index]) for index in range(count)]


def test_pixel_noise_is_standard_normal_and_rand_is_per_channel(xp):
    images = xp.zeros((64, 3, 32, 32), dtype=np.float32)
    RandomErasing(probability=1.0, mode="pixel")(images, generators(3, len(images)))
    values = to_numpy(images)[to_numpy(images) != 0]
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
    images = xp.zeros((16, 3, 32, 32), dtype=np.float32)
    RandomErasing(probability=1.0, mode="rand")(images, generators(3, len(images)))
    for image in to_numpy(images):
        for channel in image:
            assert len(np.unique(channel)) == 2  # 0 outside, one value inside


def test_same_generator_same_erasing_on_every_device(xp):
    images = np.random.default_rng(4).normal(size=(16, 3, 24, 24)).astype(np.float32)
    first = to_numpy(RandomErasing(probability=0.5)(xp.array(images), generators(9, 16)))
    on_numpy = RandomErasing(probability=0.5)(images.copy(), generators(9, 16))
    assert np.array_equal(first, on_numpy) and not np.array_equal(first, images)


def test_each_image_is_erased_by_its_own_generator_whatever_batch_it_is_in():
    # what makes K ranks erase like one process: an image's boxes and noise depend on its generator alone
    images = np.random.default_rng(5).normal(size=(6, 3, 16, 16)).astype(np.float32)
    erasing = RandomErasing(probability=0.7, mode="pixel", max_count=2)
    together = erasing(images.copy(), generators(1, 6))
    odd_and_even = [erasing(images[part].copy(), generators(1, 6)[part]) for part in (slice(0, None, 2),
                                                                                       slice(1, None, 2))]
    assert np.array_equal(together[0::2], odd_and_even[0]) and np.array_equal(together[1::2], odd_and_even[1])
    assert not np.array_equal(together, images)
    with pytest.raises(ValueError, match="one per image"):
        erasing(images, generators(1, 5))


@pytest.mark.parametrize("settings, complaint", [
    (dict(probability=1.5), r"--reprob 1.5"), (dict(mode="noise"), r"--remode 'noise'"),
    (dict(min_count=2, max_count=1), r"--recount 1"), (dict(min_area=0.5, max_area=0.2), "area")])
def test_bad_settings_are_named(settings, complaint):
    with pytest.raises(ValueError, match=complaint):
        RandomErasing(**settings)
