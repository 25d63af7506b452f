"""bfloat16 on the CPU: the rounding fused into the fast path's loops, the products of minimlp.fast.bf16_gemm
(oneDNN), and a whole training step's gradients, each against what it must equal.

Bounds, derived. A bfloat16 has 8 significant bits: rounding to nearest (ties to even) moves x by at most
half an ulp, |x' - x| <= 2^-8 |x| (u = 2^-8, the unit roundoff). A product c = sum_k a_k b_k of rounded
operands is off by sum_k a_k b_k (d_ak + d_bk) to first order, each d an independent rounding error of
mean 0 and |d| <= u: a sum of K terms of random sign, whose size is u * sqrt(sum_k (a_k b_k)^2) times a
number of order 1 (its standard deviation is at most sqrt(2/3) = 0.82 of it). So each entry must lie
within 6 u sqrt(sum_k (a_k b_k)^2) of the exact float64 product, 7 standard deviations: for K terms of
similar size, a relative error of 6 * 2^-8 * sqrt(K) of one term. Rounding errors that do not average
out break it: truncation (every |x'| <= |x|) shifts a sum of K positive terms by about 0.7 u per operand,
coherently, 1.4 u K in all, sqrt(K) times the bound's scale: at K = 196 the bound is broken 3-fold.
The float32 accumulation adds at most K 2^-24 sum_k |a_k b_k| (tested on its own, against the product of
the rounded operands: a sum kept in bfloat16 would be off by 2^-8 of it, not 2^-24).

Skipped, saying so, only where the CPU has no bfloat16 instruction or the library is not installed
(minimlp.fast.bf16_gemm.missing_instruction / unavailable_reason); the rounding tests need only ml_dtypes.
"""
import numpy as np
import pytest

from minimlp import create_model, precision
from minimlp.fast import bf16_gemm, cpu_kernels
from minimlp.precision import autocast

U = 2.0 ** -8  # bfloat16's unit roundoff
BOUND = 6.0  # the products' bound in units of U * sqrt(sum_k (a_k b_k)^2): see above

NO_ML_DTYPES = bf16_gemm.BFLOAT16 is None
needs_ml_dtypes = pytest.mark.skipif(NO_ML_DTYPES, reason=f"ml_dtypes is not installed: {bf16_gemm.INSTALL}")
SKIP_REASON = bf16_gemm.missing_instruction() or bf16_gemm.unavailable_reason()
needs_bf16 = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def special_floats():
    """float32 values where rounding to bfloat16 goes wrong if done wrong, as (bits, what they are)."""
    cases = {
        0x3F808000: "1 + 2^-8, a tie whose lower neighbour is even: stays 1",
        0x3F818000: "1 + 3 * 2^-8, a tie whose lower neighbour is odd: up to 1 + 2^-6",
        0xBF818000: "the same, negative",
        0x3F808001: "just above a tie: up",
        0x3F807FFF: "just below a tie: down",
        0x3F80FFFF: "just below the next bfloat16: up",
        0x7F7FFFFF: "float32's largest: rounds up to inf",
        0x7F7F7FFF: "just below bfloat16's largest half-ulp: stays finite",
        0x7F800000: "inf",
        0xFF800000: "-inf",
        0x7FC00000: "quiet NaN",
        0xFFC00000: "negative quiet NaN",
        0x7F800001: "signalling NaN whose payload would carry into inf",
        0x7FFFFFFF: "NaN with every payload bit set (would carry into the sign)",
        0x00000000: "zero",
        0x80000000: "negative zero",
        0x00000001: "the smallest subnormal: to 0",
        0x00008000: "a subnormal tie, even below: to 0",
        0x00018000: "a subnormal tie, odd below: up",
        0x007FFFFF: "the largest subnormal: up to the smallest normal",
        0x80017FFF: "a negative subnormal below a tie",
    }
    return np.array(list(cases), dtype=np.uint32).view(np.float32)


