"""The layers of ResMLP and its loss, each a forward/backward pair that reads like the math: the reference.

    out, cache = layer_forward(inputs..., params...)
    d_inputs..., d_params... = layer_backward(d_out, cache)

`cache` holds exactly what backward needs. Backward functions return fresh gradient arrays;
the model decides where they go. Every function works on NumPy and CuPy arrays alike: the array
module is taken from the data (`get_xp`). This file is only the math: fast paths that do the same in
fewer passes (minimlp.fast.cuda_kernels, minimlp.fast.cpu_kernels) live beside it, and minimlp.ops chooses
between them once, when a model is built.

Layout. Inside the model, activations are `tokens` of shape (N, B, d): patch, image, channel.
That makes both kinds of mixing a single large 2-D matrix product on a free reshape, with no
transpose copies:
  - channel mixing (Linear over d) sees (N*B, d),
  - token mixing (Linear over the N patches, the same for every image and channel) sees (N, B*d).
"""
import math

from .backend import erf, get_xp
from .precision import matmul  # every matrix product: plain, or float16 operands under --amp


# ---------------------------------------------------------------------------------------------
# Affine: the only "normalization" ResMLP has (no statistics, just a learned scale and shift).
# ---------------------------------------------------------------------------------------------
def affine_forward(x, alpha, beta):
    # y = alpha * x + beta    (..., d) -> (..., d)
    return alpha * x + beta, (x, alpha)


def affine_backward(dy, cache, skip=None):
    # dx = alpha * dy (+ skip);  dalpha = sum(dy * x);  dbeta = sum(dy)    (sums over all but the last axis)
    # skip: the gradient that reaches x by the residual's skip path, when the Affine opens a residual branch
    x, alpha = cache
    axes = tuple(range(dy.ndim - 1))
    dy = dy.astype(x.dtype, copy=False)  # a product's half result (bfloat16) is summed in x's precision
    dx = alpha * dy
    if skip is not None:
        dx += skip
    return dx, (dy * x).sum(axis=axes), dy.sum(axis=axes)


# ---------------------------------------------------------------------------------------------
# Linear over the last axis (channel mixing, patch embedding, classifier head).
# ---------------------------------------------------------------------------------------------
def linear_forward(x, weight, bias, half_result=False):
    # y = x @ W^T + b    (M, d_in) -> (M, d_out);  W: (d_out, d_in)
    # half_result: y may come back rounded to bfloat16 (minimlp.precision.matmul): the model asks it where only
    # the next fused layer reads y (GELU, or the residual's add)
    y = matmul(x, weight.T, half_result)
    if bias is not None:  # None: the next layer adds b in its own pass (bias_gelu_forward, residual_forward)
        y += bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache, half_dx=False):
    # dx = dy @ W;  dW = dy^T @ x;  db = sum_rows(dy)  (None when the bias was left to the next layer,
    # which then returns its gradient: bias_gelu_backward, residual_backward)
    # half_dx: dx may come back rounded to bfloat16 (minimlp.precision.matmul): the model asks it where only the
    # next fused layer reads dx (GELU's backward, or the Affine's)
    x, weight, has_bias = cache
    return matmul(dy, weight, half_dx), matmul(dy.T, x), dy.sum(axis=0) if has_bias else None


# ---------------------------------------------------------------------------------------------
# Token mixing: the cross-patch "transpose-linear" that replaces attention. One N x N matrix A
# mixes the patches; it is shared by every image and every channel.
# ---------------------------------------------------------------------------------------------
def token_mixing_forward(tokens, weight, bias, half_result=False):
    # y[n, b, c] = sum_m A[n, m] * x[m, b, c] + bias[n]    (N, B, d) -> (N, B, d), as (N,N) @ (N, B*d)
    # half_result: y may come back rounded to bfloat16 (minimlp.precision.matmul), as linear_forward's
    patches, images, channels = tokens.shape
    mixed = matmul(weight, tokens.reshape(patches, images * channels), half_result)
    if bias is not None:  # None: residual_forward adds it
        mixed += bias[:, None]
    return mixed.reshape(tokens.shape), (tokens, weight, bias is not None)


def token_mixing_backward(dy, cache, half_dx=False):
    # dx = A^T @ dy;  dA = dy @ x^T;  dbias = sum over images and channels of dy    (all on (N, B*d))
    # (dbias None when residual_forward added the bias: residual_backward returns its gradient)
    # half_dx: dx may come back rounded to bfloat16 (minimlp.precision.matmul), as linear_backward's
    tokens, weight, has_bias = cache
    patches = tokens.shape[0]
    dy_2d = dy.reshape(patches, -1)
    dx = matmul(weight.T, dy_2d, half_dx).reshape(tokens.shape)
    return dx, matmul(dy_2d, tokens.reshape(patches, -1).T), dy_2d.sum(axis=1) if has_bias else None


