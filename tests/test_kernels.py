"""The fused CUDA kernels (minimlp.kernels) against the plain xp code they replace.

The comparisons run one function twice on the same CuPy inputs, kernels on and kernels off, and
need a GPU (without one they skip with the conftest's reason). Elsewhere the plain path is what the
CPU tests check; on a GPU, test_layers, test_model, test_losses and test_optim run with the kernels
on (the default), against finite differences and PyTorch. On a GPU machine:

    python -m pytest tests/test_kernels.py tests/test_layers.py tests/test_model.py tests/test_losses.py tests/test_optim.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from minimlp import backend, create_model, kernels, layers
from minimlp.gradcheck import numerical_gradients, relative_error
from minimlp.losses import cross_entropy
from minimlp.optim import AdamW
from tests.conftest import GPU_SKIP_REASON

PATCHES, IMAGES, DIM, HIDDEN, CLASSES = 6, 4, 5, 7, 11  # all different: a swapped axis cannot pass
FLOAT32_TOLERANCE = 1e-5  # largest difference / largest value; the two paths round differently


@pytest.fixture
def cp():
    if not backend.gpu_available():
        pytest.skip(GPU_SKIP_REASON)
    return backend.get_module("gpu")


def _with_cache(output, cache):
    return [output, *cache]


def _mask(rng):
    mask = (rng.random(IMAGES) < 0.5) / 0.5
    mask[:2] = 0.0, 2.0  # both a dropped and a kept image, whatever the draw
    return mask


# name: (the kernel that must run, inputs from a Generator, the plain-code call returning its outputs)
# Inputs are NumPy float64; the test moves them to the GPU in float32, fresh for each run, since some
# layers write into their inputs (those inputs are outputs too, so they are compared).
CASES = {
    "affine_forward": ("affine_forward",
                       lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM), rng.normal(size=DIM)],
                       lambda x, alpha, beta: [layers.affine_forward(x, alpha, beta)[0]]),
    "bias_gelu_forward": ("bias_gelu_forward",
                          lambda rng: [3 * rng.normal(size=(PATCHES * IMAGES, HIDDEN)), rng.normal(size=HIDDEN)],
                          lambda x, bias: _with_cache(*layers.bias_gelu_forward(x, bias))),
    "gelu_backward": ("gelu_backward",
                      lambda rng: [rng.normal(size=(PATCHES * IMAGES, HIDDEN)), 3 * rng.normal(size=(PATCHES * IMAGES, HIDDEN))],
                      lambda dy, x: [layers.gelu_backward(dy, layers.gelu_forward(x)[1])]),
    "residual_forward_token_bias_drop_path": (
        "residual_forward",
        lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)),
                     rng.normal(size=(PATCHES, 1, 1)), rng.normal(size=DIM), _mask(rng)],
        lambda x, branch, bias, gamma, mask: [layers.residual_forward(x, branch, bias, gamma, mask)[0], branch]),
    "residual_forward_channel_bias": (
        "residual_forward",
        lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)),
                     rng.normal(size=DIM), rng.normal(size=DIM)],
        lambda x, branch, bias, gamma: [layers.residual_forward(x, branch, bias, gamma)[0], branch]),
    "residual_backward_drop_path": (
        "residual_backward",
        lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)),
                     rng.normal(size=DIM), _mask(rng)],
        lambda dy, branch, gamma, mask: list(layers.residual_backward(dy, ((branch, gamma), mask)))),
    "residual_backward": (
        "residual_backward",
        lambda rng: [rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=(PATCHES, IMAGES, DIM)), rng.normal(size=DIM)],
        lambda dy, branch, gamma: list(layers.residual_backward(dy, ((branch, gamma), None)))),
    "cross_entropy_smoothed_indices": (
        "cross_entropy",
        lambda rng: [8 * rng.normal(size=(IMAGES, CLASSES)), rng.integers(0, CLASSES, IMAGES)],
        lambda logits, labels: list(cross_entropy(logits, labels, smoothing=0.1))),
    "cross_entropy_soft_targets_many_classes": (  # more classes than threads per row: the strided loops
        "cross_entropy",
        lambda rng: [8 * rng.normal(size=(IMAGES, 1000)), rng.dirichlet(np.ones(1000), IMAGES)],
        lambda logits, targets: list(cross_entropy(logits, targets))),
}


def _run(cp, case, rng_seed, fused, monkeypatch):
    """The case's outputs (NumPy) with the kernels on or off, and how often its kernel ran."""
    kernel_name, make_inputs, call = CASES[case]
    inputs = [cp.asarray(array, dtype=np.int64 if array.dtype.kind == "i" else np.float32)
              for array in make_inputs(np.random.default_rng(rng_seed))]
    calls = []
    kernel = getattr(kernels, kernel_name)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, kernel_name, lambda *args: calls.append(1) or kernel(*args))
        patch.setattr(kernels, "enabled", fused)
        outputs = [backend.to_numpy(output) for output in call(*inputs)]
    return outputs, len(calls)


