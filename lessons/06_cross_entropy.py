# %% [markdown]
# # Lesson 6: the loss. Softmax cross-entropy, label smoothing, and large logits
#
# The model ends with C numbers per image, the logits z. Softmax turns them into probabilities,
#
#     p_c = exp(z_c) / sum_k exp(z_k),
#
# and cross-entropy measures how much probability the model gives to the right answer:
#
#     L = - sum_c q_c log p_c          q: the target distribution (one-hot for a plain label)
#
# averaged over the batch. Its gradient is the most beautiful formula of this course:
#
#     dL/dz = p - q                    (divided by B for the batch mean)
#
# "what the model said minus what it should have said". This lesson derives it, shows why a direct
# exp() overflows and how minimlp avoids it, and what label smoothing (ResMLP trains with 0.1) does.
#
# Run: python lessons/06_cross_entropy.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_source

import numpy as np

from minimlp import layers

rng = np.random.default_rng(0)
batch, classes = 4, 5


# %% [markdown]
# ## 1. A naive softmax overflows

# %%
heading("1. A naive softmax overflows")
logits = np.array([[1000.0, 0.0, -1000.0]])
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
print(f"logits {logits[0]} -> naive softmax {naive[0]}   (exp(1000) = inf, inf/inf = nan)")
# Fix: softmax does not change when the same number is subtracted from every logit (it cancels
# between numerator and denominator). Subtract the largest: then every exp() is at most exp(0) = 1.
# And for the loss we need log p, computed directly as z - max - log(sum exp(z - max)), never as
# log(exp(...)), which would turn a tiny probability into log(0) = -inf.
show_source(layers.log_softmax)
log_probs = layers.log_softmax(logits)
print(f"log_softmax -> {log_probs[0]}   (the -2000 is exact: no probability of exp(-2000) is ever formed)")
check(np.all(np.isfinite(log_probs)) and np.allclose(np.exp(log_probs).sum(), 1), "log_softmax is finite and normalized for logits of +-1000")
check(np.isclose(log_probs[0, 2], -2000.0), "log p of the smallest class is exactly z_2 - z_0 = -2000")


# %% [markdown]
# ## 2. The gradient p - q, derived
#
# For one image: L = -sum_c q_c log p_c, log p_c = z_c - log sum_k exp(z_k).
#
#     d log p_c / d z_j = [c == j] - p_j
#     dL/dz_j = -sum_c q_c ([c == j] - p_j) = -q_j + p_j * sum_c q_c = p_j - q_j    (q sums to 1)
#
# The batch loss is the MEAN over images, so each image's gradient is divided by B.

# %%
heading("2. The gradient p - q, derived")
show_source(layers.cross_entropy)
logits = 3 * rng.normal(size=(batch, classes))
labels = np.array([0, 3, 1, 3])
loss, dlogits = layers.cross_entropy(logits, labels)
probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # safe here: |logits| are small
one_hot = np.eye(classes)[labels]
print(f"loss {float(loss):.4f} = mean of -log p[label] = {-np.log(probs[np.arange(batch), labels]).mean():.4f}")
check(np.isclose(float(loss), -np.log(probs[np.arange(batch), labels]).mean()), "the loss is the mean of -log p[label]")
check(np.allclose(dlogits, (probs - one_hot) / batch), "dlogits = (p - onehot) / B")
# Finite differences on every logit (lesson 7 makes a tool of this):
h = 1e-6
numerical = np.zeros_like(logits)
for index in np.ndindex(logits.shape):
    up, down = logits.copy(), logits.copy()
    up[index] += h
    down[index] -= h
    numerical[index] = (float(layers.cross_entropy(up, labels)[0]) - float(layers.cross_entropy(down, labels)[0])) / (2 * h)
print(f"largest |dlogits - finite difference|: {np.abs(dlogits - numerical).max():.1e}")
check(np.allclose(dlogits, numerical, rtol=1e-6, atol=1e-9), "dlogits agrees with finite differences")
# Note: each row of dlogits sums to 0 (p and q both sum to 1): the loss only cares about
# differences between logits. Also, the gradient is at most 1/B in size however wrong the model
# is: cross-entropy with softmax never explodes.
check(np.allclose(dlogits.sum(axis=1), 0), "every row of dlogits sums to 0")


# %% [markdown]
# ## 3. Large logits: the loss stays finite and the gradient stays bounded

