"""What TF32 and --amp cost in accuracy and save in memory and time, measured on the GPU, for the README.

    python benchmarks/gpu_checks.py                  # ResMLP-S12, 224 px: errors at batch 32, memory at 256
    python benchmarks/gpu_checks.py --out results    # also writes gpu_checks.json and gpu_checks.md

For each precision (float32 with TF32 off, float32 with TF32 on, --amp with float16 and with bfloat16 matmuls,
each a minimlp.precision.policy), from the same random
images, weights and labels:
  - the error relative to a float64 model on the GPU, max |x - ref| / max |ref|, of the logits (evaluation
    forward) and of the gradients of one training step (minimlp.step.train_step, the trainer's own step;
    the flat gradient buffer, unscaled, is what the optimizer then read);
  - --steps + 1 training steps at --memory-batch: peak GPU memory (CuPy's pool afterwards) and the median
    step time (the first step, which allocates and compiles, untimed). Under float16 the loss scale is
    updated by the step as in training, and its final value and the skipped steps are reported.
CuPy reads CUPY_TF32 once per process, so each precision runs in its own child process, each within
--child-timeout seconds; one failing precision does not stop the others. Prints a Markdown table; asserts
nothing; exit status 1 when no precision could be measured. --device cpu runs the same code on the CPU
(with small batches): a dry run of the script, not a measurement.
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
from minimlp.optim import AdamW  # noqa: E402
from minimlp.precision import autocast, policy  # noqa: E402
from minimlp.step import train_step  # noqa: E402

PRECISIONS = {"float32": dict(tf32=False, policy="float32"), "tf32": dict(tf32=True, policy="float32"),
              "float16": dict(tf32=False, policy="float16"), "bfloat16": dict(tf32=False, policy="bfloat16")}
LR, SMOOTHING = 1e-4, 0.1


def inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 3, 224, 224)), rng.integers(0, 1000, batch)


def logits_and_grads(model, images, labels, precision_name):
    """Host float64 copies of the evaluation logits and of one training step's flat gradient (unscaled)."""
    precision = policy(precision_name)
    with autocast(precision.matmul_dtype):
        logits = backend.to_numpy(model.forward(images, train=False)).astype(np.float64)
    _, finite = train_step(model, AdamW(model.parameters, model.ops, lr=LR), images, labels, lr=LR,
                           precision=precision, smoothing=SMOOTHING)
    return logits, backend.to_numpy(model.parameters.grad).astype(np.float64), bool(finite)


def relative_error(got, reference):
    return float(np.abs(got - reference).max() / np.abs(reference).max())


def measure(args, precision):
    """Child process: errors against float64 and the training steps' memory and time, as JSON on stdout."""
    device = backend.resolve_device(args.device)
    xp = backend.get_module(device)
    name = PRECISIONS[precision]["policy"]
    images, labels = inputs(args.tolerance_batch)
    reference = logits_and_grads(create_model(args.model, device=device, dtype="float64"), images, labels, "float32")
    result = logits_and_grads(create_model(args.model, device=device, dtype="float32"), images, labels, name)

    if device == "gpu":
        xp.get_default_memory_pool().free_all_blocks()
    model = create_model(args.model, device=device, dtype="float32")
    optimizer, precision = AdamW(model.parameters, model.ops, lr=LR), policy(name)
    scaler = precision.loss_scaler
    images, labels = inputs(args.memory_batch, seed=1)
    x, y = xp.asarray(images, dtype=xp.float32), xp.asarray(labels)
    times = []
    for _ in range(args.steps + 1):  # the first step allocates and compiles: not timed
        started = time.perf_counter()
        train_step(model, optimizer, x, y, lr=LR, precision=precision, smoothing=SMOOTHING)
        if device == "gpu":
            xp.cuda.Device().synchronize()
        times.append(time.perf_counter() - started)
    return dict(logits_error=relative_error(result[0], reference[0]),
                grad_error=relative_error(result[1], reference[1]), grads_finite=result[2], peak_gb=backend.gpu_memory_held_bytes() / 1e9 if device == "gpu" else None,
                step_ms=1000 * statistics.median(times[1:]), ops=model.ops.name,
                **(dict(skipped_steps=scaler.skipped_steps, loss_scale=scaler.scale) if scaler else {}))


def run_child(precision, argv, timeout):
    """(result dict, None) or (None, why it failed)."""
    env = {**os.environ, "CUPY_TF32": "1" if PRECISIONS[precision]["tf32"] else "0"}
    try:
        child = subprocess.run([sys.executable, __file__, "--child", precision, *argv], env=env,
                               capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    if child.returncode:
        lines = child.stderr.strip().splitlines()
        sys.stderr.write(child.stderr)
        return None, lines[-1] if lines else f"exit status {child.returncode}"
    return json.loads(child.stdout.splitlines()[-1]), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resmlp_s12")
    parser.add_argument("--tolerance-batch", type=int, default=32)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one untimed one")
    parser.add_argument("--child-timeout", type=float, default=150, help="seconds for each precision")
    parser.add_argument("--out", type=Path, help="folder for gpu_checks.json and gpu_checks.md")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                        help="cpu: a dry run of the script on the CPU, not a measurement")
    parser.add_argument("--child", choices=sorted(PRECISIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    if args.device == "gpu":
        try:
            gpu = backend.get_module(backend.resolve_device("gpu")).cuda.runtime.getDeviceProperties(0)["name"].decode()
        except backend.DeviceError as error:
            sys.exit(f"benchmarks/gpu_checks.py: {error}")
    else:
        gpu = "the CPU (a dry run, not a measurement)"
    child_argv = [arg for arg in sys.argv[1:]]
    rows = {}
    for precision in PRECISIONS:
        result, error = run_child(precision, child_argv, args.child_timeout)
        rows[precision] = result or dict(error=error)
        print(precision, rows[precision], file=sys.stderr, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_checks.json").write_text(json.dumps(dict(
                model=args.model, device=gpu, tolerance_batch=args.tolerance_batch, memory_batch=args.memory_batch,
                precisions=rows), indent=2) + "\n")
    table = report(args, gpu, rows)
    print(table)
    if args.out:
        (args.out / "gpu_checks.md").write_text(table)
    if all("error" in row for row in rows.values()):
        sys.exit("benchmarks/gpu_checks.py: no precision could be measured")


def report(args, gpu, rows):
    lines = [f"{args.model}, {gpu}; errors vs float64 at batch {args.tolerance_batch} (logits of an evaluation "
             f"forward, gradients of one train_step), {args.steps} timed train_steps at batch {args.memory_batch}", "",
             "| precision | logits rel. error | grad rel. error | peak GPU memory | step time | notes |",
             "|---|---|---|---|---|---|"]
    for precision, r in rows.items():
        if "error" in r:
            lines.append(f"| {precision} | failed: {r['error']} | | | | |")
            continue
        memory = f"{r['peak_gb']:.2f} GB" if r["peak_gb"] is not None else "-"
        notes = [f"ops: {r['ops']}"] + ([] if r["grads_finite"] else ["the gradients overflowed (step skipped)"])
        if "loss_scale" in r:
            notes.append(f"loss scale {r['loss_scale']:g} after the steps, {r['skipped_steps']} skipped")
        lines.append(f"| {precision} | {r['logits_error']:.1e} | {r['grad_error']:.1e} | {memory} | "
                     f"{r['step_ms']:.0f} ms | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
