"""Fused CUDA kernels: the GPU's fast path, beside the plain `xp` reference (minimlp.layers).

Every NumPy-style operation on the GPU is one kernel that reads its inputs from memory and writes
its result back; the elementwise parts of a training step are limited by those bytes, not by
arithmetic. Each kernel here does in one pass what the reference does in several
(benchmarks/NOTES.md counts the bytes). The functions listed in OPERATIONS have the names,
signatures and results (caches included) of the reference functions they replace; minimlp.ops
chooses them once, when a model is built on the GPU with fast=True, and tests/test_fast_paths.py
checks each against the reference on the same inputs. They take CuPy float32/float64 arrays.
One more, to_bfloat16, serves minimlp.precision's cuBLAS bfloat16 products (--amp-dtype bfloat16) on any path.
CuPy is imported, and a kernel compiled, only when one is first used (CuPy caches them on disk).
"""
import functools
import math

import numpy as np

from ..layers import sum_to_shape

OPERATIONS = ("affine_forward", "bias_gelu_forward", "residual_forward", "residual_backward",
              "softmax_cross_entropy", "adamw_update")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def prepare():
    """Called by minimlp.ops when it chooses this fast path: nothing to set up (kernels compile on first use)."""


def _elementwise(name, in_params, out_params, operation):
    """A cupy.ElementwiseKernel, built on first use. T is the arrays' dtype; write constants as T(c)
    so that float32 stays float32 (a bare 0.5 is a double and would promote the arithmetic)."""
    @functools.cache
    def build():
        import cupy
        return cupy.ElementwiseKernel(in_params, out_params, operation, name)
    return build


def _reduction(name, in_params, out_params, map_expr):
    """A cupy.ReductionKernel summing map_expr, built on first use."""
    @functools.cache
    def build():
        import cupy
        return cupy.ReductionKernel(in_params, out_params, map_expr, "a + b", f"{out_params.split()[-1]} = a", "0",
                                    name)
    return build


def _scale_of(mask):
    """Drop path's per-image factor as a kernel argument: (B, 1) broadcasts over (N, B, d); 1 when off."""
    return 1.0 if mask is None else mask[:, None]


# ---------------------------------------------------------------------------------------------
# Affine: y = alpha * x + beta. Plain: two passes (alpha * x, then + beta); fused: one.
# ---------------------------------------------------------------------------------------------
_affine = _elementwise("minimlp_affine", "T x, T alpha, T beta", "T y", "y = alpha * x + beta")


def affine_forward(x, alpha, beta):
    return _affine()(x, alpha, beta), (x, alpha)


# ---------------------------------------------------------------------------------------------
# fc1's bias and GELU: one pass reads x and b, and writes GELU(x + b) and its slope (what backward keeps;
# the plain path: about ten passes). Backward, dx = dy * slope and its sum, is the reference's own.
# ---------------------------------------------------------------------------------------------
_bias_gelu = _elementwise(
    "minimlp_bias_gelu", "T x, T bias", "T activated, T slope",
    f"""T value = x + bias;
        T cdf = T(0.5) * (T(1) + erf(value * T({math.sqrt(0.5)!r})));
        activated = value * cdf;
        slope = cdf + value * exp(T(-0.5) * value * value) * T({1 / math.sqrt(2 * math.pi)!r});""")


def bias_gelu_forward(x, bias):
    return _bias_gelu()(x, bias)


# ---------------------------------------------------------------------------------------------
# A residual branch's end: y = x + mask * gamma * (branch + bias), branch += bias in place.
# Plain: bias, LayerScale, drop path, residual add: four passes over (N, B, d); fused: one.
# Backward: dbranch = mask * gamma * dy in one pass; dgamma = sum over (N, B) of mask * dy * branch
# in one reduction (plain: drop path, gamma * dy, dy * branch, then a sum).
# ---------------------------------------------------------------------------------------------
_residual = _elementwise("minimlp_residual", "T x, T bias, T gamma, T scale", "T branch, T y",
                         "branch += bias; y = x + scale * gamma * branch")
_residual_backward = _elementwise("minimlp_residual_backward", "T dy, T gamma, T scale", "T dbranch",
                                  "dbranch = scale * gamma * dy")
_scaled_product_sum = _reduction("minimlp_scaled_product_sum", "T dy, T branch, T scale", "T total",
                                 "scale * dy * branch")


def residual_forward(x, branch, bias, gamma, mask):
    import cupy
    y = cupy.empty_like(x)
    _residual()(x, bias, gamma, _scale_of(mask), branch, y)
    return y, ((branch, gamma), mask, bias.shape)  # the plain path's cache: (layer_scale cache, mask, bias shape)


