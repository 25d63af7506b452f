"""The CPU fast path's bfloat16 pieces (minimlp.fast.cpu_kernels' docstring says where bfloat16 operands
come from): the float32 -> bfloat16 rounding that every loop writing a product's operand inlines
(`_bfloat16_bits`); what lets one loop serve both precisions, `stored` (a write: rounded into bfloat16
bits, as it is into float32) and `float32_of` (a read: bfloat16 bits widened, a float32 as it is), with
`operand_output`, `readable` and `viewed` on the Python side of a loop; and the two operations that exist
for bfloat16 products only: the patch embedding's cut-and-round and the mean pool over bfloat16 tokens
(float32 inputs take the reference).

Numba's on-disk cache watches only the file a loop is defined in: after editing anything here, the
loops of cpu_kernels.py that inline it are recompiled only once their cache is gone
(`rm -r minimlp/fast/__pycache__`). A fresh clone (CI) has none.
"""
import functools

import numba
import numba.extending
import numpy as np

from .. import layers
from ..precision import cpu_bfloat16_products
from .bf16_gemm import BFLOAT16

F = np.float32
U = np.uint32  # the constants of _bfloat16_bits, as uint32 (a Python int would widen the arithmetic)
ZERO, SIXTEEN, JUST_UNDER_HALF, LOWEST_BIT = U(0), U(16), U(0x7FFF), U(1)
SIGN, QUIET_NAN, MAGNITUDE, INFINITY = U(0x8000), U(0x7FC0), U(0x7FFFFFFF), U(0x7F800000)
jit = functools.partial(numba.njit, parallel=True, fastmath=True, cache=True)
jit_inline = functools.partial(numba.njit, fastmath=True, cache=True, inline="always")


@jit_inline
def _bfloat16_bits(value):
    # float32 -> the bits of the nearest bfloat16, ties to even. A bfloat16 is the upper half of a float32: add
    # just under half of the 16 bits cut off (0x7FFF), plus 1 when the kept half is odd (so a tie goes to the
    # even neighbour), and keep the upper half. A carry runs into the exponent as it should (the largest
    # float32s round to inf; inf stays inf; subnormals round like any other number). A NaN becomes the quiet
    # NaN of its sign, 0x7FC0 or 0xFFC0, as ml_dtypes makes it (the addition could carry a payload into inf).
    # NumPy's functions rather than operators: Numba widens an operator on uint32 to 64 bits, which halves the
    # vector width of every loop that inlines this one (GELU's forward ran 25% slower); a ufunc stays uint32.
    bits = np.float32(value).view(np.uint32)
    kept = np.right_shift(bits, SIXTEEN)
    rounded = np.right_shift(np.add(np.add(bits, JUST_UNDER_HALF), np.bitwise_and(kept, LOWEST_BIT)), SIXTEEN)
    quiet_nan = np.bitwise_or(np.bitwise_and(kept, SIGN), QUIET_NAN)
    nan_mask = np.subtract(ZERO, np.uint32(np.greater(np.bitwise_and(bits, MAGNITUDE), INFINITY)))  # all ones at a NaN
    return np.uint16(np.bitwise_xor(rounded, np.bitwise_and(np.bitwise_xor(rounded, quiet_nan), nan_mask)))


def float32_of(value):
    """Inside a loop: an element as float32 (a float32 as it is; a bfloat16's uint16 bits widened, exactly), so
    that one loop reads either (Numba compiles it once for each). Only Numba calls it: see the overload below."""
    raise TypeError("float32_of is only for Numba loops")


@numba.extending.overload(float32_of, inline="always")
def _float32_of(value):
    if isinstance(value, numba.types.Integer):
        return _widened
    return _as_it_is


def _widened(value):  # the bits of a bfloat16: its float32 is them, then 16 zero bits
    # (an operator, widened to 64 bits by Numba, but truncated at once, so the vector lanes stay 32-bit:
    # GELU's backward reading bfloat16 is bound by memory, tests/test_bf16.py reads it bit for bit)
    return np.uint32(np.uint32(value) << SIXTEEN).view(np.float32)


def _as_it_is(value):
    return value


