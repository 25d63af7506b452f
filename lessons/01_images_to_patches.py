# %% [markdown]
# # Lesson 1: from an image to a sequence of patch vectors
#
# ResMLP never looks at pixels one by one. It cuts the image into non-overlapping p x p squares
# ("patches"), flattens each square into a vector of `3*p*p` numbers (three colours), and sends every
# patch through the same Linear layer to get a d-dimensional "token". After that, the whole network
# only ever sees N tokens of size d, N = (H/p) * (W/p).
#
# The paper calls this step a convolution with kernel size = stride = p. In this lesson we see that
# such a convolution is nothing but one matrix product on the flattened patches, which is how
# minimlp computes it (minimlp.layers.patch_embed_forward).
#
# What you will see:
#
# 1. the library's `images_to_patches`, and the `(N, B, 3*p*p)` layout it produces;
# 2. a picture of an image cut into its patches (lessons/out/01_patches.png);
# 3. a convolution written as four nested loops, equal to one matmul on the patches;
# 4. (needs PyTorch) the same numbers from torch.nn.functional.conv2d.
#
# Run: python lessons/01_images_to_patches.py   (from the repository root)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import numpy as np

from minimlp import layers


# %% [markdown]
# ## 1. An image is an array (B, C, H, W)
#
# We draw two small 32x32 RGB images ourselves: a colour gradient with a disc and some stripes.
# A batch of B images, C = 3 colour channels, H x W pixels: (B, C, H, W), PyTorch's layout.

# %%
heading("1. An image is an array (B, C, H, W)")
size = 32
rows, cols = np.mgrid[0:size, 0:size] / (size - 1)  # pixel coordinates in [0, 1]
image_a = np.stack([rows, cols, 0.5 * np.ones_like(rows)])  # red grows downwards, green rightwards
disc = (rows - 0.35) ** 2 + (cols - 0.6) ** 2 < 0.05
image_a[:, disc] = np.array([1.0, 1.0, 0.0])[:, None]  # a yellow disc
image_b = np.stack([0.2 + 0.6 * (np.floor(cols * 8) % 2), 0.3 * np.ones_like(rows), 1 - rows])  # stripes
images = np.stack([image_a, image_b])
print("images:", images.shape, images.dtype, "(B, C, H, W)")


# %% [markdown]
# ## 2. Cutting into patches: images_to_patches

# %%
heading("2. Cutting into patches: images_to_patches")
show_source(layers.images_to_patches)
# Read it: a reshape splits H into (rows of patches, p) and W into (columns of patches, p); a
# transpose brings the patch position to the front; a last reshape flattens (C, p, p) into one
# vector. Nothing is computed, only moved.
patch_size = 4
patches = layers.images_to_patches(images, patch_size)
num_patches = (size // patch_size) ** 2
print(f"patch size p = {patch_size}: patches {patches.shape} = (N, B, C*p*p) with N = ({size}/{patch_size})^2"
      f" = {num_patches}, C*p*p = 3*{patch_size}*{patch_size} = {3 * patch_size ** 2}")
# Notice the layout: patches come FIRST, then images, then features. minimlp keeps this (N, B, d)
# order inside the whole model; lesson 5 shows why it pays off.
# Patches are numbered row by row: patch 1 is the second square of the top row.
check(np.array_equal(patches[1, 0], images[0, :, 0:4, 4:8].reshape(-1)),
      "patch 1 of image 0 is pixels rows 0..3, columns 4..7, flattened channel by channel")
# And the inverse exists, which the backward pass needs to send gradients back to pixels:
check(np.array_equal(layers.patches_to_images(patches, images.shape, patch_size), images),
      "patches_to_images undoes images_to_patches exactly")
print(f"ResMLP-S12 on 224 px images with p = 16 has N = (224/16)^2 = {(224 // 16) ** 2} patches of 3*16*16 = 768 numbers")

# A picture: the image with the patch grid, and the same patches laid out as a sequence.
import matplotlib.pyplot as plt  # noqa: E402  (after _lesson chose the Agg backend)

figure, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[1, 2.2]))
axes[0].imshow(images[0].transpose(1, 2, 0))
for line in range(0, size + 1, patch_size):
    axes[0].axhline(line - 0.5, color="white", lw=0.8)
    axes[0].axvline(line - 0.5, color="white", lw=0.8)
axes[0].set_title(f"image 0 cut into {num_patches} patches of {patch_size}x{patch_size}")
axes[0].axis("off")
# each patch vector back to a (3, p, p) square, all 64 in a row of 4 lines, with gaps between them
strip = np.ones((4 * (patch_size + 1), 16 * (patch_size + 1), 3))
for index in range(num_patches):
    square = patches[index, 0].reshape(3, patch_size, patch_size).transpose(1, 2, 0)
    line, place = divmod(index, 16)
    strip[line * (patch_size + 1):line * (patch_size + 1) + patch_size,
          place * (patch_size + 1):place * (patch_size + 1) + patch_size] = square
