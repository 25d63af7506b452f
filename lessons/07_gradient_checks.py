# %% [markdown]
# # Lesson 7: how to know a hand-written backward is right
#
# Lessons 2 to 6 derived each backward pass by hand. A derivation can be wrong in ways that still
# "train a bit": a missing transpose, a forgotten sum, a factor of 2. Two independent witnesses
# catch such bugs:
#
# 1. finite differences: nudge each input by +-h and watch the output (no calculus needed);
# 2. PyTorch's autograd on the same function, in float64.
#
# minimlp's test suite uses both for every layer (tests/test_layers.py, helpers in minimlp/tools/gradcheck.py).
# This lesson opens those helpers, explains the choices in them (central differences, float64, a
# random upstream gradient, relative error), shows a real bug being caught, and checks a small chain
# of layers (Linear -> GELU -> Linear -> cross-entropy) end to end. Sections 4 and 5 need PyTorch
# (minimlp.tools.gradcheck.torch_gradients imports it).
#
# Run: python lessons/07_gradient_checks.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import numpy as np
import torch  # sections 4 and 5; a test-only dependency: pip install -r requirements-test.txt

from minimlp import layers
from minimlp.tools.gradcheck import numerical_gradients, relative_error, torch_gradients

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. Central differences, and why float64
#
# f'(x) ~ (f(x + h) - f(x - h)) / 2h has an error of order h^2 (the h^1 terms of the Taylor series
# cancel); the one-sided (f(x + h) - f(x)) / h has an error of order h. But h cannot be tiny: the
# subtraction f(x + h) - f(x - h) loses digits, an error of order eps / h, eps the machine precision
# (1.1e-16 in float64, 6e-8 in float32). Let us measure both effects on GELU at x = 0.7.

# %%
heading("1. Central differences, and why float64")
x0 = np.array([0.7])
exact = float(layers.gelu_backward(np.ones(1), layers.gelu_forward(x0)[1])[0])
steps = np.logspace(-12, -1, 45)
errors = {}
for dtype in (np.float64, np.float32):
    point = x0.astype(dtype)
    errors[dtype.__name__] = [abs(float((layers.gelu_forward(point + dtype(h))[0] - layers.gelu_forward(point - dtype(h))[0])[0])
                                  / (2 * float(dtype(h))) - exact) / abs(exact) for h in steps]
for name, values in errors.items():
    best = int(np.argmin(values))
    print(f"{name}: best step h = {steps[best]:.0e}, relative error {values[best]:.1e}")
import matplotlib.pyplot as plt  # noqa: E402

figure, axis = plt.subplots(figsize=(6.5, 4))
for name, values in errors.items():
    axis.loglog(steps, np.maximum(values, 1e-17), "o-", ms=3, label=name)
axis.set_xlabel("step h")
axis.set_ylabel("relative error of the central difference")
axis.set_title("GELU'(0.7): rounding error (left) vs truncation error (right)")
axis.legend()
show_figure(figure, "07_step_size.png")
check(min(errors["float64"]) < 1e-9 < min(errors["float32"]),
      "finite differences get below 1e-9 in float64, not in float32: check gradients in float64")


# %% [markdown]
# ## 2. The project's helper: every input, projected on a random upstream gradient

# %%
heading("2. The project's helper: every input, projected on a random upstream gradient")
show_source(numerical_gradients)
# A layer has many outputs; a gradient check needs one scalar. Take L = sum(f(x) * dout) with a
# RANDOM dout: then dL/dx is exactly what backward(dout) must return, and every output counts with
# a different weight, so a mix-up of two outputs cannot cancel out.
show_source(relative_error)
# Relative to the largest reference value: an absolute error of 1e-6 means nothing without a scale.

# Our own layer, token mixing, checked this way:
tokens, A, bias = rng.normal(size=(6, 3, 5)), rng.normal(size=(6, 6)), rng.normal(size=6)
out, cache = layers.token_mixing_forward(tokens, A, bias)
dout = rng.normal(size=out.shape)
analytic = layers.token_mixing_backward(dout, cache)
numerical = numerical_gradients(lambda *inputs: layers.token_mixing_forward(*inputs)[0], [tokens, A, bias], dout)
for name, ours, reference in zip(["dtokens", "dA", "dbias"], analytic, numerical):
    error = relative_error(ours, reference)
    print(f"token mixing {name:8s}: relative error {error:.1e}")
    check(error < 1e-7, f"token_mixing_backward's {name} matches finite differences")


# %% [markdown]
# ## 3. A bug, caught
#
# A classic: dW = x.T @ dy instead of dy.T @ x. With a SQUARE weight the shapes fit and nothing
# crashes; only a gradient check notices. (Hence: test with all dimensions different.)

# %%
heading("3. A bug, caught")


def buggy_linear_backward(dy, cache):
    x, weight, _ = cache
    return dy @ weight, x.T @ dy, dy.sum(axis=0)  # the transpose of the right dW