def random_floats(count, seed=0):
    """Random bit patterns: every exponent (subnormals, NaN, inf included) and every low half, ties included."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, count, dtype=np.uint64).astype(np.uint32)
    bits[: count // 4] = (bits[: count // 4] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # a quarter are ties
    return bits.view(np.float32)


def reference_bits(x):
    """ml_dtypes' round to nearest even, as bits (NaN: the quiet NaN of its sign)."""
    with np.errstate(invalid="ignore"):  # it warns on NaN, which it rounds as it should
        return np.asarray(x, np.float32).astype(bf16_gemm.BFLOAT16).view(np.uint16)


def assert_rounded(rounded, x, what):
    assert rounded.dtype == bf16_gemm.BFLOAT16, f"{what}: {rounded.dtype}, not bfloat16"
    ours, theirs = rounded.view(np.uint16).reshape(-1), reference_bits(x).reshape(-1)
    wrong = np.flatnonzero(ours != theirs)
    if wrong.size:
        first = wrong[0]
        given = np.asarray(x, np.float32).reshape(-1)[first:first + 1].view(np.uint32)[0]
        raise AssertionError(f"{what}: {wrong.size} of {ours.size} differ; e.g. float32 {given:#010x} -> "
                             f"{ours[first]:#06x}, nearest even is {theirs[first]:#06x}")


# --------------------------------------------------------------------------------------------- rounding
@needs_ml_dtypes
def test_rounding_is_to_nearest_even_bit_for_bit():
    x = np.concatenate([special_floats(), random_floats(1 << 20)])
    assert_rounded(cpu_kernels.to_bfloat16(x), x, "to_bfloat16")
    square = x[: 1 << 20].reshape(1024, 1024)
    assert_rounded(cpu_kernels.to_bfloat16(square.T), square.T, "to_bfloat16 of a transposed view")


@needs_ml_dtypes
def test_reference_rounding_agrees_with_ml_dtypes():
    """The NumPy bit formula of minimlp.precision (the emulated path) is a second, independent reference."""
    x = np.concatenate([special_floats(), random_floats(1 << 16, seed=1)])
    theirs = precision.round_to_bfloat16(x)
    finite = ~np.isnan(x)
    assert np.array_equal(theirs[finite].view(np.uint32) >> 16, reference_bits(x[finite]).astype(np.uint32))
    assert np.isnan(theirs[~finite]).all()


def pass_through_values(shape, seed=2):
    """Values to push through a fused loop that leaves them unchanged (scale 1, shift 0): specials and ties."""
    values = np.resize(np.concatenate([special_floats(), random_floats(4096, seed)]), int(np.prod(shape)))
    return values.reshape(shape).copy()


@needs_bf16
def test_every_fused_loop_rounds_its_output_to_nearest_even():
    """Each loop that writes a product's operand, given values it passes through unchanged (Affine with alpha 1
    and beta 0, GELU's backward where the slope is 1, the residual's backward with gamma 1, the patches),
    writes exactly their nearest bfloat16: ties, NaN, inf and subnormals included."""
    patches, images, dim = 7, 5, 48
    tokens = pass_through_values((patches, images, dim))
    ones, zeros = np.ones(dim, np.float32), np.full(dim, -0.0, np.float32)  # x + (-0) is x, -0 included
    with autocast("bfloat16"):
        normed, _ = cpu_kernels.affine_forward(tokens, ones, zeros)
        assert_rounded(normed, tokens, "affine_forward")
        gradient = tokens.reshape(-1, dim)
        dhidden, _ = cpu_kernels.bias_gelu_backward(gradient, np.ones_like(gradient))
        assert_rounded(dhidden, gradient, "bias_gelu_backward")
        dbranch, _, _ = cpu_kernels.residual_backward(tokens, ((tokens, ones), None, (dim,)))
        assert_rounded(dbranch, tokens, "residual_backward")
        pictures = pass_through_values((3, 2, 8, 8))
        weight = np.random.default_rng(0).normal(size=(dim, 2, 4, 4)).astype(np.float32)
        _, ((patches_kept, _, _), _, _) = cpu_kernels.patch_embed_forward(np.nan_to_num(pictures), weight, zeros)
        from minimlp.layers import images_to_patches
        cut = images_to_patches(np.nan_to_num(pictures), 4)
        assert_rounded(patches_kept, cut.reshape(-1, cut.shape[-1]), "patch_embed_forward")


