# %% [markdown]
# # Lesson 9: the whole model, forward and backward, checked against timm
#
#     images (B, 3, H, W)
#     -> patch embedding (lesson 1)                   tokens (N, B, d)
#     -> depth x ResMLP block (lesson 8)              tokens (N, B, d)
#     -> Affine `norm` (lesson 2)                     tokens (N, B, d)
#     -> mean over the N patches                      features (B, d)
#     -> Linear `head` (lesson 3)                     logits (B, num_classes)
#     -> cross-entropy (lesson 6)
#
# No class token, no positional embedding (position lives in the cross-patch matrices, lesson 5).
#
# What you will see:
#
# 1. create_model and its parameters: official checkpoint names, shapes, and the two flat buffers
#    that hold all parameters and all gradients (minimlp.parameters);
# 2. ResMLP-S12's 15.35 M parameters, counted;
# 3. forward and backward of a small model, and that backward OVERWRITES the gradients;
# 4. mean pooling's backward, the one layer we had not derived yet;
# 5. (needs torch and timm) the same model in timm, float64: logits and every gradient agree.
#
# Run: python lessons/09_whole_model.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_source

import numpy as np

from minimlp import create_model, layers
from minimlp.model import ResMLP
from minimlp.parameters import Parameters


# %% [markdown]
# ## 1. A small model and its parameters
#
# resmlp_tiny is the project's CPU preset (32 px images, patch 4, d = 128, 6 blocks). We shrink it
# further (d = 16, 2 blocks, 5 classes) and use float64, as for any gradient check.

# %%
heading("1. A small model and its parameters")
model = create_model("resmlp_tiny", dim=16, depth=2, num_classes=5, dtype="float64", seed=0)
print(f"config: {model.config}")
print(f"{model.num_patches} patches, {model.num_params():,} parameters in {len(model.params)} tensors:")
for name, value in list(model.params.items())[:14]:
    print(f"  {name:28s} {str(value.shape):14s}")
print("  ... then blocks.1.*, norm.alpha, norm.beta, head.weight, head.bias")
# The names are the official checkpoint names (docs/reference.md, Checkpoint names), so official weights load directly.
# Every parameter is a VIEW into one flat buffer, and every gradient a view into another:
show_source(Parameters.__init__, max_lines=22)
check(all(np.shares_memory(value, model.parameters.data) for value in model.params.values()),
      "every model.params[name] is a view into the single buffer model.parameters.data")
check(all(np.shares_memory(value, model.parameters.grad) for value in model.grads.values()),
      "every model.grads[name] is a view into the single buffer model.parameters.grad")
# Why: the optimizer (lesson 10) then updates ALL parameters with a handful of whole-buffer
# operations, instead of a Python loop over ~80 (or, for S36, ~440) tensors.


# %% [markdown]
# ## 2. Counting ResMLP-S12

# %%
heading("2. Counting ResMLP-S12")
s12 = create_model("resmlp_s12")
by_kind = {}
for name, value in s12.params.items():
    kind = name.split(".", 2)[2].split(".")[0] if name.startswith("blocks.") else name.split(".")[0]
    by_kind[kind] = by_kind.get(kind, 0) + value.size
print({kind: f"{count / 1e6:.2f}M" for kind, count in by_kind.items()})
print(f"total {s12.num_params() / 1e6:.2f} M (docs/reference.md, Presets: 15.35 M). The channel MLPs hold "
      f"{by_kind['mlp'] / s12.num_params():.0%}; the cross-patch matrices only {by_kind['attn'] / s12.num_params():.1%}.")
check(round(s12.num_params() / 1e6, 2) == 15.35, "ResMLP-S12 has 15.35 M parameters, as published")
del s12


# %% [markdown]
# ## 3. Forward and backward

# %%
heading("3. Forward and backward")
show_source(ResMLP.forward, max_lines=26)
show_source(ResMLP.backward, max_lines=24)
rng = np.random.default_rng(1)
# Parameters at their init would hide bugs (alpha = 1, beta = 0, biases 0): randomize them all.
model.load_state_dict({name: rng.normal(scale=0.5 if value.ndim == 1 else 0.3, size=value.shape)
                       for name, value in model.state_dict().items()})
