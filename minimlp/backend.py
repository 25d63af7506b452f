"""One place that decides where arrays live: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every other module writes its array code once against `xp`, the array module of the data
it is handed (`get_xp(array)`) or of the device it was built for (`Backend.xp`).
"""
import functools
import importlib.metadata
import os
import sys
import warnings

import numpy as np
import scipy.special

CUPY_PACKAGES = ("cupy-cuda12x", "cupy-cuda13x")  # CuPy's wheels for a CUDA 12 / CUDA 13 driver
CUPY_HINT = ('--device gpu needs CuPy with the CUDA libraries it loads: pip install "cupy-cuda12x[ctk]" '
             '(or "cupy-cuda13x[ctk]" for a CUDA 13 driver)')


class DeviceError(RuntimeError):
    """A device was asked for that this machine cannot provide."""


def _import_cupy():
    """Return the cupy module, or None when it is not installed or no GPU answers."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # CuPy installed but no driver or no GPU: treat as "no GPU"
        return None
    return cupy


def gpu_available():
    return _import_cupy() is not None


def resolve_device(device):
    """'auto' -> 'gpu' when CuPy and a GPU are present, else 'cpu'. 'gpu' without one is an error, and so is
    a GPU whose CUDA libraries do not load (check_gpu_libraries)."""
    if device not in ("auto", "cpu", "gpu"):
        raise DeviceError(f"unknown device {device!r}: choose auto, cpu or gpu")
    if device == "auto":
        device = "gpu" if gpu_available() else "cpu"
    elif device == "gpu" and not gpu_available():
        try:
            import cupy  # noqa: F401
        except ImportError:
            raise DeviceError(CUPY_HINT) from None
        raise DeviceError("--device gpu: CuPy is installed but no CUDA GPU answered "
                          "(check nvidia-smi and that the cupy-cudaXXx package matches the driver)")
    if device == "gpu":
        check_gpu_libraries()
    return device


def cupy_install_hint():
    """The pip command that brings CuPy's CUDA libraries (NVRTC, cuBLAS, the CUDA headers) for the CuPy
    package installed here: CuPy 14's wheels bring none of them without the [ctk] extra."""
    installed = []
    for package in CUPY_PACKAGES:
        try:
            importlib.metadata.version(package)
            installed.append(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) == 1:
        return f'pip install "{installed[0]}[ctk]" (or install the CUDA Toolkit)'
    return 'pip install "cupy-cuda12x[ctk]" (or "cupy-cuda13x[ctk]" for a CUDA 13 driver, or the CUDA Toolkit)'


def _one_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _load_nvrtc(cupy):
    cupy.cuda.nvrtc.getVersion()


def _load_cublas(cupy):
    from cupy_backends.cuda.libs import cublas  # noqa: F401  loads libcublas and libcublasLt
    cupy.cuda.device.get_cublas_handle()


def _run_probe_kernel(cupy):
    probe = cupy.ElementwiseKernel("T x", "T y", "y = x + T(1)", "minimlp_probe")  # CuPy's headers, compiled by NVRTC
    if float(probe(cupy.zeros(1, dtype=np.float32))[0]) != 1.0:
        raise RuntimeError("the probe kernel ran but returned a wrong value: check the driver (nvidia-smi)")


GPU_LIBRARY_CHECKS = (  # what is loaded, what it is for (in the error), how
    ("NVRTC", "CUDA's runtime compiler, which builds every kernel", _load_nvrtc),
    ("cuBLAS", "which does every matrix product", _load_cublas),
    ("a probe kernel", "most often failing for want of the CUDA headers", _run_probe_kernel),
)


@functools.cache
def check_gpu_libraries(nccl=False):
    """Load, before any work, what the GPU path needs beyond the driver: NVRTC (every kernel is compiled at its
    first launch), cuBLAS (every matrix product), the CUDA headers (a probe kernel is compiled and run), and
    NCCL if nccl (training on several GPUs). Without this, each one missing is a traceback in the middle of a
    run. Raises DeviceError: one line saying what failed and what to install."""
    import cupy
    for what, role, load in GPU_LIBRARY_CHECKS:
        try:
            load(cupy)
        except Exception as error:
            verb = "compile and run" if load is _run_probe_kernel else "load"
            raise DeviceError(f"--device gpu: CuPy cannot {verb} {what}, {role} ({_one_line(error)}); "
                              f"{cupy_install_hint()}") from None
    if nccl:
        with warnings.catch_warnings():  # CuPy warns when NCCL is missing; the error below says it once
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl as cupy_nccl
        if not cupy_nccl.available:
            major = cupy.cuda.runtime.runtimeGetVersion() // 1000
            raise DeviceError(f"--device gpu on several GPUs needs NCCL, which CuPy cannot load: "
                              f'pip install "nvidia-nccl-cu{major}>=2.18.1,<3"')


