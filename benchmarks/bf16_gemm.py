"""bfloat16 matrix products on this CPU, library against library, on ResMLP's own shapes (GFLOP/s).

    python benchmarks/bf16_gemm.py                  # S12 at batch 32 and resmlp_tiny at batch 128, 7 rounds
    python benchmarks/bf16_gemm.py --rounds 15 --torch
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bf16_gemm.py --cpu-time   # one core, on a busy machine

Every product of a training step (forward, the gradient of the input, the weight gradient), with its
operands laid out as the model passes them (`w.T` and `dy.T` are transposed views), timed in:
  - NumPy float32 (OpenBLAS), the float32 step's own products;
  - oneDNN 3.2 matmul (wheel onednn-cpu-gomp), as minimlp.fast.bf16_gemm calls it ("oneDNN": the layout it
    chooses for the shape), and in each of its two layouts: B reordered into oneDNN's blocked layout at every
    call ("blocked"), or read in its own strides ("plain");
  - MKL's cblas_gemm_bf16bf16f32 (wheel mkl, when installed: its libmkl_rt is looked for under <prefix>/lib,
    or give --mkl-lib), plain, and with B packed by cblas_gemm_bf16bf16f32_pack at every call ("packB"),
    and with B packed once beforehand ("prepacked", what a weight reused many times would cost);
  - with --torch, PyTorch's bfloat16 torch.matmul (its own oneDNN), for comparison.
All take bfloat16 operands and return float32 (NumPy: float32 operands). Interleaved: each round times
every library on every shape once (two calls each), so a neighbour's load falls on all of them alike;
the table gives the medians over the rounds, and the last column the median of the rounds' ratios
of oneDNN (as minimlp calls it) to the best MKL variant that is paid at every call. --cpu-time times with the
process's CPU time instead of the clock: with one thread per library (the environment above), what
other programs on the machine take from it then counts less (a second thread would add the time it
spends waiting). A benchmark: it asserts nothing.
"""
import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MKL_THREADING_LAYER", "GNU")  # MKL on GNU OpenMP, like oneDNN's wheel and Numba
import minimlp  # noqa: E402,F401  before NumPy: minimlp/fast/cpu_settings.py's thread settings
import numpy as np  # noqa: E402

from minimlp.fast import bf16_gemm  # noqa: E402

# row: the products of one training step, (name, M, K, N, A is a transposed view, B is one, how many per step),
# as the model multiplies them (minimlp.layers; the input images need no gradient, so no patch-embedding dx)
def _step_products(patches, images, dim, hidden, patch_inputs, depth, classes):
    tokens = patches * images
    return [
        ("patch embed     patches @ W^T", tokens, patch_inputs, dim, False, True, 1),
        ("patch embed dW  dy^T @ patches", dim, tokens, patch_inputs, True, False, 1),
        ("token mixing    A @ x", patches, patches, images * dim, False, False, depth),
        ("token mixing dx A^T @ dy", patches, patches, images * dim, True, False, depth),
        ("token mixing dA dy @ x^T", patches, images * dim, patches, False, True, depth),
        ("fc1             x @ W1^T", tokens, dim, hidden, False, True, depth),
        ("fc1 dx          dh @ W1", tokens, hidden, dim, False, False, depth),
        ("fc1 dW          dh^T @ x", hidden, tokens, dim, True, False, depth),
        ("fc2             h @ W2^T", tokens, hidden, dim, False, True, depth),
        ("fc2 dx          dy @ W2", tokens, dim, hidden, False, False, depth),
        ("fc2 dW          dy^T @ h", dim, tokens, hidden, True, False, depth),
        ("head            x @ W^T", images, dim, classes, False, True, 1),
        ("head dx         dy @ W", images, classes, dim, False, False, 1),
        ("head dW         dy^T @ x", classes, images, dim, True, False, 1),
    ]


SHAPES = {  # ResMLP-S12 at 224 px, batch 32; resmlp_tiny at 32 px, batch 128
    "s12": _step_products(patches=196, images=32, dim=384, hidden=1536, patch_inputs=768, depth=12, classes=1000),
    "tiny": _step_products(patches=64, images=128, dim=128, hidden=512, patch_inputs=48, depth=6, classes=10),
}