images = rng.normal(size=(3, 3, 32, 32))
labels = np.array([4, 0, 2])
logits = model.forward(images, train=True)
loss, dlogits = layers.cross_entropy(logits, labels)
model.backward(dlogits)
print(f"logits {logits.shape}, loss {float(loss):.4f}, gradient buffer norm {np.linalg.norm(model.parameters.grad):.4f}")
first_grads = model.parameters.grad.copy()
# A second forward + backward on the same batch: the gradients must be the same, not doubled.
model.backward(layers.cross_entropy(model.forward(images, train=True), labels)[1])
check(np.array_equal(model.parameters.grad, first_grads),
      "model.backward overwrites model.grads (a second call does not accumulate)")

# Spot-check a few parameters through the WHOLE model by finite differences (lesson 7):
h = 1e-6
for name, index in [("patch_embed.proj.weight", (3, 1, 2, 0)), ("blocks.0.attn.weight", (5, 9)),
                    ("blocks.1.gamma_2", (7,)), ("blocks.0.mlp.fc1.weight", (20, 3)), ("head.bias", (4,))]:
    original = model.params[name][index]
    model.params[name][index] = original + h
    up = float(layers.cross_entropy(model.forward(images), labels)[0])
    model.params[name][index] = original - h
    down = float(layers.cross_entropy(model.forward(images), labels)[0])
    model.params[name][index] = original
    numerical = (up - down) / (2 * h)
    # (forward alone never touches model.grads: they still hold the backward above)
    print(f"  {name}{list(index)}: backward {model.grads[name][index]:+.8f}   finite difference {numerical:+.8f}")
    check(abs(numerical - model.grads[name][index]) < 1e-6 * max(1.0, abs(numerical)),
          f"d loss / d {name}{list(index)} matches a finite difference through the whole model")


# %% [markdown]
# ## 4. The last piece: mean pooling

# %%
heading("4. The last piece: mean pooling")
show_source(layers.mean_pool_backward)
# y[b, c] = (1/N) sum_n x[n, b, c]: every token gets 1/N of the gradient of its image's feature.
# broadcast_to returns a read-only VIEW: no (N, B, d) array is written, the Affine below reads it.
pooled_grad = layers.mean_pool_backward(np.ones((3, 16)), (64, 3, 16))
check(pooled_grad.strides[0] == 0 and np.allclose(pooled_grad, 1 / 64), "mean_pool_backward is a stride-0 view of dy / N")


# %% [markdown]
# ## 5. Against timm (this section needs torch and timm)

# %%
heading("5. Against timm (this section needs torch and timm)")
try:
    from minimlp.tools.pytorch_references import timm_twin, torch
    from minimlp.weights import timm_to_official
except ImportError as error:
    torch = None
    print(f"skipping the timm comparison: {error}")
if torch is not None:
    show_source(timm_twin)
    twin = timm_twin(model)  # timm's MlpMixer with ResBlock + Affine, holding our weights (timm's names)
    torch_images = torch.tensor(images)
    torch_logits = twin(torch_images)
    torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.tensor(labels))
    torch_loss.backward()
    timm_grads = timm_to_official({name: p.grad.numpy() for name, p in twin.named_parameters()})
    logits_error = np.abs(torch_logits.detach().numpy() - logits).max()
    grad_errors = {name: np.abs(timm_grads[name] - model.grads[name]).max() / np.abs(timm_grads[name]).max()
                   for name in model.grads}
    worst = max(grad_errors, key=grad_errors.get)
    print(f"logits: largest difference {logits_error:.1e};  gradients: worst relative difference "
          f"{grad_errors[worst]:.1e} ({worst}), over all {len(grad_errors)} tensors")
    check(logits_error < 1e-10 and grad_errors[worst] < 1e-10,
          "minimlp's hand-written forward and backward equal timm's autograd for every parameter")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Add up the parameters of ResMLP-S24 and B24 the same way and compare to docs/reference.md, Presets
#    (30.0 M, 129.1 M). -> create_model("resmlp_s24").num_params(); B24 needs ~0.5 GB of float32.
# 2. Rebind a parameter instead of writing into it: model.params["head.bias"] = np.zeros(5), then
#    train a few steps (lesson 11). What happens to head.bias? -> forward now reads the new array,
#    but the optimizer updates the flat buffer model.parameters.data, which no longer backs it:
#    head.bias silently stops learning. Always write in place: model.params[name][...] = value.
# 3. Call model.backward twice after ONE forward. -> RuntimeError: backward frees the activations
#    (model.free_activations()), so a second backward cannot silently reuse stale ones.
# 4. Compute the input gradient (model.backward(dlogits, need_dimages=True)) for an image and show
#    it as a picture: which pixels would change the logit of the label most? -> a "saliency map".

# %%
print("\nLesson 9 done: the whole model's backward equals autograd; gradients overwrite, in one flat buffer.")
