"""Every setting of train.py, declared once: its flag, type, default (a value, one per kind of run, or the rule
that derives it from the dataset and the device), range, help text and whether a resume keeps it.

From this table come train.py's argument parser (add_arguments), the defaults a run fills in
(minimlp.training.config.complete_settings), the range checks (check_settings), what a resume takes from its
checkpoint (RESUMED_SETTINGS) and the "(default ...)" of every --help line, written from the very value or rule
the run uses (minimlp.training.defaults_from_data), so that the two cannot disagree.
"""
import argparse
import dataclasses
import math
import os
from pathlib import Path

from ..data.mixup import MODES as MIXUP_MODES
from ..data.randaugment import RandAugment
from ..data.random_erasing import MODES as ERASING_MODES
from ..data.transforms import TRAIN_INTERPOLATIONS
from ..model import PRESETS, preset_name
from ..precision import DEFAULT_AMP_DTYPE, HALF_DTYPES
from . import defaults_from_data as rules
from .distillation import KINDS as DISTILLATION_TYPES
from .recipes import RECIPES


@dataclasses.dataclass(frozen=True)
class Range:
    """A range check: `holds(value)`, and what the flag must be when it does not ('at least 1')."""
    holds: object
    phrase: str


AT_LEAST_1 = Range(lambda value: value >= 1, "at least 1")
POSITIVE = Range(lambda value: value > 0, "positive")
NON_NEGATIVE = Range(lambda value: value >= 0, "0 or more")
PROBABILITY = Range(lambda value: 0 <= value <= 1, "within 0..1")
BELOW_1 = Range(lambda value: 0 <= value < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the table. default: what every run takes; demo/data: what the demo (no --data) and a run on
    a user's dataset take instead (a value, or a rule of minimlp.training.defaults_from_data, which has a
    .summary for --help); default_text: the default in words where it is not one value (written into --help)."""
    name: str
    help: str
    type: object = None
    default: object = None
    demo: object = None
    data: object = None
    default_text: str = ""
    check: Range = None
    choices: tuple = None
    nargs: object = None
    metavar: object = None
    aliases: tuple = ()
    boolean: bool = False  # --flag / --no-flag
    resumed: bool = True  # a resume keeps the checkpoint's value unless the flag is given again
    group: str = "main"

    @property
    def flag(self):
        return flag_name(self.name)


def derived(value):
    return callable(value)


def shown(value):
    """A default as --help writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(shown(item) for item in value)
    if derived(value):
        return value.summary
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_in_words(setting):
    if setting.default_text:
        return setting.default_text
    if setting.default is not None:
        return shown(setting.default)
    if setting.demo is not None or setting.data is not None:
        return f"{shown(setting.demo)} for the demo; with --data: {shown(setting.data)}"
    return ""


def help_text(setting):
    words = default_in_words(setting)
    return f"{setting.help} (default: {words})" if words else setting.help


