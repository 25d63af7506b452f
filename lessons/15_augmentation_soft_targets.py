# %% [markdown]
# # Lesson 15: augmentation, and labels that are probabilities
#
# ResMLP has no convolutions to build in that a shifted cat is still a cat: it learns that from the
# data. DeiT's recipe, which ResMLP trains with, therefore augments hard, in five ways:
#
#     RandAugment        2 random photometric/geometric ops per image, magnitude ~9 of 10  (loader)
#     Mixup, CutMix      blend two images, and blend their labels the same way            (on the batch)
#     random erasing     a box of noise on a quarter of the images                         (on the batch)
#     repeated aug.      each image 3 times per epoch, each time augmented differently     (the sampler)
#
# Mixup and CutMix turn a label into a probability vector (a soft target), and this lesson shows why
# the loss needs no change for that: the cross-entropy's gradient stays p - q. Pictures:
# lessons/out/15_randaugment.png (one image through every op), 15_mix_and_erase.png.
#
# Run: python lessons/15_augmentation_soft_targets.py        (a few seconds)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import math

import numpy as np
from PIL import Image

from minimlp import layers
from minimlp.data import mixup, randaugment, random_erasing
from minimlp.data.sampler import RepeatedAugmentationSampler
from minimlp.data.synthetic import SHAPES_CLASSES, draw_image
from minimlp.data.device_feed import IMAGENET_MEAN, normalize

import matplotlib.pyplot as plt  # noqa: E402  (after _lesson, which chose the file-writing backend)

rng = np.random.default_rng(0)
picture = draw_image("ring", np.random.default_rng([15, 0]))  # uint8 (32, 32, 3), one shapes10 image
image = Image.fromarray(picture)
FILL = tuple(round(255 * value) for value in IMAGENET_MEAN)  # what geometric ops put in uncovered corners


# %% [markdown]
# ## 1. RandAugment: 15 ops, one magnitude
#
# DeiT uses "rand-m9-mstd0.5-inc1": for every image, 2 ops drawn from the 15 below, each applied
# with probability 1/2 at magnitude m ~ N(9, 0.5) clipped to 0..10. The magnitude is turned into
# each op's own argument by a small function per op:

# %%
heading("1. RandAugment: 15 ops, one magnitude")
show_source(randaugment.rotate_degrees)
show_source(randaugment.enhance_increasing_factor)
show_source(randaugment.op_argument)
magnitudes = (0, 2, 4, 6, 8, 10)
print(f"{'op':22s}" + "".join(f"m={m:<7d}" for m in magnitudes))
for name in randaugment.RAND_INCREASING_OPS:
    arguments = [randaugment.op_argument(name, m, sign=1) for m in magnitudes]
    print(f"{name:22s}" + "".join(f"{'-' if a is None else round(a, 3)!s:9s}" for a in arguments))
# "inc1" picks the set whose every op gets STRONGER as m grows. In the original set (inc0) the
# enhancements take the factor m/10 * 1.8 + 0.1: strongest at m = 0 (0.1, nearly grey) and m = 10
# (1.9), and no change at all near m = 5, so "magnitude" did not mean "severity".
IDENTITY = {"Rotate": 0.0, "ShearX": 0.0, "ShearY": 0.0, "TranslateXRel": 0.0, "TranslateYRel": 0.0,
            "PosterizeIncreasing": 8, "SolarizeIncreasing": 256, "SolarizeAdd": 0, "ColorIncreasing": 1.0,
            "ContrastIncreasing": 1.0, "BrightnessIncreasing": 1.0, "SharpnessIncreasing": 1.0}  # the arguments that change nothing
distances = {name: [abs(randaugment.op_argument(name, m, sign) - identity) for m in range(11)]
             for name, identity in IDENTITY.items() for sign in (1, -1)}
check(all(np.all(np.diff(distance) >= 0) for distance in distances.values()),
      "in the 'inc1' set every op's argument moves away from 'no change' as the magnitude grows, for either sign")
original = [randaugment.op_argument("Color", m) for m in range(11)]
check(original[0] < 1 < original[10] and abs(original[5] - 1) < 0.1,
      "in the original set, Color is strong at m = 0 and m = 10 and does nothing at m = 5")
unchanged_at_zero = [name for name in randaugment.RAND_INCREASING_OPS
                     if (np.asarray(randaugment.apply_op(image, name, randaugment.op_argument(name, 0), fill=FILL)) == picture).all()]