@needs_bf16
def test_fused_outputs_are_the_float32_outputs_rounded():
    """GELU's forward on ordinary values: both bfloat16 outputs, GELU(x) (fc2's operand) and the slope backward
    keeps, are the float32 outputs of the same loop, rounded (within half a bfloat16 ulp of them, which
    truncation breaks for half the values)."""
    rng = np.random.default_rng(3)
    rows, dim = 300, 40
    x, bias = 3 * rng.normal(size=(rows, dim)).astype(np.float32), rng.normal(size=dim).astype(np.float32)
    float32_outs = cpu_kernels.bias_gelu_forward(x.copy(), bias)
    with autocast("bfloat16"):
        bfloat16_outs = cpu_kernels.bias_gelu_forward(x.copy(), bias)
    for name, float32_out, bfloat16_out in zip(("GELU(x)", "the slope"), float32_outs, bfloat16_outs):
        assert float32_out.dtype == np.float32 and bfloat16_out.dtype == bf16_gemm.BFLOAT16, name
        exact = float32_out.astype(np.float64)
        half_ulp = np.ldexp(1.0, np.frexp(np.abs(exact))[1] - 9)  # bfloat16's ulp at |x| in [2^(e-1), 2^e): 2^(e-8)
        assert (np.abs(bfloat16_out.astype(np.float64) - exact) <= half_ulp).all(), name
        assert np.abs(bfloat16_out.astype(np.float64) - exact).max() > 0, f"{name} was not rounded at all"


@needs_bf16
def test_loops_read_bfloat16_inputs_as_their_float32_values():
    """Under bfloat16 products the results of six products reach the next fused loop in bfloat16 (GELU's input
    and its incoming gradient, the residual's branch, the Affine's incoming gradient), and GELU's slope comes
    back to its backward in bfloat16: each loop reads them as the float32s they are exactly, giving bit for bit
    what the same values in float32 give (the residual's forward stores branch + b back in bfloat16: that
    is the float32 one rounded, and what its backward reads)."""
    rng = np.random.default_rng(4)
    rows, dim, patches, images = 150, 40, 5, 6
    floats = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    half = lambda *shape: cpu_kernels.to_bfloat16(floats(*shape))  # noqa: E731
    x, dy, slope = cpu_kernels.to_bfloat16(3 * floats(rows, dim)), half(rows, dim), half(rows, dim)
    tokens, skip = floats(patches, images, dim), floats(patches, images, dim)
    branch, dtokens = half(patches, images, dim), half(patches, images, dim)
    bias, gamma, alpha = floats(dim), floats(dim), floats(dim)
    mask = np.array([0.0, 2.0, 2.0, 0.0, 2.0, 2.0], np.float32)  # drop path: dropped and kept images
    as_float32 = lambda v: v.astype(np.float32)  # noqa: E731
    with autocast("bfloat16"):
        results = {}
        for kind, given in (("bits", lambda v: v), ("floats", as_float32)):
            gelu = cpu_kernels.bias_gelu_forward(given(x), bias)
            gelu_back = cpu_kernels.bias_gelu_backward(given(dy), given(slope))
            stored_branch = given(branch).copy()
            y, cache = cpu_kernels.residual_forward(tokens, stored_branch, bias, gamma, mask)
            if kind == "floats":  # backward reads what forward stored: the bits' branch + b, rounded
                cache = ((as_float32(results["bits"][1]), gamma), mask, bias.shape)
            residual_back = cpu_kernels.residual_backward(skip, cache)
            affine_back = cpu_kernels.affine_backward(given(dtokens), (tokens, alpha), skip=skip)
            results[kind] = [*gelu, *gelu_back, y, *residual_back, *affine_back], stored_branch
    (from_bits, branch_bits), (from_floats, branch_floats) = results["bits"], results["floats"]
    for index, (ours, theirs) in enumerate(zip(from_bits, from_floats)):
        assert ours.dtype == theirs.dtype and np.array_equal(ours.view(np.uint8), theirs.view(np.uint8)), index
    assert branch_bits.dtype == bf16_gemm.BFLOAT16 and branch_floats.dtype == np.float32
    assert np.array_equal(branch_bits.view(np.uint16), cpu_kernels.to_bfloat16(branch_floats).view(np.uint16))


