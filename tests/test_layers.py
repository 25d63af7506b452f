"""Every layer of minimlp.layers: finite differences and PyTorch autograd, float64, on NumPy (and CuPy)."""
import numpy as np
import pytest

from minimlp import layers
from minimlp.backend import get_xp, to_numpy
from minimlp.tools.gradcheck import numerical_gradients, relative_error, torch_gradients
from minimlp.tools.pytorch_references import timm, torch

F = torch.nn.functional
PATCHES, IMAGES, DIM, HIDDEN = 6, 3, 5, 7  # small, and all different so a swapped axis cannot pass
MASK = np.array([2.0, 0.0, 2.0])  # a drop-path mask with keep 1/2: image 1 skips the branch


def _tokens(rng):
    return rng.normal(size=(PATCHES, IMAGES, DIM))


# name: (make inputs from a Generator, our forward, our backward, the same function in PyTorch)
LAYERS = {
    "affine": (lambda rng: [_tokens(rng), rng.normal(size=DIM), rng.normal(size=DIM)],
               layers.affine_forward, layers.affine_backward,
               lambda x, alpha, beta: torch.addcmul(beta, alpha, x)),
    "linear": (lambda rng: [rng.normal(size=(IMAGES * PATCHES, DIM)), rng.normal(size=(HIDDEN, DIM)),
                            rng.normal(size=HIDDEN)],
               layers.linear_forward, layers.linear_backward, F.linear),
    "token_mixing": (lambda rng: [_tokens(rng), rng.normal(size=(PATCHES, PATCHES)), rng.normal(size=PATCHES)],
                     layers.token_mixing_forward, layers.token_mixing_backward,
                     # timm: linear_tokens(x.transpose(1, 2)).transpose(1, 2) on (B, N, d); ours is (N, B, d)
                     lambda x, weight, bias: F.linear(x.permute(1, 2, 0), weight, bias).permute(2, 0, 1)),
    "gelu": (lambda rng: [3 * rng.normal(size=(PATCHES * IMAGES, HIDDEN))],
             layers.gelu_forward, layers.gelu_backward, torch.nn.GELU()),
    "patch_embed": (lambda rng: [rng.normal(size=(2, 3, 8, 12)), rng.normal(size=(DIM, 3, 4, 4)), rng.normal(size=DIM)],
                    layers.patch_embed_forward, layers.patch_embed_backward,
                    lambda images, weight, bias: F.conv2d(images, weight, bias, stride=4).flatten(2).permute(2, 0, 1)),
    "layer_scale": (lambda rng: [_tokens(rng), rng.normal(size=DIM)],
                    layers.layer_scale_forward, layers.layer_scale_backward, lambda x, gamma: gamma * x),
    "mean_pool": (lambda rng: [_tokens(rng)], layers.mean_pool_forward, layers.mean_pool_backward,
                  lambda x: x.mean(dim=0)),
    # The two layers that overwrite an input with (input + bias) get a copy, so a finite-difference
    # probe that calls them again sees the unchanged input.
    "bias_gelu": (lambda rng: [3 * rng.normal(size=(PATCHES * IMAGES, HIDDEN)), rng.normal(size=HIDDEN)],
                  lambda x, bias: layers.bias_gelu_forward(x.copy(), bias),
                  layers.bias_gelu_backward,
                  lambda x, bias: torch.nn.GELU()(x + bias)),
    "residual": (lambda rng: [_tokens(rng), _tokens(rng), rng.normal(size=(PATCHES, 1, 1)), rng.normal(size=DIM)],
                 lambda x, branch, bias, gamma: layers.residual_forward(x, branch.copy(), bias, gamma,
                                                                                       get_xp(x).asarray(MASK)),
                 lambda dy, cache: _residual_gradients(dy, cache),
                 lambda x, branch, bias, gamma: x + torch.from_numpy(MASK)[None, :, None] * gamma * (branch + bias)),
}


def _residual_gradients(dy, cache):
    """residual_backward gives d(branch), dbias and dgamma; the skip path's dx = dy completes it."""
    return (dy, *layers.residual_backward(dy, cache))


