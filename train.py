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
import contextlib
import json
import sys
import time
from pathlib import Path

from minimlp import backend, create_model
from minimlp.training.checkpoint import (ResumeError, check_compatible, check_not_rewinding, read_resume,
                                         restore_for_evaluation, restore_run, where_it_stands)
from minimlp.training.command_line import ArgumentParser
from minimlp.training.settings import add_arguments
from minimlp.training.config import DataFacts, complete_settings, dataset_defaults
from minimlp.training.estimates import RunTimeEstimate, memory_line
from minimlp.data.datasets import DataError, load_datasets
from minimlp.parallel.distributed import MPIUnavailable, connect
from minimlp.parallel.launcher import rank_from_environment
from minimlp.training.distillation import Distillation
from minimlp.training.ema import ModelEma
from minimlp.data.augmentations import augmentations_line
from minimlp.data.loader import Loader
from minimlp.data.mixup import Mixup
from minimlp.precision import DEFAULT_AMP_DTYPE, run_precision
from minimlp.data.randaugment import RandAugment
from minimlp.training.progress import write
from minimlp.training.run_folder import (RunFolder, RunFolderError, new_run_folder, refuse_results, trim_log,
                                        write_atomically)
from minimlp.data.random_erasing import RandomErasing
from minimlp.data.sampler import RepeatedAugmentationSampler
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.training.teacher import load_teacher
from minimlp.data.device_feed import IMAGENET_MEAN
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
    add_arguments(parser)  # every flag, from the settings table (minimlp.training.settings)
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
    notes = world.together(lambda: complete_settings(args, meta))  # a bad flag: every rank says so
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
    facts = DataFacts(train_set.samples, len(train_set.classes), len(val_set), device)
    derived = world.together(lambda: dataset_defaults(args, facts))
    # every rank the same flags and code, or none starts (--workers: each machine's own cores)
    world.check_same({key: value for key, value in settings_of(args).items() if key != "workers"})
    description = world.describe(device)
    if description:
        print(description + f"; global batch {world.size} x {args.batch_size} = {world.size * args.batch_size}")
    if meta is not None:
        world.together(lambda: check_compatible(args.resume, meta, vars(args), train_set.classes, args.eval_only))
    output = args.output or (args.resume.parent if args.resume else None)
    continuing = bool(args.resume) and output is not None and output.resolve() == args.resume.parent.resolve()
    if not args.eval_only:  # the refusals first, then the defaults chosen (training settings: none for evaluation)
        train_loader = world.together(lambda: train_loader_of(args, train_set, world))  # a batch larger than the set
        if args.resume:
            world.together(lambda: check_not_rewinding(args.resume, meta, output))  # every rank refuses at once
        if output is not None and world.is_writer:
            refuse_results(output, continuing)
        notes += derived + [world.together(lambda: memory_line(args, facts.num_classes, device, facts.memory_bytes))]
    for line in notes:
        print(line)
    operations = select(device, "float32", args.fast)  # given to the model, the loss and the optimizer
    if operations.name == "cpu_kernels" and world.is_writer:  # a line when Numba compiles them (the first run)
        from minimlp.fast.cpu_kernels import say_when_compiling  # Numba is there: select chose its loops
        say_when_compiling(write)
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
    optimizer = make_optimizer(args.opt, model.parameters, operations, args.lr, args.weight_decay, args.opt_eps,
                               args.opt_betas)
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
    position = None
    if checkpoint:
        position = restore_run(args.resume, checkpoint, model, optimizer, precision, args.weight_decay, ema)
        optimizer.eps = args.opt_eps  # the run's, as --weight-decay's (the checkpoint's unless given again)
        if args.opt_betas is not None:
            optimizer.betas = tuple(args.opt_betas)
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
                              distillation=distillation, world=world,
                              run_estimate=RunTimeEstimate(args.epochs * len(train_loader), len(train_loader),
                                                           len(val_loader.eval_order), args.batch_size, device))
            record = trainer.fit()
    print(f"done: top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% after {record['epoch']} "
          f"epochs (best top-1 {trainer.position['best_top1']:.2f}%); checkpoints in {output}")
    return 0


def train_loader_of(args, train_set, world):
    auto_augment = (None if args.aa == "none" else
                    RandAugment(args.aa, img_mean=IMAGENET_MEAN, interpolation=args.train_interpolation))
    sampler = (RepeatedAugmentationSampler(len(train_set), args.seed, num_replicas=world.size, rank=world.rank)
               if args.repeated_aug else None)
    return Loader(train_set, args.batch_size, train=True, img_size=args.img_size, scale=tuple(args.scale),
                  seed=args.seed, workers=args.workers, interpolation=args.train_interpolation, hflip=args.hflip,
                  auto_augment=auto_augment, sampler=sampler, world=world)


def settings_of(args):
    """The run's configuration, JSON-ready (saved in config.json and in every checkpoint)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


if __name__ == "__main__":
    sys.exit(main())
