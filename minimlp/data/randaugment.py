"""RandAugment (Cubuk et al. 2019) as timm defines it, on PIL images in the loader workers.

    augment = RandAugment("rand-m9-mstd0.5-inc1", img_size=224, interpolation="bicubic")
    image = augment(image, rng)          # PIL RGB image -> PIL RGB image; rng: numpy Generator

The configuration string is timm's (`timm.data.auto_augment.rand_augment_transform`), sections joined
by '-' after 'rand', in any order:
    m<int>     magnitude, 0..10 (default 10)          n<int>     ops per image (default 2)
    mstd<f>    std of Gaussian noise on the magnitude, per op (default 0; above 100: uniform in 0..m)
    mmax<int>  upper clip of the noisy magnitude (default 10, also for mmax0 as in timm)
    p<f>       probability that each chosen op is applied (default 0.5)
    inc<0|1>   1: the op set whose severity increases with the magnitude (RAND_INCREASING_OPS)
An image gets n ops drawn uniformly with replacement from the set; each is applied with probability
p at magnitude clip(m + mstd * N(0, 1), 0, mmax), a signed op (rotate, shear, translate, the
'Increasing' enhancements) taking either sign with probability 1/2.

Every op turns its magnitude into the argument timm's does and calls the same Pillow operation, so
the pixels equal timm's for the same magnitude and sign (tests/test_randaugment.py checks each op).
Geometric ops fill the uncovered corners with the dataset mean (DeiT: `img_mean`) and resample with
the training interpolation, or, for 'random', a fresh choice of bilinear/bicubic per op (as timm).
timm's `translate_const` belongs to the absolute-pixel translations, which no RandAugment set uses.

Randomness: a plan is drawn first (`draw`: which ops, whether each applies, its arguments), then
applied (`apply`). Our generator is a numpy Generator, not Python's `random`, so the sequence differs
from timm's for the same seed while the distribution is the same (tested statistically).
"""
import math
import re

from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOMINATOR = 10  # magnitude m maps to the fraction m / 10 of each op's range

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RANDOM_INTERPOLATIONS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # 'random': one per op

CONFIG_HELP = "expected e.g. rand-m9-mstd0.5-inc1 (sections m, n, p, mstd, mmax, inc after 'rand')"


# ---------------------------------------------------------------- magnitude -> op argument
# Each takes the magnitude (0..mmax) and the sign (+1 or -1, used by the signed ops only).

def rotate_degrees(magnitude, sign):
    return sign * magnitude / LEVEL_DENOMINATOR * 30.0  # up to +-30 degrees


def shear_factor(magnitude, sign):
    return sign * magnitude / LEVEL_DENOMINATOR * 0.3  # up to +-0.3


def translate_fraction(magnitude, sign, translate_pct=0.45):
    return sign * magnitude / LEVEL_DENOMINATOR * translate_pct  # up to +-45% of the side


def enhance_factor(magnitude, sign):
    return magnitude / LEVEL_DENOMINATOR * 1.8 + 0.1  # 0.1..1.9; 1 leaves the image unchanged


def enhance_increasing_factor(magnitude, sign):
    return max(0.1, 1.0 + sign * magnitude / LEVEL_DENOMINATOR * 0.9)  # away from 1 as m grows


def posterize_bits(magnitude, sign):
    return int(magnitude / LEVEL_DENOMINATOR * 4)  # bits kept: 0..4 (fewer bits at low m)


def posterize_increasing_bits(magnitude, sign):
    return 4 - posterize_bits(magnitude, sign)  # bits kept: 4..0 (fewer bits at high m)


def solarize_threshold(magnitude, sign):
    return min(256, int(magnitude / LEVEL_DENOMINATOR * 256))


def solarize_increasing_threshold(magnitude, sign):
    return 256 - solarize_threshold(magnitude, sign)  # lower threshold, more inverted, as m grows


def solarize_add_amount(magnitude, sign):
    return min(128, int(magnitude / LEVEL_DENOMINATOR * 110))


# ---------------------------------------------------------------- the ops (PIL RGB image -> PIL RGB image)

