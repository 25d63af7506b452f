"""One full training step (forward, backward, AdamW) of ResMLP on the CPU, minimlp against timm's ResMLP
in PyTorch eager, in the same run, on the same machine. Prints images/s for each and the ratio.

    python benchmarks/train_step.py                          # ResMLP-S12, 224 px, batch 32, float32

Each side runs --warmup untimed steps, then --steps timed ones; the median step time is reported.
The GPU has its own, fuller benchmark: benchmarks/gpu_train_step.py. This is a benchmark, not a test:
it asserts nothing.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimlp import create_model  # noqa: E402
from minimlp.losses import cross_entropy  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.weights import official_to_timm  # noqa: E402

TIMM_NAMES = {"resmlp_s12": "resmlp_12_224", "resmlp_s24": "resmlp_24_224", "resmlp_s36": "resmlp_36_224",
              "resmlp_b24": "resmlp_big_24_224"}


def median_step_seconds(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def minimlp_step_seconds(args, images, labels):
    model = create_model(args.model, device="cpu", dtype="float32", seed=0)
    optimizer = AdamW(model, lr=1e-4, weight_decay=0.05)
    x, y = images, labels

    def step():
        _, dlogits = cross_entropy(model.forward(x, train=True), y, smoothing=0.1)
        model.backward(dlogits)
        optimizer.step()

    return median_step_seconds(step, args.warmup, args.steps), model.state_dict()


def torch_step_seconds(args, images, labels, weights):
    from minimlp.twins import timm, torch
    torch.set_num_threads(os.cpu_count())
    model = timm.create_model(TIMM_NAMES[args.model])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in official_to_timm(weights).items()})
    decay = [p for p in model.parameters() if p.ndim > 1 and p.shape[:2] != (1, 1)]
    no_decay = [p for p in model.parameters() if not (p.ndim > 1 and p.shape[:2] != (1, 1))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0}],
                                  lr=1e-4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return median_step_seconds(step, args.warmup, args.steps), torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resmlp_s12", choices=sorted(TIMM_NAMES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, 1000, size=args.batch_size)

    ours, weights = minimlp_step_seconds(args, images, labels)
    theirs, torch_version = torch_step_seconds(args, images, labels, weights)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}, "
          f"torch {torch_version}; {args.model}, 224 px, batch {args.batch_size}, float32, cpu; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"minimlp            {ours:8.3f} s/step  {args.batch_size / ours:8.1f} images/s")
    print(f"PyTorch eager timm {theirs:8.3f} s/step  {args.batch_size / theirs:8.1f} images/s")
    print(f"minimlp / PyTorch speed: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
