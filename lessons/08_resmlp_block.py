# %% [markdown]
# # Lesson 8: the ResMLP block. Residuals, LayerScale, and no normalization
#
# One block puts lessons 2 to 5 together (tokens x: (N, B, d)):
#
#     z = x + gamma_1 * attn(Aff_1(x))                      patches talk (lesson 5)
#     y = z + gamma_2 * fc2(GELU(fc1(Aff_2(z))))            each token thinks alone (lessons 3, 4)
#
# Three ideas make a deep stack of these trainable without any BatchNorm or LayerNorm:
#
# - residual connections: the block adds a correction to x instead of replacing it, so the
#    gradient reaches earlier blocks undiminished (d(x + f(x))/dx = 1 + df/dx);
# - LayerScale: gamma_1, gamma_2 are per-channel vectors initialized SMALL (0.1 for 12 blocks,
#    1e-5 for 24, 1e-6 for 36), so every block starts as almost the identity and the network
#    begins shallow, deepening as training grows the gammas;
# - Affine instead of normalization (lesson 2): nothing depends on batch or token statistics.
#
# What you will see: the library's block_forward and block_backward; a block with small gamma is
# nearly the identity, forward and backward; each image is processed independently; and a spot
# check of every parameter's gradient by finite differences.
#
# Run: python lessons/08_resmlp_block.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_source

import numpy as np

from minimlp.model import BLOCK_PARAMETERS, PRESETS, block_backward, block_forward

rng = np.random.default_rng(0)
patches, images, dim = 16, 3, 8  # a 4x4 patch grid


