"""A few training steps through the library, as one process or as one rank of `mpiexec -n K`, for
tests/test_distributed.py: K ranks x --batch-size b must end where one process x K*b ends.

    python tests/data_parallel_run.py OUT --data D --batch-size 16 --steps 6            # one process
    mpiexec -n 2 python tests/data_parallel_run.py OUT --data D --batch-size 8 --steps 6  # two ranks

Repeated augmentation, drop path, label smoothing and gradient clipping are on; --dtype float64 makes
the comparison exact to rounding. Rank 0 writes OUT/weights.npz and OUT/result.json (the evaluation of
the sharded validation set, with the number of images each rank saw).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minimlp import create_model  # noqa: E402
from minimlp.data.datasets import load_datasets  # noqa: E402
from minimlp.data.device_feed import DeviceFeed  # noqa: E402
from minimlp.parallel.distributed import MPIWorld, SingleProcess  # noqa: E402
from minimlp.parallel.launcher import launched_by_mpi  # noqa: E402
from minimlp.data.loader import Loader  # noqa: E402
from minimlp.precision import policy  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.data.sampler import RepeatedAugmentationSampler  # noqa: E402
from minimlp.step import train_step  # noqa: E402
from minimlp.training.evaluation import evaluate  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--bucket-bytes", type=int, default=64 * 1024)  # small: several buckets for resmlp_tiny
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--drop-path", type=float, default=0.2)
    args = parser.parse_args()
    world = MPIWorld(bucket_bytes=args.bucket_bytes) if launched_by_mpi() else SingleProcess()
    world.use_local_gpu(args.device)
    train_set, val_set = load_datasets(args.data)
    model = create_model("resmlp_tiny", num_classes=len(train_set.classes), img_size=16, drop_path=args.drop_path,
                         dtype=args.dtype, device=args.device, seed=3)
    model.drop_path_shard = (world.rank, world.size)
    sampler = RepeatedAugmentationSampler(len(train_set), seed=3, repeats=3, num_replicas=world.size, rank=world.rank)
    train_loader = Loader(train_set, args.batch_size, train=True, img_size=16, seed=3, workers=0, sampler=sampler,
                          scale=(0.5, 1.0), world=world)
    val_loader = Loader(val_set, args.batch_size, train=False, img_size=16, workers=0, world=world)
    optimizer = AdamW(model.parameters, model.ops, lr=2e-3, weight_decay=0.05)
    feed = DeviceFeed(model.device, model.dtype)
    step, epoch = 0, 0
    while step < args.steps:
        for images, labels in feed.batches(train_loader.epoch(epoch)):
            train_step(model, optimizer, images, labels, lr=2e-3, precision=policy("float32"), smoothing=0.1,
                       clip_grad=1.0, sync=world if world.size > 1 else None)
            step += 1
            if step == args.steps:
                break
        epoch += 1
    metrics = evaluate(model, val_loader, feed, world=world)
    images_seen = world.sum([len(val_loader.epoch_order(0))]).tolist()[0]
    if world.is_writer:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "weights.npz", **model.state_dict())
        (args.out / "result.json").write_text(json.dumps(dict(metrics, val_images=images_seen, steps=step,
                                                              epochs=epoch, batches_per_epoch=len(train_loader))))


if __name__ == "__main__":
    main()
