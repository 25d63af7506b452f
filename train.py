"""Train and evaluate ResMLP on an ImageFolder dataset, end to end, resumable.

    python train.py                                   # the built-in demo: resmlp_tiny on shapes10, CPU
    python train.py --device gpu --data imagenet/     # ResMLP-S12 on ImageNet (DATA/train, DATA/val)
    python train.py --device gpu --amp --data imagenet/   # the same with float16 matmuls (mixed precision)
    python train.py --amp --amp-dtype bfloat16        # the demo with bfloat16 matmuls (the CPU's default --amp-dtype)
    python train.py --resume runs/X/checkpoint.npz    # continue a run exactly where it stopped
    python train.py --eval-only --resume W --data D   # top-1/top-5 of a checkpoint or published weights
    python train.py --device gpu --data imagenet/ --recipe resmlp-s12   # the paper's recipe, every value

Flags follow DeiT/timm. Without --data, the demo defaults apply (see --help).
"""
import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from minimlp import backend, create_model
from minimlp.training.checkpoint import (ResumeError, check_compatible, check_not_rewinding, read_resume,
                                         restore_for_evaluation, restore_run, where_it_stands)
from minimlp.training.command_line import ArgumentParser
from minimlp.training.config import RECIPES, complete_settings, dataset_defaults
from minimlp.data.datasets import DataError, load_datasets
from minimlp.parallel.distributed import MPIUnavailable, connect
from minimlp.parallel.launcher import rank_from_environment
from minimlp.training.distillation import KINDS as DISTILLATION_TYPES, Distillation
from minimlp.training.ema import ModelEma
from minimlp.data.augmentations import augmentations_line
from minimlp.data.loader import Loader
from minimlp.data.mixup import MODES as MIXUP_MODES, Mixup
from minimlp.model import PRESETS, preset_name
from minimlp.precision import DEFAULT_AMP_DTYPE, HALF_DTYPES, run_precision
from minimlp.data.randaugment import RandAugment
from minimlp.training.run_folder import RunFolder, RunFolderError, new_run_folder, trim_log, write_atomically
from minimlp.data.random_erasing import MODES as ERASING_MODES, RandomErasing
from minimlp.data.sampler import RepeatedAugmentationSampler
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.training.teacher import load_teacher
from minimlp.data.device_feed import IMAGENET_MEAN
from minimlp.data.transforms import TRAIN_INTERPOLATIONS
from minimlp.layers import CrossEntropy
from minimlp.ops import select
from minimlp.optim import make_optimizer
from minimlp.training.evaluation import evaluate
from minimlp.training.signals import Interrupted, quit_on_stop_signals
from minimlp.training.trainer import Trainer
from minimlp.weights import WeightsError
from minimlp.data.workers import WorkerDied

