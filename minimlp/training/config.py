"""The run's settings: the defaults of each kind of run, the paper's recipes, the defaults derived from
a user's own dataset, and the one place every flag's value is checked.

train.py parses the command line; complete_settings fills what was not given (from a resumed
checkpoint, then a --recipe, then the defaults) and validates every value, naming the flag. With
--data and no --recipe, some defaults depend on the training set's size: complete_settings leaves
them unset, and dataset_defaults fills them once the data is scanned, saying what it chose and why.
Library classes (Loader, ResMLP, RandAugment, Mixup, ...) check their own arguments too, for library
users; a command-line run never reaches those checks.
"""
import math
import os
from pathlib import Path

from .distillation import KINDS as DISTILLATION_TYPES
from ..data.mixup import MODES as MIXUP_MODES
from ..model import PRESETS
from ..data.randaugment import RandAugment
from ..data.random_erasing import MODES as ERASING_MODES
from ..data.transforms import TRAIN_INTERPOLATIONS

# Defaults, in order of precedence after the flags themselves: a resumed checkpoint's settings, then a
# --recipe's, then those of the kind of run (the demo without --data, or a user's dataset), then COMMON.
#
# The demo trains a 0.8M-parameter model for 15 epochs on 32 px shapes, three of whose classes are stripe
# orientations 45 degrees apart: no RandAugment (its rotations of up to 30 degrees and shears would move
# stripes towards the neighbouring class), no Mixup/CutMix, erasing or repeated augmentation (regularizers
# that pay off over hundreds of epochs of a model large enough to overfit, not in 15 of an underfitting one),
# and the bilinear train crop its measured results in the README were made with.
DEMO_DEFAULTS = dict(model="resmlp_tiny", img_size=32, scale=(0.6, 1.0), batch_size=128, epochs=15, lr=3e-3,
                     warmup_epochs=1, drop_path=0.0, train_interpolation="bilinear", aa="none", reprob=0.0,
                     mixup=0.0, cutmix=0.0, repeated_aug=False)
DATA_DEFAULTS = dict(model="resmlp_s12", img_size=224, scale=(0.08, 1.0), batch_size=256, epochs=300, drop_path=0.05)
COMMON_DEFAULTS = dict(crop_pct=0.875, opt="adamw", weight_decay=0.05, warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1,
                       clip_grad=0.0, seed=0, amp=False, train_interpolation="bicubic", hflip=0.5, remode="pixel",
                       recount=1, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", model_ema=False,
                       model_ema_decay=0.99996, distillation_type="none", distillation_alpha=0.5,
                       distillation_tau=1.0, save_every=30.0)
# With --data and no --recipe: chosen from the training set's size, the model and the batch (dataset_defaults).
DATASET_DERIVED = ("lr", "warmup_epochs", "aa", "reprob", "mixup", "cutmix", "repeated_aug")
# What a checkpoint written before these flags existed trained with (its settings lack them).
BEFORE_AUGMENTATIONS = dict(train_interpolation="bilinear", hflip=0.5, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0,
                            repeated_aug=False, model_ema=False, distillation_type="none")
BEFORE_AMP_DTYPE = "float16"  # the only --amp there was before --amp-dtype

# The paper's recipe (docs/reference.md, Training recipe: section 3.1 and Table 3 of the paper, the authors'
# list in deit issue #106, DeiT's main.py for what the list leaves to DeiT). lr 5e-3 is for the global batch
# of 2048: a recipe run with another --batch-size (and no --lr) scales it linearly, as DeiT's rule does.
PAPER_RECIPE = dict(img_size=224, opt="lamb", lr=5e-3, weight_decay=0.2, batch_size=2048, epochs=400, warmup_epochs=5,
                    warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, repeated_aug=True, aa="rand-m9-mstd0.5-inc1",
                    train_interpolation="bicubic", hflip=0.5, reprob=0.25, remode="pixel", recount=1, mixup=0.8,
                    cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", scale=(0.08, 1.0),
                    crop_pct=0.9, amp=False, clip_grad=0.0)
