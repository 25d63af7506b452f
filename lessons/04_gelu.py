# %% [markdown]
# # Lesson 4: GELU, the non-linearity between fc1 and fc2
#
# Two Linear layers in a row are still one Linear layer (W2 @ W1 is a matrix). Something non-linear
# must sit between them. ResMLP uses GELU, the Gaussian Error Linear Unit:
#
#     GELU(x) = x * Phi(x),        Phi(x) = P(Z <= x) = (1 + erf(x / sqrt(2))) / 2,   Z ~ Normal(0, 1)
#
# Read it as "x, kept with the probability that a standard normal is below x": close to x for large
# x, close to 0 for very negative x, and smooth in between (unlike ReLU's kink at 0).
#
# There are two GELUs in the wild: this exact one (torch.nn.GELU(), which ResMLP uses), and a tanh
# approximation from the days when erf was slow on GPUs. They differ by up to ~5e-4, enough to fail
# a comparison against the official model. minimlp implements the exact form.
#
# What you will see: the library's forward and backward, the derivative derived by hand, the two
# forms compared, a picture (lessons/out/04_gelu.png), and a finite-difference check over a grid.
#
# Run: python lessons/04_gelu.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import math

import numpy as np

from minimlp import layers
from minimlp.backend import erf


# %% [markdown]
# ## 1. Forward: x * Phi(x), with Phi from erf

# %%
heading("1. Forward: x * Phi(x), with Phi from erf")
show_source(layers.gelu_forward)
# What forward keeps for backward is not x but the derivative itself, the slope Phi(x) + x phi(x) of
# section 3, taken while Phi is at hand: erf is the costliest elementwise function of the whole model, so
# it is not computed twice, backward becomes one multiply, and one array is kept instead of two (x, Phi).
# NumPy has no erf; minimlp.backend.erf takes SciPy's on the CPU and CuPy's on the GPU.
x = np.linspace(-5, 5, 2001)
gelu, slope = layers.gelu_forward(x)
cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))  # Phi(x), from Python's math.erf
check(np.allclose(gelu, x * cdf, rtol=0, atol=1e-15), "GELU(x) = x Phi(x), Phi the normal CDF (checked against math.erf)")
lowest = np.argmin(gelu)
print(f"GELU is not monotone: its minimum is {gelu[lowest]:.4f} at x = {x[lowest]:.3f} (ReLU's is 0)")


# %% [markdown]
# ## 2. The tanh approximation is a different function
#
# GELU_tanh(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))   (torch: GELU(approximate="tanh"))

# %%
heading("2. The tanh approximation is a different function")
gelu_tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
gap = np.abs(gelu - gelu_tanh)
print(f"largest |exact - tanh| on [-5, 5]: {gap.max():.2e} at x = {x[np.argmax(gap)]:.2f}")
# After 12 blocks of fc2(GELU(fc1(.))) such differences add up: loading the official weights and
# using the tanh form changes the logits visibly (float32 resolves ~1e-7 relative).
check(gap.max() > 1e-4, "the exact and the tanh GELU differ by more than 1e-4 somewhere")
check(np.abs(gelu - 0.5 * x * (1 + erf(x / math.sqrt(2)))).max() < 1e-15, "minimlp uses the exact erf form")


# %% [markdown]
# ## 3. The derivative
#
# Product rule on x * Phi(x), with Phi' = phi, the normal density phi(x) = exp(-x^2/2) / sqrt(2 pi):
#
#     d GELU / dx = Phi(x) + x * phi(x)
#
# GELU is elementwise, so its backward is elementwise too: dx = dy * GELU'(x) (no sums).

# %%
heading("3. The derivative")
show_source(layers.gelu_backward)
slope_by_hand = cdf + x * np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
check(np.allclose(slope, slope_by_hand, rtol=0, atol=1e-15), "the slope gelu_forward keeps is Phi(x) + x phi(x)")
check(np.array_equal(layers.gelu_backward(np.ones_like(x), slope), slope), "backward with dy = 1 gives the slope itself")
print(f"slope at 0: {slope[1000]:.3f} (half a ReLU),  at -5: {slope[0]:.2e},  at 5: {slope[-1]:.6f};"
      f"  largest slope {slope.max():.4f} > 1 at x = {x[np.argmax(slope)]:.2f}")

# Finite differences on the whole grid (elementwise, so one perturbation per point suffices):
h = 1e-6
numerical = (layers.gelu_forward(x + h)[0] - layers.gelu_forward(x - h)[0]) / (2 * h)
print(f"largest |backward - finite difference| on [-5, 5]: {np.abs(slope - numerical).max():.1e}")


# %% [markdown]
# ## 4. A picture

# %%
heading("4. A picture")
import matplotlib.pyplot as plt  # noqa: E402

figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(x, gelu, label="GELU (exact, erf)", lw=2)
left.plot(x, np.maximum(x, 0), "--", label="ReLU", lw=1)
left.set_xlim(-4, 3)
left.set_ylim(-0.5, 3)
left.axhline(0, color="grey", lw=0.5)
left.set_title("GELU(x) = x * Phi(x)")
left.legend()
right.plot(x, slope, label="d GELU / dx = Phi + x phi", lw=2)
right.plot(x, 1e3 * (gelu - gelu_tanh), label="1000 x (exact - tanh form)", lw=1)
right.set_xlim(-4, 4)
right.axhline(0, color="grey", lw=0.5)
right.set_title("its derivative, and the tanh approximation's error (x1000)")
right.legend()
figure.tight_layout()
show_figure(figure, "04_gelu.png")


# %% [markdown]
# ## 5. Check: backward agrees with finite differences

# %%
heading("5. Check: backward agrees with finite differences")
dy = np.random.default_rng(0).normal(size=x.shape)
check(np.allclose(layers.gelu_backward(dy, slope), dy * numerical, rtol=1e-6, atol=1e-8),
      "gelu_backward(dy) = dy * GELU'(x) matches finite differences at 2001 points in [-5, 5]")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Replace GELU by ReLU: write relu_forward (x * (x > 0)) and relu_backward and re-run the finite
#    difference check at x = 0. -> it fails exactly at the kink: ReLU has no derivative at 0, and a
#    central difference gives 0.5 there.
# 2. Why keep the slope rather than x, and compute the slope in backward? Time scipy.special.erf against
#    np.exp on 10 million floats. -> erf costs several times exp, the most expensive elementwise op here:
#    backward would compute it a second time (or keep Phi beside x: two arrays instead of one).
# 3. Compute tanh form's derivative by hand and plot it beside the exact one. -> the curves are
#    hard to tell apart; the difference stays below 1e-3 everywhere.
# 4. For which x is GELU(x) within 1% of x, and within 1% of 0? -> above about 2.3; below about -3.

# %%
print("\nLesson 4 done: GELU = x Phi(x), derivative Phi + x phi; exact erf form, not tanh.")
