"""Every fast path (minimlp.fast.cuda_kernels on the GPU, minimlp.fast.cpu_kernels on the CPU) against the reference
operations it replaces (minimlp.ops.REFERENCE), on the same inputs, on every device where it can run.

Each case calls the fast function and the reference function on fresh copies of the same inputs, in
every dtype the fast path offers (float32; on the GPU float64 too), and compares everything they
return (outputs and caches) and every input afterwards (some
operations write into their inputs: those writes are results too). The CPU fast path runs here; the
CUDA one where a GPU is present (skipped, saying so, elsewhere). The whole model and the training step
are compared the same way, fast against reference.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimlp import backend, create_model, ops
from minimlp.tools.gradcheck import numerical_gradients, relative_error
from minimlp.layers import gelu_forward, residual_backward, residual_forward
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.step import train_step
from tests.conftest import GPU_SKIP_REASON

REPO_ROOT = Path(__file__).resolve().parent.parent

PATCHES, IMAGES, DIM, HIDDEN, CLASSES = 6, 4, 5, 7, 11  # all different: a swapped axis cannot pass
# largest difference / largest value: the two paths round differently (float64: the same formulas, reordered)
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
PARAMETERS = 3001  # an odd size: no loop may assume a multiple of its vector width


def _mask(rng):
    mask = (rng.random(IMAGES) < 0.5) / 0.5
    mask[:2] = 0.0, 2.0  # both a dropped and a kept image, whatever the draw
    return mask


def _gelu_cache(x):
    return gelu_forward(x)[1]  # the slope it keeps


# case: (operation, inputs from a Generator, as NumPy float64 arrays, tuples and Python numbers)
CASES = {
    "affine_forward": ("affine_forward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM), rng.normal(size=DIM)]),
    "affine_backward": ("affine_backward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), (rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM))]),
    "affine_backward_with_skip": ("affine_backward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), (rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM)),
        rng.normal(size=(PATCHES, IMAGES, DIM))]),
    "affine_backward_pooled": ("affine_backward", lambda rng: [  # the head's Affine gets a broadcast view
        np.broadcast_to(rng.normal(size=(IMAGES, DIM)), (PATCHES, IMAGES, DIM)),
        (rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM))]),
    "bias_gelu_forward": ("bias_gelu_forward", lambda rng: [
        3 * rng.normal(size=(PATCHES * IMAGES, HIDDEN)), rng.normal(size=HIDDEN)]),
    "bias_gelu_backward": ("bias_gelu_backward", lambda rng: [  # more rows than one partial sum takes
        rng.normal(size=(150, HIDDEN)), _gelu_cache(4 * rng.normal(size=(150, HIDDEN)))]),
    "residual_forward_token_bias_drop_path": ("residual_forward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)),
        rng.normal(size=(PATCHES, 1, 1)), rng.normal(size=DIM), _mask(rng)]),
    "residual_forward_channel_bias": ("residual_forward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)),
        rng.normal(size=DIM), rng.normal(size=DIM), None]),
    "residual_backward_token_bias_drop_path": ("residual_backward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)),
        ((rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM)), _mask(rng), (PATCHES, 1, 1))]),
    "residual_backward_channel_bias": ("residual_backward", lambda rng: [
        rng.normal(size=(PATCHES, IMAGES, DIM)), ((rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM)),
                                                  None, (DIM,))]),
    "mean_pool_forward": ("mean_pool_forward", lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM))]),
    "patch_embed_forward": ("patch_embed_forward", lambda rng: [  # 2 colors, 8 px, 4 px patches: 4 patches
        rng.normal(size=(IMAGES, 2, 8, 8)), rng.normal(size=(DIM, 2, 4, 4)), rng.normal(size=DIM)]),
    "softmax_cross_entropy": ("softmax_cross_entropy", lambda rng: [
        8 * rng.normal(size=(IMAGES, CLASSES)), rng.dirichlet(np.ones(CLASSES), IMAGES)]),
    "softmax_cross_entropy_many_classes": ("softmax_cross_entropy", lambda rng: [  # more classes than threads per row
        8 * rng.normal(size=(IMAGES, 1000)), rng.dirichlet(np.ones(1000), IMAGES)]),
    "adamw_update": ("adamw_update", lambda rng: [
        rng.normal(size=PARAMETERS), rng.normal(size=PARAMETERS), 0.1 * rng.normal(size=PARAMETERS),
        rng.uniform(0.01, 1.0, PARAMETERS), (rng.random(PARAMETERS) < 0.5).astype(float),
        1e-3 * 0.05, (0.9, 0.999), 1e-3 / (1 - 0.9 ** 3), np.sqrt(1 - 0.999 ** 3), 1e-8]),
}


@pytest.fixture(params=[("cpu", "float32"), ("gpu", "float32"), ("gpu", "float64")], ids="-".join)
def fast(request):
    """(device, xp, the device's fast-path module, dtype): every device and dtype with a fast path."""
    device, dtype = request.param[0], np.dtype(request.param[1])
    if device == "gpu" and not backend.gpu_available():
        pytest.skip(GPU_SKIP_REASON)
    module = ops.fast_module(device, dtype)
    assert module is not None, f"no fast path for {device} (on the CPU it needs Numba: pip install numba)"
    return device, backend.get_module(device), module, dtype


def test_the_fast_paths_offer_the_dtypes_tested_here():
    cpu, gpu = (importlib.import_module(ops.FAST_MODULES[device]) for device in ("cpu", "gpu"))
    assert set(cpu.DTYPES) == {np.dtype(np.float32)}
    assert set(gpu.DTYPES) == {np.dtype(np.float32), np.dtype(np.float64)}


def _on_device(value, xp, dtype):
    """Device copies in `dtype` of every array in a nest of lists and tuples (each call gets its own)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(item, xp, dtype) for item in value)
    if isinstance(value, np.ndarray):
        return xp.array(value, dtype=dtype)  # a fresh copy for each call
    return value


def _arrays(value):
    if isinstance(value, (list, tuple)):
        return [array for item in value for array in _arrays(item)]
    return [] if value is None or np.isscalar(value) else [value]


def test_every_fast_operation_has_a_case():
    covered = {operation for operation, _ in CASES.values()}
    for device in ("cpu", "gpu"):
        module = importlib.import_module(ops.FAST_MODULES[device])  # the CUDA one imports without a GPU
        assert set(module.OPERATIONS) <= covered, f"{module.__name__}: operations without a test case"
        assert set(module.OPERATIONS) <= set(ops.REFERENCE), f"{module.__name__}: operations the reference lacks"


@pytest.mark.parametrize("case", CASES)
def test_fast_operation_matches_the_reference(fast, case):
    device, xp, module, dtype = fast
    operation, make_inputs = CASES[case]
    if operation not in module.OPERATIONS:
        pytest.skip(f"{module.__name__} has no {operation}: the reference runs there (nothing to compare)")
    inputs = make_inputs(np.random.default_rng(0))
    if case == "affine_backward_pooled":  # keep the broadcast view: that is what the case is about
        view = xp.broadcast_to(xp.asarray(inputs[0][0], dtype=dtype), inputs[0].shape)
        fast_inputs = [view, _on_device(inputs[1], xp, dtype)]
        reference_inputs = [view, _on_device(inputs[1], xp, dtype)]
    else:
        fast_inputs, reference_inputs = _on_device(inputs, xp, dtype), _on_device(inputs, xp, dtype)
    fast_result = getattr(module, operation)(*fast_inputs)
    reference_result = ops.REFERENCE[operation](*reference_inputs)
    ours, theirs = _arrays([fast_result, fast_inputs]), _arrays([reference_result, reference_inputs])
    assert len(ours) == len(theirs) > 0, "the fast operation returns other things than the reference"
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{case}: result {index}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert relative_error(a, b) < TOLERANCE[dtype], f"{case}: result {index}"


def test_selection_is_made_once_by_device_dtype_and_setting():
    assert ops.select("cpu", np.float32, fast=False) is ops.REFERENCE_OPERATIONS
    assert ops.select("cpu", np.float64) is ops.REFERENCE_OPERATIONS, "float64 (gradient checks) runs the reference"
    chosen = ops.select("cpu", np.float32)
    assert chosen.name == "cpu_kernels" and chosen.bias_gelu_backward is ops.fast_module("cpu", np.float32).bias_gelu_backward
    assert chosen.linear_forward is ops.REFERENCE["linear_forward"], "what the fast path lacks stays the reference"
    model = create_model("resmlp_tiny", depth=1)
    assert model.ops.name == "cpu_kernels" and create_model("resmlp_tiny", depth=1, fast=False).ops.name == "reference"


def test_whole_training_step_fast_matches_reference(fast):
    """resmlp_tiny with stochastic depth and label smoothing, three steps of the one training step: every fast
    operation at once, against the reference model from the same initialization on the same batches."""
    device, xp, _, dtype = fast
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(8, 3, 32, 32)), rng.integers(0, 10, 8)
    results = {}
    for use_fast in (True, False):
        model = create_model("resmlp_tiny", device=device, dtype=dtype, drop_path=0.2, seed=0, fast=use_fast)
        assert (model.ops.name != "reference") == use_fast
        optimizer = AdamW(model.parameters, model.ops, lr=1e-3, weight_decay=0.05)
        losses = [train_step(model, optimizer, images, labels, 1e-3, policy("float32"), smoothing=0.1)[0]
                  for _ in range(3)]
        results[use_fast] = [xp.stack(losses), model.forward(images), model.parameters.grad, model.parameters.data]
    for name, ours, reference in zip(["losses", "logits", "gradients", "parameters"], results[True], results[False]):
        # three steps of a 6-block model: float32 rounding grows through them; float64's stays tiny
        assert relative_error(ours, reference) < (1e-4 if dtype == np.float32 else 1e-10), name


def test_cpu_gelu_is_float64s_gelu_to_float32_rounding_over_its_whole_range():
    """The CPU loop computes GELU and its slope with its own erf and exp (Abramowitz and Stegun 7.1.26 with one
    exp, minimlp/fast/cpu_kernels.py): on a fine grid over [-12, 12], through the tails where erf saturates and
    exp underflows, both are within 4e-7 of float64's exact values (relative, or absolute below 1): about three
    float32 roundings; a degree lower in the exp, or a coefficient off in its fifth digit, fails."""
    import scipy.special
    module = ops.fast_module("cpu", np.float32)
    x = np.linspace(-12.0, 12.0, 240_001).reshape(-1, 1)  # steps of 1e-4: every segment of the approximation
    cdf = 0.5 * scipy.special.erfc(-x / np.sqrt(2.0))
    exact = {"GELU": x * cdf, "slope": cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)}
    ours = dict(zip(exact, module.bias_gelu_forward(x.astype(np.float32), np.zeros(1, np.float32))))
    for name in exact:
        error = np.abs(ours[name].astype(np.float64) - exact[name]) / np.maximum(np.abs(exact[name]), 1.0)
        assert error.max() < 4e-7, f"{name}: {error.max():.1e} at x = {x[np.argmax(error), 0]:.4f}"


def test_residual_layer_matches_finite_differences():
    """The reference layer the fused residual loops replace, in float64: d(branch), the bias it adds, gamma."""
    rng = np.random.default_rng(1)
    x, branch, gamma, dy = (rng.normal(size=shape) for shape in
                            [(PATCHES, IMAGES, DIM), (PATCHES, IMAGES, DIM), DIM, (PATCHES, IMAGES, DIM)])
    mask, bias = _mask(rng), rng.normal(size=(PATCHES, 1, 1))

    def forward(x, branch, bias, gamma):
        return residual_forward(x, branch.copy(), bias, gamma, mask)[0]

    numerical = numerical_gradients(forward, [x, branch, bias, gamma], dy)
    _, cache = residual_forward(x, branch.copy(), bias, gamma, mask)
    dbranch, dbias, dgamma = residual_backward(dy, cache)
    assert relative_error(dy, numerical[0]) < 1e-7, "the skip path passes dy through"
    assert relative_error(dbranch, numerical[1]) < 1e-7
    assert relative_error(dbias, numerical[2]) < 1e-7
    assert relative_error(dgamma, numerical[3]) < 1e-7


NUMBA_COMPILES_ONE_LOOP = """
import numpy as np
from minimlp.fast import cpu_kernels
cpu_kernels.say_when_compiling(print)
for _ in range(2):
    cpu_kernels.to_bfloat16(np.ones(3, np.float32))
print("done")
"""


def test_a_line_says_when_the_cpu_loops_compile_and_none_once_they_are_cached(tmp_path):
    """The first run on a machine compiles the Numba loops (the first epoch is slower): one line says so. The
    next process loads them from the disk cache and says nothing."""
    pytest.importorskip("numba")
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs = [subprocess.run([sys.executable, "-c", NUMBA_COMPILES_ONE_LOOP], capture_output=True, text=True,
                           env=environment, cwd=REPO_ROOT, timeout=300) for _ in range(2)]
    first, second = (run.stdout.splitlines() for run in runs)
    assert all(run.returncode == 0 for run in runs), runs[0].stderr + runs[1].stderr
    assert len(first) == 2 and first[0].startswith("compiling the CPU kernels (Numba") and first[1] == "done"
    assert str(tmp_path / "numba-cache") in first[0]
    assert second == ["done"]