def parse_args(argv=None):
    parser = ArgumentParser(
        description="Train ResMLP (minimlp: NumPy/CuPy, forward and backward by hand) on an ImageFolder dataset. "
                    "Without --data: the built-in demo (resmlp_tiny on generated shapes10 images). With --resume, "
                    "flags not given again keep the checkpoint's values.",
        epilog="Ctrl-C, SIGTERM and SIGHUP (what Slurm, Kubernetes and timeout send before they kill) save a "
               "checkpoint after the current step and exit with 130, 143 and 129 (128 + the signal's number); "
               "a second one quits at once, except while a checkpoint is being written. A loader worker that "
               "dies is replaced and the run goes on unchanged; one that dies 3 times on the same batch stops the "
               "run with a checkpoint and exit code 1. Bad flags, data or checkpoints: one line, exit code 2, "
               "nothing written.")
    a = parser.add_argument
    a("--data", "--data-path", type=Path,
      help="dataset folder with train/<class>/* and val/<class>/* (or the flat ILSVRC2012 val folder with "
           "LOC_val_solution.csv beside it)")
    a("--model", type=preset_name, choices=sorted(PRESETS),
      help="model preset (default: resmlp_tiny demo, resmlp_s12 with --data); DeiT's and timm's names for the "
           "same models work too (resmlp_12, resmlpB_24, resmlp_12_224, ...)")
    a("--img-size", "--input-size", type=int, help="input resolution (default: 32 demo, 224 with --data)")
    a("--patch-size", type=int, help="patch size (default: the preset's: 4 tiny, 16 S12/S24/S36, 8 B24)")
    a("--crop-pct", type=float, help="eval: resize to img_size/crop_pct then center crop (default 0.875; paper 0.9)")
    a("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
      help="RandomResizedCrop area range of the training crops (default: 0.6 1 demo, 0.08 1 with --data)")
    a("--batch-size", type=int, help="images per step (default: 128 demo, 256 with --data)")
    a("--epochs", type=int, help="epochs (default: 15 demo, 300 with --data)")
    a("--opt", choices=["adamw", "lamb"], help="optimizer (default adamw; the paper uses lamb)")
    a("--lr", type=float, help="peak learning rate (default: 3e-3 demo; 5e-4 * batch_size / 512 with --data, "
                               "DeiT's rule)")
    a("--weight-decay", type=float, help="decoupled weight decay on matrices, never on 1-D parameters (default 0.05)")
    a("--warmup-epochs", type=float, help="epochs of linear warmup from --warmup-lr (default: 1 demo, 5 with --data)")
    a("--warmup-lr", type=float, help="learning rate of the first step (default 1e-6)")
    a("--min-lr", type=float, help="learning rate at the end of the cosine (default 1e-5)")
    a("--smoothing", type=float, help="label smoothing (default 0.1)")
    a("--clip-grad", type=float, help="clip the global gradient norm to this; 0 = off (default 0)")
    a("--drop-path", type=float, help="stochastic depth rate, the same in every block (default: 0 demo, 0.05 "
                                      "with --data)")
    a("--recipe", choices=sorted(RECIPES), help="the paper's training recipe for that model: every value of "
      "docs/reference.md's Training recipe (LAMB, lr 5e-3 at batch 2048, weight decay 0.2, 400 epochs, RandAugment, "
      "Mixup/CutMix, erasing, repeated augmentation, ...), printed at start; flags given explicitly win")
    augmentation = parser.add_argument_group(
        "augmentation and regularization (DeiT's flag names; defaults: off for the demo, chosen from the dataset's "
        "size with --data and printed, the paper's with --recipe)")
    a = augmentation.add_argument
    a("--aa", metavar="CONFIG", help="RandAugment after crop and flip, timm's grammar: rand-m9-mstd0.5-inc1 "
                                     "(the paper's: magnitude 9, its noise 0.5, the increasing op set), or none")
    a("--train-interpolation", choices=TRAIN_INTERPOLATIONS,
      help="filter of the train crop and RandAugment's geometric ops (default bicubic as DeiT; bilinear demo)")
    a("--hflip", type=float, help="probability of a horizontal flip (default 0.5; 0 for digits or text)")
    a("--reprob", type=float, help="random erasing: probability per image (paper 0.25)")
    a("--remode", choices=ERASING_MODES, help="random erasing fill: pixel (per-pixel noise, default), rand, const")
    a("--recount", type=int, help="random erasing: at most this many boxes per erased image, 1 to N drawn as in "
                                  "timm (default 1)")
    a("--mixup", type=float, help="Mixup alpha, 0 = off (paper 0.8)")
    a("--cutmix", type=float, help="CutMix alpha, 0 = off (paper 1.0)")
    a("--cutmix-minmax", type=float, nargs=2, metavar=("MIN", "MAX"),
      help="CutMix box sides uniform in MIN..MAX of the image side, instead of --cutmix's alpha (default off)")
    a("--mixup-prob", type=float, help="probability of mixing a batch (default 1.0)")
    a("--mixup-switch-prob", type=float, help="with both on: probability of CutMix rather than Mixup (default 0.5)")
    a("--mixup-mode", choices=MIXUP_MODES, help="one draw per batch (default), per pair or per image")
    a("--repeated-aug", action=argparse.BooleanOptionalAction,
      help="repeated augmentation: each image 3 times per epoch, differently augmented, the epoch kept at the "
           "dataset's length (DeiT's RASampler)")
    a("--model-ema", action=argparse.BooleanOptionalAction,
      help="keep an exponential moving average of the weights, evaluated each epoch beside them and checkpointed "
           "(default off; with --eval-only: evaluate the checkpoint's average)")
    a("--model-ema-decay", type=float, help="the average's decay per step (default 0.99996)")
    a("--distillation-type", choices=DISTILLATION_TYPES,
      help="DeiT's distillation from --teacher-model on the same augmented batch: soft (KL at --distillation-tau) "
           "or hard (the teacher's top class); default none")
    a("--distillation-alpha", type=float, help="weight of the distillation term (default 0.5)")
    a("--distillation-tau", type=float, help="temperature of soft distillation (default 1.0)")
    a("--teacher-model", help="a minimlp preset (run by minimlp) or a timm model name such as regnety_160, DeiT's "
                              "(run by PyTorch on the same device; needs torch and timm)")
    a("--teacher-path", type=Path, help="the teacher's weights: .npz/.safetensors/checkpoint for a minimlp "
                                        "preset, a PyTorch .pth for a timm model")
    a = parser.add_argument
    a("--workers", type=int, default=os.cpu_count(), help=f"data loading processes; 0 = in the main process "
                                                         f"(default: the number of cores, {os.cpu_count()})")
    a("--seed", type=int, help="seed of initialization, shuffling, augmentation and drop path (default 0)")
    a("--device", choices=["auto", "cpu", "gpu"], default="auto",
      help="auto (the default) takes the GPU when CuPy and a GPU are present, and says which it chose")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True,
      help="GPU: float32 matrix products on TF32 tensor cores (10-bit mantissa inputs, float32 accumulation; "
           "default on); --no-tf32 for full float32")
    a("--fast", action=argparse.BooleanOptionalAction, default=True,
      help="the fast path: fused CUDA kernels on the GPU, fused multi-threaded Numba loops on the CPU (where Numba "
           "is installed); same results as the reference layers (tested). --no-fast runs the reference only")
    a("--amp", action=argparse.BooleanOptionalAction,
      help="mixed precision: 16-bit matrix-product inputs (--amp-dtype) with float32 accumulation, float32 weights "
           "and optimizer state (default off)")
    a("--amp-dtype", choices=HALF_DTYPES,
      help="--amp's 16-bit type: float16 (dynamic loss scaling; emulated on the CPU) or bfloat16 (float32's range: "
           "no loss scaling). Default: float16 on the GPU, bfloat16 on the CPU; a resume keeps the checkpoint's")
    a("--output", type=Path, help="run folder for log.jsonl, checkpoint.npz, best.npz (default: a new "
                                  "runs/<model>-<date>-<time>[-N], or the resumed checkpoint's folder). A folder that "
                                  "holds another run's results is refused (continue that run with --resume, or give "
                                  "another --output), and so is one a live run is writing to (run.lock)")
    a("--resume", type=Path, help="continue from a checkpoint.npz exactly; with --eval-only also published weights "
                                  "(.npz or .safetensors, official or timm names). Resuming an older checkpoint "
                                  "(best.npz) beside a newer checkpoint.npz is refused: branch off into another "
                                  "--output")
    a("--save-every", type=float, metavar="MINUTES",
      help="also save checkpoint.npz every MINUTES inside an epoch, so that a kill -9 or a power cut loses at most "
           "that much (default 30; 0 = only at the end of each epoch)")
    a("--eval-only", "--eval", action="store_true", help="evaluate --resume on the val split and exit")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        world = connect()  # MPIWorld under mpiexec (data parallel: minimlp.parallel.distributed), else SingleProcess
    except MPIUnavailable as error:  # every rank fails alike, without MPI to agree: rank 0 says so
        if rank_from_environment() == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    world.quiet_other_ranks()
    return world.exit(run_and_report(args, world))