# %%
heading("3. Large logits: the loss stays finite and the gradient stays bounded")
huge = np.array([[500.0, -500.0, 0.0], [-800.0, 800.0, 0.0]])
loss_huge, dlogits_huge = layers.cross_entropy(huge, np.array([0, 0]))
print(f"logits {huge.tolist()}, labels [0, 0]: loss {float(loss_huge):.1f} (image 1 is 1600 nats wrong), "
      f"dlogits {np.round(dlogits_huge, 3).tolist()}")
check(np.isfinite(float(loss_huge)) and np.isclose(float(loss_huge), (0 + 1600) / 2), "loss of confident mistakes is large but exact")


# %% [markdown]
# ## 4. Label smoothing: q = (1 - s) * onehot + s / C

# %%
heading("4. Label smoothing: q = (1 - s) * onehot + s / C")
show_source(layers.smoothed_targets)
smoothing = 0.1
q = layers.smoothed_targets(labels, classes, smoothing, np.float64)
print(f"target for label 3 with s = {smoothing}, C = {classes}: {q[1]}")
# Without smoothing the loss only reaches 0 when p = onehot, i.e. logits infinitely far apart: the
# model is pushed to ever more confident logits. With smoothing the best p is q itself, which
# needs only a finite gap between logits: log(q_right / q_wrong).
best_gap = np.log((1 - smoothing + smoothing / classes) / (smoothing / classes))
best_logits = np.zeros((1, classes))
best_logits[0, 3] = best_gap
loss_best, dlogits_best = layers.cross_entropy(best_logits, np.array([3]), smoothing=smoothing)
entropy = -(q[1] * np.log(q[1])).sum()
print(f"best logit gap log(q_right/q_wrong) = {best_gap:.3f}: loss {float(loss_best):.4f} = entropy of q "
      f"{entropy:.4f} (> 0), gradient {np.abs(dlogits_best).max():.1e}")
check(np.abs(dlogits_best).max() < 1e-12, "with label smoothing, finite logits reach zero gradient: p = q")
more_confident = best_logits * 3
check(float(layers.cross_entropy(more_confident, np.array([3]), smoothing=smoothing)[0]) > float(loss_best),
      "being more confident than q is now penalized")

# Soft targets: Mixup/CutMix blend two images and their labels, giving targets that are
# probabilities, e.g. 0.7 of class 0 and 0.3 of class 2. cross_entropy takes them as (B, C):
soft = np.array([[0.7, 0, 0.3, 0, 0]] * batch)
loss_soft, dlogits_soft = layers.cross_entropy(logits, soft)
check(np.allclose(dlogits_soft, (probs - soft) / batch), "soft targets: the gradient is still (p - q) / B")


# %% [markdown]
# ## 5. Against PyTorch (this section needs torch)

# %%
heading("5. Against PyTorch (this section needs torch)")
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison with torch.nn.functional.cross_entropy")
if torch is not None:
    z = torch.tensor(logits, requires_grad=True)
    reference = torch.nn.functional.cross_entropy(z, torch.tensor(labels), label_smoothing=smoothing)
    reference.backward()
    ours, ours_dlogits = layers.cross_entropy(logits, labels, smoothing=smoothing)
    print(f"torch {reference.item():.10f}   minimlp {float(ours):.10f}")
    check(np.isclose(reference.item(), float(ours), rtol=1e-12) and np.allclose(z.grad.numpy(), ours_dlogits, rtol=1e-10),
          "minimlp's smoothed loss and gradient equal torch's cross_entropy(label_smoothing=0.1)")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Remove the `- logits.max(...)` line from a copy of log_softmax and run section 3. -> exp(800)
#    overflows to inf: the loss is nan, and a single such batch would ruin a training run.
# 2. In float32, from how large a logit does the naive exp overflow? -> above ~88.7 (exp(88.7) ~ 3.4e38).
# 3. Show that adding the same number to every logit of a row changes neither loss nor gradient.
#    -> softmax(z + c) = softmax(z); this is the freedom that section 1 uses.
# 4. With s = 0.1 and C = 1000 (ImageNet), what logit gap is optimal? -> log(0.9001 / 0.0001) ~ 9.1.

# %%
print("\nLesson 6 done: dL/dz = (p - q) / B, computed stably; smoothing keeps logits finite.")
