"""Where minimlp's CPU training step spends its time, and how close it is to the floor its matrix products set.

    python benchmarks/step_breakdown.py                          # ResMLP-S12 and resmlp_tiny, bfloat16
    python benchmarks/step_breakdown.py --rows demo --precision float32 --steps 20

One process per row (the rows and batches of benchmarks/train_step.py). It runs --warmup steps of
minimlp.step.train_step, then --steps timed ones, and charges each piece of the step its own time
(exclusive of what it calls): every operation the model runs (model.ops: the fused loops of the fast
path, the reference layers elsewhere) and, in bfloat16, every oneDNN product (minimlp.fast.bf16_gemm.matmul;
in float32 the products are inside the Linear/token-mixing operations and show under their names). What
is left is Python and the optimizer's own loop. Then the floor: every product the last step ran is
timed again alone, on copies of its own operands, the fastest of --repeats, which is what the library
can do with them here; the step runs at that sum over its own time of the floor's speed.

A profile, not a benchmark against PyTorch (that is benchmarks/train_step.py): it wraps every call in a
timer, which costs a few microseconds each (the step it reports is within a percent of an unwrapped one).
"""
import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minimlp  # noqa: E402,F401  before NumPy: minimlp's thread settings (minimlp/fast/cpu_settings.py) come first

from train_step import ROWS, describe_cpu, minimlp_step  # noqa: E402  (this folder's benchmark: its rows, its step)


class SelfTimes:
    """Wraps functions so that each call's time, less the time of the wrapped calls inside it, is charged
    to its name."""

    def __init__(self):
        self.seconds, self.calls, self.inside = collections.defaultdict(float), collections.Counter(), []

    def wrap(self, name, function):
        def timed(*args, **options):
            started = time.perf_counter()
            self.inside.append(0.0)
            try:
                return function(*args, **options)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds[name] += elapsed - self.inside.pop()
                self.calls[name] += 1
                if self.inside:
                    self.inside[-1] += elapsed
        return timed

    def clear(self):
        self.seconds.clear()
        self.calls.clear()


def profile(row, precision_name, warmup, steps, repeats):
    from minimlp.fast import bf16_gemm
    model, step = minimlp_step(row, precision_name)
    times = SelfTimes()
    for name, function in list(vars(model.ops).items()):
        if callable(function):
            setattr(model.ops, name, times.wrap(name, function))
    products, library_matmul = [], bf16_gemm.matmul

    def recorded_matmul(a, b, **options):
        products.append((a.copy(order="K"), b.copy(order="K"), options))
        return library_matmul(a, b, **options)

    bf16_gemm.matmul = times.wrap("oneDNN products", library_matmul)
    step_times = []
    for index in range(warmup + steps):
        if index == warmup:
            times.clear()
        started = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - started)
    seconds, calls = dict(times.seconds), dict(times.calls)
    bf16_gemm.matmul = recorded_matmul  # one more step, untimed, to collect its products' operands
    step()
    bf16_gemm.matmul = library_matmul
    mean = statistics.fmean(step_times[warmup:])
    print(f"\n{ROWS[row][0]}, {ROWS[row][1]} px, batch {ROWS[row][2]}, {precision_name}, {model.ops.name}: "
          f"a step takes {mean:.3f} s (the mean of {steps}); of it:")
    accounted = 0.0
    for name, total in sorted(seconds.items(), key=lambda item: -item[1]):
        per_step = total / steps
        accounted += per_step
        print(f"  {per_step * 1e3:9.1f} ms  {per_step / mean:6.1%}  {name} ({calls[name] // steps} calls)")
    print(f"  {(mean - accounted) * 1e3:9.1f} ms  {(mean - accounted) / mean:6.1%}  the rest: Python, AdamW's loop")
    if products:
        floor = sum(fastest_alone(library_matmul, *product, repeats) for product in products)
        print(f"  the floor, each of the step's {len(products)} products alone at the library's rate: {floor:.3f} s; "
              f"the step runs at {floor / mean:.0%} of the floor's speed")


def fastest_alone(matmul, a, b, options, repeats):
    matmul(a, b, **options)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b, **options)
        best = min(best, time.perf_counter() - started)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each product alone (the fastest counts)")
    args = parser.parse_args()
    print(f"CPU: {describe_cpu()}")
    for row in args.rows:
        profile(row, args.precision, args.warmup, args.steps, args.repeats)


if __name__ == "__main__":
    main()