def run_and_report(args, world):
    """run(args, world); an error becomes one line on stderr and the exit code."""
    try:
        with quit_on_stop_signals():
            return run(args, world)
    except Interrupted as stop:  # a signal or a dead worker during training: a checkpoint was saved
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # a signal outside the training loop (scanning data, evaluating), or a second
        print(f"interrupted{f' ({stop})' if str(stop) else ''}", file=sys.stderr)
        return getattr(stop, "exit_code", 130)
    except WorkerDied as error:  # outside the training loop (--eval-only): nothing to save
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (DataError, WeightsError, ResumeError, RunFolderError, backend.DeviceError, ValueError,
            FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except backend.out_of_memory_errors() as error:
        print(f"error: {backend.out_of_memory_advice(args.batch_size, error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder the run cannot read or write, e.g. --output without permission
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args, world):
    # Data parallel: rank 0 reads the checkpoint and sends it to every rank (no shared filesystem needed).
    checkpoint = world.from_writer(lambda: read_resume(args.resume, args.eval_only)) if args.resume else None
    args.world_size = world.size  # --batch-size is per rank; the learning-rate rules use the global batch
    meta = checkpoint[2] if checkpoint else None
    evaluate_ema = bool(args.eval_only and args.model_ema)  # asked for now, not a setting kept from the checkpoint
    for line in world.together(lambda: complete_settings(args, meta)):  # a bad flag: every rank says so
        print(line)
    backend.set_tf32(args.tf32)  # before any GPU work: CuPy reads it at its first float32 matmul
    world.use_local_gpu(args.device)  # rank r takes GPU local_rank of its machine
    device = backend.resolve_device(args.device)
    print(f"device: {device}" + (" (auto: no CUDA GPU with CuPy found)" if args.device == "auto" and device == "cpu"
                                 else f" (TF32 matmuls {'on' if args.tf32 else 'off'})" if device == "gpu" else ""))
    if args.amp_dtype is None:  # not given, nor kept from a checkpoint: the device's fast one
        args.amp_dtype = DEFAULT_AMP_DTYPE[device]
    precision, line = run_precision(args.amp_dtype if args.amp else "float32", device)  # bfloat16 CPU: its library
    if line:
        print(line)
    data = args.data
    if data is None:
        if world.is_writer:  # one rank generates it; the others wait (one machine) or make their own
            ensure_shapes_dataset()
        world.barrier()
        data = ensure_shapes_dataset()
        print(f"no --data given: the demo, {args.model} on the built-in shapes10 dataset in {data}")
    train_set, val_set = world.together(lambda: load_datasets(data))
    for line in world.together(lambda: dataset_defaults(args, len(train_set))):
        if not args.eval_only:  # (training settings: nothing an evaluation uses)
            print(line)
    # every rank the same flags and code, or none starts (--workers: each machine's own cores)
    world.check_same({key: value for key, value in settings_of(args).items() if key != "workers"})
    description = world.describe(device)
    if description:
        print(description + f"; global batch {world.size} x {args.batch_size} = {world.size * args.batch_size}")
    if meta is not None:
        world.together(lambda: check_compatible(args.resume, meta, vars(args), train_set.classes, args.eval_only))
    operations = select(device, "float32", args.fast)  # given to the model, the loss and the optimizer
    model = create_model(args.model, num_classes=len(train_set.classes), img_size=args.img_size,
                         patch_size=args.patch_size, drop_path=args.drop_path, device=device, seed=args.seed,
                         ops=operations)
    model.drop_path_shard = (world.rank, world.size)  # the rank's slice of the global batch's masks
    print(f"model: {args.model}, {model.num_params() / 1e6:.2f}M parameters, {model.num_patches} patches, "
          f"{operations.name} operations; "
          f"data: {len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes")
    if not args.eval_only:  # every augmentation that is on, whatever chose it (a flag, --data, --recipe)
        print(augmentations_line(args))
    val_loader = Loader(val_set, args.batch_size, train=False, img_size=args.img_size, crop_pct=args.crop_pct,
                        seed=args.seed, workers=args.workers, world=world)
    if args.eval_only:
        restore_for_evaluation(args.resume, checkpoint, model, use_ema=evaluate_ema)
        with val_loader:
            metrics = evaluate(model, val_loader, matmul_dtype=precision.matmul_dtype, world=world)
        print(f"{args.resume}{' (EMA)' if evaluate_ema else ''}: top-1 {metrics['val_top1']:.2f}%  "
              f"top-5 {metrics['val_top5']:.2f}%  "
              f"val loss {metrics['val_loss']:.4f}  ({len(val_set)} images)")
        return 0
    auto_augment = (None if args.aa == "none" else
                    RandAugment(args.aa, img_mean=IMAGENET_MEAN, interpolation=args.train_interpolation))
    sampler = (RepeatedAugmentationSampler(len(train_set), args.seed, num_replicas=world.size, rank=world.rank)
               if args.repeated_aug else None)
    train_loader = Loader(train_set, args.batch_size, train=True, img_size=args.img_size, scale=tuple(args.scale),
                          seed=args.seed, workers=args.workers, interpolation=args.train_interpolation,
                          hflip=args.hflip, auto_augment=auto_augment, sampler=sampler, world=world)
    optimizer = make_optimizer(args.opt, model.parameters, operations, args.lr, args.weight_decay)
    ema = ModelEma(model.parameters.data, args.model_ema_decay) if args.model_ema else None
    erasing = RandomErasing.from_flags(args.reprob, args.remode, args.recount) if args.reprob > 0 else None
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(len(train_set.classes), args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob,
                      args.mixup_switch_prob, args.mixup_mode, label_smoothing=args.smoothing)
    criterion = CrossEntropy(operations, 0.0 if mixup else args.smoothing)  # Mixup's soft targets hold the smoothing
    distillation = None
    if args.distillation_type != "none":
        teacher = load_teacher(args.teacher_model, args.teacher_path, len(train_set.classes), args.img_size, device,
                               fast=args.fast)
        print(f"teacher: {teacher.description}, {args.distillation_type} distillation, alpha "
              f"{args.distillation_alpha:g}" + (f", tau {args.distillation_tau:g}" if args.distillation_type == "soft"
                                                else ""))
        distillation = Distillation(teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)
    output = args.output or (args.resume.parent if args.resume else None)
    continuing = bool(args.resume) and output is not None and output.resolve() == args.resume.parent.resolve()
    if args.resume:
        world.together(lambda: check_not_rewinding(args.resume, meta, output))  # every rank refuses at once
    position = None
    if checkpoint:
        position = restore_run(args.resume, checkpoint, model, optimizer, precision, args.weight_decay, ema)
        print(f"resumed from {args.resume}: at {where_it_stands(position)}")
    if position is not None and position["epoch"] >= args.epochs:  # before anything is written
        print(f"nothing to do: the checkpoint is at {where_it_stands(position)}, and --epochs is {args.epochs} "
              "(give a larger --epochs to go on)")
        return 0
    if output is None:  # rank 0 names it (data parallel)
        output = world.from_writer(lambda: new_run_folder("runs", f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"))
    with RunFolder.claim(output, continuing) if world.is_writer else contextlib.nullcontext():  # rank 0 writes
        if world.is_writer:
            write_atomically(output / "config.json", lambda file: file.write(
                (json.dumps(settings_of(args), indent=2) + "\n").encode()))
        if world.is_writer and position is not None and trim_log(output / "log.jsonl", position["epoch"]):
            print(f"{output / 'log.jsonl'}: dropped the lines past the checkpoint's epoch {position['epoch']} "
                  "(written just before a kill), to be written again")
        print(f"output: {output}")
        with train_loader, val_loader:
            trainer = Trainer(model, criterion, optimizer, train_loader, val_loader, train_set.classes,
                              settings_of(args), output, position, precision, erasing=erasing, mixup=mixup, ema=ema,
                              distillation=distillation, world=world)
            record = trainer.fit()
    print(f"done: top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% after {record['epoch']} "
          f"epochs (best top-1 {trainer.position['best_top1']:.2f}%); checkpoints in {output}")
    return 0


def settings_of(args):
    """The run's configuration, JSON-ready (saved in config.json and in every checkpoint)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


if __name__ == "__main__":
    sys.exit(main())
