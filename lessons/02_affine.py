# %% [markdown]
# # Lesson 2: Affine, and your first backward pass
#
# ResMLP has no LayerNorm and no BatchNorm. In their place sits the simplest layer imaginable,
#
#     Aff(x) = alpha * x + beta,        alpha, beta: vectors of size d (one number per channel)
#
# applied to every token of every image alike. It computes no statistics, so it behaves the same for
# a batch of one image as for a thousand, in training as in evaluation, and at initialization
# (alpha = 1, beta = 0) it does nothing at all.
#
# This lesson also introduces how every backward pass in minimlp works. A layer never sees the loss
# L, only the gradient of L with respect to its output, `dy` = dL/dy, handed down from the layer above.
# Its job: return dL/dx for its input and dL/dparameter for each parameter (the chain rule, one
# layer at a time). We derive Affine's three gradients by hand, compute them from scratch with loops,
# and check them against minimlp.layers.affine_backward and against a nudged parameter.
#
# Run: python lessons/02_affine.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_source

import numpy as np

from minimlp import layers

rng = np.random.default_rng(0)
patches, images, dim = 6, 3, 5  # all different, so a mixed-up axis cannot go unnoticed
tokens = rng.normal(size=(patches, images, dim))  # (N, B, d): the layout of lesson 1
alpha, beta = rng.normal(size=dim), rng.normal(size=dim)  # random, not 1 and 0: those would hide bugs


# %% [markdown]
# ## 1. Forward: a scale and a shift per channel

# %%
heading("1. Forward: a scale and a shift per channel")
show_source(layers.affine_forward)
out, cache = layers.affine_forward(tokens, alpha, beta)
# alpha (d,) broadcasts against (N, B, d): NumPy lines up the LAST axes, so alpha[c] multiplies
# every x[n, b, c]. The cache keeps exactly what backward will need: x and alpha (beta is not needed).
check(np.allclose(out[2, 1], alpha * tokens[2, 1] + beta), "token 2 of image 1 is alpha * x + beta, channel by channel")


# %% [markdown]
# ## 2. Backward, derived by hand
#
# Write the layer with its indices:   y[n, b, c] = alpha[c] * x[n, b, c] + beta[c].
# The loss L depends on y; the layer above gives us dy[n, b, c] = dL/dy[n, b, c].
# Chain rule: dL/dtheta = sum over every output of dL/dy * dy/dtheta.
#
#     x[n, b, c] appears in exactly one output, y[n, b, c], with slope alpha[c]:
#     dx[n, b, c] = dy[n, b, c] * alpha[c]
#     alpha[c] appears in N*B outputs (every token, every image), with slope x[n, b, c] in each:
#     dalpha[c] = sum over n, b of dy[n, b, c] * x[n, b, c]
#     beta[c] also appears in N*B outputs, with slope 1:
#     dbeta[c] = sum over n, b of dy[n, b, c]
#
# The rule to remember: a parameter that is broadcast (reused) in the forward pass has its
# gradients SUMMED over the axes it was broadcast along in the backward pass.

# %%
heading("2. Backward, derived by hand")
dy = rng.normal(size=out.shape)  # a random upstream gradient: never zeros or ones, they hide bugs

dx_loops = np.zeros_like(tokens)
dalpha_loops, dbeta_loops = np.zeros(dim), np.zeros(dim)
for n in range(patches):
    for b in range(images):
        for c in range(dim):
            dx_loops[n, b, c] = dy[n, b, c] * alpha[c]
            dalpha_loops[c] += dy[n, b, c] * tokens[n, b, c]
            dbeta_loops[c] += dy[n, b, c]

show_source(layers.affine_backward)
dx, dalpha, dbeta = layers.affine_backward(dy, cache)
for name, ours, loops in [("dx", dx, dx_loops), ("dalpha", dalpha, dalpha_loops), ("dbeta", dbeta, dbeta_loops)]:
    print(f"{name:7s} shape {str(ours.shape):10s} largest difference to the loops {np.abs(ours - loops).max():.1e}")
    check(np.allclose(ours, loops, rtol=1e-12, atol=1e-12), f"affine_backward's {name} equals the loop derivation")
# Notice the shapes: every gradient has the shape of the thing it is the gradient of.
# `axes = tuple(range(dy.ndim - 1))` sums over all leading axes, so the same function works on
# (N, B, d) tokens and on (B, d) pooled features (the final `norm` of the model).


# %% [markdown]
# ## 3. What a gradient means: nudge a parameter and watch the loss
#
# To have a loss to nudge, take L = sum(y * dy): its gradient with respect to y is exactly dy.
# Change alpha[3] by +-h; L changes by about dalpha[3] * h.

# %%
heading("3. What a gradient means: nudge a parameter and watch the loss")


def loss_of(alpha_value):
    return float((layers.affine_forward(tokens, alpha_value, beta)[0] * dy).sum())


h = 1e-6
nudged_up, nudged_down = alpha.copy(), alpha.copy()
nudged_up[3] += h
nudged_down[3] -= h
slope = (loss_of(nudged_up) - loss_of(nudged_down)) / (2 * h)
print(f"(L(alpha_3 + h) - L(alpha_3 - h)) / 2h = {slope:.8f}   dalpha[3] from backward = {dalpha[3]:.8f}")
check(abs(slope - dalpha[3]) < 1e-6 * max(1.0, abs(dalpha[3])), "the nudged loss moves by dalpha * h")
# Lesson 7 turns this into a systematic check of every number of every layer.


# %% [markdown]
# ## 4. Why not LayerNorm? Affine needs no statistics
#
# LayerNorm would first standardize every token over its d channels: (x - mean) / std. That makes
# each token depend on all its channels, and costs a reduction per token. Affine is per number:

# %%
heading("4. Why not LayerNorm? Affine needs no statistics")
one_image, _ = layers.affine_forward(tokens[:, :1], alpha, beta)  # image 0 alone, as a batch of 1
check(np.array_equal(one_image, out[:, :1]), "an image's output does not depend on the other images in the batch")
identity, _ = layers.affine_forward(tokens, np.ones(dim), np.zeros(dim))  # the initialization
check(np.array_equal(identity, tokens), "at initialization (alpha = 1, beta = 0) Affine is the identity")
# The paper's ablations find Affine about as good as LayerNorm for ResMLP; and being a plain
# multiply-add, it can be folded into the next linear layer after training (exercise 3).
# LayerScale (lesson 8) is the same idea without beta: layers.layer_scale_forward = gamma * x.
show_source(layers.layer_scale_forward)


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Put a bug into dbeta: replace dy.sum(axis=axes) by dy.sum() in a copy of affine_backward.
#    Which check catches it? -> the loop comparison; the shapes differ too (a scalar, not (d,)).
# 2. Derive the backward of y = x * x (elementwise) the same way and check it by a nudge.
#    -> dx = 2 * x * dy.
# 3. Fold Affine into a following Linear: Linear(Aff(x)) = (x * alpha + beta) @ W.T + b. Write the W'
#    and b' of a single Linear that does the same. -> W' = W * alpha (scales columns), b' = W @ beta + b.
# 4. Compute LayerNorm of `tokens` over the last axis and show that, unlike Affine, the output of
#    image 0 changes if you change one channel of image 0 elsewhere in the token. -> every channel
#    of a token enters its mean and standard deviation.

# %%
print("\nLesson 2 done: Affine's backward sums its parameter gradients over every token and image.")