@needs_bf16
def test_float32_path_is_untouched_outside_bfloat16():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 4, 8)).astype(np.float32)
    for dtype in (None, "float16"):
        with autocast(dtype):
            out, _ = cpu_kernels.affine_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32))
        assert out.dtype == np.float32 and np.array_equal(out, x)


# --------------------------------------------------------------------------------------------- products
def _layout(array, transposed):
    return np.ascontiguousarray(array.T).T if transposed else np.ascontiguousarray(array)


PRODUCTS = {  # name: (M, K, N, A a transposed view, B a transposed view), the model's kinds of product, smaller
    "linear x @ W^T": (200, 96, 64, False, True),
    "linear dx = dy @ W": (200, 64, 96, False, False),
    "weight gradient dy^T @ x": (64, 1200, 96, True, False),
    "token mixing A @ x": (49, 49, 1536, False, False),
    "token mixing dx = A^T @ dy": (49, 49, 1536, True, False),
    "token mixing dA = dy @ x^T": (49, 1536, 49, False, True),
    "many rows (blocked B)": (2048, 196, 72, False, True),
    "one row": (1, 33, 17, False, False),
}


@needs_bf16
@pytest.mark.parametrize("given", ["float32", "bfloat16"])
@pytest.mark.parametrize("product", PRODUCTS)
def test_product_is_within_bfloat16s_bound_of_float64(product, given):
    """Positive operands (where biased rounding adds up) and signed ones, float32 (rounded by the library) or
    already bfloat16 (as the fast path hands them over), in the model's layouts."""
    m, k, n, a_transposed, b_transposed = PRODUCTS[product]
    rng = np.random.default_rng(5)
    for a, b in [(rng.uniform(0.5, 1.5, (m, k)), rng.uniform(0.5, 1.5, (k, n))),
                 (rng.normal(size=(m, k)), rng.normal(size=(k, n)) * 1e-3)]:
        a32, b32 = _layout(a.astype(np.float32), a_transposed), _layout(b.astype(np.float32), b_transposed)
        if given == "bfloat16":
            a_in, b_in = a32.astype(bf16_gemm.BFLOAT16), b32.astype(bf16_gemm.BFLOAT16)
        else:
            a_in, b_in = a32, b32
        outs = [bf16_gemm.matmul(a_in, b_in, layout=layout) for layout in bf16_gemm.LAYOUTS]
        default = outs[bf16_gemm.LAYOUTS.index(bf16_gemm.default_layout(m))]
        assert np.array_equal(bf16_gemm.matmul(a_in, b_in), default)
        assert all(o.dtype == np.float32 and o.shape == (m, n) and o.flags.c_contiguous for o in outs)
        exact = a32.astype(np.float64) @ b32.astype(np.float64)
        scale = np.sqrt((a32.astype(np.float64) ** 2) @ (b32.astype(np.float64) ** 2))  # sqrt(sum_k (a_k b_k)^2)
        worsts = [(np.abs(o - exact) / (U * scale)).max() for o in outs]  # each layout's
        assert max(worsts) < BOUND, f"{product}: an entry is off by {max(worsts):.1f} U sqrt(sum (ab)^2) (bound {BOUND})"
        assert min(worsts) > 0.05, f"{product}: as exact as float32: were the operands rounded to bfloat16?"
        # against the product of the rounded operands: only float32 accumulation is left
        rounded = a32.astype(bf16_gemm.BFLOAT16).astype(np.float64) @ b32.astype(bf16_gemm.BFLOAT16).astype(np.float64)
        absolute = np.abs(a32.astype(np.float64)) @ np.abs(b32.astype(np.float64))
        for o in outs:
            assert (np.abs(o - rounded) <= k * 2.0 ** -24 * absolute + 1e-30).all(), "not accumulated in float32"


