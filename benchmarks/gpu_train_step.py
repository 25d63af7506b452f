"""Training-step throughput on one GPU: minimlp (CuPy) against timm's resmlp_12_224 in PyTorch, same run.

    python benchmarks/gpu_train_step.py                       # ResMLP-S12, 224 px, batch 256
    OUT=results python benchmarks/gpu_train_step.py --steps 50

A step is forward, cross-entropy (label smoothing 0.1), backward and AdamW, on one fixed batch already on
the GPU (no data loading: benchmarks/loader_throughput.py measures that). Each variant runs --warmup
untimed steps, then --steps timed ones, each between two CUDA events; the median is reported.
Variants: minimlp float32 (TF32), minimlp AMP (float16 matmuls, minimlp.precision), minimlp with the
fused kernels off (MINIMLP_FUSED=0's switch); PyTorch eager float32 (TF32), eager AMP bf16 and fp16,
torch.compile with AMP bf16. Also: peak GPU memory, and model FLOPs utilisation against this GPU's own
dense GEMM peak, measured here with a large torch matmul. One failing variant does not stop the others;
the markdown table at the end (also written to $OUT/gpu_train_step.md when OUT is set) says why.
"""
import argparse
import contextlib
import os
import statistics
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimlp import backend  # noqa: E402

backend.set_tf32(True)  # before any CuPy matmul (CuPy reads CUPY_TF32 once)

from minimlp import create_model, kernels, precision  # noqa: E402
from minimlp.losses import cross_entropy  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.weights import official_to_timm  # noqa: E402
from minimlp.twins import timm, torch  # noqa: E402


TRAIN_FLOPS_PER_IMAGE = 18e9  # REFERENCE.md: ~6 GFLOP forward (3.0 G multiply-adds), x3 for training


def median_step_ms(step, new_event, elapsed_ms, synchronize, warmup, steps):
    """Median over `steps` of one step's time between two CUDA events, after `warmup` steps."""
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


def minimlp_variant(fused, amp):
    def run(args, images, labels):
        import cupy
        kernels.enabled = fused
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        model = create_model("resmlp_s12", device="gpu", dtype="float32", seed=0)
        optimizer = AdamW(model, lr=1e-4, weight_decay=0.05)
        scaler = precision.LossScaler() if amp else None
        x, y = cupy.asarray(images), cupy.asarray(labels)

        def step():
            with precision.autocast() if amp else contextlib.nullcontext():
                _, dlogits = cross_entropy(model.forward(x, train=True), y, smoothing=0.1)
                model.backward(dlogits if scaler is None else scaler.scale_gradient(dlogits))
            if scaler is None:
                optimizer.step()
            else:  # skip the step on inf/NaN gradients, adapt the scale
                finite = scaler.unscale(model.parameters)
                if finite:
                    optimizer.step()
                scaler.update(finite)

        try:
            ms = median_step_ms(step, cupy.cuda.Event, cupy.cuda.get_elapsed_time, cupy.cuda.Device().synchronize,
                                args.warmup, args.steps)
        finally:
            kernels.enabled = True
        return ms, pool.total_bytes(), model.state_dict()
    return run


def torch_variant(dtype=None, compile=False):
    def run(args, images, labels, weights):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = timm.create_model("resmlp_12_224").cuda()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in official_to_timm(weights).items()})
        decay = [p for p in model.parameters() if p.ndim > 1 and p.shape[:2] != (1, 1)]
        no_decay = [p for p in model.parameters() if not (p.ndim > 1 and p.shape[:2] != (1, 1))]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
        forward = torch.compile(model) if compile else model
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        x, y = torch.from_numpy(images).cuda(), torch.from_numpy(labels).cuda()
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(forward(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        ms = median_step_ms(step, lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b),
                            torch.cuda.synchronize, args.warmup + (10 if compile else 0), args.steps)
        return ms, torch.cuda.max_memory_allocated()
    return run


def dense_matmul_tflops(dtype, size=8192, repeats=20):
    """This GPU's dense GEMM rate (TF32 for float32), from a size x size x size torch matmul."""
    torch.backends.cuda.matmul.allow_tf32 = True
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    stop.record()
    stop.synchronize()
    return 2 * size ** 3 * repeats / (start.elapsed_time(stop) / 1e3) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, 1000, size=args.batch_size)

    peaks = {"tf32": dense_matmul_tflops(torch.float32), "bf16/fp16": dense_matmul_tflops(torch.float16)}
    # name, precision (which peak it is held against), how to run it
    ours = [("minimlp float32 (TF32)", "tf32", minimlp_variant(fused=True, amp=False)),
            ("minimlp AMP (fp16 matmuls)", "bf16/fp16", minimlp_variant(fused=True, amp=True)),
            ("minimlp float32, fused kernels off", "tf32", minimlp_variant(fused=False, amp=False))]
    theirs = [("PyTorch eager float32 (TF32)", "tf32", torch_variant()),
              ("PyTorch eager AMP bf16", "bf16/fp16", torch_variant(torch.bfloat16)),
              ("PyTorch eager AMP fp16", "bf16/fp16", torch_variant(torch.float16)),
              ("torch.compile AMP bf16", "bf16/fp16", torch_variant(torch.bfloat16, compile=True))]
    results, weights = {}, None
    for name, peak, run in ours:
        try:
            ms, memory, weights = run(args, images, labels)
            results[name] = (peak, ms, memory)
        except Exception:
            traceback.print_exc()
            results[name] = (peak, None, traceback.format_exc(limit=1).strip().splitlines()[-1])
        print(name, results[name][1:], flush=True)
    weights = weights or create_model("resmlp_s12", seed=0).state_dict()
    for name, peak, run in theirs:
        try:
            results[name] = (peak, *run(args, images, labels, weights))
        except Exception:
            traceback.print_exc()
            results[name] = (peak, None, traceback.format_exc(limit=1).strip().splitlines()[-1])
        print(name, results[name][1:], flush=True)

    table = report(args, results, peaks, [name for name, _, _ in theirs])
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_train_step.md").write_text(table)


def report(args, results, peaks, torch_names):
    gpu = torch.cuda.get_device_name()
    lines = [f"{gpu}; ResMLP-S12, 224 px, batch {args.batch_size}; median of {args.steps} steps after "
             f"{args.warmup} warm-up; torch {torch.__version__}, timm {timm.__version__}. Dense GEMM measured here: "
             + ", ".join(f"{key} {value:.0f} TFLOP/s" for key, value in peaks.items()) + ".", "",
             "| variant | ms/step | images/s | " + " | ".join(f"vs {name}" for name in torch_names)
             + " | peak memory GiB | MFU |", "|---" * (5 + len(torch_names)) + "|"]
    for name, (peak, ms, memory) in results.items():
        if ms is None:
            lines.append(f"| {name} | failed: {memory} |" + " |" * (3 + len(torch_names)))
            continue
        rate = args.batch_size / ms * 1e3
        ratios = [f"{results[other][1] / ms:.2f}x" if results[other][1] else "-" for other in torch_names]
        mfu = rate * TRAIN_FLOPS_PER_IMAGE / (peaks[peak] * 1e12)
        lines.append(f"| {name} | {ms:.1f} | {rate:.0f} | " + " | ".join(ratios) + f" | {memory / 2 ** 30:.1f} | "
                     f"{100 * mfu:.0f}% ({peak}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