PAPER_BATCH_SIZE = 2048
# Stochastic depth: 0.05 is the published value for S12 (issue #106); none is published for the others,
# which take DeiT's default 0.1 (issue #117 gives 0.1 for 24 blocks when fine-tuning on CIFAR).
RECIPES = {"resmlp-s12": dict(PAPER_RECIPE, model="resmlp_s12", drop_path=0.05),
           "resmlp-s24": dict(PAPER_RECIPE, model="resmlp_s24", drop_path=0.1),
           "resmlp-s36": dict(PAPER_RECIPE, model="resmlp_s36", drop_path=0.1),
           "resmlp-b24": dict(PAPER_RECIPE, model="resmlp_b24", drop_path=0.1)}

# What a resumed run takes from its checkpoint unless the flag is given again (not: device, tf32, workers, output)
RESUMED_SETTINGS = ["data", "model", "img_size", "patch_size", "crop_pct", "scale", "batch_size", "epochs", "opt", "lr",
                    "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "smoothing", "clip_grad", "drop_path",
                    "seed", "amp", "amp_dtype", "recipe", "aa", "train_interpolation", "hflip", "reprob", "remode", "recount",
                    "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_mode",
                    "repeated_aug", "model_ema", "model_ema_decay", "distillation_type", "distillation_alpha",
                    "distillation_tau", "teacher_model", "teacher_path", "save_every"]

# dataset_defaults: a training set at least this large, with an S/B model, gets the paper's regime.
LARGE_DATASET = 100_000
# Learning rates known to train, from which smaller sets scale with the square root of the batch
# (Adam's scaling rule, Malladi et al. 2022): resmlp_tiny at 3e-3 for batch 128 (the demo), the S/B models
# at 1e-3 for batch 1024 (DeiT's AdamW rate for models of S12's size: 5e-4 x 1024 / 512).
SMALL_SET_LR = {"resmlp_tiny": (3e-3, 128)}
SMALL_SET_LR_SB = (1e-3, 1024)
PAPER_AUGMENTATION = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, repeated_aug=True)
LIGHT_AUGMENTATION = dict(aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=False)


def complete_settings(args, meta):
    """Fill every flag not given: from the checkpoint's settings (meta, when resuming), then the recipe, then
    defaults; validate them. Returns lines to print (the recipe's values). With --data and no --recipe the
    DATASET_DERIVED settings not given stay None: dataset_defaults fills them."""
    if meta is not None:
        for key in RESUMED_SETTINGS:
            if getattr(args, key) is None and meta["settings"].get(key) is not None:
                value = meta["settings"][key]
                setattr(args, key, Path(value) if key == "data" else tuple(value) if key == "scale" else value)
                if key == "batch_size":  # the same global batch over this run's number of ranks
                    args.batch_size = per_rank_batch(value * meta["settings"].get("world_size", 1), args,
                                                     "the checkpoint's global batch", fixed=True)
        for key, value in BEFORE_AUGMENTATIONS.items():
            if getattr(args, key) is None and key not in meta["settings"]:
                setattr(args, key, value)
        if args.amp_dtype is None and "amp_dtype" not in meta["settings"]:
            args.amp_dtype = BEFORE_AMP_DTYPE
    if args.data is not None:  # absolute, so that a resume from another directory finds it
        args.data = Path(os.path.abspath(Path(args.data).expanduser()))
    notes = []
    if args.recipe is not None:
        notes = apply_recipe(args)
    kind = DATA_DEFAULTS if args.data else DEMO_DEFAULTS
    for key, value in {**COMMON_DEFAULTS, **kind}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_settings(args)
    return notes


