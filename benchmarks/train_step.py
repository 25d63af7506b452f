"""One full training step on the CPU (forward, loss, backward, AdamW), minimlp against timm's same model in PyTorch
eager, each side in a fresh process of its own, in float32 and (--amp-dtype) in bfloat16. Prints as it goes.

    python benchmarks/train_step.py                           # ResMLP-S12 (224 px, batch 32) and resmlp_tiny (32 px,
                                                              # batch 128), float32 and bfloat16
    python benchmarks/train_step.py --rows s12 --rounds 5 --amp-dtype none    # float32 only

Four sides per row and precision, each a fresh process started from this script's environment as given:
  - minimlp: its one training step (minimlp.step.train_step, policy(precision)) on the fast path the model
    chooses, with minimlp's own thread and allocator settings (minimlp/fast/cpu_settings.py; in its process
    only). bfloat16: the CPU's bfloat16 products (minimlp.fast.bf16_gemm).
  - PyTorch, its defaults: benchmarks/pytorch_train_step.py, a process that never imports minimlp (it says
    so in its report; the weights and the batch come in a .safetensors file under timm's names, written here
    with minimlp.weights' mapping). bfloat16: `torch.autocast("cpu", dtype=torch.bfloat16)`.
  - PyTorch again, given the allocator setting minimlp gives itself: MALLOC_MMAP_THRESHOLD_=1073741824
    MALLOC_TRIM_THRESHOLD_=2147483647 in its environment.
  - PyTorch with that setting and the model under torch.compile (inductor, which compiles its fused C++
    loops with the machine's C++ compiler; the first step compiles, about 20-40 s, and is not timed;
    --no-compile leaves this side out).
Same weights, same batch, label smoothing 0.1, AdamW with two parameter groups. Each round runs the sides once
each, in a rotating order; a process does --warmup untimed steps, then --steps timed ones, and reports their
median. A row reports the median over the rounds, and minimlp's speed against the fastest PyTorch side of
the same precision (and every round's ratio). A benchmark, not a test: it asserts nothing.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = dict(os.environ)  # as given: each side's process starts from it (minimlp's settings are its own)
PYTORCH_SIDE = Path(__file__).resolve().parent / "pytorch_train_step.py"
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
SIDES = {"minimlp": "minimlp", "pytorch": "PyTorch eager, its defaults",
         "pytorch+allocator": "PyTorch eager, minimlp's allocator setting",
         "compile+allocator": "PyTorch torch.compile, the allocator setting"}
ROWS = {  # name: (minimlp model, image size, batch size, timm model or None for the MlpMixer twin)
    "s12": ("resmlp_s12", 224, 32, "resmlp_12_224"),
    "demo": ("resmlp_tiny", 32, 128, None),
}


def describe_cpu():
    """The CPU as lscpu names it, its cores, and its bfloat16 instructions (if any)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    except (OSError, subprocess.CalledProcessError):
        fields = {}
    name = fields.get("Model name") or platform.processor() or platform.machine()
    bfloat16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in fields.get("Flags", "").split()]
    return f"{name}, {os.cpu_count()} cores; bfloat16 instructions: {', '.join(bfloat16) or 'none'}"


def batch_of(row, num_classes):
    import numpy as np
    _, img_size, batch_size, _ = ROWS[row]
    rng = np.random.default_rng(0)
    return (rng.normal(size=(batch_size, 3, img_size, img_size)).astype(np.float32),
            rng.integers(0, num_classes, size=batch_size))


def write_handover(row, folder):
    """The weights (timm's names), the batch and the model's description, for PyTorch's process: one
    .safetensors file, made from the minimlp model the minimlp side builds too (seed 0)."""
    import numpy as np
    from safetensors.numpy import save_file

    from minimlp import create_model
    from minimlp.tools.pytorch_references import twin_arguments
    from minimlp.weights import official_to_timm
    model = create_model(ROWS[row][0], seed=0, fast=False)
    images, labels = batch_of(row, model.config["num_classes"])
    timm_name = ROWS[row][3]
    metadata = dict(timm_model=timm_name) if timm_name else dict(mlp_mixer=json.dumps(twin_arguments(model.config)))
    path = Path(folder) / f"{row}.safetensors"
    save_file({**official_to_timm(model.state_dict()), "images": images, "labels": labels.astype(np.int64)}, path,
              metadata=metadata)
    return path


def minimlp_step(row, precision_name, fast=True):
    """(the model, one call of minimlp's training step on the row's batch): what minimlp's side times, and what
    benchmarks/step_breakdown.py takes apart."""
    from minimlp import create_model
    from minimlp.optim import AdamW
    from minimlp.precision import run_precision
    from minimlp.step import train_step
    model = create_model(ROWS[row][0], seed=0, fast=fast)
    precision, line = run_precision(precision_name, "cpu")
    if precision.name != precision_name:  # the CPU has no bfloat16 instruction: that is no bfloat16 measurement
        raise SystemExit(line)
    images, labels = batch_of(row, model.config["num_classes"])
    optimizer = AdamW(model.parameters, model.ops, lr=1e-4, weight_decay=0.05)

    def step():
        train_step(model, optimizer, images, labels, 1e-4, precision, smoothing=0.1)

    return model, step