axes[1].imshow(strip)
axes[1].set_title("the same patches as a sequence: tokens 0..63, row by row (what the model sees)")
axes[1].axis("off")
figure.tight_layout()
show_figure(figure, "01_patches.png")


# %% [markdown]
# ## 3. A convolution with stride = kernel is a matmul
#
# A convolution slides a kernel W of shape (d, C, p, p) over the image. Output channel k at
# position (i, j) is `sum over c, u, v of W[k, c, u, v] * image[c, i*s + u, j*s + v] + bias[k]`.
# With stride s = p the windows do not overlap: each window IS one patch. Written with loops:

# %%
heading("3. A convolution with stride = kernel is a matmul")
dim = 5
rng = np.random.default_rng(0)
weight = rng.normal(size=(dim, 3, patch_size, patch_size))
bias = rng.normal(size=dim)


def convolution_with_loops(images, weight, bias, stride):
    batch, _, height, width = images.shape
    out_channels, _, kernel, _ = weight.shape
    out = np.zeros((batch, out_channels, (height - kernel) // stride + 1, (width - kernel) // stride + 1))
    for b in range(batch):
        for k in range(out_channels):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    window = images[b, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
                    out[b, k, i, j] = (weight[k] * window).sum() + bias[k]
    return out


looped = convolution_with_loops(images, weight, bias, stride=patch_size)  # (B, d, H/p, W/p)
# The sum over (c, u, v) is a dot product between the flattened kernel (a row of a `(d, C*p*p)`
# matrix) and the flattened patch. All of them at once: one matrix product.
as_matmul = patches @ weight.reshape(dim, -1).T + bias  # (N, B, C*p*p) @ (C*p*p, d) -> (N, B, d)
show_source(layers.patch_embed_forward)
tokens, _ = layers.patch_embed_forward(images, weight, bias)
# The conv output (B, d, rows, cols) in token layout: flatten the grid, put patches first.
looped_as_tokens = looped.reshape(2, dim, num_patches).transpose(2, 0, 1)
print("tokens:", tokens.shape, "(N, B, d)")
print("largest difference loops vs one matmul:", np.abs(as_matmul - looped_as_tokens).max())
check(np.allclose(as_matmul, looped_as_tokens, rtol=0, atol=1e-12), "the loop convolution equals one matmul on patches")
check(np.allclose(tokens, looped_as_tokens, rtol=0, atol=1e-12), "minimlp.layers.patch_embed_forward equals the loops")


# %% [markdown]
# ## 4. The same with PyTorch's conv2d (this section needs torch)
#
# PyTorch is used here only as an independent witness; minimlp itself never imports it.

# %%
heading("4. The same with PyTorch's conv2d (this section needs torch)")
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison with torch.nn.functional.conv2d")
if torch is not None:
    torch_out = torch.nn.functional.conv2d(torch.from_numpy(images), torch.from_numpy(weight),
                                           torch.from_numpy(bias), stride=patch_size).numpy()
    print("torch conv2d output:", torch_out.shape, "(B, d, H/p, W/p)")
    check(np.allclose(torch_out.reshape(2, dim, -1).transpose(2, 0, 1), tokens, rtol=0, atol=1e-12),
          "torch's conv2d(stride = kernel) equals minimlp's patch embedding")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Change patch_size to 8. How many tokens are there now, and how long is each patch vector?
#    -> N = (32/8)^2 = 16 and `3*8*8` = 192; the checks above should still pass unchanged.
# 2. Make the convolution overlap: stride 2 with a 4x4 kernel in convolution_with_loops. Why can
#    images_to_patches no longer express it? -> a pixel now belongs to several windows; you would
#    need to copy it (an "im2col" matrix), so the matmul input grows by (kernel/stride)^2.
# 3. Count the multiply-adds of the patch embedding for ResMLP-S12 (224 px, p = 16, d = 384).
#    -> `N * (3*p*p) * d` = 196 * 768 * 384 = 57.8 M per image, about 2% of the model's 3.0 G
#    (docs/reference.md, Cost of a step).
# 4. Swap the transpose order in images_to_patches (e.g. flatten (p, p, C) instead of (C, p, p))
#    in a copy of the function: which check fails, and why does the torch comparison catch it?
#    -> the flattened patch must follow the kernel's (C, p, p) order for the dot products to match.

# %%
print("\nLesson 1 done: a stride = kernel convolution is one matmul on flattened patches.")