print(f"ops that leave the image unchanged at m = 0: {', '.join(unchanged_at_zero)}")
check(set(unchanged_at_zero) == set(IDENTITY) - {"PosterizeIncreasing"},
      "at m = 0 every op with an argument is the identity, except Posterize (timm keeps 4 bits at m = 0)")

# The ops themselves are Pillow's, derived here from scratch on the pixels:
pixels = picture.astype(np.int64)
solarized = np.asarray(randaugment.apply_op(image, "SolarizeIncreasing", 128))
check((solarized == np.where(pixels >= 128, 255 - pixels, pixels)).all(), "Solarize(t) inverts every value >= t")
posterized = np.asarray(randaugment.apply_op(image, "PosterizeIncreasing", 2))
check((posterized == pixels & 0b11000000).all(), "Posterize(2) keeps the top 2 bits of each value")
added = np.asarray(randaugment.apply_op(image, "SolarizeAdd", 50))
check((added == np.where(pixels < 128, np.minimum(pixels + 50, 255), pixels)).all(), "SolarizeAdd(a) adds a below 128")
check((np.asarray(randaugment.apply_op(image, "Invert", None)) == 255 - pixels).all(), "Invert is 255 - x")
# Geometric ops are inverse maps: output pixel (x, y) reads input (x + 0.25 W, y), so a positive
# translation moves the content LEFT by 8 of 32 pixels and fills the uncovered right edge.
shifted = np.asarray(randaugment.translate_x(image, 0.25, Image.Resampling.BICUBIC, FILL))
check((shifted[:, :24] == picture[:, 8:]).all() and (shifted[:, 24:] == FILL).all(),
      "TranslateXRel(0.25) on 32 px: the content moves 8 px left, the right edge is the mean colour")

# How often and how strong: the magnitude of each applied op is N(9, 0.5) clipped to 0..10.
augment = randaugment.RandAugment("rand-m9-mstd0.5-inc1")
drawn = np.array([augment.draw_magnitude(rng) for _ in range(20_000)])
z = (10 - 9) / 0.5  # the clip at 10 cuts the normal 2 standard deviations above its mean
expected = 9 - 0.5 * (math.exp(-z * z / 2) / math.sqrt(2 * math.pi) - z * 0.5 * math.erfc(z / math.sqrt(2)))
print(f"mean magnitude of 20,000 draws {drawn.mean():.4f}; a normal clipped at 10 has mean {expected:.4f}")
check(abs(drawn.mean() - expected) < 4 * 0.5 / math.sqrt(len(drawn)) and drawn.max() == 10,
      "the drawn magnitudes follow N(9, 0.5) clipped at 10")
plans = [augment.draw(np.random.default_rng([15, 1, index])) for index in range(2000)]
check(abs(np.mean([len(plan) for plan in plans]) - 1.0) < 0.06, "on average 1 of the 2 chosen ops applies (p = 0.5 each)")
for index in range(3):
    print(f"  the plan for image {index}: {[(name, round(argument, 2) if argument else argument) for name, argument, _ in plans[index]]}")

figure, axes = plt.subplots(len(magnitudes), len(randaugment.RAND_INCREASING_OPS) + 1, figsize=(17, 7.5))
for row, magnitude in enumerate(magnitudes):
    axes[row, 0].imshow(picture, interpolation="nearest")
    axes[row, 0].set_ylabel(f"m = {magnitude}", fontsize=9)
    for column, name in enumerate(randaugment.RAND_INCREASING_OPS, start=1):
        argument = randaugment.op_argument(name, magnitude, sign=1)
        axes[row, column].imshow(np.asarray(randaugment.apply_op(image, name, argument, fill=FILL)), interpolation="nearest")
        axes[row, column].set_xlabel("" if argument is None else f"{argument:.3g}", fontsize=7, labelpad=1)
        if row == 0:
            axes[row, column].set_title(name.replace("Increasing", "\nIncreasing").replace("Rel", "\nRel"), fontsize=7)
axes[0, 0].set_title("original", fontsize=8)
for axis in axes.flat:
    axis.set_xticks([])
    axis.set_yticks([])
figure.suptitle("RandAugment's 15 ops ('inc1' set) at magnitudes 0..10, positive sign; below each: the op's argument")
show_figure(figure, "15_randaugment.png")


# %% [markdown]
# ## 2. Mixup and CutMix: convex combinations of images and of labels