rows, square_weight, square_bias = rng.normal(size=(8, 4)), rng.normal(size=(4, 4)), rng.normal(size=4)
out, cache = layers.linear_forward(rows, square_weight, square_bias)
dout = rng.normal(size=out.shape)
numerical_dW = numerical_gradients(lambda w: layers.linear_forward(rows, w, square_bias)[0], [square_weight], dout)[0]
buggy_error = relative_error(buggy_linear_backward(dout, cache)[1], numerical_dW)
right_error = relative_error(layers.linear_backward(dout, cache)[1], numerical_dW)
print(f"dW relative error: buggy {buggy_error:.2f}, minimlp's {right_error:.1e}")
check(buggy_error > 0.1 and right_error < 1e-7, "the gradient check rejects the transposed dW and accepts the library's")


# %% [markdown]
# ## 4. The second witness: PyTorch autograd

# %%
heading("4. The second witness: PyTorch autograd")
show_source(torch_gradients)
# PyTorch computes the same derivative by a completely different route (its own autograd rules),
# so agreeing to ~1e-12 in float64 leaves no room for a wrong formula. It is also fast for large
# inputs, where finite differences (two forwards per number) are not.
F = torch.nn.functional
x = rng.normal(size=(10, 5))
out, cache = layers.gelu_forward(x)
dout = rng.normal(size=out.shape)
torch_out, (torch_dx,) = torch_gradients(F.gelu, [x], dout)
check(relative_error(out, torch_out) < 1e-12 and relative_error(layers.gelu_backward(dout, cache), torch_dx) < 1e-12,
      "GELU forward and backward equal torch's in float64")


# %% [markdown]
# ## 5. A chain of layers: Linear -> GELU -> Linear -> cross-entropy
#
# Backward of a chain = the layers' backwards in reverse order, each passing its dx to the next.
# This is the channel MLP of a ResMLP block plus a loss, the pattern lesson 8 builds on.

# %%
heading("5. A chain of layers: Linear -> GELU -> Linear -> cross-entropy")
x = rng.normal(size=(6, 4))
w1, b1, w2, b2 = rng.normal(size=(9, 4)), rng.normal(size=9), rng.normal(size=(3, 9)), rng.normal(size=3)
labels = np.array([0, 2, 1, 1, 0, 2])


def forward(x, w1, b1, w2, b2):
    hidden, fc1 = layers.linear_forward(x, w1, b1)
    active, act = layers.gelu_forward(hidden)
    logits, fc2 = layers.linear_forward(active, w2, b2)
    loss, dlogits = layers.cross_entropy(logits, labels, smoothing=0.1)
    return loss, (fc1, act, fc2, dlogits)


loss, (fc1, act, fc2, dlogits) = forward(x, w1, b1, w2, b2)
dactive, dw2, db2 = layers.linear_backward(dlogits, fc2)
dhidden = layers.gelu_backward(dactive, act)
dx, dw1, db1 = layers.linear_backward(dhidden, fc1)
ours = [dx, dw1, db1, dw2, db2]
# Finite differences on the scalar loss (dout = 1):
numerical = numerical_gradients(lambda *inputs: forward(*inputs)[0], [x, w1, b1, w2, b2], np.array(1.0))


def torch_chain(x, w1, b1, w2, b2):
    logits = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1)


torch_loss, torch_grads = torch_gradients(torch_chain, [x, w1, b1, w2, b2], np.array(1.0))
check(abs(float(loss) - float(torch_loss)) < 1e-12, "the chain's loss equals torch's")
for name, mine, by_differences, by_torch in zip(["dx", "dw1", "db1", "dw2", "db2"], ours, numerical, torch_grads):
    print(f"{name}: vs finite differences {relative_error(mine, by_differences):.1e}, vs torch {relative_error(mine, by_torch):.1e}")
    check(relative_error(mine, by_differences) < 1e-6 and relative_error(mine, by_torch) < 1e-12,
          f"the chain's {name} matches both witnesses")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Replace GELU by ReLU in section 5 (np.maximum(x, 0) forward, dy * (x > 0) backward) and
#    re-run the checks. -> they pass, unless a hidden value lands within h of 0, where the kink
#    makes the finite difference wrong. Try scaling x by 1e-6 to see it.
# 2. Use a one-sided difference (f(x + h) - f(x)) / h in section 1. Where is the best h now, and
#    how good is it? -> around 1e-8 with ~1e-8 error: error O(h) + O(eps/h), balanced at sqrt(eps).
# 3. Run section 2 with dout = np.ones(...). Then put a bug into dbias: return dy.sum() / 6 * ones.
#    Does the check still catch it? -> with ones, many bugs that swap or average outputs go unseen;
#    a random dout catches them.
# 4. Why is the tolerance vs torch (1e-12) so much tighter than vs finite differences (1e-6)?
#    -> torch computes the same formulas exactly up to rounding; finite differences have their own
#    O(h^2) + O(eps/h) error, as section 1 measured.

# %%
print("\nLesson 7 done: central differences in float64 and PyTorch autograd agree with every backward.")
