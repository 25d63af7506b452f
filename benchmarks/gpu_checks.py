"""What TF32 and --amp cost in accuracy and save in memory and time, measured on the GPU, for the README.

    python benchmarks/gpu_checks.py                    # ResMLP-S12, 224 px: tolerances at batch 32, memory at 256

For each precision (float32 with TF32 off, float32 with TF32 on, AMP float16 matmuls), on the same
random images, weights and labels:
  - logits and gradient error relative to a float64 reference:  max |x - ref| / max |ref|;
  - one training step (forward, loss, backward, AdamW) at --memory-batch: peak GPU memory (CuPy's pool
    after the step) and the median step time.
CuPy reads CUPY_TF32 once per process, so each precision runs in its own child process. Prints a
Markdown table; asserts nothing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimlp import backend, create_model  # noqa: E402
from minimlp.losses import cross_entropy  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.precision import AMP_DTYPE, LossScaler, autocast  # noqa: E402

PRECISIONS = {"float32": dict(tf32=False, amp=False), "tf32": dict(tf32=True, amp=False),
              "amp": dict(tf32=False, amp=True)}


def inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 3, 224, 224)), rng.integers(0, 1000, batch)


def logits_and_grads(model, images, labels, amp):
    """Host float64 copies of the logits and the flat gradient of one forward/backward."""
    with autocast(amp):
        logits = model.forward(images, train=True)
        _, dlogits = cross_entropy(logits, backend.to_device(labels, "gpu"))
        model.backward(dlogits)
    return backend.to_numpy(logits).astype(np.float64), backend.to_numpy(model.parameters.grad).astype(np.float64)


def measure(args, precision):
    """Child process: errors against float64 and one training step's memory and time, as JSON on stdout."""
    xp = backend.get_module("gpu")
    amp = PRECISIONS[precision]["amp"]
    images, labels = inputs(args.tolerance_batch)
    reference = logits_and_grads(create_model(args.model, device="gpu", dtype="float64"), images, labels, False)
    result = logits_and_grads(create_model(args.model, device="gpu", dtype="float32"), images, labels, amp)
    errors = [float(np.abs(got - ref).max() / np.abs(ref).max()) for got, ref in zip(result, reference)]

    xp.get_default_memory_pool().free_all_blocks()
    model = create_model(args.model, device="gpu", dtype="float32")
    optimizer, scaler = AdamW(model, lr=1e-4), LossScaler() if amp else None
    images, labels = inputs(args.memory_batch, seed=1)
    x, y = xp.asarray(images, dtype=xp.float32), xp.asarray(labels)

    def step():
        with autocast(amp):
            _, dlogits = cross_entropy(model.forward(x, train=True), y, smoothing=0.1)
            model.backward(dlogits if scaler is None else scaler.scale_gradient(dlogits))
        if scaler is None or scaler.unscale(model.parameters):
            optimizer.step()
        xp.cuda.Device().synchronize()

    times = []
    for _ in range(args.steps + 1):  # the first step allocates and compiles: not timed
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return dict(logits_error=errors[0], grad_error=errors[1], peak_gb=backend.gpu_memory_held_bytes() / 1e9,
                step_ms=1000 * statistics.median(times[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resmlp_s12")
    parser.add_argument("--tolerance-batch", type=int, default=32)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one untimed one")
    parser.add_argument("--child", choices=sorted(PRECISIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    if not backend.gpu_available():
        sys.exit("benchmarks/gpu_checks.py needs a CUDA GPU with CuPy")
    rows = []
    for precision, setting in PRECISIONS.items():
        env = {**os.environ, "CUPY_TF32": "1" if setting["tf32"] else "0"}
        child = subprocess.run([sys.executable, __file__, "--child", precision, *sys.argv[1:]], env=env,
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"{precision} failed:\n{child.stderr}")
        rows.append((precision, json.loads(child.stdout.splitlines()[-1])))
    device = backend.get_module("gpu").cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{args.model}, {device}; errors vs float64 at batch {args.tolerance_batch}, "
          f"one AdamW step at batch {args.memory_batch}; AMP matmul inputs: {AMP_DTYPE.name}\n")
    print("| precision | logits rel. error | grad rel. error | peak GPU memory | step time |")
    print("|---|---|---|---|---|")
    for precision, r in rows:
        print(f"| {precision} | {r['logits_error']:.1e} | {r['grad_error']:.1e} | {r['peak_gb']:.2f} GB | "
              f"{r['step_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
