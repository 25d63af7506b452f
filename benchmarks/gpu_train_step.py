"""Training-step throughput on one GPU: minimlp (CuPy) against timm's resmlp_12_224 in PyTorch, same run.

    python benchmarks/gpu_train_step.py                          # ResMLP-S12, 224 px, batch 256
    python benchmarks/gpu_train_step.py --steps 20 --out results  # also writes gpu_train_step.{json,md}
    python benchmarks/gpu_train_step.py --device cpu --batch-size 2 --steps 1 --warmup 0  # dry run, no GPU

minimlp's step is minimlp.step.train_step, the one the trainer runs: forward, cross-entropy with label
smoothing 0.1, backward, loss scaling (float16 only) and AdamW, on one fixed batch already on the GPU (no data
loading: benchmarks/loader_throughput.py measures that). PyTorch's is the usual eager loop on timm's model
holding the same weights. Each variant runs --warmup untimed steps, then --steps timed ones, each between
two CUDA events; the median is reported. Variants: minimlp float32 (TF32), minimlp AMP with float16 and
with bfloat16 matmuls (minimlp.precision.policy), minimlp float32 on the reference layers (create_model(fast=False): no fused kernel); PyTorch eager float32
(TF32), eager AMP bf16 and fp16, torch.compile AMP bf16. Also: peak GPU memory, and model FLOPs
utilisation against this GPU's dense GEMM rate, measured here with CuPy.

minimlp's rows need CuPy only: PyTorch is imported inside its own rows, so a missing or CPU-only torch
costs those rows and nothing else. One failing variant does not stop the others (its row says why), and
with --out the JSON and the table are rewritten after every variant, so a run cut short keeps what it
measured. Exit status 1 when no minimlp variant ran.
"""
import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimlp import backend  # noqa: E402

backend.set_tf32(True)  # before any CuPy matmul (CuPy reads CUPY_TF32 once)

from minimlp import create_model  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.precision import policy  # noqa: E402
from minimlp.step import train_step  # noqa: E402
from minimlp.weights import official_to_timm  # noqa: E402

TRAIN_FLOPS_PER_IMAGE = 18e9  # docs/reference.md, Cost of a step: ~6 GFLOP forward (3.0 G multiply-adds), x3 for training
LR, WEIGHT_DECAY, SMOOTHING = 1e-4, 0.05, 0.1


def median_step_ms(step, clock, warmup, steps):
    """Median over `steps` of one step's time between two events of `clock`, after `warmup` steps."""
    new_event, elapsed_ms, synchronize = clock
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(steps):
        start, stop = new_event(), new_event()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(elapsed_ms(start, stop))
    return statistics.median(times)


class HostEvent:
    """The CPU's stand-in for a CUDA event (--device cpu: a dry run of this script, not a measurement)."""

    def record(self):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


def minimlp_clock(device):
    if device == "cpu":
        return HostEvent, lambda start, stop: 1e3 * (stop.time - start.time), lambda: None
    cupy = backend.get_module("gpu")
    return cupy.cuda.Event, cupy.cuda.get_elapsed_time, cupy.cuda.Device().synchronize


def minimlp_variant(fast, precision_name):
    def run(args, images, labels):
        device = backend.resolve_device(args.device)  # DeviceError, one line, where there is no GPU
        xp = backend.get_module(device)
        pool = xp.get_default_memory_pool() if device == "gpu" else None
        if pool is not None:
            pool.free_all_blocks()
        model = create_model("resmlp_s12", device=device, dtype="float32", seed=0, fast=fast)
        optimizer = AdamW(model.parameters, model.ops, lr=LR, weight_decay=WEIGHT_DECAY)
        precision = policy(precision_name)
        scaler = precision.loss_scaler  # float16's
        x, y = xp.asarray(images), xp.asarray(labels)

        def step():
            train_step(model, optimizer, x, y, lr=LR, precision=precision, smoothing=SMOOTHING)

        ms = median_step_ms(step, minimlp_clock(device), args.warmup, args.steps)
        notes = f"ops: {model.ops.name}" + (f"; {scaler.skipped_steps} skipped steps, loss scale {scaler.scale:g}"
                                            if scaler else "")
        return dict(ms=ms, memory_bytes=pool.total_bytes() if pool else 0, notes=notes), model.state_dict()
    return run