def set_tf32(enabled):
    """TF32 tensor cores for float32 matmuls on the GPU. CuPy reads CUPY_TF32 at its first matmul,
    so this must run before any GPU work; it has no effect on the CPU."""
    os.environ["CUPY_TF32"] = "1" if enabled else "0"


def gpu_memory_held_bytes():
    """Bytes that CuPy's memory pool holds on the GPU. The pool keeps freed blocks for reuse instead of
    returning them, so this is the high-water mark of what the run has had allocated at once (plus
    rounding and fragmentation), which is what decides an out-of-memory error."""
    return get_module("gpu").get_default_memory_pool().total_bytes()


def out_of_memory_errors():
    """The exception classes that mean "the GPU ran out of memory", for an `except` clause: CuPy's, if
    CuPy has been imported, else none (a CPU-only run never imports CuPy just to name an exception)."""
    cupy = sys.modules.get("cupy")
    return (cupy.cuda.memory.OutOfMemoryError,) if cupy is not None else ()


def out_of_memory_advice(batch_size, error):
    """What to say when out_of_memory_errors() is caught: the batch size that did not fit, and a smaller one."""
    return (f"the GPU ran out of memory with --batch-size {batch_size} ({error}): try a smaller --batch-size, "
            f"e.g. {max(batch_size // 2, 1)}")


def get_module(device):
    """The array module for 'cpu' or 'gpu' (after resolve_device)."""
    if device == "cpu":
        return np
    cupy = _import_cupy()
    if cupy is None:
        raise DeviceError(CUPY_HINT)
    return cupy


def get_xp(array):
    """numpy or cupy, whichever owns `array`."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    return get_module("gpu")


def to_numpy(array):
    """A host (NumPy) copy-or-view of any array."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


def to_device(array, device, dtype=None):
    """Move `array` to 'cpu' or 'gpu', optionally casting; no copy when it is already there."""
    xp = get_module(device)
    out = xp.asarray(array)
    if dtype is not None and out.dtype != np.dtype(dtype):
        out = out.astype(dtype)
    return out


# float32 erf on the CPU: the rational approximation that Eigen and XLA use for float32,
#   erf(x) ~= x * P(x^2) / Q(x^2)  on x clamped to [-4, 4]  (beyond, erf is +-1 to float32 precision)
# with P of degree 6 and Q of degree 4 in x^2; absolute error under 5e-7 (tests/test_backend.py).
# SciPy computes every float32 erf in float64 and is six times slower: GELU's erf was the costliest
# elementwise operation of a CPU training step. Coefficients from the highest power down.
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)
ERF_PIECE = 1 << 14  # elements per piece: the piece's temporaries stay in the CPU's cache


def erf(x):
    """The error function, elementwise, on either backend (NumPy has none of its own): CuPy's on the
    GPU, SciPy's in float64 on the CPU, the rational approximation above for float32 on the CPU."""
    if get_xp(x) is not np:
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if x.dtype != np.float32:
        return scipy.special.erf(x)
    out = np.empty_like(x)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, ERF_PIECE):
        _erf_float32_piece(flat_in[start:start + ERF_PIECE], flat_out[start:start + ERF_PIECE])
    return out


def _erf_float32_piece(x, out):
    x = np.clip(x, -4.0, 4.0)
    x2 = x * x
    numerator = np.full_like(x, ERF_NUMERATOR[0])
    for coefficient in ERF_NUMERATOR[1:]:  # Horner's rule in x^2
        numerator *= x2
        numerator += coefficient
    numerator *= x
    denominator = np.full_like(x, ERF_DENOMINATOR[0])
    for coefficient in ERF_DENOMINATOR[1:]:
        denominator *= x2
        denominator += coefficient
    np.divide(numerator, denominator, out=out)
