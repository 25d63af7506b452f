"""A run's settings completed: from a resumed checkpoint, then a --recipe, then the defaults of the settings
table (minimlp.training.settings), then, with --data, the rules that derive the rest from the dataset and the
device (minimlp.training.defaults_from_data). Every value is checked where it is filled (check_settings).

train.py parses the command line (settings.add_arguments); complete_settings fills what was not given and can
be filled before the data is scanned; dataset_defaults fills the derived ones once it is, and returns the lines
that say what it chose and why. Library classes (Loader, ResMLP, RandAugment, Mixup, ...) check their own
arguments too, for library users; a command-line run never reaches those checks.
"""
import os
from pathlib import Path

from .defaults_from_data import DataFacts, LARGE_DATASET, global_batch, is_large, world_size
from .recipes import PAPER_BATCH_SIZE, RECIPES
from .settings import BY_NAME, RESUMED_SETTINGS, SETTINGS, check_settings, derived, flag_with_value

__all__ = ["DataFacts", "LARGE_DATASET", "RECIPES", "complete_settings", "dataset_defaults", "global_batch"]

# What a checkpoint written before these flags existed trained with (its settings lack them).
BEFORE_AUGMENTATIONS = dict(train_interpolation="bilinear", hflip=0.5, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0,
                            repeated_aug=False, model_ema=False, distillation_type="none")
BEFORE_OPT_EPS = {"adamw": 1e-8, "lamb": 1e-6}  # each optimizer's own eps, before --opt-eps
BEFORE_AMP_DTYPE = "float16"  # the only --amp there was before --amp-dtype
PATHS = ("data", "teacher_path")  # stored absolute, so that a resume from another directory finds them


def kind_default(setting, args):
    """The table's default of `setting` for this kind of run (a value, a rule, or None)."""
    if setting.default is not None:
        return setting.default
    return setting.data if args.data is not None else setting.demo


def complete_settings(args, meta):
    """Fill every flag not given: from the checkpoint's settings (meta, when resuming), then the recipe, then the
    table's defaults; validate them. Returns lines to print (the recipe's values). Settings whose default is a
    rule (with --data and no --recipe) stay None: dataset_defaults fills them."""
    if meta is not None:
        resume_settings(args, meta["settings"])
    for key in PATHS:
        if getattr(args, key) is not None:
            setattr(args, key, Path(os.path.abspath(Path(getattr(args, key)).expanduser())))
    notes = []
    if args.recipe is not None:
        notes = apply_recipe(args)
    for setting in SETTINGS:
        value = kind_default(setting, args)
        if getattr(args, setting.name) is None and value is not None and not derived(value):
            setattr(args, setting.name, value)
    check_settings(args)
    return notes


def resume_settings(args, saved):
    """The checkpoint's settings where no flag is given. A relative --teacher-path (stored so before paths were
    made absolute) is resolved against the checkpoint's folder."""
    for key in RESUMED_SETTINGS:
        if getattr(args, key) is None and saved.get(key) is not None:
            value = saved[key]
            if key in PATHS:
                value = Path(value)
                if key == "teacher_path" and not value.is_absolute():
                    value = Path(args.resume).parent / value
            elif BY_NAME[key].nargs is not None:
                value = tuple(value)
            setattr(args, key, value)
            if key == "batch_size":  # the same global batch over this run's number of ranks
                args.batch_size = per_rank_batch(value * saved.get("world_size", 1), args,
                                                 "the checkpoint's global batch", fixed=True)
    for key, value in BEFORE_AUGMENTATIONS.items():
        if getattr(args, key) is None and key not in saved:
            setattr(args, key, value)
    if args.opt_eps is None and "opt_eps" not in saved:
        args.opt_eps = BEFORE_OPT_EPS.get(args.opt or saved.get("opt"), 1e-8)
    if args.amp_dtype is None and "amp_dtype" not in saved:
        args.amp_dtype = BEFORE_AMP_DTYPE


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


def dataset_defaults(args, facts):
    """With --data: fill the settings still unset whose default is a rule (minimlp.training.defaults_from_data),
    in the table's order, from `facts` (a DataFacts); returns the lines that say what was chosen and why (nothing
    when every one was given)."""
    chosen = []  # (key, reason)
    for setting in SETTINGS:
        rule = kind_default(setting, args)
        if getattr(args, setting.name) is None and derived(rule):
            value, reason = rule(args, facts, setting.name)
            setattr(args, setting.name, value)
            chosen.append((setting.name, reason))
    if not chosen:
        return []
    size = ("an ImageNet-sized set" if is_large(args, facts) else
            "a small set" if facts.num_train < LARGE_DATASET else "resmlp_tiny")
    lines = [f"defaults for {facts.num_train:,} training images ({size}), {args.model}, batch {global_batch(args)}, "
             f"{args.epochs} epochs (any flag given wins; --recipe resmlp-s12 for the paper's):"]
    while chosen:  # settings with the same reason (the augmentations) on one line
        together = [key for key, reason in chosen if reason == chosen[0][1]]
        lines.append(f"  {' '.join(flag_with_value(args, key) for key in together)}: {chosen[0][1]}")
        chosen = [(key, reason) for key, reason in chosen if key not in together]
    check_settings(args)
    return lines


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
