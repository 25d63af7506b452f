# %% [markdown]
# # Lesson 5: the cross-patch "transpose-linear", ResMLP's replacement for attention
#
# So far every layer worked on each token separately: a patch never learned anything about its
# neighbours. A vision transformer lets the patches talk with self-attention,
#
#     out[n] = sum_m  softmax_m(q_n . k_m / sqrt(d)) * v[m]      (weights computed FROM the input)
#
# ResMLP replaces it with the plainest possible mixing of patches: one learned N x N matrix A,
#
#     out[n, b, c] = sum_m  A[n, m] * x[m, b, c]  +  bias[n]     (weights are parameters)
#
# the same for every image b and every channel c. It is a Linear layer applied along the patch axis
# instead of the channel axis; timm writes it linear(x.transpose(1, 2)).transpose(1, 2), whence
# "transpose-linear". The official code calls the layer `attn`, in memory of what it replaces.
#
# What you will see:
#
# 1. minimlp's token_mixing_forward, checked against the batch-first (B, N, d) transpose-linear;
# 2. why minimlp's (N, B, d) layout makes it ONE matmul on a free reshape, and (B, N, d) does not;
# 3. attention's weights change with the image, A's do not (and what that costs and buys);
# 4. an A that is a convolution: it moves the whole image by a patch (lessons/out/05_shift.png);
# 5. the backward pass, derived and checked.
#
# Run: python lessons/05_cross_patch.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import best_of, check, heading, show_figure, show_source

import numpy as np

from minimlp import layers

rng = np.random.default_rng(0)
patches, images, dim = 16, 3, 5  # a 4x4 grid of patches, 3 images, 5 channels


# %% [markdown]
# ## 1. Forward, and the transpose-linear it equals

# %%
heading("1. Forward, and the transpose-linear it equals")
show_source(layers.token_mixing_forward)
tokens = rng.normal(size=(patches, images, dim))  # (N, B, d)
A, bias = rng.normal(size=(patches, patches)), rng.normal(size=patches)
mixed, cache = layers.token_mixing_forward(tokens, A, bias)

# The same layer as timm and the official code write it, on batch-first (B, N, d) activations:
# transpose to (B, d, N), apply a Linear(N, N) to the last axis, transpose back.
batch_first = tokens.transpose(1, 0, 2)  # (B, N, d)
transpose_linear = (batch_first.transpose(0, 2, 1) @ A.T + bias).transpose(0, 2, 1)  # (B, N, d)
check(np.allclose(mixed.transpose(1, 0, 2), transpose_linear, rtol=1e-12, atol=1e-12),
      "token_mixing_forward on (N, B, d) equals linear(x.transpose(1, 2)).transpose(1, 2) on (B, N, d)")
check(np.allclose(mixed[:, 1, 2], A @ tokens[:, 1, 2] + bias, rtol=1e-12, atol=1e-12),
      "for image 1, channel 2: out = A @ (that channel's values over all patches) + bias")


# %% [markdown]
# ## 2. Why the (N, B, d) layout makes it one matmul
#
# In (N, B, d), memory holds patch 0 (all its images and channels), then patch 1, ... so the array
# IS an (N, B*d) matrix already: every row is one patch, every column one (image, channel) pair.
# A @ that matrix mixes the patches of every image and channel in a single BLAS call.

# %%
heading("2. Why the (N, B, d) layout makes it one matmul")
as_matrix = tokens.reshape(patches, images * dim)
check(np.shares_memory(as_matrix, tokens), "(N, B, d) -> (N, B*d) is a free view: no copy")
# The channel MLP (lesson 3) wants (N*B, d) rows, also a free view of the same array. In a
# (B, N, d) layout only the channel view is free; the patch view needs a transposed COPY:
stored_batch_first = np.ascontiguousarray(batch_first)  # how a (B, N, d) library holds it in memory
patch_rows_from_batch_first = stored_batch_first.transpose(1, 0, 2).reshape(patches, -1)
check(not np.shares_memory(patch_rows_from_batch_first, stored_batch_first),
      "from (B, N, d), getting (N, B*d) copies the whole activation (or needs B separate matmuls)")
# Timing at ResMLP-S12 size (N = 196, d = 384) with 16 images. Printed, not asserted: timings vary.
big = rng.normal(size=(196, 16, 384)).astype(np.float32)
big_A = rng.normal(size=(196, 196)).astype(np.float32)
big_batch_first = np.ascontiguousarray(big.transpose(1, 0, 2))


one_matmul = best_of(lambda: big_A @ big.reshape(196, -1))
with_transposes = best_of(lambda: (big_batch_first.transpose(0, 2, 1) @ big_A.T).transpose(0, 2, 1).copy())
print(f"N=196, B=16, d=384, float32: one (N,N)@(N,B*d) matmul {1e3 * one_matmul:.1f} ms;  "
      f"batch-first transpose-linear-transpose {1e3 * with_transposes:.1f} ms")


# %% [markdown]
# ## 3. Attention's weights depend on the image; A's do not
#
# A bare-bones attention (queries = keys = values = the tokens themselves, no projections), to see
# what the weights look like: one N x N matrix PER IMAGE, recomputed at every forward pass.

# %%
heading("3. Attention's weights depend on the image; A's do not")
scores = np.einsum("nbc,mbc->bnm", tokens, tokens) / np.sqrt(dim)  # (B, N, N)
weights = np.exp(scores - scores.max(axis=2, keepdims=True))
weights /= weights.sum(axis=2, keepdims=True)
print(f"attention weights: {weights.shape} (one matrix per image); rows sum to 1: "
      f"{np.allclose(weights.sum(axis=2), 1)}; image 0 and 1 differ by up to {np.abs(weights[0] - weights[1]).max():.2f}")
