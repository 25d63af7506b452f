"""Train and evaluate ResMLP on an ImageFolder dataset, end to end, resumable.

    python train.py                                   # the built-in demo: resmlp_tiny on shapes10, CPU
    python train.py --device gpu --data imagenet/     # ResMLP-S12 on ImageNet (DATA/train, DATA/val)
    python train.py --device gpu --amp --data imagenet/   # the same with float16 matmuls (mixed precision)
    python train.py --resume runs/X/checkpoint.npz    # continue a run exactly where it stopped
    python train.py --eval-only --resume W --data D   # top-1/top-5 of a checkpoint or published weights

Flags follow DeiT/timm. Without --data, the demo defaults apply (see --help).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from minimlp import backend, create_model
from minimlp.checkpoint import check_compatible, read_resume, restore_run
from minimlp.config import complete_settings
from minimlp.datasets import DataError, load_datasets
from minimlp.loader import Loader
from minimlp.loss_scaling import LossScaler, NoLossScaling
from minimlp.model import PRESETS
from minimlp.precision import AMP_DTYPE
from minimlp.synthetic import ensure_shapes_dataset
from minimlp.trainer import Interrupted, Trainer, evaluate, make_optimizer
from minimlp.weights import WeightsError

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train ResMLP (minimlp: NumPy/CuPy, forward and backward by hand) on an ImageFolder dataset. "
                    "Without --data: the built-in demo (resmlp_tiny on generated shapes10 images). With --resume, "
                    "flags not given again keep the checkpoint's values.")
    a = parser.add_argument
    a("--data", type=Path, help="dataset folder with train/<class>/* and val/<class>/* (or the flat ILSVRC2012 "
                                "val folder with LOC_val_solution.csv beside it)")
    a("--model", choices=sorted(PRESETS), help="model preset (default: resmlp_tiny demo, resmlp_s12 with --data)")
    a("--img-size", type=int, help="input resolution (default: 32 demo, 224 with --data)")
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
      help=f"mixed precision: {AMP_DTYPE.name} matrix-product inputs with float32 accumulation, float32 weights "
           "and optimizer state, dynamic loss scaling (default off; works on the CPU too, emulated)")
    a("--output", type=Path, help="run folder for log.jsonl, checkpoint.npz, best.npz (default: runs/<model>-<time>, "
                                  "or the resumed checkpoint's folder)")
    a("--resume", type=Path, help="continue from a checkpoint.npz exactly; with --eval-only also published weights "
                                  "(.npz or .safetensors, official or timm names)")
    a("--eval-only", action="store_true", help="evaluate --resume on the val split and exit")
    args = parser.parse_args(argv)
    if args.eval_only and not args.resume:
        parser.error("--eval-only needs --resume CHECKPOINT_OR_WEIGHTS")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (scanning data, evaluating), or a second one
        print("interrupted", file=sys.stderr)
        return 130
    except (DataError, WeightsError, backend.DeviceError, ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except backend.out_of_memory_errors() as error:
        print(f"error: the GPU ran out of memory with --batch-size {args.batch_size} ({error}): "
              f"try a smaller --batch-size, e.g. {max(args.batch_size // 2, 1)}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder the run cannot read or write, e.g. --output without permission
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args):
    checkpoint = read_resume(args.resume, args.eval_only) if args.resume else None
    meta = checkpoint[2] if checkpoint else None
    complete_settings(args, meta)
    backend.set_tf32(args.tf32)  # before any GPU work: CuPy reads it at its first float32 matmul
    device = backend.resolve_device(args.device)
    print(f"device: {device}" + (" (auto: no CUDA GPU with CuPy found)" if args.device == "auto" and device == "cpu"
                                 else f" (TF32 matmuls {'on' if args.tf32 else 'off'})" if device == "gpu" else ""))
    if args.amp:
        print(f"mixed precision: {AMP_DTYPE.name} matmul inputs, float32 accumulation, weights and optimizer state; "
              "dynamic loss scaling" + (" (emulated on the CPU: slower, not faster)" if device == "cpu" else ""))
    data = args.data
    if data is None:
        data = ensure_shapes_dataset()
        print(f"no --data given: the demo, {args.model} on the built-in shapes10 dataset in {data}")
    train_set, val_set = load_datasets(data)
    if meta is not None:
        check_compatible(args.resume, meta, vars(args), train_set.classes, args.eval_only)
    model = create_model(args.model, num_classes=len(train_set.classes), img_size=args.img_size,
                         patch_size=args.patch_size, drop_path=args.drop_path, device=device, seed=args.seed, fast=args.fast)
    print(f"model: {args.model}, {model.num_params() / 1e6:.2f}M parameters, {model.num_patches} patches, "
          f"{model.ops.name} operations; "
          f"data: {len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes")
    val_loader = Loader(val_set, args.batch_size, train=False, img_size=args.img_size, crop_pct=args.crop_pct,
                        seed=args.seed, workers=args.workers)
    if args.eval_only:
        model.load_state_dict(checkpoint[0])
        with val_loader:
            metrics = evaluate(model, val_loader, amp=args.amp)
        print(f"{args.resume}: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
              f"val loss {metrics['val_loss']:.4f}  ({len(val_set)} images)")
        return 0
    train_loader = Loader(train_set, args.batch_size, train=True, img_size=args.img_size, scale=tuple(args.scale),
                          seed=args.seed, workers=args.workers)
    optimizer = make_optimizer(args.opt, model, args.lr, args.weight_decay)
    scaler = LossScaler() if args.amp else NoLossScaling()
    position = None
    if checkpoint:
        position = restore_run(checkpoint, model, optimizer, scaler, args.weight_decay)
        print(f"resumed from {args.resume}: epoch {position['epoch'] + 1}, batch {position['batch']}")
    output = args.output or (args.resume.parent if args.resume else
                             Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(settings_of(args), indent=2) + "\n")
    print(f"output: {output}")
    with train_loader, val_loader:
        trainer = Trainer(model, optimizer, train_loader, val_loader, train_set.classes, settings_of(args), output,
                          position, scaler)
        record = trainer.fit()
    if record:
        print(f"done: top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% after {record['epoch']} "
              f"epochs (best top-1 {trainer.position['best_top1']:.2f}%); checkpoints in {output}")
    else:
        print(f"nothing to do: the checkpoint is at epoch {position['epoch'] + 1}, batch {position['batch']}, "
              f"and --epochs is {args.epochs} (give a larger --epochs to go on)")
    return 0


def settings_of(args):
    """The run's configuration, JSON-ready (saved in config.json and in every checkpoint)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


if __name__ == "__main__":
    sys.exit(main())
