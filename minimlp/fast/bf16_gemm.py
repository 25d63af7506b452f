"""bfloat16 matrix products on the CPU: oneDNN's matmul, called on NumPy arrays through ctypes.

    from minimlp.fast import bf16_gemm
    c = bf16_gemm.matmul(a, b)     # a (M, K), b (K, N): bfloat16 or float32 -> c float32 (M, N)
    c = bf16_gemm.matmul(a, b, dtype=bf16_gemm.BFLOAT16)   # the same sums, rounded to bfloat16 by oneDNN

Install (optional, not in requirements.txt):  pip install onednn-cpu-gomp ml-dtypes

For the callers. minimlp.precision routes to it: inside `autocast("bfloat16")` (what train_step does with
`policy("bfloat16")`), `precision.matmul(a, b)` on NumPy arrays calls `bf16_gemm.matmul(a, b)`, and
`precision.cpu_bfloat16_products()` tells the CPU fast path to hand its operands over in bfloat16. The
command line, for --amp-dtype bfloat16 on the CPU, asks two questions, in this order:
    note = bf16_gemm.missing_instruction()   # None, or one line: no avx512_bf16/amx_bf16 here -> print, run float32
    reason = bf16_gemm.unavailable_reason()  # None, or one line saying what to pip install -> print, exit 2
`available()` is both at once (cached): True where bfloat16 products run here.

What a product is. Both operands are bfloat16 (8-bit significand, float32's exponent); each product of two
of them is exact in float32, and the K products of a dot product are summed in float32 by the hardware's
own instructions (AVX-512-BF16's vdpbf16ps, or AMX's tile products where the CPU has them). Those
instructions read a subnormal bfloat16 (below 1.2e-38) as zero. An operand given in float32 is rounded to
bfloat16 (to nearest, ties to even) first, by a oneDNN reorder; the fast path hands its activations and
gradients over already rounded (minimlp/fast/cpu_kernels.py rounds in the loop that produces each one),
so that only the weights, rounded while they are reordered, pay a pass, and it is a small one.

Layouts. An operand may be a row-major 2-D array or the transposed view of one: `w.T` or `dy.T` is
described to oneDNN by its strides and never copied. When A has many rows (BLOCKED_FROM_ROWS), B is first
reordered into the blocked layout oneDNN picks for this CPU ("format_tag any"): one pass over B, won back
because every block of rows of A reads it again, on a CPU without AMX; with AMX it is not (default_layout).
Token mixing's B (196 x B*d) is larger than its A and is read in its own strides.

Why oneDNN (benchmarks/bf16_gemm.py measures both, and MKL's packed-operand calls): on this project's AMD
EPYC (Zen 4, avx512_bf16, no AMX), one core, oneDNN ran ResMLP-S12's products at 145-197 GFLOP/s, level with
PyTorch's own bfloat16 matmul and twice NumPy's float32, where MKL's cblas_gemm_bf16bf16f32 ran 43-80
(cblas_gemm_bf16bf16f32_pack + _compute slower still, 9-82: MKL takes a slow path on AMD); an S12 step's
products cost 3.15 s of one core through oneDNN, 7.7 s through MKL. On the Intel Xeon with AMX the order turns:
MKL 2026.2 (wheel `mkl`) ran an S12 step's products in 0.41 s (0.36 s with B packed once), oneDNN 3.2 in 0.50 s,
PyTorch's newer bundled oneDNN in 0.40 s (README, Speed): oneDNN stays the one library that serves both CPUs,
and MKL on Intel is the measured next step. oneDNN 3.2's wheel `onednn-cpu-gomp` is built on GNU
OpenMP, the runtime of Numba's OpenMP threading layer, so the products and the fused loops share one pool
of threads (and OMP_WAIT_POLICY, minimlp/fast/cpu_settings.py). The newer `onednn` wheel is a SYCL build
with no CPU engine for host arrays: it is refused, saying so.

bfloat16 arrays are NumPy arrays of `ml_dtypes.bfloat16` (BFLOAT16 here): the dtype says what the 16 bits
are, so an operand that is already rounded is known by its dtype, `astype(np.float32)` reads it back
exactly, and printing shows values, not integers. Numba cannot type that dtype, so the fused loops write
uint16 bit patterns and the result is `.view(BFLOAT16)`, which costs nothing.
"""
import ctypes
import ctypes.util
import functools
import os
import site
import sys
from pathlib import Path

import numpy as np

INSTALL = "pip install onednn-cpu-gomp ml-dtypes"
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the x86 bfloat16 dot-product instructions

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    ml_dtypes, BFLOAT16 = None, None