_cores = os.cpu_count()
MAIN, AUGMENTATION = "main", "augmentation"
S = Setting
SETTINGS = [
    S("data", "dataset folder with train/<class>/* and val/<class>/* (or the flat ILSVRC2012 val folder with "
      "LOC_val_solution.csv beside it)", type=Path, aliases=("--data-path",),
      default_text="the built-in demo, generated shapes10 images"),
    S("model", "model preset; DeiT's and timm's names for the same models work too (resmlp_12, resmlpB_24, "
      "resmlp_12_224, ...)", type=preset_name, choices=tuple(sorted(PRESETS)), demo="resmlp_tiny",
      data=rules.choose_model),
    S("img_size", "input resolution", type=int, aliases=("--input-size",), demo=32, data=rules.choose_img_size,
      check=AT_LEAST_1),
    S("patch_size", "patch size", type=int, check=AT_LEAST_1, default_text="the preset's: " + ", ".join(
        f"{PRESETS[name]['patch_size']} {name}" for name in PRESETS)),
    S("crop_pct", "eval: resize to img_size/crop_pct then center crop (paper 0.9)", type=float, default=0.875,
      check=POSITIVE),
    S("scale", "RandomResizedCrop area range of the training crops", type=float, nargs=2, metavar=("MIN", "MAX"),
      demo=(0.6, 1.0), data=(0.08, 1.0)),
    S("batch_size", "images per step, per process", type=int, demo=128, data=rules.choose_batch_size,
      check=AT_LEAST_1),
    S("epochs", "epochs", type=int, demo=15, data=rules.choose_epochs, check=AT_LEAST_1),
    S("opt", "optimizer (the paper uses lamb)", choices=("adamw", "lamb"), default="adamw"),
    S("opt_eps", "the optimizer's epsilon, DeiT's for every optimizer (timm's Lamb alone defaults to 1e-6)",
      type=float, default=1e-8, check=POSITIVE),
    S("opt_betas", "the optimizer's beta1 beta2, as DeiT's --opt-betas", type=float, nargs="+", metavar="BETA",
      default_text="the optimizer's own, 0.9 0.999"),
    S("lr", "peak learning rate", type=float, demo=3e-3, data=rules.choose_lr, check=POSITIVE),
    S("weight_decay", "decoupled weight decay on matrices, never on 1-D parameters", type=float, default=0.05,
      check=NON_NEGATIVE),
    S("warmup_epochs", "epochs of linear warmup from --warmup-lr", type=float, demo=1.0,
      data=rules.choose_warmup_epochs, check=NON_NEGATIVE),
    S("warmup_lr", "learning rate of the first step", type=float, default=1e-6, check=NON_NEGATIVE),
    S("min_lr", "learning rate at the end of the cosine", type=float, default=1e-5, check=NON_NEGATIVE),
    S("smoothing", "label smoothing", type=float, default=0.1, check=BELOW_1),
    S("clip_grad", "clip the global gradient norm to this; 0 = off", type=float, default=0.0, check=NON_NEGATIVE),
    S("drop_path", "stochastic depth rate, the same in every block", type=float, demo=0.0, data=0.05,
      check=BELOW_1),
    S("recipe", "the paper's training recipe for that model: every value of docs/reference.md's Training recipe "
      "(LAMB, lr 5e-3 at batch 2048, weight decay 0.2, 400 epochs, RandAugment, Mixup/CutMix, erasing, repeated "
      "augmentation, ...), printed at start; flags given explicitly win", choices=tuple(sorted(RECIPES))),
    # augmentation and regularization
    S("aa", "RandAugment after crop and flip, timm's grammar: rand-m9-mstd0.5-inc1 (the paper's: magnitude 9, its "
      "noise 0.5, the increasing op set), or none", metavar="CONFIG", demo="none", data=rules.choose_augmentation,
      group=AUGMENTATION),
    S("train_interpolation", "filter of the train crop and RandAugment's geometric ops", choices=TRAIN_INTERPOLATIONS,
      demo="bilinear", data="bicubic", group=AUGMENTATION),
    S("hflip", "probability of a horizontal flip (0 for digits or text)", type=float, default=0.5, check=PROBABILITY,
      group=AUGMENTATION),
    S("reprob", "random erasing: probability per image (paper 0.25)", type=float, demo=0.0,
      data=rules.choose_augmentation, check=PROBABILITY, group=AUGMENTATION),
    S("remode", "random erasing fill: pixel (per-pixel noise), rand, const", choices=ERASING_MODES, default="pixel",
      group=AUGMENTATION),
    S("recount", "random erasing: at most this many boxes per erased image, 1 to N drawn as in timm", type=int,
      default=1, check=AT_LEAST_1, group=AUGMENTATION),
    S("mixup", "Mixup alpha, 0 = off (paper 0.8)", type=float, demo=0.0, data=rules.choose_augmentation,
      check=NON_NEGATIVE, group=AUGMENTATION),
    S("cutmix", "CutMix alpha, 0 = off (paper 1.0)", type=float, demo=0.0, data=rules.choose_augmentation,
      check=NON_NEGATIVE, group=AUGMENTATION),
    S("cutmix_minmax", "CutMix box sides uniform in MIN..MAX of the image side, instead of --cutmix's alpha",
      type=float, nargs=2, metavar=("MIN", "MAX"), default_text="off", group=AUGMENTATION),
    S("mixup_prob", "probability of mixing a batch", type=float, default=1.0, check=PROBABILITY, group=AUGMENTATION),
    S("mixup_switch_prob", "with both on: probability of CutMix rather than Mixup", type=float, default=0.5,
      check=PROBABILITY, group=AUGMENTATION),
    S("mixup_mode", "one draw per batch, per pair or per image", choices=MIXUP_MODES, default="batch",
      group=AUGMENTATION),
    S("repeated_aug", "repeated augmentation: each image 3 times per epoch, differently augmented, the epoch kept at "
      "the dataset's length (DeiT's RASampler)", boolean=True, demo=False, data=rules.choose_augmentation,
      group=AUGMENTATION),
    S("model_ema", "keep an exponential moving average of the weights, evaluated each epoch beside them and "
      "checkpointed (with --eval-only: evaluate the checkpoint's average)", boolean=True, default=False,
      group=AUGMENTATION),
    S("model_ema_decay", "the average's decay per step", type=float, default=0.99996, check=PROBABILITY,
      group=AUGMENTATION),
    S("distillation_type", "DeiT's distillation from --teacher-model on the same augmented batch: soft (KL at "
      "--distillation-tau) or hard (the teacher's top class)", choices=DISTILLATION_TYPES, default="none",
      group=AUGMENTATION),
    S("distillation_alpha", "weight of the distillation term", type=float, default=0.5, check=PROBABILITY,
      group=AUGMENTATION),
    S("distillation_tau", "temperature of soft distillation", type=float, default=1.0, check=POSITIVE,
      group=AUGMENTATION),
    S("teacher_model", "a minimlp preset (run by minimlp) or a timm model name such as regnety_160, DeiT's (run by "
      "PyTorch on the same device; needs torch and timm)", group=AUGMENTATION),
    S("teacher_path", "the teacher's weights: .npz/.safetensors/checkpoint for a minimlp preset, a PyTorch .pth for "
      "a timm model (stored absolute, as --data)", type=Path, group=AUGMENTATION),
    # the run
    S("workers", "data loading processes; 0 = in the main process", type=int, default=_cores,
      default_text=f"the number of cores, {_cores}", check=NON_NEGATIVE, resumed=False),
    S("seed", "seed of initialization, shuffling, augmentation and drop path", type=int, default=0),
    S("device", "auto takes the GPU when CuPy and a GPU are present, and says which it chose",
      choices=("auto", "cpu", "gpu"), default="auto", resumed=False),
    S("tf32", "GPU: float32 matrix products on TF32 tensor cores (10-bit mantissa inputs, float32 accumulation); "
      "--no-tf32 for full float32", boolean=True, default=True, resumed=False),
    S("fast", "the fast path: fused CUDA kernels on the GPU, fused multi-threaded Numba loops on the CPU (where Numba "
      "is installed); same results as the reference layers (tested). --no-fast runs the reference only",
      boolean=True, default=True, resumed=False),
    S("amp", "mixed precision: 16-bit matrix-product inputs (--amp-dtype) with float32 accumulation, float32 weights "
      "and optimizer state", boolean=True, default=False),
    S("amp_dtype", "--amp's 16-bit type: float16 (dynamic loss scaling; emulated on the CPU) or bfloat16 (float32's "
      "range: no loss scaling). A resume keeps the checkpoint's; giving another is allowed (weights and optimizer "
      "state are float32 in every precision; float16's loss scaler then starts afresh)", choices=HALF_DTYPES,
      default_text=", ".join(f"{dtype} on the {device.upper()}" for device, dtype in DEFAULT_AMP_DTYPE.items())),
    S("output", "run folder for log.jsonl, checkpoint.npz, best.npz. A folder that holds another run's results is "
      "refused (continue that run with --resume, or give another --output), and so is one a live run is writing to "
      "(run.lock)", type=Path, default_text="a new runs/<model>-<date>-<time>[-N], or the resumed checkpoint's "
      "folder", resumed=False),
    S("resume", "continue from a checkpoint.npz exactly; with --eval-only also published weights (.npz or "
      ".safetensors, official or timm names). Resuming an older checkpoint (best.npz) beside a newer checkpoint.npz "
      "is refused: branch off into another --output", type=Path, resumed=False),
    S("save_every", "also save checkpoint.npz every MINUTES inside an epoch, so that a kill -9 or a power cut loses "
      "at most that much; 0 = only at the end of each epoch", type=float, default=30.0, metavar="MINUTES",
      check=NON_NEGATIVE),
    S("eval_only", "evaluate --resume on the val split and exit", aliases=("--eval",), boolean=True, default=False,
      resumed=False),
]
BY_NAME = {setting.name: setting for setting in SETTINGS}
# What a resumed run takes from its checkpoint unless the flag is given again
RESUMED_SETTINGS = [setting.name for setting in SETTINGS if setting.resumed]
GROUP_TITLES = {AUGMENTATION: "augmentation and regularization (DeiT's flag names; defaults: off for the demo, "
                              "chosen from the dataset's size with --data and printed, the paper's with --recipe)"}