print(f"token mixing: one A {A.shape} shared by all {images} images and {dim} channels")
# What this buys: no softmax, no queries and keys, a single matmul, and no quadratic activation
# memory per image. What it costs: A is tied to N, so the model works at one image size, and the
# mixing cannot adapt to the content. The paper's finding is that with enough data augmentation,
# this fixed mixing still classifies ImageNet well (docs/reference.md, Published results: 76.6% for S12).
check(weights.shape == (images, patches, patches) and A.shape == (patches, patches),
      "attention has B matrices of N x N, token mixing one")


# %% [markdown]
# ## 4. An A that is a convolution moves the image
#
# Take a 32x32 image cut into 8x8 patches of 4x4 pixels (lesson 1), and an A that gives every
# patch the values of its LEFT neighbour: A[n, m] = 1 if m is the patch left of n. Then mix the
# raw pixel values (channels = the 48 numbers of each patch): the picture slides right by a patch.

# %%
heading("4. An A that is a convolution moves the image")
side, p = 8, 4
yy, xx = np.mgrid[0:32, 0:32] / 31
picture = np.stack([yy, xx, 0.5 + 0 * yy])
picture[:, (yy - 0.5) ** 2 + (xx - 0.35) ** 2 < 0.04] = np.array([1.0, 1.0, 0.0])[:, None]
pixel_tokens = layers.images_to_patches(picture[None], p)  # (64, 1, 48)
shift_right = np.zeros((side * side, side * side))
for row in range(side):
    for col in range(1, side):
        shift_right[row * side + col, row * side + col - 1] = 1.0
shifted_tokens, _ = layers.token_mixing_forward(pixel_tokens, shift_right, np.zeros(side * side))
shifted = layers.patches_to_images(shifted_tokens, (1, 3, 32, 32), p)[0]
check(np.array_equal(shifted[:, :, 4:], picture[:, :, :-4]) and not shifted[:, :, :4].any(),
      "a shift matrix A moves the image one patch (4 pixels) to the right, with zeros coming in")
# Every row of this A is the same pattern (a single 1), placed relative to its own patch: that
# is what a convolution on the patch grid looks like as a matrix. Lesson 13 looks for this pattern
# in trained A's: the paper finds early layers learn convolution-like A's by themselves.
import matplotlib.pyplot as plt  # noqa: E402

figure, axes = plt.subplots(1, 3, figsize=(11, 3.8))
axes[0].imshow(picture.transpose(1, 2, 0))
axes[0].set_title("image (8x8 patches of 4x4)")
axes[1].imshow(shift_right, cmap="Greys")
axes[1].set_title("A: row n takes patch n-1 (64x64)")
axes[2].imshow(shifted.transpose(1, 2, 0))
axes[2].set_title("token_mixing_forward(image, A)")
for axis in axes:
    axis.set_xticks([])
    axis.set_yticks([])
figure.tight_layout()
show_figure(figure, "05_shift.png")


# %% [markdown]
# ## 5. Backward
#
# On the (N, B*d) matrix view X it is a Linear with the roles turned around: Y = A @ X + bias[:, None].
#
#     dX = A.T @ dY                       (each x[m] fed every output n, with weight A[n, m])
#     dA = dY @ X.T                       (sum over all images AND channels: A is shared by all of them)
#     dbias = dY summed over its B*d columns

# %%
heading("5. Backward")
show_source(layers.token_mixing_backward)
dy = rng.normal(size=mixed.shape)
dx, dA, dbias = layers.token_mixing_backward(dy, cache)
check(np.allclose(dA, np.einsum("nbc,mbc->nm", dy, tokens), rtol=1e-12, atol=1e-12),
      "dA[n, m] = sum over images b and channels c of dy[n, b, c] * x[m, b, c]")
check(np.allclose(dx, np.einsum("nm,nbc->mbc", A, dy), rtol=1e-12, atol=1e-12),
      "dx[m, b, c] = sum over n of A[n, m] * dy[n, b, c]")
check(np.allclose(dbias, dy.sum(axis=(1, 2)), rtol=1e-12, atol=1e-12), "dbias[n] = sum of dy[n] over images and channels")
h = 1e-6
nudged = A.copy()
nudged[3, 7] += h
up = float((layers.token_mixing_forward(tokens, nudged, bias)[0] * dy).sum())
nudged[3, 7] -= 2 * h
down = float((layers.token_mixing_forward(tokens, nudged, bias)[0] * dy).sum())
check(abs((up - down) / (2 * h) - dA[3, 7]) < 1e-6 * max(1.0, abs(dA[3, 7])), "a nudged A[3, 7] agrees with dA[3, 7]")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Build an A that shifts the image DOWN by one patch and one that blurs (each patch the mean of
#    itself and its 4 neighbours). -> row n has 1 at n - side; the blur has 1/5 at up to 5 places.
# 2. Permute the patches of an image (a random permutation P, tokens[P]) before token mixing. Does
#    the model notice? -> yes, A[n, m] is tied to positions, which is why ResMLP needs no positional
#    embedding: position is in A. (A channel Linear alone could not tell.)
# 3. How many parameters does A have for ResMLP-S12 (N = 196), and how many multiply-adds per image
#    and block? -> `196*196` = 38,416 (+196 bias); `196*196*384` = 14.8 M, 6% of the channel MLP.
# 4. Show that a (B, N, d) implementation can avoid the copy with np.matmul broadcasting
#    A @ batch_first (A (N,N) against (B,N,d)). What does it become inside? -> B matmuls of (N,N)@(N,d):
#    smaller, less efficient calls than one (N,N)@(N,B*d).

# %%
print("\nLesson 5 done: one shared N x N matrix mixes the patches; in (N, B, d) it is one matmul.")