# oneDNN 3.x C API constants (dnnl_types.h)
_CPU_ENGINE = 1  # dnnl_cpu
_STREAM_IN_ORDER = 1  # dnnl_stream_default_flags
_DATA_TYPE = {"bfloat16": 2, "float32": 3}  # dnnl_bf16, dnnl_f32
_FORMAT_ANY = 1  # dnnl_format_tag_any: the primitive picks its own (blocked) layout
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33  # DNNL_ARG_SRC, DNNL_ARG_DST, DNNL_ARG_WEIGHTS (reorders: FROM, TO)
_QUERY_IMPL_INFO, _QUERY_EXEC_ARG_MD = 8, 255  # dnnl_query_impl_info_str, dnnl_query_exec_arg_md
_Dims = ctypes.c_int64 * 12  # dnnl_dims_t (DNNL_MAX_NDIMS = 12)


class _ExecArg(ctypes.Structure):  # dnnl_exec_arg_t
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):  # dnnl_version_t
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


# --------------------------------------------------------------------------------------------- availability
def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo); empty where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "this CPU"


def missing_instruction():
    """None where the CPU multiplies bfloat16 in hardware (avx512_bf16 or amx_bf16), else the one line to print
    before running float32 instead: without the instruction, bfloat16 products are slower than float32 ones."""
    if cpu_flags() & set(BFLOAT16_FLAGS):
        return None
    return (f"{cpu_name()} has no bfloat16 instruction (neither {' nor '.join(BFLOAT16_FLAGS)}): "
            "bfloat16 products would be slower than float32 here, so the step runs in float32")


def unavailable_reason():
    """None where the library is installed and serves the CPU, else one line saying what to do."""
    if BFLOAT16 is None:
        return f"bfloat16 on the CPU needs the ml_dtypes package: {INSTALL}"
    try:
        _library()
    except OSError as error:
        return str(error)
    return None


@functools.cache
def available():
    """True where bfloat16 products run here: the CPU has the instruction and the library is installed
    (asked once per process)."""
    return missing_instruction() is None and unavailable_reason() is None


def _library_candidates():
    """Where pip puts the wheel's libdnnl.so.3 (its data files go to <prefix>/lib), then the system's."""
    prefixes = [sys.prefix, sys.base_prefix, site.getuserbase()]
    paths = [os.path.join(prefix, "lib", "libdnnl.so.3") for prefix in dict.fromkeys(prefixes)]
    found = ctypes.util.find_library("dnnl")
    return paths + ([found] if found else [])


_state = {}  # the loaded library, engine and stream: made once, on first use


def _library():
    if "lib" in _state:
        return _state["lib"]
    tried = [path for path in _library_candidates() if path and (os.path.exists(path) or "/" not in path)]
    if not tried:
        raise OSError(f"bfloat16 on the CPU needs oneDNN (libdnnl.so.3, not found under {sys.prefix}/lib): {INSTALL}")
    try:
        lib = ctypes.CDLL(tried[0])
    except OSError as error:
        raise OSError(f"oneDNN ({tried[0]}) does not load ({error}); reinstall it: {INSTALL}") from None
    lib.dnnl_version.restype = ctypes.POINTER(_Version)
    version = lib.dnnl_version().contents
    lib.dnnl_engine_get_count.restype = ctypes.c_size_t
    if version.major != 3 or lib.dnnl_engine_get_count(_CPU_ENGINE) < 1:
        raise OSError(f"the oneDNN found ({tried[0]}, version {version.major}.{version.minor}) has no CPU engine "
                      f"for NumPy arrays (the `onednn` wheel is a SYCL build): pip uninstall onednn; {INSTALL}")
    for name in ("dnnl_engine_create", "dnnl_stream_create", "dnnl_memory_desc_create_with_strides",
                 "dnnl_memory_desc_create_with_tag", "dnnl_matmul_primitive_desc_create", "dnnl_primitive_create",
                 "dnnl_memory_create", "dnnl_memory_set_data_handle", "dnnl_primitive_execute", "dnnl_stream_wait",
                 "dnnl_primitive_desc_query", "dnnl_reorder_primitive_desc_create"):
        getattr(lib, name).restype = ctypes.c_int
    lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    engine, stream = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, ctypes.c_size_t(0)), "creating the CPU engine")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, ctypes.c_uint(_STREAM_IN_ORDER)), "creating a stream")
    _state.update(lib=lib, engine=engine, stream=stream, version=f"{version.major}.{version.minor}.{version.patch}")
    return lib


