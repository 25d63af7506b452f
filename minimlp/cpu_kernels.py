"""Fused CPU loops compiled by Numba: the CPU's fast path, beside the plain NumPy reference (minimlp.layers).

NumPy runs one operation at a time, on one core, and each operation reads its inputs from memory and
writes a new array back: GELU's forward alone is about twelve passes over fc1's output. Each loop
here does in one multi-threaded pass what the reference does in several, the formula per element,
so the activations are read once and written once. The functions listed in OPERATIONS have the
names, signatures and results (caches included) of the reference functions they replace;
minimlp.ops chooses them once, when a model is built on the CPU in float32, and
tests/test_fast_paths.py checks each against the reference on the same inputs.

Numba compiles each loop the first time it is called and keeps the machine code on disk
(cache=True, in __pycache__), so only the very first run pays the compile time (about 10 s).
Arithmetic is float32 throughout, like the reference's; `fastmath` lets the compiler vectorize and
reorder the sums, so results differ from the reference by float32 rounding only (tested at 1e-5).

The allocator. A training step frees and allocates hundreds of megabytes of activations. glibc's
malloc serves blocks above M_MMAP_THRESHOLD (128 KiB to 32 MiB, adaptive) with mmap and returns them
to the system on free, so every step the kernel maps fresh zeroed pages and the step faults them in
again: on ResMLP-S12 that was 9 s of system time over 15 steps. `keep_freed_memory()` raises the
mmap threshold and the trim threshold so that freed blocks stay in the heap for the next step
(measured in benchmarks/train_step.py: README, "Speed"). It is called once, by minimlp.ops, when this
fast path is chosen; it changes nothing but where freed memory waits.
"""
import ctypes
import ctypes.util
import functools
import math

import numba
import numpy as np

from .backend import ERF_DENOMINATOR, ERF_NUMERATOR

OPERATIONS = ("affine_forward", "affine_backward", "bias_gelu_forward", "gelu_backward", "residual_forward",
              "residual_backward", "adamw_update")
DTYPES = (np.dtype(np.float32),)

# float32 constants: a float64 constant would promote the float32 arithmetic around it
F = np.float32
HALF, ONE, ZERO = F(0.5), F(1.0), F(0.0)
SQRT_HALF, INV_SQRT_2PI = F(math.sqrt(0.5)), F(1.0 / math.sqrt(2.0 * math.pi))
P0, P1, P2, P3, P4, P5, P6 = (F(c) for c in ERF_NUMERATOR)
Q0, Q1, Q2, Q3, Q4 = (F(c) for c in ERF_DENOMINATOR)
ERF_CLAMP = F(4.0)
ROWS_PER_PARTIAL_SUM = 64  # reductions: each thread sums 64 rows into its own partial row, then one small sum

jit = functools.partial(numba.njit, parallel=True, fastmath=True, cache=True)
jit_inline = functools.partial(numba.njit, fastmath=True, cache=True, inline="always")