@pytest.mark.parametrize("case", CASES)
def test_fused_kernel_matches_plain_code(cp, case, monkeypatch):
    fused, fused_calls = _run(cp, case, 0, True, monkeypatch)
    plain, plain_calls = _run(cp, case, 0, False, monkeypatch)
    assert fused_calls > 0 and plain_calls == 0, "the dispatch did not pick the path the switch asks for"
    for index, (ours, reference) in enumerate(zip(fused, plain)):
        assert relative_error(ours, reference) < FLOAT32_TOLERANCE, f"{case}: output {index}"


def test_residual_layer_matches_finite_differences(xp):
    """The layer the fused residual kernel replaces (plain on NumPy, the kernel on CuPy), in float64;
    the bias gradient belongs to the Linear before it and is sum(d branch)."""
    rng = np.random.default_rng(1)
    x, branch, gamma, dy = (xp.asarray(rng.normal(size=shape)) for shape in
                            [(PATCHES, IMAGES, DIM), (PATCHES, IMAGES, DIM), DIM, (PATCHES, IMAGES, DIM)])
    mask, bias = xp.asarray(_mask(rng)), xp.asarray(rng.normal(size=(PATCHES, 1, 1)))

    def forward(x, branch, bias, gamma):
        return layers.residual_forward(x, branch.copy(), bias, gamma, mask)[0]

    numerical = numerical_gradients(forward, [x, branch, bias, gamma], dy)
    _, cache = layers.residual_forward(x, branch.copy(), bias, gamma, mask)
    dbranch, dgamma = layers.residual_backward(dy, cache)
    assert relative_error(dy, numerical[0]) < 1e-7, "the skip path passes dy through"
    assert relative_error(dbranch, numerical[1]) < 1e-7
    assert relative_error(dbranch.sum(axis=(1, 2), keepdims=True), numerical[2]) < 1e-7
    assert relative_error(dgamma, numerical[3]) < 1e-7


@pytest.mark.parametrize("steps", [1, 3])
def test_fused_adamw_matches_plain(cp, steps, monkeypatch):
    """The one-kernel AdamW step against the plain one on the same buffers, weight decay on matrices."""
    results = []
    for fused in (True, False):
        monkeypatch.setattr(kernels, "enabled", fused)
        model = create_model("resmlp_tiny", device="gpu", depth=2, seed=0)
        optimizer = AdamW(model, lr=1e-2, weight_decay=0.1)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            model.parameters.grad[...] = cp.asarray(rng.normal(size=model.parameters.size), dtype=np.float32)
            optimizer.step()
        results.append([backend.to_numpy(array) for array in (model.parameters.data, optimizer.m, optimizer.v)])
    for name, ours, reference in zip(["parameters", "m", "v"], *results):
        assert relative_error(ours, reference) < FLOAT32_TOLERANCE, name


def test_whole_model_fused_matches_plain(cp, monkeypatch):
    """resmlp_tiny with stochastic depth, label smoothing, two AdamW steps: every kernel at once."""
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(8, 3, 32, 32)), rng.integers(0, 10, 8)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(kernels, "enabled", fused)
        model = create_model("resmlp_tiny", device="gpu", drop_path=0.2, seed=0)
        optimizer = AdamW(model, lr=1e-3, weight_decay=0.05)
        for _ in range(2):
            logits = model.forward(images, train=True)
            loss, dlogits = cross_entropy(logits, cp.asarray(labels), smoothing=0.1)
            model.backward(dlogits)
            optimizer.step()
        results.append([backend.to_numpy(array) for array in (logits, loss, model.parameters.grad, model.parameters.data)])
    for name, ours, reference in zip(["logits", "loss", "gradients", "parameters"], *results):
        assert relative_error(ours, reference) < 1e-4, name  # two steps of a 6-block model in float32


def test_kernels_only_for_cupy_floats_and_switched_off_by_the_environment():
    assert not kernels.available(np.ones(3, dtype=np.float32)), "NumPy arrays always take the plain path"
    command = [sys.executable, "-c", "from minimlp import kernels; print(kernels.enabled)"]
    for setting, expected in [("0", "False"), ("1", "True")]:
        result = subprocess.run(command, env={**os.environ, "MINIMLP_FUSED": setting}, capture_output=True, text=True,
                                check=True)
        assert result.stdout.strip() == expected, f"MINIMLP_FUSED={setting}"