def residual_backward(dy, cache):
    (branch, gamma), mask, bias_shape = cache
    scale = _scale_of(mask)
    dbranch = _residual_backward()(dy, gamma, scale)
    return dbranch, sum_to_shape(dbranch, bias_shape), _scaled_product_sum()(dy, branch, scale, axis=(0, 1))


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy: one block per image computes max, log-sum-exp, the row's loss and its
# dlogits in one kernel (plain: about ten whole-array operations); a sum then gives the loss.
# ---------------------------------------------------------------------------------------------
THREADS_PER_ROW = 256  # a power of two: the block reduction halves it
_CROSS_ENTROPY_SOURCE = r"""
template <typename T, typename Op>
__device__ T block_reduce(T value, T* shared, Op combine) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + half]);
        __syncthreads();
    }
    T result = shared[0];
    __syncthreads();  // shared is reused by the next reduction
    return result;
}

// logits, targets (probabilities), dlogits: (batch, classes), row-major; row_loss: (batch,)
// row_loss[b] = -sum_c q_c log p_c;  dlogits = (p - q) / batch;  log p = z - max z - log sum exp(z - max z)
template <typename T>
__global__ void cross_entropy_rows(const T* logits, const T* targets, T* dlogits, T* row_loss,
                                   int classes, T inverse_batch) {
    __shared__ T shared[THREADS];
    const long long row = (long long)blockIdx.x * classes;
    T local = logits[row];  // any logit of the row starts the max (no INFINITY without headers)
    for (int c = threadIdx.x; c < classes; c += blockDim.x) local = max(local, logits[row + c]);
    const T row_max = block_reduce(local, shared, [](T a, T b) { return max(a, b); });
    local = 0;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) local += exp(logits[row + c] - row_max);
    const T log_sum = log(block_reduce(local, shared, [](T a, T b) { return a + b; }));
    local = 0;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        const T log_prob = logits[row + c] - row_max - log_sum;
        local -= targets[row + c] * log_prob;
        dlogits[row + c] = (exp(log_prob) - targets[row + c]) * inverse_batch;
    }
    const T loss = block_reduce(local, shared, [](T a, T b) { return a + b; });
    if (threadIdx.x == 0) row_loss[blockIdx.x] = loss;
}
""".replace("THREADS", str(THREADS_PER_ROW))
_CROSS_ENTROPY_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.cache
def _cross_entropy_module():
    import cupy
    return cupy.RawModule(code=_CROSS_ENTROPY_SOURCE, options=("-std=c++17",),
                          name_expressions=[f"cross_entropy_rows<{t}>" for t in _CROSS_ENTROPY_TYPES.values()])


def softmax_cross_entropy(logits, target_probs):
    """logits, target_probs (B, C) -> (loss 0-d, dlogits (B, C)), as layers.softmax_cross_entropy."""
    import cupy
    batch, classes = logits.shape
    logits = cupy.ascontiguousarray(logits)
    target_probs = cupy.ascontiguousarray(target_probs, dtype=logits.dtype)
    dlogits, row_loss = cupy.empty_like(logits), cupy.empty(batch, dtype=logits.dtype)
    kernel = _cross_entropy_module().get_function(f"cross_entropy_rows<{_CROSS_ENTROPY_TYPES[logits.dtype]}>")
    kernel((batch,), (THREADS_PER_ROW,),
           (logits, target_probs, dlogits, row_loss, np.int32(classes), logits.dtype.type(1.0 / batch)))
    return row_loss.sum() / batch, dlogits


# ---------------------------------------------------------------------------------------------
# AdamW over the one flat buffer: decay, both moments, bias correction and the update in one pass
# (reads p, g, m, v, mask; writes p, m, v). The plain step is about twenty whole-buffer operations.
# ---------------------------------------------------------------------------------------------
_adamw = _elementwise(
    "minimlp_adamw",
    "T grad, T decay_mask, T lr_decay, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T step_size, "
    "T sqrt_bias2, T eps", "T param, T m, T v",
    """param -= lr_decay * decay_mask * param;
       m = beta1 * m + one_minus_beta1 * grad;
       v = beta2 * v + one_minus_beta2 * grad * grad;
       param -= step_size * m / (sqrt(v) / sqrt_bias2 + eps);""")


def adamw_update(param, grad, m, v, decay_mask, lr_decay, betas, step_size, sqrt_bias2, eps):
    """In place on param, m, v. lr_decay = lr * weight_decay; step_size = lr / (1 - b1^t);
    sqrt_bias2 = sqrt(1 - b2^t). 1 - beta is rounded from double, as the plain step does (1 - 0.999 in
    float32 arithmetic is off by 1.3e-5 relative)."""
    beta1, beta2 = betas
    _adamw()(grad, decay_mask, lr_decay, beta1, beta2, 1 - beta1, 1 - beta2, step_size, sqrt_bias2, eps, param, m, v)


# ---------------------------------------------------------------------------------------------
# bfloat16 operands for cuBLAS (minimlp.precision, --amp-dtype bfloat16). CuPy has no bfloat16 dtype: a
# bfloat16 array is a uint16 array of its bits, the upper half of a float32's. One pass reads an operand in
# any layout (a weight's .T view) and writes the rounded bits C-ordered, as gemmEx takes them; round to
# nearest even exactly as precision.round_to_bfloat16 (add 0x7FFF and the lowest kept bit, keep the top 16
# bits), NaN kept a NaN (quiet, same sign).
# ---------------------------------------------------------------------------------------------
_to_bfloat16 = _elementwise(
    "minimlp_to_bfloat16", "T x", "uint16 bits",
    """const float value = (float)x;
       const unsigned int word = __float_as_uint(value);
       bits = isnan(value) ? (unsigned short)((word >> 16) | 0x40u)
                           : (unsigned short)((word + 0x7FFFu + ((word >> 16) & 1u)) >> 16);""")


def to_bfloat16(x):
    """x (float32 or float64, any strides) -> a C-contiguous uint16 array of x's shape: its nearest bfloat16s."""
    import cupy
    bits = cupy.empty(x.shape, dtype=np.uint16)
    _to_bfloat16()(x, bits)
    return bits