# %%
heading("2. Mixup and CutMix: convex combinations of images and of labels")
show_source(mixup.Mixup.apply, max_lines=20)
# Image i is paired with image B-1-i (the batch reversed) and keeps a fraction lam of itself:
#   Mixup:   x_i <- lam x_i + (1 - lam) x_{B-1-i}
#   CutMix:  a box of x_i is replaced by x_{B-1-i}'s; lam = the fraction of the image outside the box
#   labels:  q_i = lam q(label_i) + (1 - lam) q(label_{B-1-i})     q: smoothed one-hot (s = 0.1)
# Both are convex combinations, so the targets stay probability vectors: >= 0, summing to 1.
classes = len(SHAPES_CLASSES)
labels = np.array([1, 6, 0, 9])  # circle, ring, checkerboard, vertical_stripes
raw = np.stack([draw_image(SHAPES_CLASSES[label], np.random.default_rng([15, 2, index]))
                for index, label in enumerate(labels)]).transpose(0, 3, 1, 2)
batch = normalize(raw)  # (4, 3, 32, 32) float32, as the trainer mixes it (after normalization, on the device)
mixer = mixup.Mixup(num_classes=classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
smooth = mixup.smoothed_one_hot(labels, classes, 0.1, np)
lam = 0.7
mixup_plan = mixup.MixPlan(np.full(4, mixup.MIXUP, np.int8), np.full(4, lam), np.zeros((4, 4), np.int64))
mixed, mixed_targets = mixer.apply(batch.copy(), labels, mixup_plan)
check(np.allclose(mixed, lam * batch + (1 - lam) * batch[::-1], atol=1e-6), "Mixup: x_i = 0.7 x_i + 0.3 x_{B-1-i}")
check(np.allclose(mixed_targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-7)
      and np.allclose(mixed_targets.sum(axis=1), 1) and (mixed_targets >= 0).all(),
      "Mixup: q_i = 0.7 q_i + 0.3 q_{B-1-i}, still >= 0 and summing to 1")
box, box_lam = mixer.draw_box(0.6, 32, 32, np.random.default_rng(5))  # the box for lam ~ 0.6, corrected for the border
cutmix_plan = mixup.MixPlan(np.full(4, mixup.CUTMIX, np.int8), np.full(4, box_lam), np.tile(box, (4, 1)))
cut, cut_targets = mixer.apply(batch.copy(), labels, cutmix_plan)
own = (cut == batch).all(axis=1)             # (B, H, W): pixels that are still the image's own
from_partner = (cut == batch[::-1]).all(axis=1) & ~own
print(f"CutMix box (top, bottom, left, right) = {box}: lam = {box_lam:.4f}, own pixels {own.mean(axis=(1, 2))}")
check(np.allclose(own.mean(axis=(1, 2)), box_lam) and (own | from_partner).all(),
      "CutMix: every pixel comes from one image or its partner, and lam is exactly the fraction that stays its own")
check(np.allclose(cut_targets, box_lam * smooth + (1 - box_lam) * smooth[::-1], atol=1e-7),
      "CutMix: the label weights are the pixel fractions")
# Drawn, not chosen: per batch, with probability 1/2 each, Mixup with lam ~ Beta(0.8, 0.8) or CutMix
# with lam ~ Beta(1, 1) (then corrected for the clipped box).
draws = [mixer.draw(4, 32, 32, np.random.default_rng([15, 3, index])) for index in range(4000)]
kinds = np.array([plan.kinds[0] for plan in draws])
check(abs((kinds == mixup.CUTMIX).mean() - 0.5) < 0.03, "about half of the batches get CutMix, the rest Mixup")
mixup_lams = np.array([plan.lams[0] for plan in draws if plan.kinds[0] == mixup.MIXUP])
check(abs(mixup_lams.mean() - 0.5) < 0.03 and abs(mixup_lams.var() - 0.25 / 2.6) < 0.01,
      "Mixup's lam has Beta(0.8, 0.8)'s mean 1/2 and variance 1/(4 (2 alpha + 1)) = 0.096")


# %% [markdown]
# ## 3. Soft targets: the same p - q gradient

# %%
heading("3. Soft targets: the same p - q gradient")
show_source(layers.softmax_cross_entropy)
# L = -sum_c q_c log p_c,   log p_c = z_c - log sum_k exp z_k
#   dL/dz_j = -q_j + p_j * sum_c q_c  =  p_j - q_j        WHEN sum_c q_c = 1
# Nothing else about q is used: one-hot, smoothed or mixed, the gradient is (p - q) / B. And since L
# is linear in q, the loss of a mixed target is the mix of the two losses:
#   L(z, lam q_a + (1 - lam) q_b) = lam L(z, q_a) + (1 - lam) L(z, q_b)
logits = 2 * rng.normal(size=(4, classes))
loss, dlogits = layers.softmax_cross_entropy(logits, mixed_targets.astype(np.float64))


def numerical_gradient(targets, step=1e-6):
    gradient = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (float(layers.softmax_cross_entropy(up, targets)[0])
                           - float(layers.softmax_cross_entropy(down, targets)[0])) / (2 * step)
    return gradient


mixed64 = mixed_targets.astype(np.float64)
numerical = numerical_gradient(mixed64)
probabilities = np.exp(layers.log_softmax(logits))
print(f"largest |dlogits - finite difference| with Mixup's soft targets: {np.abs(dlogits - numerical).max():.1e}")
check(np.allclose(dlogits, numerical, rtol=1e-6, atol=1e-9) and np.allclose(dlogits, (probabilities - mixed64) / 4),
      "with soft targets dL/dz = (p - q) / B, confirmed by finite differences (float64)")
per_image = [-(q * layers.log_softmax(logits[i:i + 1])).sum() for i, q in enumerate(mixed64)]
split = [lam * -(smooth[i] * layers.log_softmax(logits[i:i + 1])).sum()
         + (1 - lam) * -(smooth[3 - i] * layers.log_softmax(logits[i:i + 1])).sum() for i in range(4)]
check(np.allclose(per_image, split), "the loss of a mixed target is the mix of the losses of its two labels")
# The one assumption, sum q = 1, is not decoration: targets summing to 2 break the formula.
doubled = 2 * mixed64
check(not np.allclose(layers.softmax_cross_entropy(logits, doubled)[1], numerical_gradient(doubled), atol=1e-6),
      "for targets that do not sum to 1, (p - q) / B is NOT the gradient: Mixup's convexity is what makes it hold")


# %% [markdown]
# ## 4. Random erasing: a box of noise

# %%
heading("4. Random erasing: a box of noise")
show_source(random_erasing.RandomErasing.draw_boxes)
# DeiT: --reprob 0.25 --remode pixel. A box of area U(0.02, 1/3) of the image, aspect h/w log-uniform
# in (0.3, 1/0.3), filled with N(0, 1) per pixel: on a normalized batch, noise around the mean.
eraser = random_erasing.RandomErasing(probability=1.0, mode="pixel")
erase_plan = eraser.draw([np.random.default_rng([7, index]) for index in range(len(batch))], *batch.shape[1:])
erased = eraser.apply(batch.copy(), erase_plan)
inside = np.zeros(batch.shape, bool)
for index, top, left, box_h, box_w in erase_plan.boxes:
    inside[index, :, top:top + box_h, left:left + box_w] = True
check((erased[~inside] == batch[~inside]).all() and len(erase_plan.boxes) == 4,
      "probability 1: each image got one box, and every pixel outside the boxes is untouched")
check(np.allclose(np.sort(erased[inside]), np.sort(erase_plan.noise)), "inside the boxes: the drawn N(0, 1) noise")
default = random_erasing.RandomErasing(probability=0.25)
boxes = [default.draw_boxes(32, 32, np.random.default_rng([15, 4, index])) for index in range(4000)]
erased_share = np.mean([len(found) > 0 for found in boxes])
areas = np.array([h * w / 32 ** 2 for found in boxes for _, _, h, w in found])
aspects = np.array([h / w for found in boxes for _, _, h, w in found])
print(f"of 4000 images {erased_share:.1%} erased; box areas {areas.min():.3f}..{areas.max():.3f} of the image, "
      f"aspect h/w {aspects.min():.2f}..{aspects.max():.2f}")
check(abs(erased_share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000), "about a quarter of the images are erased (--reprob 0.25)")
check(areas.min() > 0.02 * 0.7 and areas.max() < 1 / 3 * 1.3 and aspects.min() > 0.3 * 0.7 and aspects.max() < 1 / 0.3 * 1.4,
      "box areas stay within 2%..33% of the image and aspects within 0.3..3.3 (up to rounding to whole pixels)")

figure, axes = plt.subplots(4, 4, figsize=(8.5, 10))


def show(axis, normalized, title):
    pixels = normalized.transpose(1, 2, 0) * np.array([0.229, 0.224, 0.225]) + np.array(IMAGENET_MEAN)
    axis.imshow(np.clip(pixels, 0, 1), interpolation="nearest")
    axis.set_title(title, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


def top_two(targets):
    order = np.argsort(targets)[::-1][:2]
    return "\n".join(f"{targets[c]:.2f} {SHAPES_CLASSES[c]}" for c in order)


for i in range(4):
    show(axes[0, i], batch[i], SHAPES_CLASSES[labels[i]])
    show(axes[1, i], mixed[i], top_two(mixed_targets[i]))
    show(axes[2, i], cut[i], top_two(cut_targets[i]))
    show(axes[3, i], erased[i], SHAPES_CLASSES[labels[i]])
for row, name in enumerate(["original", f"Mixup, lam {lam}", f"CutMix, lam {box_lam:.3f}", "random erasing"]):
    axes[row, 0].set_ylabel(name, fontsize=9)
figure.suptitle("a batch, mixed with its reverse (image i with image 3 - i), and erased;\n"
                "titles: the soft targets' two largest entries (label smoothing 0.1)")
show_figure(figure, "15_mix_and_erase.png")


# %% [markdown]
# ## 5. Repeated augmentation: each image 3 times, augmented 3 ways

# %%
heading("5. Repeated augmentation: each image 3 times, augmented 3 ways")
show_source(RepeatedAugmentationSampler.order_from_permutation)
sampler = RepeatedAugmentationSampler(12, seed=0, repeats=3)
order = sampler.epoch_order(epoch=0)
print(f"one process, 12 images: epoch order {order.tolist()}")
# The epoch keeps its length (12 samples), so it sees 12 / 3 = 4 different images, 3 times each; every
# sample p is augmented with its own generator [seed, epoch, p], so the 3 copies differ.
check(len(order) == 12 and len(set(order.tolist())) == 4 and (order.reshape(4, 3) == order[::3, None]).all(),
      "an epoch of 12 samples is 4 images, each repeated 3 times in a row")
copies = [augment.draw(np.random.default_rng([0, 0, position])) for position in range(3)]
print(f"the 3 RandAugment plans of image {order[0]} (positions 0, 1, 2): {[[name for name, _, _ in plan] for plan in copies]}")
check(copies[0] != copies[1] != copies[2] != copies[0], "the 3 copies of an image are augmented differently")
# With K ranks, rank r takes positions r, r + K, ...: with K = 3 the 3 copies of an image land on 3
# different GPUs, in the same global batch: a batch then holds 3 views of each image it contains.
shards = [RepeatedAugmentationSampler(12, seed=0, repeats=3, num_replicas=3, rank=rank).epoch_order(0) for rank in range(3)]
check((np.stack(shards, axis=1).reshape(-1) == order).all(), "the 3 ranks' shards, interleaved, are the one-process order")
check(all(len(set(shard.tolist())) == len(shard) for shard in shards), "with K = 3 no rank sees an image twice in an epoch")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Draw RandAugment("rand-m9-mstd0.5") (inc0) plans and look at Color at m ~ 9: stronger or weaker
#    than at m = 5? -> factor 1.72 vs 1.0: at m = 5 the original set's enhancements do nothing.
# 2. Why does the Mixup partner come from the same batch (reversed) and not from the dataset? -> no
#    extra loading; reversed pairs i with B-1-i, so every image is used once as partner.
# 3. Train lesson 11's loop with targets from Mixup(num_classes=10) instead of labels. Does the
#    training loss still fall to ~0.5? -> no: a mixed target has more entropy, so the lowest possible
#    loss is higher; validation accuracy is what to compare.
# 4. Mixup at lam = 0.5 between a ring and a circle gives a target of 0.5/0.5. What does the best
#    model predict for it? -> p = q: exactly the blend; Mixup teaches calibrated, linear behaviour
#    between training examples.
# 5. Why are Mixup and erasing done after normalization, on the device, and RandAugment before, in
#    the loader? -> RandAugment's ops are Pillow's on uint8 images; mixing and noise are cheap array
#    arithmetic on the whole batch, where the noise N(0, 1) means "around the dataset mean".

# %%
print("\nLesson 15 done: augmented images, mixed labels; the loss's gradient is still p - q.")
