"""One full training step on the CPU (forward, loss, backward, AdamW), minimlp against the same model in timm
and PyTorch eager, side by side on the same machine. Prints seconds per step, images/s and the ratio.

    python benchmarks/train_step.py                  # both rows: ResMLP-S12 (224 px, batch 32) and the demo
                                                     # model resmlp_tiny (32 px, batch 128), float32
    python benchmarks/train_step.py --rows s12 --rounds 5

minimlp runs its one training step (minimlp.step.train_step) with the fast path the model chooses
(minimlp/fast/cpu_kernels.py; `--no-fast` times the reference layers, `--no-keep-freed-memory` the fast path
with glibc's default allocator settings); PyTorch runs timm's model with the
same weights (`resmlp_12_224` for S12, an MlpMixer/ResBlock/Affine twin for resmlp_tiny), the same
label smoothing and torch.optim.AdamW with the same two parameter groups.

Interleaved: each round times minimlp and PyTorch once each, each side in a fresh process of its own
(alternating which goes first), so neither inherits the other's threads, allocator state or
environment: minimlp's thread and allocator settings (minimlp/fast/cpu_settings.py) apply in its own process
only, and PyTorch runs with its defaults. Each process does --warmup untimed steps, then --steps timed ones, and reports
their median; a row reports the median over the rounds, and every round's ratio. A benchmark, not a
test: it asserts nothing.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENVIRONMENT = dict(os.environ)  # as given: each side's process starts from it (minimlp's settings are its own)
import minimlp  # noqa: E402,F401  before NumPy: its thread settings (minimlp/fast/cpu_settings.py) must come first
import numpy as np  # noqa: E402

ROWS = {  # name: (minimlp model, image size, batch size, timm model or None for the built twin)
    "s12": ("resmlp_s12", 224, 32, "resmlp_12_224"),
    "demo": ("resmlp_tiny", 32, 128, None),
}


def cpu_model():
    """The CPU's model name, as lscpu and /proc/cpuinfo give it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def batch_of(row):
    model_name, img_size, batch_size, _ = ROWS[row]
    rng = np.random.default_rng(0)
    classes = 1000 if model_name == "resmlp_s12" else 10
    return (rng.normal(size=(batch_size, 3, img_size, img_size)).astype(np.float32),
            rng.integers(0, classes, size=batch_size))


def median_step_seconds(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_minimlp(row, warmup, steps, fast, keep_freed_memory):
    from minimlp.fast import cpu_settings
    from minimlp import create_model
    from minimlp.loss_scaling import NoLossScaling
    from minimlp.optim import AdamW
    from minimlp.step import train_step
    images, labels = batch_of(row)
    if not keep_freed_memory:  # to measure what the allocator setting buys: glibc's defaults stay
        cpu_settings.keep_freed_memory = lambda: False
    model = create_model(ROWS[row][0], seed=0, fast=fast)
    optimizer, scaler = AdamW(model.parameters, model.ops, lr=1e-4, weight_decay=0.05), NoLossScaling()

    def step():
        train_step(model, optimizer, images, labels, 1e-4, scaler, smoothing=0.1)

    return dict(seconds=median_step_seconds(step, warmup, steps), version=np.__version__, path=model.ops.name)


def time_pytorch(row, warmup, steps):
    from minimlp import create_model
    from minimlp.tools.pytorch_references import timm, timm_twin, torch
    from minimlp.weights import official_to_timm
    images, labels = batch_of(row)
    ours = create_model(ROWS[row][0], seed=0, fast=False)  # only for its weights and configuration
    if ROWS[row][3] is None:
        model = timm_twin(ours, dtype=torch.float32)
    else:
        model = timm.create_model(ROWS[row][3])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in official_to_timm(ours.state_dict()).items()})
    decay = [p for p in model.parameters() if p.ndim > 1 and p.shape[:2] != (1, 1)]  # timm's Affine is (1, 1, d)
    no_decay = [p for p in model.parameters() if not (p.ndim > 1 and p.shape[:2] != (1, 1))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0}],
                                  lr=1e-4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return dict(seconds=median_step_seconds(step, warmup, steps), version=torch.__version__,
                threads=torch.get_num_threads())


def run_side(side, row, args):
    """One side of one round in a fresh process; returns its JSON report."""
    command = [sys.executable, __file__, "--side", side, "--rows", row, "--warmup", str(args.warmup),
               "--steps", str(args.steps)] + ([] if args.fast else ["--no-fast"]) + \
        ([] if args.keep_freed_memory else ["--no-keep-freed-memory"])
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENVIRONMENT)
    if result.returncode != 0:
        raise SystemExit(f"{side} {row} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="minimlp's fast path (default) or, with --no-fast, the reference layers")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="the fast path's allocator setting (default; minimlp/fast/cpu_kernels.py), or glibc's defaults")
    parser.add_argument("--side", choices=["minimlp", "pytorch"], help=argparse.SUPPRESS)  # one side, in a child
    args = parser.parse_args()
    if args.side:
        row = args.rows[0]
        report = (time_minimlp(row, args.warmup, args.steps, args.fast, args.keep_freed_memory) if args.side == "minimlp"
                  else time_pytorch(row, args.warmup, args.steps))
        print(json.dumps(report))
        return

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} interleaved rounds, float32")
    for row in args.rows:
        model_name, img_size, batch_size, _ = ROWS[row]
        reports = {"minimlp": [], "pytorch": []}
        for round_index in range(args.rounds):
            order = ["minimlp", "pytorch"] if round_index % 2 == 0 else ["pytorch", "minimlp"]
            for side in order:
                reports[side].append(run_side(side, row, args))
        ours = statistics.median(r["seconds"] for r in reports["minimlp"])
        theirs = statistics.median(r["seconds"] for r in reports["pytorch"])
        ratios = [t["seconds"] / o["seconds"] for o, t in zip(reports["minimlp"], reports["pytorch"])]
        print(f"\n{model_name}, {img_size} px, batch {batch_size}:")
        print(f"  minimlp ({reports['minimlp'][0]['path']}, numpy {reports['minimlp'][0]['version']})"
              f"  {ours:7.3f} s/step  {batch_size / ours:8.1f} images/s")
        print(f"  PyTorch eager {reports['pytorch'][0]['version']} ({reports['pytorch'][0]['threads']} threads)"
              f"  {theirs:7.3f} s/step  {batch_size / theirs:8.1f} images/s")
        print(f"  minimlp / PyTorch speed: {theirs / ours:.2f}x (of the medians); median of the rounds' ratios "
              f"{statistics.median(ratios):.2f}x")
        print("  rounds (PyTorch s / minimlp s): " + ", ".join(
            f"{t['seconds'] / o['seconds']:.2f}x ({t['seconds']:.2f}/{o['seconds']:.2f})"
            for o, t in zip(reports["minimlp"], reports["pytorch"])))


if __name__ == "__main__":
    main()
