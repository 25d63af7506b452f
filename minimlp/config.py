"""The run's settings: the defaults of each kind of run, and the one place every flag's value is checked.

train.py parses the command line; complete_settings fills what was not given (from a resumed
checkpoint, then the defaults) and validates every value, naming the flag. Library classes (Loader,
ResMLP) check their own arguments too, for library users; a command-line run never reaches those checks.
"""
from pathlib import Path

# Defaults, in order of precedence after the flags themselves: a resumed checkpoint's settings, then
# those of the kind of run (the demo without --data, or a real dataset such as ImageNet), then COMMON.
DEMO_DEFAULTS = dict(model="resmlp_tiny", img_size=32, scale=(0.6, 1.0), batch_size=128, epochs=15, lr=3e-3,
                     warmup_epochs=1, drop_path=0.0)
DATA_DEFAULTS = dict(model="resmlp_s12", img_size=224, scale=(0.08, 1.0), batch_size=256, epochs=300, lr=None, warmup_epochs=5,
                     drop_path=0.05)
COMMON_DEFAULTS = dict(crop_pct=0.875, opt="adamw", weight_decay=0.05, warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1,
                       clip_grad=0.0, seed=0, amp=False)
# What a resumed run takes from its checkpoint unless the flag is given again (not: device, tf32, workers, output)
RESUMED_SETTINGS = ["data", "model", "img_size", "patch_size", "crop_pct", "scale", "batch_size", "epochs", "opt", "lr",
                    "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "smoothing", "clip_grad", "drop_path",
                    "seed", "amp"]



def complete_settings(args, meta):
    """Fill every flag not given: from the checkpoint's settings (meta, when resuming), then defaults."""
    if meta is not None:
        for key in RESUMED_SETTINGS:
            if getattr(args, key) is None and meta["settings"].get(key) is not None:
                value = meta["settings"][key]
                setattr(args, key, Path(value) if key == "data" else value)
    for key, value in {**(DATA_DEFAULTS if args.data else DEMO_DEFAULTS), **COMMON_DEFAULTS}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 5e-4 * args.batch_size / 512
    for flag, value in [("--batch-size", args.batch_size), ("--epochs", args.epochs), ("--img-size", args.img_size)]:
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, value in [("--smoothing", args.smoothing), ("--drop-path", args.drop_path)]:
        if not 0 <= value < 1:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    for flag, value in [("--lr", args.lr), ("--crop-pct", args.crop_pct)]:
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    for flag, value in [("--weight-decay", args.weight_decay), ("--warmup-epochs", args.warmup_epochs),
                        ("--warmup-lr", args.warmup_lr), ("--min-lr", args.min_lr), ("--clip-grad", args.clip_grad)]:
        if value < 0:
            raise ValueError(f"{flag} must be 0 or more, got {value}")
    if args.crop_pct > 1:
        raise ValueError(f"--crop-pct must be at most 1 (the crop is that fraction of the resized image), "
                         f"got {args.crop_pct}")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--scale MIN MAX needs 0 < MIN <= MAX <= 1 (fractions of the image area), got {low} {high}")
    return args