def torch_variant(dtype_name=None, compile=False):
    def run(args, images, labels, weights):
        from minimlp.tools.pytorch_references import timm, torch  # here, so that minimlp's rows never depend on torch
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA GPU")
        dtype = getattr(torch, dtype_name) if dtype_name else None
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = timm.create_model("resmlp_12_224").cuda()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in official_to_timm(weights).items()})
        decay = [p for p in model.parameters() if p.ndim > 1 and p.shape[:2] != (1, 1)]
        no_decay = [p for p in model.parameters() if not (p.ndim > 1 and p.shape[:2] != (1, 1))]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=LR)
        forward = torch.compile(model) if compile else model
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        x, y = torch.from_numpy(images).cuda(), torch.from_numpy(labels).cuda()
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTHING)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(forward(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        clock = lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b), torch.cuda.synchronize
        ms = median_step_ms(step, clock, args.warmup + (10 if compile else 0), args.steps)
        return dict(ms=ms, memory_bytes=torch.cuda.max_memory_allocated(),
                    notes=f"torch {torch.__version__}, timm {timm.__version__}")
    return run


def dense_matmul_tflops(dtype, size=8192, repeats=10):
    """This GPU's dense GEMM rate (TF32 for float32), from a size x size x size CuPy matmul."""
    cupy = backend.get_module(backend.resolve_device("gpu"))
    a, b = (cupy.random.standard_normal((size, size), dtype=np.float32).astype(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        a @ b
    stop.record()
    stop.synchronize()
    return 2 * size ** 3 * repeats / (cupy.cuda.get_elapsed_time(start, stop) / 1e3) / 1e12


def failure(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-torch", action="store_true", help="minimlp's rows only")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--out", type=Path, help="folder for gpu_train_step.json and gpu_train_step.md")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                        help="cpu: a dry run of minimlp's rows on the CPU (host timer), to check the script")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, 1000, size=args.batch_size)
    result = dict(config=dict(model="resmlp_s12", img_size=224, batch_size=args.batch_size, warmup=args.warmup,
                              steps=args.steps), gpu=None, peak_tflops={}, variants={})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def save():  # after every variant: a run cut short keeps what it measured
        if args.out:
            (args.out / "gpu_train_step.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "gpu_train_step.md").write_text(report(result, list(theirs)))

    # name: (which peak it is held against, how to run it)
    ours = {"minimlp float32 (TF32)": ("tf32", minimlp_variant(fast=True, precision_name="float32")),
            "minimlp AMP (fp16 matmuls)": ("fp16", minimlp_variant(fast=True, precision_name="float16")),
            "minimlp AMP (bf16 matmuls)": ("fp16", minimlp_variant(fast=True, precision_name="bfloat16")),
            "minimlp float32, reference layers (no fused kernel)": ("tf32", minimlp_variant(fast=False,
                                                                                            precision_name="float32"))}
    theirs = {} if args.no_torch else {
        "PyTorch eager float32 (TF32)": ("tf32", torch_variant()),
        "PyTorch eager AMP bf16": ("fp16", torch_variant("bfloat16")),
        "PyTorch eager AMP fp16": ("fp16", torch_variant("float16"))}
    if not (args.no_torch or args.no_compile):
        theirs["torch.compile AMP bf16"] = ("fp16", torch_variant("bfloat16", compile=True))
    result["config"]["device"] = args.device
    if args.device == "gpu":
        try:
            cupy = backend.get_module(backend.resolve_device("gpu"))
            result["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
            result["peak_tflops"] = {"tf32": dense_matmul_tflops(np.float32),
                                     "fp16": dense_matmul_tflops(np.float16)}
        except Exception as error:
            print(f"GPU and its GEMM rate: {failure(error)}", flush=True)
    save()

    weights = None
    for name, (peak, run) in {**ours, **theirs}.items():
        try:
            if name in ours:
                measured, weights = run(args, images, labels)
            else:
                weights = weights or create_model("resmlp_s12", seed=0).state_dict()
                measured = run(args, images, labels, weights)
            rate = args.batch_size / measured["ms"] * 1e3
            peak_rate = result["peak_tflops"].get(peak)
            row = dict(precision=peak, ms=measured["ms"], images_per_s=rate, peak_memory_gib=measured["memory_bytes"]
                       / 2 ** 30, mfu=rate * TRAIN_FLOPS_PER_IMAGE / (peak_rate * 1e12) if peak_rate else None,
                       notes=measured["notes"], error=None)
        except Exception as error:
            if not isinstance(error, backend.DeviceError):  # a DeviceError is its own one-line explanation
                traceback.print_exc()
            row = dict(precision=peak, error=failure(error))
        result["variants"][name] = row
        print(name, {key: value for key, value in row.items() if value is not None}, flush=True)
        save()

    print(report(result, list(theirs)))
    if all(result["variants"][name]["error"] for name in ours):
        sys.exit("benchmarks/gpu_train_step.py: no minimlp variant ran")


def speedup(theirs, ours):
    """How many times faster than `theirs` (their time over ours), or '-' where either failed."""
    return f"{theirs['ms'] / ours['ms']:.2f}x" if theirs and not theirs["error"] else "-"


def report(result, torch_names):
    c = result["config"]
    peaks = ", ".join(f"{key} {value:.0f} TFLOP/s" for key, value in result["peak_tflops"].items()) or "not measured"
    where = result["gpu"] or ("the CPU (a dry run, not a measurement)" if c["device"] == "cpu" else "no GPU")
    lines = [f"{where}; ResMLP-S12, 224 px, batch {c['batch_size']}; median of {c['steps']} "
             f"steps after {c['warmup']} warm-up. Dense GEMM measured here (CuPy): {peaks}.", "",
             "| variant | ms/step | images/s | " + "".join(f"vs {name} | " for name in torch_names)
             + "peak memory GiB | MFU | notes |", "|---" * (6 + len(torch_names)) + "|"]
    variants = result["variants"]
    for name, row in variants.items():
        if row["error"]:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * (4 + len(torch_names)))
            continue
        ratios = "".join(f"{speedup(variants.get(other), row)} | " for other in torch_names)
        mfu = f"{100 * row['mfu']:.0f}% ({row['precision']})" if row["mfu"] else "-"
        lines.append(f"| {name} | {row['ms']:.1f} | {row['images_per_s']:.0f} | {ratios}"
                     f"{row['peak_memory_gib']:.1f} | {mfu} | {row['notes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