def _pointer(array):
    return ctypes.c_void_p(array.ctypes.data)


class MKL:
    """The two MKL calls measured, on the same operands (MKL_BF16 is the bfloat16 bit pattern, uint16)."""
    ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.cblas_gemm_bf16bf16f32_pack_get_size.restype = ctypes.c_size_t
        self.lib.MKL_Get_Version_String.restype = None
        text = ctypes.create_string_buffer(256)
        self.lib.MKL_Get_Version_String(text, 256)
        self.version = text.value.decode().strip()

    def _layout(self, x):  # a row-major (rows, cols) array or a transposed view: (CblasTrans?, leading dimension)
        if x.strides[1] == x.itemsize:
            return self.NO_TRANS, x.strides[0] // x.itemsize
        return self.TRANS, x.strides[1] // x.itemsize

    def gemm(self, a, b, out):
        (m, k), n = a.shape, b.shape[1]
        (ta, lda), (tb, ldb) = self._layout(a), self._layout(b)
        self.lib.cblas_gemm_bf16bf16f32(self.ROW_MAJOR, ta, tb, m, n, k, ctypes.c_float(1.0), _pointer(a), lda,
                                        _pointer(b), ldb, ctypes.c_float(0.0), _pointer(out), n)

    def pack_b(self, a, b):
        (m, k), n = a.shape, b.shape[1]
        packed = np.empty(self.lib.cblas_gemm_bf16bf16f32_pack_get_size(self.B_MATRIX, m, n, k), np.uint8)
        tb, ldb = self._layout(b)
        self.lib.cblas_gemm_bf16bf16f32_pack(self.ROW_MAJOR, self.B_MATRIX, tb, m, n, k, _pointer(b), ldb,
                                             _pointer(packed))
        return packed

    def gemm_packed_b(self, a, packed, out):
        (m, k), n = a.shape, out.shape[1]
        ta, lda = self._layout(a)
        self.lib.cblas_gemm_bf16bf16f32_compute(self.ROW_MAJOR, ta, self.PACKED, m, n, k, ctypes.c_float(1.0),
                                                _pointer(a), lda, _pointer(packed), n, ctypes.c_float(0.0),
                                                _pointer(out), n)


def find_mkl(given):
    candidates = [given] if given else [os.path.join(prefix, "lib", name) for prefix in (sys.prefix, sys.base_prefix)
                                        for name in ("libmkl_rt.so.3", "libmkl_rt.so.2")]
    return next((path for path in candidates if path and os.path.exists(path)), None)


def cpu_line():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lines = []
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines if ":" in line}
    flags = set(fields.get("Flags", "").split())
    bf16 = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags] or ["no bfloat16 instruction"]
    return f"{fields.get('Model name', bf16_gemm.cpu_name())}, {os.cpu_count()} cores, {', '.join(bf16)}"


def operand(rng, shape, transposed):
    """A float32 (rows, cols) operand: row-major, or the transposed view of a row-major (cols, rows) array."""
    return rng.standard_normal(shape[::-1]).astype(np.float32).T if transposed else \
        rng.standard_normal(shape).astype(np.float32)


