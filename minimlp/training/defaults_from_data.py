"""The defaults of a run on a user's dataset (--data, no --recipe) that depend on the dataset and the device:
the model and image size from the images' typical size, the batch from the set's size and the device's memory,
the epochs, learning rate, warmup and augmentation from the set's size. Each rule returns its value and the
reason printed beside it; its .summary is what --help says (minimlp.training.settings), so that the two agree.

The rules run in the table's order (model, img_size, batch_size, epochs, lr, warmup_epochs, augmentation),
each seeing the values before it, and only for the settings no flag, checkpoint or recipe gave.
"""
import functools
import math
import statistics

from PIL import Image

from ..model import PRESETS
from . import estimates

LARGE_DATASET = 100_000  # a training set at least this large, with an S/B model, gets the paper's regime
PAPER_SIZE = 224  # the paper's resolution
TINY_MAX_SIZE = 64  # resmlp_tiny's largest default size: 256 of its 4 px patches (token mixing grows as patches^2)
SAMPLED_IMAGES = 300  # image headers read to find the typical size (PIL reads the header, not the pixels)
DATA_BATCH, SMALLEST_BATCH, STEPS_PER_EPOCH = 256, 32, 20
TARGET_STEPS, FEWEST_EPOCHS, MOST_EPOCHS = 1000, 10, 300
# Learning rates known to train, from which smaller sets scale with the square root of the batch
# (Adam's scaling rule, Malladi et al. 2022): resmlp_tiny at 3e-3 for batch 128 (the demo), the S/B models
# at 1e-3 for batch 1024 (DeiT's AdamW rate for models of S12's size: 5e-4 x 1024 / 512).
SMALL_SET_LR = {"resmlp_tiny": (3e-3, 128)}
SMALL_SET_LR_SB = (1e-3, 1024)
PAPER_AUGMENTATION = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, repeated_aug=True)
LIGHT_AUGMENTATION = dict(aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=False)


