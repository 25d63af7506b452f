"""Mixed precision (--amp): float16 matrix products, float32 everything else.

    with autocast(enabled):                       # every matmul() inside takes float16 operands
        logits = model.forward(x, train=True)

The loss scaling that goes with it (a training policy, not arithmetic) is minimlp.loss_scaling; the
training step that uses both is minimlp.step.

What is float16 and what is not. Only the operands of the matrix products (where nearly all the
arithmetic is, and where tensor cores take float16 at many times the float32 rate). The products are
accumulated and returned in float32; weights, optimizer moments, activations kept for backward,
elementwise layers, the loss: all stay float32 ("master weights").

AMP_DTYPE is the one place the half type is chosen. bfloat16 (float32's range, no loss scaling
needed, fewer mantissa bits) would be a one-line switch here once it is measured correct and fast
on the GPU; it needs a bfloat16 array dtype (ml_dtypes) on the NumPy side.
"""
import contextlib

import numpy as np

from .backend import get_xp

AMP_DTYPE = np.dtype(np.float16)

_autocast_enabled = False  # set only by autocast()


@contextlib.contextmanager
def autocast(enabled=True):
    """Inside the block, matmul() rounds its operands to AMP_DTYPE and returns float32."""
    global _autocast_enabled
    previous, _autocast_enabled = _autocast_enabled, enabled
    try:
        yield
    finally:
        _autocast_enabled = previous


def matmul(a, b):
    """a @ b for 2-D arrays: every matrix product of the model goes through here.

    Outside autocast(): the plain product in the operands' dtype (float32 on the GPU uses TF32 tensor
    cores unless --no-tf32). Inside: both operands rounded to AMP_DTYPE, products accumulated in float32,
    result float32 (M, N)."""
    if not _autocast_enabled:
        return a @ b
    if get_xp(a) is np:
        return _half_matmul_emulated(a, b)
    return _half_matmul_cublas(a, b)


def _half_matmul_emulated(a, b):
    # NumPy has no float16 GEMM with float32 accumulation, but it needs none: the product of two float16
    # numbers (11-bit significands) is exact in float32 (24 bits), so rounding the operands to float16 and
    # multiplying in float32 gives what a tensor core gives, up to the order of the float32 additions.
    # Values beyond float16's range become inf, as on the GPU: that is the loss scaler's signal, not a bug.
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(AMP_DTYPE).astype(np.float32) @ b.astype(AMP_DTYPE).astype(np.float32)


def _half_matmul_cublas(a, b):
    # cupy.matmul on float16 arrays accumulates in float32 but returns float16 (rounded, and inf above
    # 65504), so cuBLAS's gemmEx is called directly: A, B float16, C float32, compute type 32F.
    # cuBLAS is column-major: a row-major (M, K) array is a column-major (K, M) one, its transpose. So the
    # row-major C = A @ B is asked for as the column-major C^T (N, M) = B^T (N, K) @ A^T (K, M).
    import cupy
    from cupy.cuda import cublas, device, runtime
    cuda_type = {"float16": runtime.CUDA_R_16F, "bfloat16": runtime.CUDA_R_16BF}[AMP_DTYPE.name]
    a_half = a.astype(AMP_DTYPE, order="C", copy=False)  # one kernel: round and lay out (a may be a .T view)
    b_half = b.astype(AMP_DTYPE, order="C", copy=False)
    (rows, inner), columns = a_half.shape, b_half.shape[1]
    out = cupy.empty((rows, columns), dtype=np.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)  # host scalars, read during the call
    cublas.gemmEx(device.get_cublas_handle(), cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, columns, rows, inner,
                  one.ctypes.data, b_half.data.ptr, cuda_type, columns, a_half.data.ptr, cuda_type, inner,
                  zero.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, columns,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return out