# ---------------------------------------------------------------------------------------------
# GELU, the exact erf form of torch.nn.GELU() (not the tanh approximation).
# ---------------------------------------------------------------------------------------------
SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    # y = x * Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2  the standard normal CDF
    # cached: the slope dy/dx = Phi(x) + x * phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)  the normal density,
    # taken here while Phi is at hand: backward is one multiply, and one array is kept instead of x and Phi
    xp = get_xp(x)
    cdf = erf(x * SQRT_HALF)
    cdf += 1.0
    cdf *= 0.5
    slope = x * x  # then updated in place, step by step: one array instead of a temporary per operation
    slope *= -0.5
    xp.exp(slope, out=slope)
    slope *= x
    slope *= INV_SQRT_2PI
    slope += cdf
    return x * cdf, slope


def gelu_backward(dy, slope):
    # dx = dy * GELU'(x), the slope gelu_forward kept
    return dy * slope


def bias_gelu_forward(x, bias):
    # y = GELU(x + b): fc1's bias, left to GELU by linear_forward, added here (the fast paths add it in GELU's pass)
    return gelu_forward(x + bias)


def bias_gelu_backward(dy, slope):
    # dx = dy * GELU'(x + b);  db = sum over rows of dx    (bias_gelu_forward's two steps, backwards)
    dx = gelu_backward(dy, slope)
    return dx, dx.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Patch embedding: a convolution with kernel = stride = p is a matmul on non-overlapping patches.
# ---------------------------------------------------------------------------------------------
def images_to_patches(images, patch_size):
    # (B, C, H, W) -> (N, B, C*p*p) with N = (H/p)*(W/p), each patch flattened in (c, row, col) order
    batch, colors, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(batch, colors, rows, patch_size, cols, patch_size)
    return grid.transpose(2, 4, 0, 1, 3, 5).reshape(rows * cols, batch, colors * patch_size * patch_size)


def patches_to_images(patches, image_shape, patch_size):
    # (N, B, C*p*p) -> (B, C, H, W): the exact inverse of images_to_patches (used by backward)
    batch, colors, height, width = image_shape
    rows, cols = height // patch_size, width // patch_size
    grid = patches.reshape(rows, cols, batch, colors, patch_size, patch_size)
    return grid.transpose(2, 3, 0, 4, 1, 5).reshape(image_shape)


def patch_embed_forward(images, weight, bias):
    # (B, C, H, W) -> tokens (N, B, d);  weight (d, C, p, p) used as a (d, C*p*p) matrix
    dim, patch_size = weight.shape[0], weight.shape[-1]
    patches = images_to_patches(images, patch_size)
    tokens, linear_cache = linear_forward(patches.reshape(-1, patches.shape[-1]), weight.reshape(dim, -1), bias)
    return tokens.reshape(patches.shape[0], patches.shape[1], dim), (linear_cache, images.shape, weight.shape)


def patch_embed_backward(dtokens, cache, need_dimages=True):
    # the Linear's backward on flattened patches; dimages folds the patch gradients back into images
    linear_cache, image_shape, weight_shape = cache
    patches, weight, _ = linear_cache
    dtokens_2d = dtokens.reshape(-1, dtokens.shape[-1])
    dweight = matmul(dtokens_2d.T, patches).reshape(weight_shape)
    dbias = dtokens_2d.sum(axis=0)
    if not need_dimages:  # the input images need no gradient in training: skip a whole matmul
        return None, dweight, dbias
    dpatches = matmul(dtokens_2d, weight).reshape(dtokens.shape[0], dtokens.shape[1], -1)
    return patches_to_images(dpatches, image_shape, weight_shape[-1]), dweight, dbias


# ---------------------------------------------------------------------------------------------
# LayerScale and stochastic depth: both scale a residual branch before it is added.
# ---------------------------------------------------------------------------------------------
def layer_scale_forward(x, gamma):
    # y = gamma * x    (N, B, d), gamma (d,)
    return gamma * x, (x, gamma)


def layer_scale_backward(dy, cache):
    # dx = gamma * dy;  dgamma = sum over patches and images of dy * x
    x, gamma = cache
    return gamma * dy, (dy * x).sum(axis=(0, 1))


def drop_path_mask(rng, images, drop_rate, xp, dtype):
    """Per-image keep mask for stochastic depth: 1/keep with probability keep, else 0. Shape (B,).
    Drawn from a NumPy Generator on the host (B numbers) so CPU and GPU runs draw the same masks."""
    keep = 1.0 - drop_rate
    return xp.asarray((rng.random(images) < keep) / keep, dtype=dtype)


def drop_path_forward(x, mask):
    # y[n, b, c] = x[n, b, c] * mask[b]    mask in {0, 1/keep}: a dropped image skips the branch
    return x * mask[None, :, None], mask


def drop_path_backward(dy, mask):
    # dx = dy * mask
    return dy * mask[None, :, None]