# --------------------------------------------------------------------------------------------- allocator
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory():
    """Ask glibc to keep freed blocks up to 1 GiB in the heap (no mmap/munmap per activation) and never to
    trim the heap. True where it took effect (glibc), False elsewhere (then nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc: musl, macOS
        return False


ALLOCATOR_KEEPS_FREED_MEMORY = keep_freed_memory()  # once, when minimlp.ops first chooses this fast path


# --------------------------------------------------------------------------------------------- Affine
def affine_forward(x, alpha, beta):
    # y = alpha * x + beta, one pass
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    return _affine(rows, alpha, beta).reshape(x.shape), (x, alpha)


@jit
def _affine(x, alpha, beta):
    y = np.empty_like(x)
    for i in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            y[i, j] = alpha[j] * x[i, j] + beta[j]
    return y


def affine_backward(dy, cache):
    # dx = alpha * dy; dalpha = sum dy * x; dbeta = sum dy: one pass over dy and x for all three
    x, alpha = cache
    dy_rows = np.ascontiguousarray(dy).reshape(-1, dy.shape[-1])
    x_rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    dx, dalpha, dbeta = _affine_backward(dy_rows, x_rows, alpha)
    return dx.reshape(dy.shape), dalpha, dbeta


@jit
def _affine_backward(dy, x, alpha):
    rows, dim = dy.shape
    pieces = (rows + ROWS_PER_PARTIAL_SUM - 1) // ROWS_PER_PARTIAL_SUM
    dx = np.empty_like(dy)
    dalpha_parts, dbeta_parts = np.zeros((pieces, dim), dy.dtype), np.zeros((pieces, dim), dy.dtype)
    for piece in numba.prange(pieces):
        for i in range(piece * ROWS_PER_PARTIAL_SUM, min(rows, (piece + 1) * ROWS_PER_PARTIAL_SUM)):
            for j in range(dim):
                dx[i, j] = alpha[j] * dy[i, j]
                dalpha_parts[piece, j] += dy[i, j] * x[i, j]
                dbeta_parts[piece, j] += dy[i, j]
    return dx, dalpha_parts.sum(axis=0), dbeta_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------- GELU
@jit_inline
def _erf(x):
    # the rational approximation of minimlp.backend.erf, per element
    x = min(max(x, -ERF_CLAMP), ERF_CLAMP)
    x2 = x * x
    numerator = ((((((P0 * x2 + P1) * x2 + P2) * x2 + P3) * x2 + P4) * x2 + P5) * x2 + P6) * x
    denominator = (((Q0 * x2 + Q1) * x2 + Q2) * x2 + Q3) * x2 + Q4
    return numerator / denominator


def bias_gelu_forward(x, bias):
    # x += b (cached: GELU's input); cdf = Phi(x); y = x * cdf, one pass
    activated, cdf = _bias_gelu(x, bias)
    return activated, (x, cdf)


@jit
def _bias_gelu(x, bias):
    activated, cdf = np.empty_like(x), np.empty_like(x)
    for i in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            value = x[i, j] + bias[j]
            x[i, j] = value
            phi = HALF * (ONE + _erf(value * SQRT_HALF))
            cdf[i, j] = phi
            activated[i, j] = value * phi
    return activated, cdf


def gelu_backward(dy, cache):
    # dx = dy * (Phi(x) + x * phi(x)), one pass
    x, cdf = cache
    return _gelu_backward(dy, x, cdf)


@jit
def _gelu_backward(dy, x, cdf):
    dx = np.empty_like(dy)
    for i in numba.prange(dy.shape[0]):
        for j in range(dy.shape[1]):
            value = x[i, j]
            dx[i, j] = dy[i, j] * (cdf[i, j] + value * math.exp(-HALF * value * value) * INV_SQRT_2PI)
    return dx


# --------------------------------------------------------------------------------------------- residual
def residual_forward(x, branch, bias, gamma, mask):
    # branch += b; y = x + mask * gamma * branch, one pass; b is per patch (N, 1, 1) or per channel (d,)
    scale = _scale_of(mask, x)
    per_patch_bias = bias.reshape(-1) if bias.ndim == 3 else np.zeros(x.shape[0], x.dtype)
    per_channel_bias = bias if bias.ndim == 1 else np.zeros(x.shape[2], x.dtype)
    y = _residual(x, branch, per_patch_bias, per_channel_bias, gamma, scale)
    return y, ((branch, gamma), mask)  # the reference's cache: (layer_scale cache, mask)


@jit
def _residual(x, branch, patch_bias, channel_bias, gamma, scale):
    y = np.empty_like(x)
    for n in numba.prange(x.shape[0]):
        for b in range(x.shape[1]):
            for c in range(x.shape[2]):
                value = branch[n, b, c] + patch_bias[n] + channel_bias[c]
                branch[n, b, c] = value
                y[n, b, c] = x[n, b, c] + scale[b] * gamma[c] * value
    return y


def residual_backward(dy, cache):
    # dbranch = mask * gamma * dy;  dgamma = sum over (N, B) of mask * dy * branch, one pass
    (branch, gamma), mask = cache
    return _residual_backward(np.ascontiguousarray(dy), branch, gamma, _scale_of(mask, dy))


@jit
def _residual_backward(dy, branch, gamma, scale):
    patches, images, dim = dy.shape
    dbranch = np.empty_like(dy)
    dgamma_parts = np.zeros((patches, dim), dy.dtype)
    for n in numba.prange(patches):
        for b in range(images):
            for c in range(dim):
                scaled = scale[b] * dy[n, b, c]
                dbranch[n, b, c] = scaled * gamma[c]
                dgamma_parts[n, c] += scaled * branch[n, b, c]
    return dbranch, dgamma_parts.sum(axis=0)


def _scale_of(mask, like):
    """Drop path's per-image factor (B,); ones when drop path is off."""
    return np.ones(like.shape[1], like.dtype) if mask is None else mask


# --------------------------------------------------------------------------------------------- AdamW
def adamw_update(param, grad, m, v, decay_mask, lr_decay, betas, step_size, sqrt_bias2, eps):
    """In place on param, m, v, as minimlp.optim.adamw_update; 1 - beta is rounded from double, as there."""
    beta1, beta2 = betas
    _adamw(param, grad, m, v, decay_mask, F(lr_decay), F(beta1), F(beta2), F(1 - beta1), F(1 - beta2),
           F(step_size), F(sqrt_bias2), F(eps))


@jit
def _adamw(param, grad, m, v, decay_mask, lr_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
           sqrt_bias2, eps):
    for i in numba.prange(param.shape[0]):
        p = param[i] - lr_decay * decay_mask[i] * param[i]
        g = grad[i]
        m[i] = beta1 * m[i] + one_minus_beta1 * g
        v[i] = beta2 * v[i] + one_minus_beta2 * g * g
        param[i] = p - step_size * m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps)
