"""One place that decides where arrays live: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every other module writes its array code once against `xp`, the array module of the data
it is handed (`get_xp(array)`) or of the device it was built for (`Backend.xp`).
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.special

CUPY_HINT = "--device gpu needs CuPy: pip install cupy-cuda12x (or cupy-cuda13x for CUDA 13)"


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
    """'auto' -> 'gpu' when CuPy and a GPU are present, else 'cpu'. 'gpu' without one is an error."""
    if device not in ("auto", "cpu", "gpu"):
        raise DeviceError(f"unknown device {device!r}: choose auto, cpu or gpu")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        try:
            import cupy  # noqa: F401
        except ImportError:
            raise DeviceError(CUPY_HINT) from None
        raise DeviceError("--device gpu: CuPy is installed but no CUDA GPU answered "
                          "(check nvidia-smi and that the cupy-cudaXXx package matches the driver)")
    return device


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


def device_of(array):
    return "cpu" if get_xp(array) is np else "gpu"


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


_CPU_THREADS = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
_ROWS_PER_TASK_MIN = 1 << 15  # below this many elements per core, threads cost more than they save


def erf(x):
    """The error function, elementwise, on either backend (NumPy has none of its own).

    On the CPU it is SciPy's, the most expensive elementwise operation of a training step (GELU's
    forward): NumPy and SciPy ufuncs use one core, so large arrays are cut into one contiguous piece
    per core, computed in threads (ufuncs release the GIL while they run)."""
    if get_xp(x) is not np:
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    cores = _CPU_THREADS._max_workers
    if cores == 1 or x.size < cores * _ROWS_PER_TASK_MIN or not x.flags.c_contiguous:
        return scipy.special.erf(x)
    out = np.empty_like(x)
    pieces = zip(np.array_split(x.reshape(-1), cores), np.array_split(out.reshape(-1), cores))
    for task in [_CPU_THREADS.submit(scipy.special.erf, piece, out=out_piece) for piece, out_piece in pieces]:
        task.result()
    return out