def test_b_is_reordered_for_many_rows_only_without_amx(monkeypatch):
    without_amx, with_amx = {"avx512_bf16"}, {"avx512_bf16", "amx_bf16"}
    for flags, expected in [(without_amx, ["plain", "blocked", "blocked"]), (with_amx, ["plain"] * 3)]:
        monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: flags)
        bf16_gemm.default_layout.cache_clear()
        rows = [bf16_gemm.BLOCKED_FROM_ROWS - 1, bf16_gemm.BLOCKED_FROM_ROWS, 6272]
        assert [bf16_gemm.default_layout(r) for r in rows] == expected, flags
    bf16_gemm.default_layout.cache_clear()  # this machine's flags again


@needs_bf16
def test_product_into_out_and_empty_and_other_views():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(30, 40)).astype(np.float32), rng.normal(size=(80, 20)).astype(np.float32)[::2]
    out = np.full((30, 20), np.nan, np.float32)
    assert bf16_gemm.matmul(a, b, out) is out  # b, every other row, is copied once
    reference = a.astype(bf16_gemm.BFLOAT16).astype(np.float64) @ b.astype(bf16_gemm.BFLOAT16).astype(np.float64)
    assert np.abs(out - reference).max() < 1e-4
    assert np.array_equal(bf16_gemm.matmul(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not multiply"):
        bf16_gemm.matmul(a, a)


@needs_bf16
def test_autocast_routes_cpu_products_to_the_library(monkeypatch):
    calls = []
    real = bf16_gemm.matmul
    monkeypatch.setattr(bf16_gemm, "matmul", lambda a, b, **options: calls.append(1) or real(a, b, **options))
    a, b = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    with autocast("bfloat16"):
        assert precision.cpu_bfloat16_products()
        precision.matmul(a, b)
    assert not precision.cpu_bfloat16_products(), "outside autocast"
    precision.matmul(a, b)
    with autocast("float16"):
        precision.matmul(a, b)
    assert len(calls) == 1


@needs_bf16
def test_a_half_result_is_the_float32_product_rounded_and_only_under_bfloat16_products():
    """precision.matmul(..., half_result=True), what the model asks for fc1's output and fc2's input gradient:
    under the CPU's bfloat16 products, the float32 sums rounded to nearest even (oneDNN rounds them as it stores
    them: each equals ml_dtypes' rounding of the float32 result); outside, float32 as always."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 200)).astype(np.float32), rng.normal(size=(200, 77)).astype(np.float32)
    with autocast("bfloat16"):
        full, half = precision.matmul(a, b), precision.matmul(a, b, half_result=True)
    assert full.dtype == np.float32 and half.dtype == bf16_gemm.BFLOAT16
    assert np.array_equal(half.view(np.uint16), full.astype(bf16_gemm.BFLOAT16).view(np.uint16))
    assert not np.array_equal(half.astype(np.float32), full), "the result was not rounded at all"
    with autocast("float16"):
        assert precision.matmul(a, b, half_result=True).dtype == np.float32
    assert precision.matmul(a, b, half_result=True).dtype == np.float32


def test_the_library_takes_only_float32_or_bfloat16_results():
    if bf16_gemm.unavailable_reason():
        pytest.skip(bf16_gemm.unavailable_reason())
    a = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bf16_gemm.matmul(a, a.T, dtype=np.float16)


# --------------------------------------------------------------------------------------------- whole step
def _gradients(model, images, targets, dtype):
    with autocast(dtype):
        logits = model.forward(images, train=True)
        _, dlogits = model.ops.softmax_cross_entropy(logits, targets)
        model.backward(dlogits)
    return model.grads


@needs_bf16
def test_whole_step_gradients_against_float64(monkeypatch):
    """resmlp_tiny (6 blocks), one forward and backward under bfloat16 against the reference model in float64
    from the same weights. Every product goes through the library with its activations and gradients
    already in bfloat16 (the fused rounding), and the results that only the next fused loop reads come back in
    bfloat16;
    every gradient tensor lies within 3% (norm-wise) of float64's,
    and further from it than float32 would be (1e-4): the products did run in bfloat16.
    Where the 3% comes from: each product is off by about 2^-8 relative (bounded above), a backward pass chains
    about 20 of them whose errors add in quadrature, and the small gradients of Affine and LayerScale are sums
    of many terms that cancel, which scales their relative error up; measured: 0.02-1.2%."""
    images_per_batch = 6  # tokens N*B = 384 and B*d = 768: sizes no weight has (64, 128, 512, 48, 10)
    rng = np.random.default_rng(7)
    images = rng.normal(size=(images_per_batch, 3, 32, 32)).astype(np.float32)
    targets = rng.dirichlet(np.ones(10), images_per_batch).astype(np.float32)
    model = create_model("resmlp_tiny", seed=3)
    reference = create_model("resmlp_tiny", seed=3, dtype="float64", fast=False)
    activation_sizes = {64 * images_per_batch, images_per_batch * 128}
    operands, results = [], []
    real = bf16_gemm.matmul

    def recorded(a, b, **options):
        operands.append((a, b))
        results.append(real(a, b, **options))
        return results[-1]

    monkeypatch.setattr(bf16_gemm, "matmul", recorded)
    ours = _gradients(model, images, targets, "bfloat16")
    depth = model.config["depth"]
    assert len(operands) == 9 * depth + 5, "every product: 3 per block forward, 6 backward, patches, head"
    dim = model.config["dim"]
    hidden, channels = (64 * images_per_batch, model.config["mlp_ratio"] * dim), (64 * images_per_batch, dim)
    mixing = 64, images_per_batch * dim
    assert [c.shape for c in results if c.dtype == bf16_gemm.BFLOAT16] == \
        [mixing, hidden, channels] * depth + [hidden, channels, mixing] * depth, \
        "the results only the next fused loop reads come back in bfloat16 (forward: token mixing's, fc1's and " \
        "fc2's; backward: the input gradients of fc2, fc1 and token mixing), and nothing else"
    rounded_by_the_library = [x.shape for pair in operands for x in pair
                              if x.dtype != bf16_gemm.BFLOAT16 and activation_sizes & set(x.shape)]
    assert rounded_by_the_library == [(128, 64 * images_per_batch)], \
        "activations and gradients reach the products in bfloat16 (only the patch embedding's weight gradient " \
        "rounds its incoming float32 gradient in the library)"
    theirs = _gradients(reference, images.astype(np.float64), targets.astype(np.float64), None)
    errors = {name: np.linalg.norm(ours[name] - theirs[name]) / np.linalg.norm(theirs[name]) for name in theirs}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.03, f"{worst}: {errors[worst]:.3f} of its norm from float64"
    assert max(errors.values()) > 1e-4, "as close as float32: did the products run in bfloat16?"


# --------------------------------------------------------------------------------------------- availability
def test_without_the_instruction_one_line_says_so(monkeypatch):
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: {"avx2", "avx512f"})
    bf16_gemm.available.cache_clear()
    try:
        message = bf16_gemm.missing_instruction()
        assert message and "\n" not in message and "no bfloat16 instruction" in message and "float32" in message
        assert not bf16_gemm.available()
        with autocast("bfloat16"):
            assert not precision.cpu_bfloat16_products()
            x = np.ones((3, 4), np.float32)
            assert cpu_kernels.affine_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32))[0].dtype == np.float32
    finally:
        bf16_gemm.available.cache_clear()
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: {"avx512_bf16"})
    assert bf16_gemm.missing_instruction() is None


def test_without_the_library_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setattr(bf16_gemm, "_library_candidates", lambda: ["/nonexistent/lib/libdnnl.so.3"])
    monkeypatch.setattr(bf16_gemm, "_state", {})
    bf16_gemm.available.cache_clear()
    try:
        message = bf16_gemm.unavailable_reason()
        assert message and "\n" not in message and "pip install onednn-cpu-gomp ml-dtypes" in message
        assert not bf16_gemm.available()
    finally:
        bf16_gemm.available.cache_clear()