def stored(array, value):
    """Inside a loop: the float32 `value` as `array` keeps it: as it is in a float32 array, rounded to nearest
    even in the uint16 bits of a bfloat16 one, so that one loop writes either (Numba compiles it once for each).
    Only Numba calls it: see the overload below."""
    raise TypeError("stored is only for Numba loops")


@numba.extending.overload(stored, inline="always")
def _stored(array, value):
    if isinstance(array.dtype, numba.types.Integer):
        return _stored_rounded
    return _stored_as_it_is


def _stored_rounded(array, value):
    return _bfloat16_bits(value)


def _stored_as_it_is(array, value):
    return value


def readable(x):
    """x as a Numba loop can take it: a bfloat16 array as its uint16 bits (Numba cannot type ml_dtypes' dtype),
    any other as it is."""
    return x.view(np.uint16) if x.dtype == BFLOAT16 else x


def operand_output(shape):
    """An empty array for a loop to write a product's operand (or GELU's slope) into: bfloat16 bits (uint16)
    under bfloat16 products, float32 elsewhere (what `stored` rounds or not)."""
    return np.empty(shape, np.uint16 if cpu_bfloat16_products() else np.float32)


def viewed(array):
    """A loop's output as the library hands it on: bfloat16 bits viewed as bfloat16, float32 as it is."""
    return array.view(BFLOAT16) if array.dtype == np.uint16 else array


def to_bfloat16(x):
    """float32 array -> the nearest bfloat16 array (ml_dtypes.bfloat16), one parallel pass, any shape."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return _round_bfloat16(flat).view(BFLOAT16).reshape(np.shape(x))


@jit
def _round_bfloat16(x):
    bits = np.empty(x.shape, np.uint16)
    for i in numba.prange(x.shape[0]):
        bits[i] = _bfloat16_bits(x[i])
    return bits


def mean_pool_forward(tokens):
    # y[b, c] = mean over n of x[n, b, c]: bfloat16 tokens (the last Affine's output under bfloat16 products)
    # are summed in float32; float32 tokens take the reference
    if tokens.dtype == BFLOAT16:
        return _mean_over_patches(np.ascontiguousarray(tokens).view(np.uint16)), tokens.shape
    return layers.mean_pool_forward(tokens)


@jit
def _mean_over_patches(bits):
    patches, images, dim = bits.shape
    pooled = np.zeros((images, dim), np.float32)
    for b in numba.prange(images):
        for n in range(patches):
            for c in range(dim):
                pooled[b, c] += np.uint32(np.uint32(bits[n, b, c]) << np.uint32(16)).view(np.float32)
    return pooled * F(1.0 / patches) if patches else pooled


def patch_embed_forward(images, weight, bias):
    # under bfloat16 products: the patches cut from the images and rounded to bfloat16 in one pass (the
    # reference copies them out in float32: images_to_patches), then the same Linear; else the reference
    if not cpu_bfloat16_products():
        return layers.patch_embed_forward(images, weight, bias)
    dim, patch_size = weight.shape[0], weight.shape[-1]
    patches = _patches_bfloat16(np.ascontiguousarray(images, dtype=np.float32), patch_size).view(BFLOAT16)
    tokens, linear_cache = layers.linear_forward(patches.reshape(-1, patches.shape[-1]), weight.reshape(dim, -1), bias)
    return tokens.reshape(patches.shape[0], patches.shape[1], dim), (linear_cache, images.shape, weight.shape)


@jit
def _patches_bfloat16(images, patch_size):
    # (B, C, H, W) -> (N, B, C*p*p) bfloat16 bits, each patch flattened in (c, row, col) order (images_to_patches)
    batch, colors, height, width = images.shape
    columns = width // patch_size
    grid = (height // patch_size) * columns
    patches = np.empty((grid, batch, colors * patch_size * patch_size), np.uint16)
    for n in numba.prange(grid):
        top, left = (n // columns) * patch_size, (n % columns) * patch_size
        for b in range(batch):
            for c in range(colors):
                for i in range(patch_size):
                    for j in range(patch_size):
                        patches[n, b, (c * patch_size + i) * patch_size + j] = _bfloat16_bits(
                            images[b, c, top + i, left + j])
    return patches