def time_minimlp(row, precision_name, warmup, steps, fast):
    """minimlp's side, in its own process: the median seconds of --steps train_steps."""
    import numpy as np
    model, step = minimlp_step(row, precision_name, fast)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return dict(seconds=statistics.median(times), version=f"numpy {np.__version__}", path=model.ops.name)


def run_side(side, row, precision, handover, args):
    """One side of one round in a fresh process; returns its JSON report."""
    steps = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    if side == "minimlp":
        command = [sys.executable, __file__, "--side", "minimlp", "--rows", row, "--precision", precision, *steps,
                   *([] if args.fast else ["--no-fast"])]
        environment = ENVIRONMENT
    else:
        command = [sys.executable, str(PYTORCH_SIDE), str(handover), "--precision", precision, *steps,
                   *(["--compile"] if side.startswith("compile") else [])]
        environment = {**ENVIRONMENT, **(KEEP_FREED_MEMORY if side.endswith("+allocator") else {})}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{SIDES[side]}, {row}, {precision} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(row, precision, handover, args):
    """Every round of the four sides (three with --no-compile) of one row and precision, printed as they report."""
    model_name, img_size, batch_size, _ = ROWS[row]
    print(f"\n{model_name}, {img_size} px, batch {batch_size}, {precision}:", flush=True)
    sides = [side for side in SIDES if args.compile or not side.startswith("compile")]
    reports = {side: [] for side in sides}
    for round_index in range(args.rounds):
        order = sides[round_index % len(sides):] + sides[:round_index % len(sides)]
        for side in order:
            report = run_side(side, row, precision, handover, args)
            if report.get("minimlp_imported"):
                raise SystemExit(f"{PYTORCH_SIDE.name} imported minimlp: its side would not run with PyTorch's "
                                 "defaults")
            reports[side].append(report)
            print(f"  round {round_index + 1}/{args.rounds}: {SIDES[side]:45s} {report['seconds']:7.3f} s/step",
                  flush=True)
    medians = {side: statistics.median(r["seconds"] for r in reports[side]) for side in sides}
    fastest = min((side for side in sides if side != "minimlp"), key=medians.get)
    first = {side: reports[side][0] for side in sides}
    details = {side: f"torch {first[side]['version']}, {first[side]['threads']} threads"
               + (f", first step (compiling) {first[side]['first_step']:.0f} s" if first[side]["compiled"] else "")
               for side in sides if side != "minimlp"}
    details["minimlp"] = f"{first['minimlp']['path']}, {first['minimlp']['version']}"
    for side in sides:
        print(f"  {SIDES[side]:45s} ({details[side]})  {medians[side]:7.3f} s/step  "
              f"{batch_size / medians[side]:8.1f} images/s", flush=True)
    ratios = [t["seconds"] / o["seconds"] for o, t in zip(reports["minimlp"], reports[fastest])]
    print(f"  minimlp / the fastest PyTorch ({SIDES[fastest]}): {medians[fastest] / medians['minimlp']:.2f}x (of the "
          f"medians); median of the rounds' ratios {statistics.median(ratios):.2f}x; rounds: "
          + ", ".join(f"{ratio:.2f}x" for ratio in ratios), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--amp-dtype", choices=["bfloat16", "float16", "none"], default="bfloat16",
                        help="the 16-bit precision measured beside float32 (default bfloat16; none: float32 only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="minimlp's fast path (default) or, with --no-fast, the reference layers")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the torch.compile side (default) or, with --no-compile, eager PyTorch only")
    parser.add_argument("--side", choices=["minimlp"], help=argparse.SUPPRESS)  # minimlp's side, in a child
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.side:
        import minimlp  # noqa: F401  before NumPy: its thread settings (minimlp/fast/cpu_settings.py) come first
        print(json.dumps(time_minimlp(args.rows[0], args.precision, args.warmup, args.steps, args.fast)))
        return
    precisions = ["float32"] + ([] if args.amp_dtype == "none" else [args.amp_dtype])
    print(f"CPU: {describe_cpu()}; Python {platform.python_version()}; median of {args.steps} steps after "
          f"{args.warmup} warm-up, {args.rounds} rounds; {', '.join(precisions)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="train_step_") as folder:
        for row in args.rows:
            handover = write_handover(row, folder)
            for precision in precisions:
                measure(row, precision, handover, args)


if __name__ == "__main__":
    main()