def affine(image, matrix, resample, fill):
    """Pillow's inverse map: output (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def shear_x(image, factor, resample, fill):
    return affine(image, (1, factor, 0, 0, 1, 0), resample, fill)


def shear_y(image, factor, resample, fill):
    return affine(image, (1, 0, 0, factor, 1, 0), resample, fill)


def translate_x(image, fraction, resample, fill):
    return affine(image, (1, 0, fraction * image.width, 0, 1, 0), resample, fill)


def translate_y(image, fraction, resample, fill):
    return affine(image, (1, 0, 0, 0, 1, fraction * image.height), resample, fill)


def rotate(image, degrees, resample, fill):
    return image.rotate(degrees, resample=resample, fillcolor=fill)  # counter-clockwise, about the centre


def posterize(image, bits):
    """Keeps the top `bits` bits of every value. 0 bits gives a black image, as in TensorFlow's RandAugment
    and Pillow before 13 (Pillow 13's ImageOps.posterize refuses 0, which timm's PosterizeIncreasing at
    magnitude 10 asks for: timm then raises)."""
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1) & 255
    return image.point([value & mask for value in range(256)] * 3)  # one table per channel


def solarize(image, threshold):
    return ImageOps.solarize(image, threshold)  # inverts every value >= threshold


def solarize_add(image, amount, threshold=128):
    """Adds `amount` (clipped at 255) to every value below `threshold`."""
    table = [min(255, value + amount) if value < threshold else value for value in range(256)]
    return image.point(table * 3)  # one table per channel


def enhance(enhancer):
    return lambda image, factor: enhancer(image).enhance(factor)


# name -> (magnitude to argument, op, geometric: takes resample and fill)
OPS = {
    "AutoContrast": (None, ImageOps.autocontrast, False),
    "Equalize": (None, ImageOps.equalize, False),
    "Invert": (None, ImageOps.invert, False),
    "Rotate": (rotate_degrees, rotate, True),
    "Posterize": (posterize_bits, posterize, False),
    "PosterizeIncreasing": (posterize_increasing_bits, posterize, False),
    "Solarize": (solarize_threshold, solarize, False),
    "SolarizeIncreasing": (solarize_increasing_threshold, solarize, False),
    "SolarizeAdd": (solarize_add_amount, solarize_add, False),
    "Color": (enhance_factor, enhance(ImageEnhance.Color), False),
    "ColorIncreasing": (enhance_increasing_factor, enhance(ImageEnhance.Color), False),
    "Contrast": (enhance_factor, enhance(ImageEnhance.Contrast), False),
    "ContrastIncreasing": (enhance_increasing_factor, enhance(ImageEnhance.Contrast), False),
    "Brightness": (enhance_factor, enhance(ImageEnhance.Brightness), False),
    "BrightnessIncreasing": (enhance_increasing_factor, enhance(ImageEnhance.Brightness), False),
    "Sharpness": (enhance_factor, enhance(ImageEnhance.Sharpness), False),
    "SharpnessIncreasing": (enhance_increasing_factor, enhance(ImageEnhance.Sharpness), False),
    "ShearX": (shear_factor, shear_x, True),
    "ShearY": (shear_factor, shear_y, True),
    "TranslateXRel": (translate_fraction, translate_x, True),
    "TranslateYRel": (translate_fraction, translate_y, True),
}
SIGNED_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def op_argument(name, magnitude, sign=1, translate_pct=0.45):
    """The argument of op `name` at `magnitude` (already clipped) and `sign`; None for ops without one."""
    to_argument = OPS[name][0]
    if to_argument is None:
        return None
    if to_argument is translate_fraction:
        return translate_fraction(magnitude, sign, translate_pct)
    return to_argument(magnitude, sign)


def apply_op(image, name, argument, resample=Image.Resampling.BICUBIC, fill=(128, 128, 128)):
    """Op `name` with its argument (op_argument) on a PIL RGB image."""
    _, operation, geometric = OPS[name]
    arguments = () if argument is None else (argument,)
    if geometric:
        return operation(image, *arguments, resample=resample, fill=fill)
    return operation(image, *arguments)


# ---------------------------------------------------------------- the policy

def parse_config(config):
    """'rand-m9-mstd0.5-inc1' -> dict(magnitude, num_layers, prob, magnitude_std, magnitude_max, increasing).
    ValueError naming the string for anything timm would not accept (and for sections timm ignores)."""
    sections = config.split("-") if isinstance(config, str) else []
    if not sections or sections[0] != "rand":
        raise ValueError(f"RandAugment config {config!r} must start with 'rand'; {CONFIG_HELP}")
    settings = dict(magnitude=LEVEL_DENOMINATOR, num_layers=2, prob=0.5, magnitude_std=0.0,
                    magnitude_max=LEVEL_DENOMINATOR, increasing=False)
    for section in sections[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d.*)", section)
        if match is None:
            raise ValueError(f"RandAugment config {config!r}: unknown section {section!r}; {CONFIG_HELP}")
        key, value = match.groups()
        try:
            if key == "m":
                settings["magnitude"] = int(value)
            elif key == "n":
                settings["num_layers"] = int(value)
            elif key == "p":
                settings["prob"] = float(value)
            elif key == "mstd":
                std = float(value)
                settings["magnitude_std"] = math.inf if std > 100 else std  # timm: > 100 means uniform
            elif key == "mmax":
                settings["magnitude_max"] = int(value) or LEVEL_DENOMINATOR  # timm: mmax0 means the default
            else:
                settings["increasing"] = bool(int(value))
        except ValueError:
            raise ValueError(f"RandAugment config {config!r}: section {section!r} needs "
                             f"{'a number' if key in ('p', 'mstd') else 'an integer'} after {key!r}") from None
    if settings["num_layers"] < 1 or not 0 <= settings["prob"] <= 1:
        raise ValueError(f"RandAugment config {config!r}: n must be at least 1 and p within 0..1")
    return settings


class RandAugment:
    """n ops per image from timm's RandAugment set (see the module docstring for the config string).

    img_mean: the dataset mean as fractions (0..1), the fill of geometric ops (timm: round(255 * mean)).
    interpolation: 'bicubic', 'bilinear' or 'random' (the training interpolation, as timm passes it).
    Plain attributes only, so it pickles into the loader's worker processes.
    """

    def __init__(self, config, img_mean=(0.485, 0.456, 0.406), interpolation="bicubic", translate_pct=0.45):
        if interpolation not in (*INTERPOLATIONS, "random"):
            raise ValueError(f"interpolation {interpolation!r}: choose bicubic, bilinear or random")
        self.config = config
        settings = parse_config(config)
        self.magnitude = settings["magnitude"]
        self.magnitude_std = settings["magnitude_std"]
        self.magnitude_max = settings["magnitude_max"]
        self.num_layers = settings["num_layers"]
        self.prob = settings["prob"]
        self.op_names = RAND_INCREASING_OPS if settings["increasing"] else RAND_OPS
        self.fill = tuple(min(255, round(255 * value)) for value in img_mean)
        self.interpolation = interpolation
        self.translate_pct = translate_pct

    def draw_magnitude(self, rng):
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0, self.magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(self.magnitude, self.magnitude_std)
        else:
            magnitude = self.magnitude
        return max(0.0, min(float(magnitude), self.magnitude_max))

    def draw(self, rng):
        """The plan for one image: [(op name, argument, resample)] for the ops that apply, in order.

        Draws, per layer: the op (uniform, with replacement), whether it applies (probability p), its
        magnitude, its sign (signed ops), the resampling filter (geometric ops, 'random' only)."""
        chosen = rng.integers(0, len(self.op_names), size=self.num_layers)
        plan = []
        for index in chosen:
            name = self.op_names[index]
            if self.prob < 1 and rng.random() > self.prob:
                continue
            magnitude = self.draw_magnitude(rng)
            sign = -1 if name in SIGNED_OPS and rng.random() > 0.5 else 1
            resample = None
            if OPS[name][2]:
                resample = (RANDOM_INTERPOLATIONS[rng.integers(2)] if self.interpolation == "random"
                            else INTERPOLATIONS[self.interpolation])
            plan.append((name, op_argument(name, magnitude, sign, self.translate_pct), resample))
        return plan

    def apply(self, image, plan):
        for name, argument, resample in plan:
            image = apply_op(image, name, argument, resample, self.fill)
        return image

    def __call__(self, image, rng):
        return self.apply(image, self.draw(rng))

    def __repr__(self):
        return f"RandAugment({self.config!r}, interpolation={self.interpolation!r}, fill={self.fill})"