def random_block(gamma):
    """Block parameters by short name, random (not at their init values, which would hide bugs)."""
    shapes = {"attn.weight": (patches, patches), "attn.bias": (patches,), "mlp.fc1.weight": (4 * dim, dim),
              "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
    params = {}
    for short in BLOCK_PARAMETERS:
        if short.startswith("gamma_"):
            params[short] = gamma * (1 + 0.5 * rng.normal(size=dim))
        elif short.endswith(".alpha"):
            params[short] = 1 + 0.3 * rng.normal(size=dim)
        elif short.endswith(".beta"):
            params[short] = 0.3 * rng.normal(size=dim)
        else:
            params[short] = rng.normal(size=shapes[short]) / np.sqrt(shapes[short][-1])
    return params


# %% [markdown]
# ## 1. The block, as the library writes it

# %%
heading("1. The block, as the library writes it")
show_source(block_forward)
# Read the two halves: Affine -> token mixing -> [bias, LayerScale, drop path, add]; then
# Affine -> fc1 -> [bias, GELU] -> fc2 -> [bias, LayerScale, drop path, add]. The bracketed steps are
# one layer each (layers.bias_gelu_forward, layers.residual_forward): in the reference (minimlp.layers)
# they are the plain layers in a row; a fast path does each in one fused pass (minimlp/ops.py: Numba
# loops on the CPU, CUDA kernels on the GPU, lesson 12). `op` is that choice, made once when the model
# is built. That is why the Linears are called with bias None: the next layer adds the bias in its own
# pass, and its backward returns the bias's gradient. The MLP sees (N*B, d) rows, a free reshape of the
# (N, B, d) tokens (lesson 3).
show_source(block_backward)
# Read it bottom-up against the forward: the same layers in reverse. At each residual the
# gradient forks and joins again: the Affine that opens the branch returns `alpha * dy + skip`, "the
# gradient that went through the branch plus the one that skipped it" (affine_backward's skip).


# %% [markdown]
# ## 2. Residual + small LayerScale: a block starts as almost the identity

# %%
heading("2. Residual + small LayerScale: a block starts as almost the identity")
print("LayerScale init per preset:", {name: preset["layerscale_init"] for name, preset in PRESETS.items()})
tokens = rng.normal(size=(patches, images, dim))
dout = rng.normal(size=tokens.shape)
for gamma in (1.0, 0.1, 1e-5):
    params = random_block(gamma)
    out, cache = block_forward(tokens, params)
    dtokens, _ = block_backward(dout, cache)
    change = np.linalg.norm(out - tokens) / np.linalg.norm(tokens)
    gradient_change = np.linalg.norm(dtokens - dout) / np.linalg.norm(dout)
    print(f"gamma ~ {gamma:<6g}: |y - x| / |x| = {change:.1e}     |dx - dy| / |dy| = {gradient_change:.1e}")
    if gamma == 1e-5:
        check(change < 1e-3 and gradient_change < 1e-3,
              "with LayerScale 1e-5 the block passes both the tokens and the gradient through nearly unchanged")
# Why this matters for depth: with 36 blocks, dx of the first block is the product of 36 Jacobians
# (1 + gamma * df/dx). Near 1 each, the product neither explodes nor vanishes. Training then grows
# the gammas where a block is useful. The exercises below let you watch this in a deep stack.


# %% [markdown]
# ## 3. No normalization: every image is processed on its own
#
# BatchNorm would mix images (batch statistics); LayerNorm would mix the channels of a token
# through its mean and variance. Affine does neither, so image b's output is a function of image
# b alone: the same in a batch of 1 and of 1000, in training and evaluation.

# %%
heading("3. No normalization: every image is processed on its own")
params = random_block(0.1)
batch_out, _ = block_forward(tokens, params)
alone_out, _ = block_forward(np.ascontiguousarray(tokens[:, 2:3]), params)
check(np.allclose(alone_out[:, 0], batch_out[:, 2], rtol=1e-12, atol=1e-12),
      "image 2 alone gives the same output as image 2 inside the batch")
# (Token mixing does mix the PATCHES of one image: that is its purpose.)


# %% [markdown]
# ## 4. Spot-check every gradient of the block by finite differences
#
# A block has thousands of numbers; for a quick check pick a few random entries of each tensor and
# compare one central difference each (lesson 7) with block_backward. tests/test_model.py checks
# every entry, and against timm.

# %%
heading("4. Spot-check every gradient of the block by finite differences")
params = random_block(0.5)
out, cache = block_forward(tokens, params)
dtokens, grads = block_backward(dout, cache)


def loss(tokens, params):
    return float((block_forward(tokens, params)[0] * dout).sum())


h = 1e-6
worst = 0.0
for name, array, gradient in [("tokens", tokens, dtokens)] + [(short, params[short], grads[short]) for short in BLOCK_PARAMETERS]:
    flat = array.reshape(-1)  # a view: changing it changes the block's input
    for index in rng.choice(flat.size, size=min(5, flat.size), replace=False):
        original = flat[index]
        flat[index] = original + h
        up = loss(tokens, params)
        flat[index] = original - h
        down = loss(tokens, params)
        flat[index] = original
        numerical = (up - down) / (2 * h)
        analytic = gradient.reshape(-1)[index]
        worst = max(worst, abs(numerical - analytic) / max(1.0, abs(analytic)))
    print(f"  {name:15s} {str(array.shape):10s} checked")
print(f"worst relative disagreement over {5 * (1 + len(BLOCK_PARAMETERS))} spot checks: {worst:.1e}")
check(worst < 1e-6, "block_backward's gradients for the tokens and all 12 parameters match finite differences")
check(set(grads) == set(BLOCK_PARAMETERS), "block_backward returns a gradient for every block parameter, by short name")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Stack 36 random blocks (random_block(gamma)) and push tokens and dout through; print the norm
#    of the gradient reaching the first block for gamma = 1 and 1e-6. -> with gamma = 1 it drifts
#    from |dout| by ~10 orders of magnitude (so do the tokens); with 1e-6 it stays |dout|.
# 2. Remove the residual of the MLP half (return middle's branch only) in a copy of block_forward.
#    What happens to section 2's numbers for gamma = 1e-5? -> the output collapses to ~0: without
#    the skip path a small gamma kills the signal instead of preserving it.
# 3. Write a LayerNorm version of norm1 and redo section 3 with BatchNorm-style statistics over the
#    batch axis. -> image 2's output now depends on images 0 and 1.
# 4. Pass drop-path masks (minimlp.layers.drop_path_mask) to block_forward and verify that an image
#    whose mask is 0 leaves the block unchanged. -> masks=(mask, mask) with mask[b] = 0 gives y[:, b] = x[:, b].

# %%
print("\nLesson 8 done: a block = two residual branches scaled by LayerScale; no statistics anywhere.")