def add_arguments(parser):
    """train.py's flags, from the table. Every resumed setting parses to None when not given, so that a resume,
    a --recipe or the defaults can fill it (complete_settings); the others get their default here."""
    groups = {MAIN: parser, **{group: parser.add_argument_group(title) for group, title in GROUP_TITLES.items()}}
    for setting in SETTINGS:
        options = dict(help=help_text(setting).replace("%", "%%"))  # argparse formats help with %
        if setting.boolean and setting.name == "eval_only":
            options.update(action="store_true")
        elif setting.boolean:
            options.update(action=argparse.BooleanOptionalAction)
        else:
            options.update({key: value for key, value in dict(type=setting.type, choices=setting.choices,
                                                              nargs=setting.nargs, metavar=setting.metavar).items()
                            if value is not None})
        if not setting.resumed and setting.default is not None:
            options["default"] = setting.default
        groups[setting.group].add_argument(setting.flag, *setting.aliases, **options)
    return parser


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
    """Every flag's value, one line naming the flag when it is wrong: the table's ranges and choices, then what
    spans several settings. Settings still None are skipped (the derived ones, before they are derived)."""
    for key, value in vars(args).items():  # nan passes every comparison below, inf most of them
        if any(isinstance(number, float) and not math.isfinite(number)
               for number in (value if isinstance(value, (tuple, list)) else [value])):
            written = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            raise ValueError(f"{flag_name(key)} must be a finite number, got {written}")
    for setting in SETTINGS:
        value = getattr(args, setting.name, None)
        if value is None:
            continue
        if setting.check is not None and not setting.check.holds(value):
            raise ValueError(f"{setting.flag} must be {setting.check.phrase}, got {value}")
        if setting.choices is not None and value not in setting.choices:  # from a checkpoint or a recipe
            raise ValueError(f"{setting.flag} {value!r}: choose one of {', '.join(setting.choices)}")
    check_combinations(args)


def check_combinations(args):
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
    for key, what, strict in [("scale", "area", False), ("cutmix_minmax", "side", True)]:
        value = getattr(args, key)
        if value is not None and not (0 < value[0] < value[1] <= 1 if strict else 0 < value[0] <= value[1] <= 1):
            raise ValueError(f"{flag_name(key)} MIN MAX needs 0 < MIN {'<' if strict else '<='} MAX <= 1 (fractions "
                             f"of the image {what}), got {value[0]} {value[1]}")
    if args.opt_betas is not None and not (len(args.opt_betas) == 2 and all(0 <= beta < 1 for beta in args.opt_betas)):
        raise ValueError(f"--opt-betas needs two numbers in [0, 1) (beta1 beta2, e.g. 0.9 0.999), got "
                         f"{' '.join(map(str, args.opt_betas))}")
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
    if args.distillation_type != "none" and not (args.teacher_model and args.teacher_path):
        raise ValueError(f"--distillation-type {args.distillation_type} needs --teacher-model and --teacher-path "
                         "(a minimlp preset with its weights, or a timm model with a PyTorch checkpoint: README, "
                         "The paper's recipe)")