def apply_recipe(args):
    """Set the recipe's values where no flag (or checkpoint) gave one; returns the lines that say so."""
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe {args.recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[args.recipe]
    given = [key for key in recipe if getattr(args, key) is not None]
    if args.batch_size is None and world_size(args) > 1:  # the paper's batch is the global one
        args.batch_size = per_rank_batch(PAPER_BATCH_SIZE, args, f"--recipe {args.recipe}'s batch")
    if getattr(args, "lr") is None and args.batch_size is not None and global_batch(args) != PAPER_BATCH_SIZE:
        args.lr = recipe["lr"] * global_batch(args) / PAPER_BATCH_SIZE
        lr_note = f" (--lr {args.lr:.3g}: {recipe['lr']:g} x batch {global_batch(args)} / {PAPER_BATCH_SIZE})"
    else:
        lr_note = ""
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shown = "  ".join(flag_with_value(args, key) for key in recipe if key not in given)
    notes = [f"recipe {args.recipe} (the paper's, docs/reference.md, Training recipe): {shown}{lr_note}"]
    if given:
        notes.append("  given explicitly (they win): " + "  ".join(flag_with_value(args, key) for key in given))
    return notes


def dataset_defaults(args, num_train):
    """With --data and no --recipe: fill the DATASET_DERIVED settings still unset from the training set's size,
    the model and the batch; returns the lines that say what was chosen and why (nothing when all were given).

    A large set (at least LARGE_DATASET images) with an S/B model gets the paper's regime: DeiT's learning
    rate rule and the paper's augmentations. A smaller set, or resmlp_tiny, gets a learning rate that trains
    in the few steps such a run has, and light augmentation (crop, flip, label smoothing)."""
    missing = [key for key in DATASET_DERIVED if getattr(args, key) is None]
    if not missing:
        return []
    large = num_train >= LARGE_DATASET and args.model != "resmlp_tiny"
    why = {}
    if large:
        lr = 5e-4 * global_batch(args) / 512
        why["lr"] = f"DeiT's rule 5e-4 x batch {global_batch(args)} / 512"
        augmentation = PAPER_AUGMENTATION
        augmentation_why = "the paper's augmentations (for an S/B model on an ImageNet-sized set)"
    else:
        base, base_batch = SMALL_SET_LR.get(args.model, SMALL_SET_LR_SB)
        lr = base * math.sqrt(global_batch(args) / base_batch)
        deit = 5e-4 * global_batch(args) / 512
        why["lr"] = (f"{base:g} x sqrt(batch {global_batch(args)} / {base_batch}), a rate known to train {args.model}"
                     f" scaled by the square root of the batch; DeiT's rule (5e-4 x batch / 512 = {deit:.2g}) is"
                     " made for 1.28M images over 300 epochs and trains too little on a small set")
        augmentation = LIGHT_AUGMENTATION
        augmentation_why = ("light augmentation: RandomResizedCrop, flip (--hflip), label smoothing; the paper's"
                            " RandAugment, erasing, Mixup/CutMix and repeated augmentation regularize S/B models"
                            " over hundreds of epochs of ImageNet (turn them on with their flags, or --recipe)")
    warmup = min(5.0, args.epochs / 20)
    why["warmup_epochs"] = "5% of --epochs, at most DeiT's 5"
    chosen = dict(lr=lr, warmup_epochs=warmup, **augmentation)
    for key in missing:
        setattr(args, key, chosen[key])
    size = "an ImageNet-sized set" if large else ("a small set" if num_train < LARGE_DATASET else "resmlp_tiny")
    lines = [f"defaults for {num_train:,} training images ({size}), {args.model}, batch {global_batch(args)}, "
             f"{args.epochs} epochs (any flag given wins; --recipe resmlp-s12 for the paper's):"]
    for key in ("lr", "warmup_epochs"):
        if key in missing:
            lines.append(f"  {flag_with_value(args, key)}: {why[key]}")
    augmentation_keys = [key for key in missing if key in augmentation]
    if augmentation_keys:
        lines.append(f"  {' '.join(flag_with_value(args, key) for key in augmentation_keys)}: {augmentation_why}")
    check_settings(args)
    return lines


def world_size(args):
    """The number of data parallel ranks (train.py sets args.world_size; minimlp.parallel.distributed)."""
    return getattr(args, "world_size", None) or 1


def global_batch(args):
    """--batch-size is per rank (DeiT/timm); the learning-rate rules use the global batch, K x --batch-size."""
    return args.batch_size * world_size(args)


def per_rank_batch(total, args, what, fixed=False):
    """The per-rank --batch-size of a global batch of `total` images over this run's ranks. One that does not split
    is refused naming what would: the nearest numbers of ranks that divide it, and unless the global batch is
    `fixed` (a resumed run's), the --batch-size closest to it."""
    ranks = world_size(args)
    if total % ranks == 0:
        return total // ranks
    nearest = [max(k for k in range(1, ranks) if total % k == 0)]  # fewer ranks (1 always divides)
    nearest += [k for k in range(ranks + 1, total + 1) if total % k == 0][:1]  # more, where there are
    instead = (f"start {' or '.join(map(str, nearest))} ranks (--batch-size "
               f"{' or '.join(str(total // k) for k in nearest)} each)")
    if not fixed:
        instead = (f"give --batch-size {total // ranks} (per rank: a global batch of {total // ranks * ranks}), or "
                   + instead)
    raise ValueError(f"{what} of {total} images does not split over {ranks} ranks: {instead}")


def flag_name(key):
    return "--" + key.replace("_", "-")


def flag_with_value(args, key):
    """The flag that sets `key` to its value now, as one would type it: '--lr 0.003', '--no-repeated-aug'."""
    value = getattr(args, key)
    if isinstance(value, bool):
        return flag_name(key) if value else "--no-" + flag_name(key)[2:]
    if isinstance(value, (tuple, list)):
        return f"{flag_name(key)} {' '.join(f'{item:g}' for item in value)}"
    return f"{flag_name(key)} {value:.3g}" if isinstance(value, float) else f"{flag_name(key)} {value}"


def check_settings(args):
    """Every flag's value, one line naming the flag when it is wrong. Settings still None are skipped (the
    dataset-derived ones, before dataset_defaults)."""
    def given(*keys):
        return [(flag_name(key), getattr(args, key)) for key in keys if getattr(args, key) is not None]

    for key, value in vars(args).items():  # nan passes every comparison below, inf most of them
        if any(isinstance(number, float) and not math.isfinite(number)
               for number in (value if isinstance(value, (tuple, list)) else [value])):
            shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            raise ValueError(f"{flag_name(key)} must be a finite number, got {shown}")
    for flag, value in given("batch_size", "epochs", "img_size", "recount"):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, value in given("smoothing", "drop_path"):
        if not 0 <= value < 1:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    for flag, value in given("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay",
                             "distillation_alpha"):
        if not 0 <= value <= 1:
            raise ValueError(f"{flag} must be within 0..1, got {value}")
    for flag, value in given("lr", "crop_pct", "distillation_tau"):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    for flag, value in given("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "clip_grad", "mixup", "cutmix",
                             "save_every"):
        if value < 0:
            raise ValueError(f"{flag} must be 0 or more, got {value}")
    patch = args.patch_size if args.patch_size is not None else PRESETS.get(args.model, {}).get("patch_size")
    if patch is not None and args.img_size is not None:
        if not 1 <= patch <= args.img_size:
            raise ValueError(f"--patch-size must be between 1 and --img-size {args.img_size}, got {patch}")
        if args.img_size % patch:
            raise ValueError(f"--img-size {args.img_size} is not a multiple of --patch-size {patch}"
                             + (f" ({args.model}'s)" if args.patch_size is None else "")
                             + ": the image is cut into whole patches")
    if args.crop_pct > 1:
        raise ValueError(f"--crop-pct must be at most 1 (the crop is that fraction of the resized image), "
                         f"got {args.crop_pct}")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--scale MIN MAX needs 0 < MIN <= MAX <= 1 (fractions of the image area), got {low} {high}")
    if args.cutmix_minmax is not None:
        low, high = args.cutmix_minmax
        if not 0 < low < high <= 1:
            raise ValueError(f"--cutmix-minmax MIN MAX needs 0 < MIN < MAX <= 1 (fractions of the image side), "
                             f"got {low} {high}")
    for flag, value, choices in [("--train-interpolation", args.train_interpolation, TRAIN_INTERPOLATIONS),
                                 ("--remode", args.remode, ERASING_MODES),
                                 ("--mixup-mode", args.mixup_mode, MIXUP_MODES),
                                 ("--distillation-type", args.distillation_type, DISTILLATION_TYPES)]:
        if value not in choices:
            raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    if args.aa is not None:
        if args.aa == "":
            args.aa = "none"
        if args.aa != "none":
            try:
                RandAugment(args.aa)
            except ValueError as error:
                raise ValueError(f"--aa: {error} (or none)") from None
    if args.eval_only and not args.resume:
        raise ValueError("--eval-only needs --resume CHECKPOINT_OR_WEIGHTS")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.distillation_type != "none" and not (args.teacher_model and args.teacher_path):
        raise ValueError(f"--distillation-type {args.distillation_type} needs --teacher-model and --teacher-path "
                         "(a minimlp preset with its weights, or a timm model with a PyTorch checkpoint: README, "
                         "The paper's recipe)")