def contenders(m, k, n, a_transposed, b_transposed, mkl, torch, rng):
    """{library: function of no arguments doing the product once}, on the same operands."""
    a32, b32 = operand(rng, (m, k), a_transposed), operand(rng, (k, n), b_transposed)
    a16, b16 = a32.astype(bf16_gemm.BFLOAT16), b32.astype(bf16_gemm.BFLOAT16)  # astype keeps the layout
    out = np.empty((m, n), np.float32)
    calls = {"NumPy f32": lambda: np.matmul(a32, b32, out=out),
             "oneDNN": lambda: bf16_gemm.matmul(a16, b16, out),  # the layout bf16_gemm chooses, as the model runs
             "oneDNN blocked": lambda: bf16_gemm.matmul(a16, b16, out, layout="blocked"),
             "oneDNN plain": lambda: bf16_gemm.matmul(a16, b16, out, layout="plain")}
    if mkl is not None:
        a_bits, b_bits = a16.view(np.uint16), b16.view(np.uint16)
        prepacked = mkl.pack_b(a_bits, b_bits)
        calls.update({"MKL plain": lambda: mkl.gemm(a_bits, b_bits, out),
                      "MKL packB": lambda: mkl.gemm_packed_b(a_bits, mkl.pack_b(a_bits, b_bits), out),
                      "MKL prepacked": lambda: mkl.gemm_packed_b(a_bits, prepacked, out)})
    if torch is not None:
        as_torch = lambda x: (torch.from_numpy(np.ascontiguousarray(x.T)).bfloat16().T if x.strides[0] < x.strides[1]
                              else torch.from_numpy(x).bfloat16())  # noqa: E731  the same layout
        ta, tb = as_torch(a32), as_torch(b32)
        calls["torch bf16"] = lambda: torch.matmul(ta, tb)
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mkl-lib", help="path of libmkl_rt.so (default: the mkl wheel's, under <prefix>/lib)")
    parser.add_argument("--torch", action="store_true", help="PyTorch's bfloat16 matmul too")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (one thread each)")
    args = parser.parse_args()
    reason = bf16_gemm.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    mkl_path = find_mkl(args.mkl_lib)
    mkl = MKL(mkl_path) if mkl_path else None
    torch = None
    if args.torch:
        import torch
    rng = np.random.default_rng(0)
    cases = [(row, shape, contenders(*shape[1:6], mkl, torch, rng)) for row in args.rows for shape in SHAPES[row]]
    libraries = list(cases[0][2])
    seconds = {(shape[0], row, library): [] for row, shape, calls in cases for library in calls}
    for _, _, calls in cases:  # warm-up: plans, packing buffers, first-touch pages
        for call in calls.values():
            call()
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.rounds):
        for row, shape, calls in cases:
            for library, call in calls.items():
                started = clock()
                call()
                call()
                seconds[(shape[0], row, library)].append((clock() - started) / 2)

    print(f"CPU: {cpu_line()}")
    print(f"oneDNN {bf16_gemm.version()} ({next(iter(bf16_gemm._plans.values())).implementation}); "
          f"MKL: {mkl.version if mkl else 'not installed (pip install mkl, or --mkl-lib)'}; "
          f"{'torch ' + torch.__version__ if torch else 'torch not measured (--torch)'}")
    threads = os.environ.get("OMP_NUM_THREADS", f"{os.cpu_count()} (all cores)")
    print(f"GFLOP/s (2*M*N*K / s of {'CPU time' if args.cpu_time else 'the clock'}), median of {args.rounds} "
          f"interleaved rounds of 2 calls each; OMP_NUM_THREADS {threads}")
    per_call = [name for name in ("MKL plain", "MKL packB") if name in libraries]
    header = f"{'product':33s} {'M x K x N':>17s} " + " ".join(f"{name:>14s}" for name in libraries)
    print(header + ("  oneDNN/MKL" if per_call else ""))
    for row, shape, calls in cases:
        name, m, k, n = shape[:4]
        flops = 2.0 * m * k * n
        rates = [flops / statistics.median(seconds[(name, row, library)]) / 1e9 for library in libraries]
        line = f"{row + ' ' + name:33s} {f'{m}x{k}x{n}':>17s} " + " ".join(f"{rate:14.0f}" for rate in rates)
        if per_call:
            ours = seconds[(name, row, "oneDNN")]
            best_mkl = [min(seconds[(name, row, library)][i] for library in per_call) for i in range(args.rounds)]
            line += f"  {statistics.median(b / o for o, b in zip(ours, best_mkl)):9.2f}x"
        print(line)
    print("\nThe floor: a training step's products (each as many times as one step runs it), at the rates above")
    for row in args.rows:
        step = [(shape, shape[6]) for r, shape, _ in cases if r == row]
        total = sum(2.0 * m * k * n * count for (_, m, k, n, _, _, count), count in step) / 1e9
        floors = {library: sum(statistics.median(seconds[(shape[0], row, library)]) * count for shape, count in step)
                  for library in libraries}
        print(f"  {row}: {total:.0f} GFLOP per step; " + ", ".join(
            f"{library} {floor:.3f} s" for library, floor in floors.items()))


if __name__ == "__main__":
    main()
