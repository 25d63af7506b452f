"""Mixed precision: 16-bit matrix-product operands, float32 everything else, and the policy that chooses them.

    precision = policy("bfloat16")                # or "float16", "float32"
    loss, taken = train_step(model, optimizer, images, labels, lr, precision, smoothing=0.1)  # minimlp.step
    with autocast(precision.matmul_dtype):        # what the step does: every matmul() inside takes 16-bit operands
        logits = model.forward(images, train=True)

What is 16-bit and what is not. Only the operands of the matrix products (where nearly all the
arithmetic is, and where tensor cores and the CPU's AMX/AVX-512-BF16 units take 16-bit numbers at many
times the float32 rate). The products are accumulated and returned in float32; weights, optimizer
moments, activations kept for backward, elementwise layers, the loss: all stay float32 ("master weights").
One exception, on the CPU's bfloat16 path only: the products whose results only the next fused loop reads
(GELU, the residual's add, the Affine's backward) return them in bfloat16 (matmul's half_result), as PyTorch's
autocast returns every product; those loops compute in float32.

The three policies (train.py: no --amp; --amp --amp-dtype float16; --amp --amp-dtype bfloat16):
  float32   the products in the operands' own dtype; nothing else: the step calls nothing of the policy.
  float16   11-bit significand, range 6e-8..65504: small gradients underflow to 0, so dlogits is multiplied
            by a dynamic loss scale (minimlp.loss_scaling.LossScaler) and a step whose gradients overflow
            is skipped, which needs a finiteness check read back from the device at every step.
  bfloat16  8-bit significand, float32's 8-bit exponent (range to 3.4e38): whatever float32 keeps, bfloat16
            keeps, so no loss scaling, no skipped steps and no read-back; each operand is off by at most
            2^-8 relative (round to nearest even), eight times float16's 2^-11.
"""
import contextlib
import dataclasses

import numpy as np

from .backend import get_xp
from .loss_scaling import LossScaler

PRECISIONS = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")  # what autocast() takes, besides None
DEFAULT_AMP_DTYPE = {"gpu": "float16", "cpu": "bfloat16"}  # --amp-dtype's default: each device's fast one

_matmul_dtype = None  # set only by autocast(): None (plain products), "float16" or "bfloat16"


@dataclasses.dataclass(frozen=True)
class Precision:
    """A run's precision. matmul_dtype: the matrix products' operand dtype under autocast (None: their own);
    loss_scaler: float16's LossScaler (its state is checkpointed), None for float32 and bfloat16."""
    name: str
    matmul_dtype: str | None
    loss_scaler: LossScaler | None = None


def policy(name):
    """The Precision for "float32", "float16" (with a fresh LossScaler) or "bfloat16"; what train_step takes."""
    if name == "float32":
        return Precision(name, None)
    if name == "float16":
        return Precision(name, "float16", LossScaler())
    if name == "bfloat16":
        return Precision(name, "bfloat16")
    raise ValueError(f"precision {name!r}: choose one of {', '.join(PRECISIONS)}")


def run_precision(name, device):
    """(the Precision a run on `device` trains in, the line that says so or None) for --amp/--amp-dtype's `name`.
    bfloat16 on the CPU runs on the CPU's bfloat16 instructions through minimlp.fast.bf16_gemm: where the CPU has
    none, the line says so and the run trains in float32; where the library is missing, ValueError, one line
    saying what to install."""
    if name == "bfloat16" and device == "cpu":
        from .fast import bf16_gemm
        if bf16_gemm.missing_instruction():
            return policy("float32"), bf16_gemm.missing_instruction()
        if bf16_gemm.unavailable_reason():
            raise ValueError(f"--amp-dtype bfloat16 on the CPU: {bf16_gemm.unavailable_reason()}")
    mixed = "{} matmul inputs, float32 accumulation, weights and optimizer state; "
    lines = {"float32": None,
             "float16": "mixed precision: " + mixed.format("float16") + "dynamic loss scaling"
                        + (" (emulated on the CPU: slower, not faster)" if device == "cpu" else ""),
             "bfloat16": "mixed precision: " + mixed.format("bfloat16") + "no loss scaling (float32's range)"
                         + (" (oneDNN, the CPU's bfloat16 instructions)" if device == "cpu" else "")}
    return policy(name), lines[name]


@contextlib.contextmanager
def autocast(dtype="float16"):
    """Inside the block, matmul() rounds its operands to `dtype` ("float16" or "bfloat16") and returns
    float32; autocast(None): the plain products (float32 training, or a block inside autocast)."""
    global _matmul_dtype
    if dtype is not None and dtype not in HALF_DTYPES:
        raise ValueError(f"autocast({dtype!r}): choose one of {', '.join(HALF_DTYPES)}, or None")
    previous, _matmul_dtype = _matmul_dtype, dtype
    try:
        yield
    finally:
        _matmul_dtype = previous