# ---------------------------------------------------------------------------------------------
# The end of a residual branch: its Linear's bias, LayerScale, drop path, and the add to the skip path.
# One layer so that a fast path can do it in one pass (minimlp.fast.cuda_kernels); here it is those layers in a row.
# ---------------------------------------------------------------------------------------------
def residual_forward(x, branch, bias, gamma, mask=None):
    # y = x + mask * gamma * (branch + b)    (N, B, d); b broadcasts, (N, 1, 1) or (d,); mask (B,) or None
    # branch (a Linear's output without its bias) is overwritten with branch + b: LayerScale's input, cached
    # (in bfloat16 where the product gave branch so: minimlp.precision.matmul's half_result)
    branch += bias
    scaled, scale = layer_scale_forward(branch, gamma)
    if mask is not None:
        scaled, _ = drop_path_forward(scaled, mask)
    return x + scaled, (scale, mask, bias.shape)


def residual_backward(dy, cache):
    # d(branch) = mask * gamma * dy;  db = d(branch) summed over the axes b broadcasts along;
    # dgamma = sum over patches and images of mask * dy * branch.
    # The skip path's gradient is dy itself: the caller adds it (affine_backward's `skip`).
    scale, mask, bias_shape = cache
    dscaled = dy if mask is None else drop_path_backward(dy, mask)
    dbranch, dgamma = layer_scale_backward(dscaled, scale)
    return dbranch, sum_to_shape(dbranch, bias_shape), dgamma


def sum_to_shape(gradient, shape):
    """The gradient of a value of `shape` broadcast to gradient.shape: the sum over the broadcast axes."""
    leading = gradient.ndim - len(shape)
    axes = tuple(range(leading)) + tuple(leading + i for i, size in enumerate(shape) if size == 1)
    return gradient.sum(axis=axes).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Mean over patches (global average pooling).
# ---------------------------------------------------------------------------------------------
def mean_pool_forward(tokens):
    # y[b, c] = mean over n of x[n, b, c]    (N, B, d) -> (B, d)
    return tokens.mean(axis=0), tokens.shape


def mean_pool_backward(dy, tokens_shape):
    # dx[n, b, c] = dy[b, c] / N   (a broadcast view: no copy)
    xp = get_xp(dy)
    return xp.broadcast_to(dy / tokens_shape[0], tokens_shape)


# ---------------------------------------------------------------------------------------------
# The loss: softmax cross-entropy with label smoothing and soft targets, returning the loss and its gradient.
#     criterion = CrossEntropy(model.ops, smoothing=0.1)   # the loss training and evaluation compute
#     loss, dlogits = criterion(logits, labels)
# CrossEntropy runs the softmax cross-entropy of the operations it is given (minimlp.ops.select: the reference
# below, or the device's fused kernel); cross_entropy is the same loss through the reference alone.
# ---------------------------------------------------------------------------------------------
def smoothed_targets(targets, num_classes, smoothing, dtype):
    """Target distribution q (B, C). `targets` are class indices (B,) or probabilities (B, C)
    (soft targets, e.g. from Mixup/CutMix). Label smoothing mixes in the uniform distribution:
    q = (1 - s) * targets + s / C  (timm's LabelSmoothingCrossEntropy for index targets)."""
    xp = get_xp(targets)
    if targets.ndim == 1:
        one_hot = xp.zeros((targets.shape[0], num_classes), dtype=dtype)
        one_hot[xp.arange(targets.shape[0]), targets] = 1
        targets = one_hot
    return (1.0 - smoothing) * targets.astype(dtype, copy=False) + smoothing / num_classes


def log_softmax(logits):
    # log p = z - max(z) - log(sum exp(z - max(z)))   stable for any size of logits: exp never overflows
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits, targets, smoothing=0.0):
    """Mean over the batch of -sum_c q_c log softmax(z)_c.

    logits (B, C); targets: indices (B,) or probabilities (B, C); returns (loss, a 0-d array on the
    logits' device: float() it when needed, so a GPU step need not wait for it; dlogits (B, C)).
    dL/dz = (softmax(z) - q) / B
    """
    xp = get_xp(logits)
    target_probs = smoothed_targets(xp.asarray(targets), logits.shape[1], smoothing, logits.dtype)
    return softmax_cross_entropy(logits, target_probs)


def softmax_cross_entropy(logits, target_probs):
    """logits, target_probs (B, C) -> (loss: mean over the batch of -sum_c q_c log p_c, a 0-d array;
    dlogits (B, C)).    dL/dz = (softmax(z) - q) / B"""
    xp = get_xp(logits)
    batch = logits.shape[0]
    log_probs = log_softmax(logits)
    loss = -(target_probs * log_probs).sum() / batch
    dlogits = (xp.exp(log_probs) - target_probs) / batch
    return loss, dlogits


class CrossEntropy:
    """The smoothed cross-entropy through `ops` (minimlp.ops.select), the one loss code that training (label
    smoothing `smoothing`; 0 under Mixup/CutMix, whose soft targets hold it) and evaluation (0) run."""

    def __init__(self, ops, smoothing=0.0):
        self.ops, self.smoothing = ops, smoothing

    def __call__(self, logits, targets):
        """logits (B, C); targets: indices (B,) or probabilities (B, C) -> (loss 0-d, dlogits (B, C))."""
        xp = get_xp(logits)
        target_probs = smoothed_targets(xp.asarray(targets), logits.shape[1], self.smoothing, logits.dtype)
        return self.ops.softmax_cross_entropy(logits, target_probs)
