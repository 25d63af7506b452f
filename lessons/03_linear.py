# %% [markdown]
# # Lesson 3: Linear, the layer that does almost all the work
#
#     y = x @ W.T + b        x: (M, d_in) rows,  W: (d_out, d_in),  b: (d_out,),  y: (M, d_out)
#
# Every row of x (one token of one image) is mapped by the same matrix. ResMLP uses Linear for the
# patch embedding (lesson 1), for the channel MLP inside each block (fc1: d -> 4d, fc2: 4d -> d)
# and for the classifier head. Nearly all of a training step's arithmetic is in these matmuls.
#
# What you will see:
#
# 1. how the model feeds its (N, B, d) tokens to a Linear: a free reshape to (N*B, d);
# 2. the backward pass derived with indices, then with the "make the shapes fit" shortcut;
# 3. a check against the library and a nudged weight;
# 4. why a training step costs about three forward passes;
# 5. that backward returns fresh arrays: calling it twice does not add up (gradient semantics).
#
# Run: python lessons/03_linear.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_source

import numpy as np

from minimlp import layers

rng = np.random.default_rng(0)
patches, images, dim, hidden = 6, 3, 5, 7


# %% [markdown]
# ## 1. Forward, and the free reshape from tokens to rows

# %%
heading("1. Forward, and the free reshape from tokens to rows")
show_source(layers.linear_forward)
tokens = rng.normal(size=(patches, images, dim))  # (N, B, d)
rows = tokens.reshape(patches * images, dim)  # (N*B, d): every token of every image is one row
check(np.shares_memory(rows, tokens), "reshaping (N, B, d) to (N*B, d) copies nothing (it is a view)")
weight, bias = rng.normal(size=(hidden, dim)), rng.normal(size=hidden)  # fc1-like: d -> h
out, cache = layers.linear_forward(rows, weight, bias)
print(f"x {rows.shape} @ W.T {weight.T.shape} + b {bias.shape} -> y {out.shape}")
# A Linear over channels treats every token the same: it mixes the d numbers WITHIN a token, never
# across tokens. Mixing across tokens is lesson 5's job.
check(np.allclose(out[4], weight @ rows[4] + bias), "row 4 of y is W @ x_4 + b")


# %% [markdown]
# ## 2. Backward, with indices
#
#     y[m, o] = sum_i x[m, i] * W[o, i] + b[o]
#
# x[m, i] appears in y[m, o] for every o, with slope W[o, i]:
#
#     dx[m, i] = sum_o dy[m, o] * W[o, i]            ->  dx = dy @ W            (M, d_out) @ (d_out, d_in)
#
# W[o, i] appears in y[m, o] for every row m, with slope x[m, i]:
#
#     dW[o, i] = sum_m dy[m, o] * x[m, i]            ->  dW = dy.T @ x          (d_out, M) @ (M, d_in)
#
# b[o] appears in every row with slope 1 (broadcast over rows, so: sum over rows):
#
#     db[o] = sum_m dy[m, o]
#
# Shortcut: each gradient has the shape of its variable, and there is only one way to multiply dy
# with x or W to get that shape. dW is a sum over rows of outer products dy_m x_m^T: every token of
# every image contributes to the weight gradient.

# %%
heading("2. Backward, with indices")
dy = rng.normal(size=out.shape)
dW_outer = sum(np.outer(dy[m], rows[m]) for m in range(rows.shape[0]))
dx_index = np.einsum("mo,oi->mi", dy, weight)  # the index formula, written literally
show_source(layers.linear_backward)
dx, dW, db = layers.linear_backward(dy, cache)
check(np.allclose(dx, dx_index, rtol=1e-12, atol=1e-12), "dx = dy @ W (the index formula)")
check(np.allclose(dW, dW_outer, rtol=1e-12, atol=1e-12), "dW = dy.T @ x = sum of outer products over rows")
check(np.allclose(db, dy.sum(axis=0), rtol=1e-12, atol=1e-12), "db = dy summed over rows")


# %% [markdown]
# ## 3. A nudged weight

# %%
heading("3. A nudged weight")
h = 1e-6
nudged = weight.copy()
nudged[2, 4] += h
loss_up = float((layers.linear_forward(rows, nudged, bias)[0] * dy).sum())
nudged[2, 4] -= 2 * h
loss_down = float((layers.linear_forward(rows, nudged, bias)[0] * dy).sum())
slope = (loss_up - loss_down) / (2 * h)
print(f"finite difference {slope:.8f}   dW[2, 4] = {dW[2, 4]:.8f}")
check(abs(slope - dW[2, 4]) < 1e-6 * max(1.0, abs(dW[2, 4])), "nudging W[2, 4] moves L = sum(y * dy) by dW[2, 4] * h")


# %% [markdown]
# ## 4. Counting the work: a training step is about 3 forward passes
#
# The forward is one matmul of (M, d_in) by (d_in, d_out): `M*d_in*d_out` multiply-adds.
# The backward has two matmuls of the same size: dx = dy @ W and dW = dy.T @ x. So forward +
# backward is 3x the forward, for every Linear, which is where "a training step costs about 3
# forwards" (docs/reference.md, Cost of a step) comes from. (The input images need no dx:
# patch_embed_backward skips that matmul with need_dimages=False.)

# %%
heading("4. Counting the work: a training step is about 3 forward passes")
n_tokens, d = 196, 384
fc_forward = n_tokens * d * (4 * d) * 2  # fc1 and fc2 of one block, per image
print(f"ResMLP-S12, one block's channel MLP, one image: {fc_forward / 1e6:.0f} M multiply-adds forward, "
      f"{3 * fc_forward / 1e6:.0f} M for a training step")
print(f"12 blocks: {12 * fc_forward / 1e9:.2f} G of the model's 3.0 G (docs/reference.md, Cost of a step): "
      "the MLPs dominate")
check(12 * fc_forward / 3.0e9 > 0.8, "the channel MLPs are most of ResMLP-S12's arithmetic")


# %% [markdown]
# ## 5. Gradient semantics: fresh arrays, never accumulated
#
# A classic bug of from-scratch trainers is adding this step's gradient onto the last step's.
# In minimlp a layer's backward returns NEW arrays, and the model's backward OVERWRITES its
# gradient buffer (model.grads[...] = ...): there is no zero_grad() to forget.

# %%
heading("5. Gradient semantics: fresh arrays, never accumulated")
dx_again, dW_again, db_again = layers.linear_backward(dy, cache)
check(np.array_equal(dW_again, dW) and dW_again is not dW, "a second backward gives the same, new, dW")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Write linear_forward for a 3-D input (N, B, d) directly with np.einsum("nbi,oi->nbo", ...).
#    Why does minimlp prefer the reshape? -> one large 2-D matmul (BLAS/cuBLAS) is the fastest thing
#    there is; the reshape of a contiguous array is free.
# 2. Time rows @ weight.T against the einsum for rows of shape (6272, 384) and weight (1536, 384).
#    -> np.matmul calls BLAS; einsum may not (try optimize=True).
# 3. Break linear_backward: return dy.T @ x.T or x.T @ dy instead of dy.T @ x. What happens?
#    -> a shape error, or (for square shapes!) a silently wrong transpose: another reason to test
#    with all dimensions different (5, 7, 18 here).
# 4. The model's head is linear_forward on pooled features (B, d). Which gradient does train.py never
#    need for the first layer of the network? -> dx of the patch embedding (the images are data).

# %%
print("\nLesson 3 done: dx = dy @ W, dW = dy.T @ x, db = sum of dy; three matmuls per step.")