def version():
    """oneDNN's version, e.g. '3.2.0' (loads it)."""
    _library()
    return _state["version"]


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"oneDNN failed {what} (dnnl_status_t {status})")


# --------------------------------------------------------------------------------------------- the product
LAYOUTS = ("blocked", "plain")  # how B reaches the matmul: reordered into oneDNN's layout first, or as it is
BLOCKED_FROM_ROWS = 1024  # without AMX, B is reordered when A has at least this many rows (benchmarks/bf16_gemm.py)


@functools.cache
def default_layout(rows):
    """How matmul reads B when A has `rows` rows: "blocked" from BLOCKED_FROM_ROWS rows up on a CPU without AMX
    (AVX-512-BF16: the reorder is won back), "plain" elsewhere. With AMX the products run 3-4x faster and the
    reorder at every call costs more than it wins (benchmarks/bf16_gemm.py on the Intel Xeon with AMX: an S12
    step's products 0.50 s with B plain, 0.73 s blocked; README, Speed)."""
    return "blocked" if rows >= BLOCKED_FROM_ROWS and "amx_bf16" not in cpu_flags() else "plain"


def matmul(a, b, out=None, layout=None, dtype=np.float32):
    """a @ b: a (M, K), b (K, N), each bfloat16 or float32 (then rounded to bfloat16 to nearest even), row-major
    or the transposed view of a row-major array (read as they are; other views are copied). Returns (M, N) in
    `dtype`, C-contiguous, written into `out` if given: the products of bfloat16 operands, summed in float32;
    dtype BFLOAT16: those float32 sums rounded to nearest even as they are stored (half the bytes written).

    layout: how B is read. "blocked": first reordered into oneDNN's blocked layout (one pass over B, which
    pays back when many rows of A reuse it: the weights of fc1/fc2/patch embedding, and the weight gradients);
    "plain": in its own strides (token mixing, whose B, 196 x B*d, is larger than A). None: default_layout's
    choice for A's rows on this CPU."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"bf16_gemm.matmul: shapes {a.shape} @ {b.shape} do not multiply")
    a, b = _operand(a), _operand(b)
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype)
    if out.dtype != np.float32 and out.dtype != BFLOAT16:
        raise ValueError(f"bf16_gemm.matmul: the result is float32 or bfloat16, not {out.dtype}")
    if out.size == 0 or a.shape[1] == 0:
        out[...] = 0.0
        return out
    if layout is None:
        layout = default_layout(a.shape[0])
    _plan(a, b, layout, _dtype_name(out)).execute(a, b, out)
    return out


def _operand(x):
    # oneDNN is given the strides: a row-major array or the transposed view of one (.T) is read as it is;
    # any other view (and any other dtype) is copied once
    if x.dtype != BFLOAT16 and x.dtype != np.float32:
        x = x.astype(np.float32)
    return x if x.flags.c_contiguous or x.flags.f_contiguous else np.ascontiguousarray(x)


def _element_strides(x):
    # strides in elements; an axis of length 1 gets the stride of a row-major array (any stride would do)
    rows, columns = x.shape
    row_stride = x.strides[0] // x.itemsize if rows > 1 else columns
    column_stride = x.strides[1] // x.itemsize if columns > 1 else 1
    return row_stride, column_stride


def _dtype_name(x):
    return "bfloat16" if x.dtype == BFLOAT16 else "float32"


_plans = {}  # (shapes, strides, dtypes, layout) -> _Plan; a training run uses a few dozen
MAX_PLANS = 512


def _plan(a, b, layout, result="float32"):
    key = (a.shape, _element_strides(a), _dtype_name(a), b.shape, _element_strides(b), _dtype_name(b), layout, result)
    plan = _plans.get(key)
    if plan is None:
        if layout not in LAYOUTS:
            raise ValueError(f"bf16_gemm.matmul: layout {layout!r} is not one of {LAYOUTS}")
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = _Plan(a, b, layout, result)
    return plan


class _Plan:
    """The oneDNN objects for one kind of product (shapes, strides, dtypes, layout), made once: the matmul
    primitive (src: bfloat16 with a's strides; weights: B, bfloat16, in the layout oneDNN picks or with
    b's strides; dst: float32 or bfloat16, row-major), and the reorders that round a float32 a into bfloat16 of the
    same layout and bring b into the weights' layout (rounding it when it is float32)."""

    def __init__(self, a, b, layout, result):
        lib, engine = _library(), _state["engine"]
        self.lib = lib
        (rows, inner), columns = a.shape, b.shape[1]
        src = self._desc(a.shape, _element_strides(a), "bfloat16")
        dst = self._desc((rows, columns), (columns, 1), result)
        if layout == "blocked":
            weights = ctypes.c_void_p()
            _check(lib.dnnl_memory_desc_create_with_tag(ctypes.byref(weights), 2, _Dims(inner, columns),
                                                        _DATA_TYPE["bfloat16"], _FORMAT_ANY), "describing B")
        else:
            weights = self._desc(b.shape, _element_strides(b), "bfloat16")
        primitive_desc = ctypes.c_void_p()
        _check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(primitive_desc), engine, src, weights, None, dst,
                                                     None), f"planning a bfloat16 product {a.shape} @ {b.shape}")
        self.product = self._primitive(primitive_desc)
        info = ctypes.c_char_p()
        lib.dnnl_primitive_desc_query(primitive_desc, _QUERY_IMPL_INFO, 0, ctypes.byref(info))
        self.implementation = (info.value or b"?").decode()  # e.g. "brg:avx512_core_bf16", "brg:avx512_core_amx"
        weights = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(primitive_desc, _QUERY_EXEC_ARG_MD, _ARG_WEIGHTS))
        self.memory = {"src": self._memory(src), "weights": self._memory(weights), "dst": self._memory(dst)}
        self.round_a = self.reorder_b = None
        if a.dtype != BFLOAT16:
            a_float32 = self._desc(a.shape, _element_strides(a), "float32")
            self.round_a, self.memory["a"] = self._reorder(a_float32, src), self._memory(a_float32)
        if layout == "blocked" or b.dtype != BFLOAT16:
            b_given = self._desc(b.shape, _element_strides(b), _dtype_name(b))
            self.reorder_b, self.memory["b"] = self._reorder(b_given, weights), self._memory(b_given)
            self.weights_bytes = lib.dnnl_memory_desc_get_size(weights)

    def execute(self, a, b, out):
        if self.round_a is not None:  # a float32 a: into a bfloat16 array of the same layout
            rounded = np.empty(a.shape, BFLOAT16, order="C" if a.flags.c_contiguous else "F")
            self._run(self.round_a, [(_ARG_SRC, "a", a), (_ARG_DST, "src", rounded)])
            a = rounded
        if self.reorder_b is not None:  # B into the weights' layout (and to bfloat16)
            weights = np.empty(self.weights_bytes, np.uint8)
            self._run(self.reorder_b, [(_ARG_SRC, "b", b), (_ARG_DST, "weights", weights)])
            b = weights
        self._run(self.product, [(_ARG_SRC, "src", a), (_ARG_WEIGHTS, "weights", b), (_ARG_DST, "dst", out)])

    def _run(self, primitive, arguments):
        # arguments: (DNNL_ARG_*, memory name, array whose data the memory points at)
        for _, name, array in arguments:
            self.lib.dnnl_memory_set_data_handle(self.memory[name], ctypes.c_void_p(array.ctypes.data))
        exec_args = (_ExecArg * len(arguments))(*(_ExecArg(role, self.memory[name]) for role, name, _ in arguments))
        _check(self.lib.dnnl_primitive_execute(primitive, _state["stream"], len(arguments), exec_args), "executing")
        _check(self.lib.dnnl_stream_wait(_state["stream"]), "waiting for the stream")

    def _desc(self, shape, strides, dtype_name):
        desc = ctypes.c_void_p()
        _check(self.lib.dnnl_memory_desc_create_with_strides(ctypes.byref(desc), 2, _Dims(*shape),
                                                             _DATA_TYPE[dtype_name], _Dims(*strides)),
               f"describing a {dtype_name} array {shape} with element strides {strides}")
        return desc

    def _primitive(self, primitive_desc):
        primitive = ctypes.c_void_p()
        _check(self.lib.dnnl_primitive_create(ctypes.byref(primitive), primitive_desc), "creating a primitive")
        return primitive

    def _reorder(self, source, destination):
        primitive_desc, engine = ctypes.c_void_p(), _state["engine"]
        _check(self.lib.dnnl_reorder_primitive_desc_create(ctypes.byref(primitive_desc), source, engine,
                                                           destination, engine, None), "planning a reorder")
        return self._primitive(primitive_desc)

    def _memory(self, desc):
        memory = ctypes.c_void_p()
        _check(self.lib.dnnl_memory_create(ctypes.byref(memory), desc, _state["engine"], None), "creating memory")
        return memory
