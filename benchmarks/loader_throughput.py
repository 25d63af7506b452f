"""Images/s that minimlp.data.loader.Loader delivers from ImageNet-sized JPEGs, with 0, 1, 2, ... worker
processes (train transform: RandomResizedCrop 224 + flip, optionally RandAugment), to set against what
the GPU consumes (benchmarks/gpu_train_step.py). Writes --images random-content JPEGs of 500x375 (the
typical ImageNet size, quality 90) into a temporary folder, then times whole epochs after one untimed
warm-up epoch.

    python benchmarks/loader_throughput.py                    # workers 0, 1, ..., os.cpu_count()
    python benchmarks/loader_throughput.py --workers 0 4 8 16 --images 512
    python benchmarks/loader_throughput.py --aa rand-m9-mstd0.5-inc1 --train-interpolation bicubic  # DeiT's
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimlp.data.datasets import ImageFolder  # noqa: E402
from minimlp.data.loader import Loader  # noqa: E402
from minimlp.data.randaugment import RandAugment  # noqa: E402
from minimlp.data.transforms import TRAIN_INTERPOLATIONS  # noqa: E402


def write_jpegs(folder, count, rng):
    """count JPEGs of 500x375 whose content is smooth noise (compresses like a photo, not like a flat
    image or white noise: the decode cost depends on it)."""
    samples = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        grain = rng.integers(-12, 13, size=(375, 500, 3))
        picture = Image.fromarray(np.clip(np.asarray(picture) + grain, 0, 255).astype(np.uint8))
        path = Path(folder) / f"{index:05d}.JPEG"
        picture.save(path, quality=90)
        samples.append((str(path), index % 10))
    return ImageFolder(folder, [str(label) for label in range(10)], samples)


def images_per_second(dataset, workers, batch_size, img_size, interpolation="bilinear", auto_augment=None):
    with Loader(dataset, batch_size=batch_size, train=True, img_size=img_size, seed=0, workers=workers,
                interpolation=interpolation, auto_augment=auto_augment) as loader:  # --train-interpolation, --aa
        for _ in loader.epoch(0):  # warm-up: starts the worker processes, fills the file cache
            pass
        started = time.perf_counter()
        delivered = sum(len(labels) for _, labels in loader.epoch(1))
        return delivered / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=list(range(os.cpu_count() + 1)))
    parser.add_argument("--aa", default=None, metavar="CONFIG",
                        help="RandAugment after crop and flip, timm's grammar, e.g. rand-m9-mstd0.5-inc1 (DeiT's)")
    parser.add_argument("--train-interpolation", default="bilinear", choices=TRAIN_INTERPOLATIONS,
                        help="filter of the train crop (and of RandAugment's geometric ops); DeiT uses bicubic")
    args = parser.parse_args()
    try:
        auto_augment = None if args.aa is None else RandAugment(args.aa, interpolation=args.train_interpolation)
    except ValueError as error:
        parser.error(f"--aa: {error}")
    with tempfile.TemporaryDirectory() as folder:
        dataset = write_jpegs(folder, args.images, np.random.default_rng(0))
        augmentation = f", RandAugment {args.aa}" if args.aa else ""
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.images} JPEGs "
              f"500x375 q90, train transform {args.img_size} px ({args.train_interpolation}{augmentation}), "
              f"batch {args.batch_size}")
        print("| workers | images/s |\n|---|---|")
        for workers in args.workers:
            rate = images_per_second(dataset, workers, args.batch_size, args.img_size, args.train_interpolation,
                                     auto_augment)
            print(f"| {workers} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