class DataFacts:
    """What the rules look at: the training set's size, its images' typical size (read when first asked for),
    the validation set's size, the device and its memory."""

    def __init__(self, samples, num_classes, num_val, device):
        self.samples, self.num_train, self.num_classes = samples, len(samples), num_classes
        self.num_val, self.device = num_val, device

    @functools.cached_property
    def image_side(self):
        """The median shorter side of up to SAMPLED_IMAGES training images spread over the set (PAPER_SIZE when
        none of them can be read: the loader will say which files are broken)."""
        step = max(1, self.num_train // SAMPLED_IMAGES)
        sides = []
        for path, _ in self.samples[::step][:SAMPLED_IMAGES]:
            try:
                with Image.open(path) as image:
                    sides.append(min(image.size))
            except (OSError, SyntaxError, ValueError):
                continue
        return int(statistics.median(sides)) if sides else PAPER_SIZE

    @functools.cached_property
    def memory_bytes(self):
        return estimates.device_memory_bytes(self.device)


def rule(summary):
    """Mark a function (args, facts, key) -> (value, reason) as the rule of a default; summary: for --help."""
    def attach(choose):
        choose.summary = summary
        return choose
    return attach


def world_size(args):
    """The number of data parallel ranks (train.py sets args.world_size; minimlp.parallel.distributed)."""
    return getattr(args, "world_size", None) or 1


def global_batch(args):
    """--batch-size is per rank (DeiT/timm); the learning-rate rules use the global batch, K x --batch-size."""
    return args.batch_size * world_size(args)


def is_large(args, facts):
    return facts.num_train >= LARGE_DATASET and args.model != "resmlp_tiny"


@rule(f"resmlp_s12 (the paper's) for images of {PAPER_SIZE} px or more on a GPU or in an ImageNet-sized set "
      f"({LARGE_DATASET:,}+ images), else resmlp_tiny (0.8M parameters: a step a CPU takes in a fraction of a "
      "second)")
def choose_model(args, facts, key):
    side = facts.image_side
    if side >= PAPER_SIZE and (facts.device == "gpu" or facts.num_train >= LARGE_DATASET):
        where = "on a GPU" if facts.device == "gpu" else f"in a set of {facts.num_train:,}"
        return "resmlp_s12", f"images of {side} px {where}: the paper's model at its resolution"
    why = (f"images of {side} px, below the {PAPER_SIZE} px S12 is made for" if side < PAPER_SIZE else
           f"{facts.num_train:,} images on the CPU, where an S12 step takes seconds")
    return "resmlp_tiny", why + " (--model resmlp_s12 for the paper's)"


@rule(f"the images' typical size (median shorter side of {SAMPLED_IMAGES} sampled files) in whole patches, "
      f"at most {PAPER_SIZE} ({TINY_MAX_SIZE} for resmlp_tiny)")
def choose_img_size(args, facts, key):
    patch = args.patch_size or PRESETS[args.model]["patch_size"]
    largest = TINY_MAX_SIZE if args.model == "resmlp_tiny" else PAPER_SIZE
    side = facts.image_side
    size = max(patch, min(side, largest) // patch * patch)
    why = f"the images' typical size is {side} px"
    if side > largest:
        why += (f"; at most {largest} for {args.model}"
                + (f" ({(largest // patch) ** 2} patches; its cost grows with their square)" if largest < PAPER_SIZE
                   else " (the paper's resolution)"))
    elif size != side:
        why += f", rounded down to whole {patch} px patches"
    return size, why


@rule(f"{DATA_BATCH}, halved (down to {SMALLEST_BATCH}) until an epoch has {STEPS_PER_EPOCH} steps, and until "
      "the estimated peak memory fits the device")
def choose_batch_size(args, facts, key):
    batch, reasons = DATA_BATCH, []
    while batch > SMALLEST_BATCH and facts.num_train // (batch * world_size(args)) < STEPS_PER_EPOCH:
        batch //= 2
    if batch != DATA_BATCH:
        reasons.append(f"an epoch of {facts.num_train // (batch * world_size(args))} steps")
    fitting = estimates.largest_fitting_batch(args, facts.num_classes, facts.device, facts.memory_bytes, batch)
    if fitting < batch:
        batch = fitting
        reasons.append(f"the most that fits the {facts.device}'s {facts.memory_bytes / 1e9:.1f} GB")
    return batch, f"{DATA_BATCH}" + (f", lowered for {' and '.join(reasons)}" if reasons else "")


@rule(f"300 (DeiT's) for an ImageNet-sized set, else about {TARGET_STEPS:,} steps' worth ({FEWEST_EPOCHS} to "
      f"{MOST_EPOCHS} epochs)")
def choose_epochs(args, facts, key):
    if facts.num_train >= LARGE_DATASET:
        return MOST_EPOCHS, "DeiT's, for an ImageNet-sized set"
    steps = max(1, facts.num_train // global_batch(args))
    epochs = min(MOST_EPOCHS, max(FEWEST_EPOCHS, math.ceil(TARGET_STEPS / steps)))
    return epochs, f"{epochs * steps:,} steps of batch {global_batch(args)} (about {TARGET_STEPS:,}, a small set)"


@rule(f"DeiT's 5e-4 x batch / 512 for an S/B model on {LARGE_DATASET:,}+ images; else 3e-3 x sqrt(batch / 128) for "
      "resmlp_tiny, 1e-3 x sqrt(batch / 1024) for S/B")
def choose_lr(args, facts, key):
    if is_large(args, facts):
        return 5e-4 * global_batch(args) / 512, f"DeiT's rule 5e-4 x batch {global_batch(args)} / 512"
    base, base_batch = SMALL_SET_LR.get(args.model, SMALL_SET_LR_SB)
    deit = 5e-4 * global_batch(args) / 512
    return base * math.sqrt(global_batch(args) / base_batch), (
        f"{base:g} x sqrt(batch {global_batch(args)} / {base_batch}), a rate known to train {args.model} scaled by "
        f"the square root of the batch; DeiT's rule (5e-4 x batch / 512 = {deit:.2g}) is made for 1.28M images "
        "over 300 epochs and trains too little on a small set")


@rule("5% of --epochs, at most DeiT's 5")
def choose_warmup_epochs(args, facts, key):
    return min(5.0, args.epochs / 20), "5% of --epochs, at most DeiT's 5"


@rule(f"the paper's for an S/B model on {LARGE_DATASET:,}+ images, else off")
def choose_augmentation(args, facts, key):
    if is_large(args, facts):
        return PAPER_AUGMENTATION[key], "the paper's augmentations (for an S/B model on an ImageNet-sized set)"
    return LIGHT_AUGMENTATION[key], (
        "light augmentation: RandomResizedCrop, flip (--hflip), label smoothing; the paper's RandAugment, erasing, "
        "Mixup/CutMix and repeated augmentation regularize S/B models over hundreds of epochs of ImageNet (turn "
        "them on with their flags, or --recipe)")
