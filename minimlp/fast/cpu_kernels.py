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

The process settings this fast path relies on (threads that sleep when they wait, freed memory kept in
the heap) are in minimlp/fast/cpu_settings.py; `prepare` applies the allocator one when minimlp.ops chooses
this fast path.

bfloat16 products (inside autocast("bfloat16"), where minimlp.precision.cpu_bfloat16_products() says the
CPU multiplies bfloat16 in hardware through minimlp/fast/bf16_gemm.py): each loop whose output is only
a matrix product's operand writes it in bfloat16, rounded to nearest even in the same pass, so no
product pays a rounding pass of its own: Affine's output (token mixing's and fc1's input; the last
Affine's feeds the mean pool, which reads bfloat16 and sums in float32), GELU's output (fc2's input),
the gradients that reach fc2 and token mixing (residual_backward) and fc1 (bias_gelu_backward), and the
image patches (patch_embed_forward cuts and rounds them in one pass). What GELU keeps for backward, its
slope, is kept in bfloat16 too (as PyTorch's autocast keeps GELU's bfloat16 input). The products' results
that only the next loop reads come from oneDNN already in bfloat16 (minimlp.precision.matmul's half_result):
GELU's inputs (fc1's output, fc2's input gradient), the residual's branch (token mixing's and fc2's outputs,
which the residual's forward stores back, bias added, in bfloat16 for its backward), and the Affine's
incoming gradient (fc1's and token mixing's input gradients); the loops read each as the float32 it is.
Everything else stays float32: the residual stream and its gradient, the sums (biases, alpha, gamma) of
gradients taken before they are rounded.
One loop serves both precisions: each such function allocates its output as operand_output (bfloat16
bits under bfloat16 products, float32 elsewhere), and the loop writes `stored(out, value)` and reads
`float32_of(x[i])`, which Numba resolves for the array's dtype when it compiles the loop, once for each
(minimlp/fast/cpu_bfloat16.py): in float32 they are the value itself, so the float32 loop is what it was.
bfloat16 arrays are ml_dtypes.bfloat16 views of the uint16 bits the loops write (Numba cannot type
that dtype). The AdamW update's loop is minimlp/fast/cpu_optimizer.py.
"""
import functools
import math

import numba
import numpy as np

from . import cpu_settings
from .cpu_bfloat16 import float32_of, operand_output, readable, stored, viewed
from .cpu_bfloat16 import mean_pool_forward, patch_embed_forward, to_bfloat16  # noqa: F401  (OPERATIONS; tests)
from .cpu_optimizer import adamw_update  # noqa: F401  (the last two: OPERATIONS)

OPERATIONS = ("affine_forward", "affine_backward", "bias_gelu_forward", "bias_gelu_backward", "residual_forward",
              "residual_backward", "adamw_update", "mean_pool_forward", "patch_embed_forward")
DTYPES = (np.dtype(np.float32),)

# float32 constants: a float64 constant would promote the float32 arithmetic around it
F = np.float32
HALF, ONE, ZERO = F(0.5), F(1.0), F(0.0)
SQRT_HALF, INV_SQRT_2PI = F(math.sqrt(0.5)), F(1.0 / math.sqrt(2.0 * math.pi))
AS_P, AS_A1, AS_A2, AS_A3, AS_A4, AS_A5 = (F(c) for c in (  # Abramowitz and Stegun 7.1.26 (_gelu_and_slope)
    0.3275911, 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
EXP_FLOOR = F(-80.0)  # exp(-80) = 2e-35, still a normal float32 (2^k for k >= -126)
LOG2_E, LN2_HIGH, LN2_LOW = F(1.0 / math.log(2.0)), F(0.693359375), F(math.log(2.0) - 0.693359375)
EXP_TAYLOR = tuple(F(1.0 / math.factorial(k)) for k in range(8))  # 1/k!, k = 0..7
EXPONENT_BIAS, MANTISSA_SPAN = np.int32(127), np.int32(1 << 23)  # a float32's bits: exponent + 127, above 23 bits
FIRST_COMPILE_SECONDS = 30  # measured: README, Speed
ROWS_PER_PARTIAL_SUM = 64  # reductions: each thread sums 64 rows into its own partial row, then one small sum

jit = functools.partial(numba.njit, parallel=True, fastmath=True, cache=True)
jit_inline = functools.partial(numba.njit, fastmath=True, cache=True, inline="always")


def prepare():
    """Called by minimlp.ops each time it chooses this fast path: the allocator setting of
    minimlp/fast/cpu_settings.py (calling it again changes nothing)."""
    cpu_settings.keep_freed_memory()


def say_when_compiling(say):
    """Call say(line) once, when Numba starts compiling one of the fast path's loops because its disk cache
    has none yet (the first run on a machine, or after an edit); a cached loop loads silently. Numba's event
    API ("numba:compile" fires on a cache miss only)."""
    numba.core.event.register("numba:compile", _FirstCompile(say))


class _FirstCompile(numba.core.event.Listener):
    def __init__(self, say):
        self.say, self.said = say, False

    def on_start(self, event):
        dispatcher = event.data["dispatcher"]
        if not self.said and dispatcher.py_func.__module__.startswith(__package__):
            self.said = True
            self.say(f"compiling the CPU kernels (Numba; once per machine, about {FIRST_COMPILE_SECONDS} s over the "
                     f"first steps and the first evaluation; kept in {dispatcher.stats.cache_path})")

    def on_end(self, event):
        pass


# --------------------------------------------------------------------------------------------- Affine
def affine_forward(x, alpha, beta):
    # y = alpha * x + beta, one pass (y in bfloat16 under bfloat16 products: a product's operand)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = operand_output(rows.shape)
    _affine(rows, alpha, beta, y)
    return viewed(y).reshape(x.shape), (x, alpha)


@jit
def _affine(x, alpha, beta, y):  # y: float32, or bfloat16 bits
    for i in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            y[i, j] = stored(y, alpha[j] * x[i, j] + beta[j])


def affine_backward(dy, cache, skip=None):
    # dx = alpha * dy (+ skip); dalpha = sum dy * x; dbeta = sum dy: one pass over dy and x for all three
    # (dy in bfloat16 under bfloat16 products, a product's half result: read as float32, exactly)
    x, alpha = cache
    rows_of = lambda array: np.ascontiguousarray(readable(array)).reshape(-1, array.shape[-1])  # noqa: E731
    skip_rows = np.zeros((1, 1), x.dtype) if skip is None else rows_of(skip)
    dx, dalpha, dbeta = _affine_backward(rows_of(dy), rows_of(x), alpha, skip_rows, skip is not None)
    return dx.reshape(dy.shape), dalpha, dbeta


@jit
def _affine_backward(dy, x, alpha, skip, add_skip):  # dy: float32, or bfloat16 bits
    rows, dim = dy.shape
    pieces = (rows + ROWS_PER_PARTIAL_SUM - 1) // ROWS_PER_PARTIAL_SUM
    dx = np.empty_like(x)
    dalpha_parts, dbeta_parts = np.zeros((pieces, dim), x.dtype), np.zeros((pieces, dim), x.dtype)
    for piece in numba.prange(pieces):
        for i in range(piece * ROWS_PER_PARTIAL_SUM, min(rows, (piece + 1) * ROWS_PER_PARTIAL_SUM)):
            for j in range(dim):
                gradient = float32_of(dy[i, j])
                dx[i, j] = alpha[j] * gradient + skip[i, j] if add_skip else alpha[j] * gradient
                dalpha_parts[piece, j] += gradient * x[i, j]
                dbeta_parts[piece, j] += gradient
    return dx, dalpha_parts.sum(axis=0), dbeta_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------- GELU
@jit_inline
def _exp_negative(t):
    # exp(t) for t <= 0 without a call into libm (which would stop the loop from being vectorized):
    # exp(t) = 2^k exp(r), k = round(t / ln 2), r = t - k ln 2 in [-ln2 / 2, ln2 / 2] (ln 2 in two parts, so
    # that r is exact to float32's rounding); exp(r) by Taylor to degree 7 (error < 6e-9 relative); 2^k made
    # by writing k + 127 into a float32's exponent bits (int32 ufuncs: an operator would widen to 64 bits).
    t = max(t, EXP_FLOOR)
    k = np.floor(t * LOG2_E + HALF)
    r = (t - k * LN2_HIGH) - k * LN2_LOW
    e = EXP_TAYLOR[7]
    e = e * r + EXP_TAYLOR[6]
    e = e * r + EXP_TAYLOR[5]
    e = e * r + EXP_TAYLOR[4]
    e = e * r + EXP_TAYLOR[3]
    e = e * r + EXP_TAYLOR[2]
    e = e * r + EXP_TAYLOR[1]
    e = e * r + EXP_TAYLOR[0]
    two_to_k = np.int32(np.multiply(np.add(np.int32(k), EXPONENT_BIAS), MANTISSA_SPAN)).view(np.float32)
    return e * two_to_k


@jit_inline
def _gelu_and_slope(x):
    # GELU(x) = x * Phi(x) and its slope Phi(x) + x * phi(x) (minimlp.layers.gelu_forward), per element, with
    # one exp for both: phi(x) = exp(-x^2 / 2) / sqrt(2 pi), and Phi from erfc(z), z = |x| / sqrt 2, by
    # Abramowitz and Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z),
    # |error| < 1.5e-7, whose exp(-z^2) is that same exp(-x^2 / 2). Phi(x) = 1 - erfc(z) / 2 for x >= 0,
    # erfc(z) / 2 below (tests/test_fast_paths.py: within 4e-7 of float64's GELU and slope).
    density = _exp_negative(-HALF * x * x)  # exp(-x^2 / 2)
    t = ONE / (ONE + AS_P * SQRT_HALF * abs(x))
    half_erfc = HALF * t * (AS_A1 + t * (AS_A2 + t * (AS_A3 + t * (AS_A4 + t * AS_A5)))) * density
    cdf = ONE - half_erfc if x >= ZERO else half_erfc
    return x * cdf, cdf + x * density * INV_SQRT_2PI


def bias_gelu_forward(x, bias):
    # y = GELU(x + b) and the slope GELU'(x + b) that backward keeps, one pass (under bfloat16 products x comes
    # in bfloat16, and y, fc2's operand, and the slope go out in bfloat16)
    activated, slope = operand_output(x.shape), operand_output(x.shape)
    _bias_gelu(readable(x), bias, activated, slope)
    return viewed(activated), viewed(slope)


@jit
def _bias_gelu(x, bias, activated, slope):  # x, activated and slope: float32, or bfloat16 bits
    for i in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            value, derivative = _gelu_and_slope(float32_of(x[i, j]) + bias[j])
            activated[i, j], slope[i, j] = stored(activated, value), stored(slope, derivative)


def bias_gelu_backward(dy, slope):
    # dx = dy * slope; db = sum over rows of dx, in the same pass (under bfloat16 products dy and the slope come
    # in bfloat16 and dx goes out in bfloat16, fc1's incoming gradient; db sums it before rounding)
    dx = operand_output(dy.shape)
    dbias = _bias_gelu_backward(readable(dy), readable(slope), dx)
    return viewed(dx), dbias


@jit
def _bias_gelu_backward(dy, slope, dx):  # dy, slope and dx: float32, or bfloat16 bits
    rows, dim = dy.shape
    pieces = (rows + ROWS_PER_PARTIAL_SUM - 1) // ROWS_PER_PARTIAL_SUM
    dbias_parts = np.zeros((pieces, dim), np.float32)
    for piece in numba.prange(pieces):
        for i in range(piece * ROWS_PER_PARTIAL_SUM, min(rows, (piece + 1) * ROWS_PER_PARTIAL_SUM)):
            for j in range(dim):
                gradient = float32_of(dy[i, j]) * float32_of(slope[i, j])
                dx[i, j] = stored(dx, gradient)
                dbias_parts[piece, j] += gradient
    return dbias_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------- residual
def residual_forward(x, branch, bias, gamma, mask):
    # branch += b; y = x + mask * gamma * branch, one pass; b is per patch (N, 1, 1) or per channel (d,)
    # (under bfloat16 products branch comes in bfloat16 and branch + b is stored back in bfloat16; y takes it
    # unrounded)
    scale = _scale_of(mask, x)
    per_patch_bias = bias.reshape(-1) if bias.ndim == 3 else np.zeros(x.shape[0], x.dtype)
    per_channel_bias = bias if bias.ndim == 1 else np.zeros(x.shape[2], x.dtype)
    y = _residual(x, readable(branch), per_patch_bias, per_channel_bias, gamma, scale)
    return y, ((branch, gamma), mask, bias.shape)  # the reference's cache: (layer_scale cache, mask, bias shape)


@jit
def _residual(x, branch, patch_bias, channel_bias, gamma, scale):  # branch: float32, or bfloat16 bits
    y = np.empty_like(x)
    for n in numba.prange(x.shape[0]):
        for b in range(x.shape[1]):
            for c in range(x.shape[2]):
                value = float32_of(branch[n, b, c]) + patch_bias[n] + channel_bias[c]
                branch[n, b, c] = stored(branch, value)
                y[n, b, c] = x[n, b, c] + scale[b] * gamma[c] * value
    return y


def residual_backward(dy, cache):
    # dbranch = mask * gamma * dy;  db = dbranch summed to b's shape;  dgamma = sum over (N, B) of
    # mask * dy * branch: one pass
    # (dbranch in bfloat16 under bfloat16 products: the incoming gradient of fc2 or token mixing; the sums are
    # taken before rounding)
    (branch, gamma), mask, bias_shape = cache
    dbranch = operand_output(dy.shape)
    sums_per_patch, sums_per_patch_channel, dgamma = _residual_backward(
        np.ascontiguousarray(dy), readable(branch), gamma, _scale_of(mask, dy), dbranch)
    dbias = sums_per_patch.reshape(bias_shape) if len(bias_shape) == 3 else sums_per_patch_channel.sum(axis=0)
    return viewed(dbranch), dbias, dgamma


@jit
def _residual_backward(dy, branch, gamma, scale, dbranch):  # branch and dbranch: float32, or bfloat16 bits
    patches, images, dim = dy.shape
    dgamma_parts, dbranch_sums = np.zeros((patches, dim), dy.dtype), np.zeros((patches, dim), dy.dtype)
    for n in numba.prange(patches):
        for b in range(images):
            for c in range(dim):
                scaled = scale[b] * dy[n, b, c]
                gradient = scaled * gamma[c]
                dbranch[n, b, c] = stored(dbranch, gradient)
                dbranch_sums[n, c] += gradient
                dgamma_parts[n, c] += scaled * float32_of(branch[n, b, c])
    return dbranch_sums.sum(axis=1), dbranch_sums, dgamma_parts.sum(axis=0)


def _scale_of(mask, like):
    """Drop path's per-image factor (B,); ones when drop path is off."""
    return np.ones(like.shape[1], like.dtype) if mask is None else mask