def matmul(a, b, half_result=False):
    """a @ b for 2-D arrays: every matrix product of the model goes through here.

    Outside autocast(): the plain product in the operands' dtype (float32 on the GPU uses TF32 tensor
    cores unless --no-tf32). Inside: both operands rounded to the autocast dtype, products accumulated in
    float32, result float32 (M, N).

    half_result=True: the caller also takes the result rounded to bfloat16, and gets it so where the CPU's
    bfloat16 products run (cpu_bfloat16_products()); elsewhere float32. The model asks it for the six
    products of a block whose results only the next fused loop reads: forward, token mixing's and fc2's
    outputs (read by the residual's add) and fc1's (GELU's); backward, the input gradients of fc2 (GELU's
    backward reads it), fc1 and token mixing (the Affine's backward). Rounded as oneDNN stores them, they
    take half the bytes to write and to read; the weight gradients and the head's logits stay float32."""
    if _matmul_dtype is None:
        return a @ b
    if get_xp(a) is np:
        if _matmul_dtype == "bfloat16" and cpu_bfloat16_products():
            from .fast import bf16_gemm  # the CPU's bfloat16 instructions, through oneDNN
            return bf16_gemm.matmul(a, b, dtype=bf16_gemm.BFLOAT16 if half_result else np.float32)
        return _half_matmul_emulated(a, b, _matmul_dtype)
    return _half_matmul_cublas(a, b, _matmul_dtype)


def cpu_bfloat16_products():
    """True inside autocast("bfloat16") on a CPU whose bfloat16 products run in hardware, through the library
    (minimlp.fast.bf16_gemm: the CPU has avx512_bf16 or amx_bf16, and oneDNN is installed). The CPU fast
    path (minimlp.fast.cpu_kernels) then rounds each operand to bfloat16 in the loop that produces it, and
    matmul() takes it as it is. Elsewhere (no instruction, no library) matmul() emulates the rounding."""
    if _matmul_dtype != "bfloat16":
        return False
    from .fast import bf16_gemm  # imported here: only a bfloat16 run loads it
    return bf16_gemm.available()


def round_to_float16(x):
    """float32 -> the nearest float16, as float32 (inf beyond 65504, as on the GPU: the loss scaler's signal)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).astype(np.float32)


def round_to_bfloat16(x):
    """float32 -> the nearest bfloat16 (round to nearest, ties to even), as float32.

    A bfloat16 is the upper 16 bits of a float32, so rounding is integer arithmetic on the bits: add just
    under half of the 16 bits cut off (0x7FFF), plus 1 when the kept part is odd (a tie then rounds up, to
    even), and clear them. A carry moves into the exponent as it should (the largest float32s round to inf).
    NaN is kept as it is (the addition could carry a NaN's payload into inf)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)  # the same 4 bytes read as an integer
    kept_is_odd = (bits >> 16) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + kept_is_odd) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), x, rounded)[()]  # [()]: a 0-d result as a NumPy scalar, arrays as they are


HALF_ROUNDING = {"float16": round_to_float16, "bfloat16": round_to_bfloat16}


def _half_matmul_emulated(a, b, dtype):
    # NumPy has no 16-bit GEMM with float32 accumulation, but it needs none: the product of two float16
    # numbers (11-bit significands) or two bfloat16 ones (8 bits) is exact in float32 (24 bits), so rounding
    # the operands and multiplying in float32 gives what a tensor core gives, up to the order of the float32
    # additions. Values beyond float16's range become inf, as on the GPU: that is the loss scaler's signal.
    rounded = HALF_ROUNDING[dtype]
    with np.errstate(over="ignore", invalid="ignore"):  # inf * 0 = NaN in an overflowed product: expected too
        return rounded(a) @ rounded(b)


def _half_matmul_cublas(a, b, dtype):
    # cupy.matmul on float16 arrays accumulates in float32 but returns float16 (rounded, and inf above
    # 65504), and CuPy has no bfloat16 dtype, so cuBLAS's gemmEx is called directly: A, B 16-bit, C float32,
    # compute type 32F. bfloat16 operands are uint16 arrays holding the bits (cuda_kernels.to_bfloat16).
    # cuBLAS is column-major: a row-major (M, K) array is a column-major (K, M) one, its transpose. So the
    # row-major C = A @ B is asked for as the column-major C^T (N, M) = B^T (N, K) @ A^T (K, M).
    import cupy
    from cupy.cuda import cublas, device, runtime
    if dtype == "bfloat16":
        from .fast.cuda_kernels import to_bfloat16
        cuda_type, a_half, b_half = runtime.CUDA_R_16BF, to_bfloat16(a), to_bfloat16(b)  # one kernel each
    else:
        cuda_type = runtime.CUDA_R_16F
        a_half = a.astype(np.float16, order="C", copy=False)  # one kernel: round and lay out (a may be a .T view)
        b_half = b.astype(np.float16, order="C", copy=False)
    (rows, inner), columns = a_half.shape, b_half.shape[1]
    out = cupy.empty((rows, columns), dtype=np.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)  # host scalars, read during the call
    cublas.gemmEx(device.get_cublas_handle(), cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, columns, rows, inner,
                  one.ctypes.data, b_half.data.ptr, cuda_type, columns, a_half.data.ptr, cuda_type, inner,
                  zero.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, columns,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return out