def _run(name, xp, seed=0):
    make_inputs, forward, backward, torch_forward = LAYERS[name]
    rng = np.random.default_rng(seed)
    inputs = [xp.asarray(array) for array in make_inputs(rng)]
    output, cache = forward(*inputs)
    dout = xp.asarray(rng.normal(size=output.shape))
    gradients = backward(dout, cache)
    gradients = gradients if isinstance(gradients, tuple) else (gradients,)
    return inputs, output, dout, gradients, forward, torch_forward


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_finite_differences(name, xp):
    inputs, _, dout, gradients, forward, _ = _run(name, xp)
    numerical = numerical_gradients(lambda *args: forward(*args)[0], inputs, dout)
    for index, (ours, expected) in enumerate(zip(gradients, numerical)):
        assert relative_error(ours, expected) < 1e-7, f"{name}: gradient of input {index}"


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_pytorch(name, xp):
    inputs, output, dout, gradients, _, torch_forward = _run(name, xp, seed=1)
    torch_output, torch_grads = torch_gradients(torch_forward, inputs, dout)
    assert relative_error(output, torch_output) < 1e-10, f"{name}: output"
    for index, (ours, expected) in enumerate(zip(gradients, torch_grads)):
        assert relative_error(ours, expected) < 1e-10, f"{name}: gradient of input {index}"


def test_gelu_is_the_erf_form_not_tanh(xp):
    x = xp.linspace(-4, 4, 101)
    exact = torch.nn.GELU()(torch.tensor(to_numpy(x))).numpy()
    tanh_form = torch.nn.GELU(approximate="tanh")(torch.tensor(to_numpy(x))).numpy()
    ours = to_numpy(layers.gelu_forward(x)[0])
    assert np.abs(ours - exact).max() < 1e-15
    assert np.abs(ours - tanh_form).max() > 1e-4  # the two forms are distinguishable at this size


def test_patches_round_trip(xp):
    images = xp.asarray(np.random.default_rng(2).normal(size=(2, 3, 8, 12)))
    patches = layers.images_to_patches(images, 4)
    assert patches.shape == (6, 2, 48)
    # patch 1 of image 0 is rows 0..3, columns 4..7, flattened channel-first like a conv kernel
    assert xp.array_equal(patches[1, 0], images[0, :, 0:4, 4:8].reshape(-1))
    assert xp.array_equal(layers.patches_to_images(patches, images.shape, 4), images)


def test_drop_path_matches_timm_with_the_same_mask(xp):
    rng = np.random.default_rng(3)
    batch_first = rng.normal(size=(IMAGES * 4, PATCHES, DIM))  # timm's (B, N, d)
    torch.manual_seed(0)
    timm_out = timm.layers.drop_path(torch.tensor(batch_first), drop_prob=0.4, training=True).numpy()
    timm_mask = timm_out[:, 0, 0] / batch_first[:, 0, 0]  # the per-image factor timm drew: 0 or 1/keep
    assert set(np.round(timm_mask, 12)) == {0.0, round(1 / 0.6, 12)}, "test needs both kept and dropped images"
    tokens = xp.asarray(np.ascontiguousarray(batch_first.transpose(1, 0, 2)))
    ours, mask = layers.drop_path_forward(tokens, xp.asarray(timm_mask))
    assert relative_error(ours, timm_out.transpose(1, 0, 2)) < 1e-15
    dout = xp.asarray(rng.normal(size=tokens.shape))
    numerical = numerical_gradients(lambda x: layers.drop_path_forward(x, mask)[0], [tokens], dout)[0]
    assert relative_error(layers.drop_path_backward(dout, mask), numerical) < 1e-7


def test_drop_path_mask_statistics(xp):
    mask = to_numpy(layers.drop_path_mask(np.random.default_rng(4), 20000, 0.25, xp, np.float64))
    assert set(np.round(mask, 12)) == {0.0, round(1 / 0.75, 12)}
    assert abs(mask.mean() - 1.0) < 0.02  # E[mask] = 1: the branch keeps its expected value
