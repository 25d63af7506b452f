"""The process settings that make the CPU training step fast, in one place: each explained and measured
(benchmarks/train_step.py; README, "Speed").

A step alternates matrix products (OpenBLAS's threads, through NumPy) with fused elementwise loops
(Numba's OpenMP threads, minimlp/fast/cpu_kernels.py), with as many threads of each as there are cores.

1. Threads that wait must sleep, not spin. By default a BLAS or OpenMP thread that has finished keeps
   spinning for a while in case more work comes, on a core the other library's next piece of work
   needs: each spinning thread halves the loop or the product beside it. OPENBLAS_THREAD_TIMEOUT=4
   (2^4 cycles before sleeping, OpenBLAS's minimum) and OMP_WAIT_POLICY=PASSIVE make finished threads
   sleep at once. Both libraries read them when they start, so they are set here, in the environment,
   when minimlp is imported (minimlp/__init__.py imports this module first), unless the environment
   already sets them; a program that has imported NumPy before minimlp keeps OpenBLAS's default.
   Measured on ResMLP-S12, batch 32 (README, "Speed"): 3.13 s per step with spinning threads, 2.01 without.
2. Freed memory must stay in the heap. A step frees and allocates hundreds of megabytes of activations.
   glibc's malloc serves blocks above M_MMAP_THRESHOLD (128 KiB to 32 MiB, adaptive) with mmap and
   returns them to the system on free, so every step maps fresh zeroed pages and faults them in again
   (on ResMLP-S12, 9 s of system time over 15 steps; 2.51 s per step, against 2.01 with this setting).
   keep_freed_memory() raises the mmap and trim thresholds so freed blocks wait in the heap for the
   next step. minimlp.ops calls it when it chooses the CPU fast path (cpu_kernels.prepare); it changes
   nothing but where freed memory waits.
"""
import ctypes
import ctypes.util
import os

THREAD_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def let_waiting_threads_sleep():
    """Setting 1 above: into the environment, where it was not set, before NumPy and Numba start threads."""
    for name, value in THREAD_SETTINGS.items():
        os.environ.setdefault(name, value)


def keep_freed_memory():
    """Setting 2 above: glibc keeps freed blocks up to 1 GiB in the heap (no mmap/munmap per activation) and
    never trims it. True where it took effect (glibc), False elsewhere (then nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError, TypeError):  # not glibc: musl, macOS
        return False


let_waiting_threads_sleep()
