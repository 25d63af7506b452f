# %% [markdown]
# # Lesson 10: AdamW, decoupled weight decay, and the learning-rate schedule
#
# Backward gives a gradient g for every parameter. The simplest update is p <- p - lr * g (SGD).
# Adam instead keeps two running averages per number,
#
#     m <- b1 m + (1 - b1) g           (which way the gradient points, on average)
#     v <- b2 v + (1 - b2) g^2         (how large it is, on average)
#
# and steps by lr * m_hat / (sqrt(v_hat) + eps): roughly lr per step in the direction of the
# gradient, whatever its scale (m_hat, v_hat undo the bias of starting m, v at 0). AdamW adds weight
# decay the "decoupled" way, p <- p - lr * wd * p, separate from the gradient, and only to matrices,
# never to 1-D parameters (biases, Affine, LayerScale).
#
# What you will see: minimlp.optim.AdamW, re-derived from scratch per tensor and compared; why
# decoupled decay differs from adding wd * p to the gradient; the decay mask; (needs torch)
# agreement with torch.optim.AdamW; and minimlp.schedule's warmup + cosine (lessons/out/10_schedule.png).
# The paper trains ResMLP with LAMB (also in minimlp.optim); AdamW is DeiT's common alternative.
#
# Run: python lessons/10_adamw.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import math

import numpy as np

from minimlp import create_model
from minimlp.precision import policy
from minimlp.optim import AdamW, Lamb
from minimlp.schedule import lr_at
from minimlp.step import train_step

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. AdamW as the library writes it: whole buffers at once

# %%
heading("1. AdamW as the library writes it: whole buffers at once")
show_source(AdamW.step)
# p, g, m, v are the FLAT buffers of lesson 9: each line is one vectorized operation over every
# parameter of the model. `decay_mask` is 1 where the parameter is a matrix, 0 elsewhere.


# %% [markdown]
# ## 2. The same, from scratch, one tensor at a time

# %%
heading("2. The same, from scratch, one tensor at a time")
model = create_model("resmlp_tiny", dim=16, depth=2, num_classes=5, dtype="float64", seed=0)
images, labels = rng.normal(size=(4, 3, 32, 32)), np.array([0, 1, 2, 3])
lr, betas, eps, weight_decay = 1e-2, (0.9, 0.999), 1e-8, 0.05
optimizer = AdamW(model.parameters, model.ops, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
mine = {name: value.copy() for name, value in model.params.items()}  # our own copy of the weights
m = {name: np.zeros_like(value) for name, value in mine.items()}
v = {name: np.zeros_like(value) for name, value in mine.items()}
for t in range(1, 4):
    loss, _ = train_step(model, optimizer, images, labels, lr, policy("float32"))  # forward, loss, backward, step
    for name, p in mine.items():
        g = model.grads[name]  # the same gradient: our weights equal the model's (checked below)
        if p.ndim > 1:  # decoupled weight decay, matrices only
            p -= lr * weight_decay * p
        m[name] = betas[0] * m[name] + (1 - betas[0]) * g
        v[name] = betas[1] * v[name] + (1 - betas[1]) * g * g
        m_hat, v_hat = m[name] / (1 - betas[0] ** t), v[name] / (1 - betas[1] ** t)
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    difference = max(np.abs(mine[name] - model.params[name]).max() for name in mine)
    print(f"step {t}: loss {float(loss):.4f}, largest difference from-scratch vs minimlp {difference:.1e}")
    check(difference < 1e-12, f"after step {t}, minimlp's AdamW equals the per-tensor formulas")
decayed = [name for name, value in model.params.items() if value.ndim > 1]
print(f"weight decay applies to {len(decayed)} of {len(model.params)} tensors: {', '.join(decayed[:4])}, ...")


# %% [markdown]
# ## 3. Decoupled decay vs L2 regularization inside Adam
#
# "Adam + L2" adds wd * p to the GRADIENT. Adam then divides by sqrt(v): the decay gets normalized
# away. Extreme case: a weight with no gradient from the loss at all, p = 1, 200 steps.

# %%
heading("3. Decoupled decay vs L2 regularization inside Adam")
p_adamw, p_l2, m_l2, v_l2 = 1.0, 1.0, 0.0, 0.0
for t in range(1, 201):
    p_adamw -= lr * weight_decay * p_adamw  # AdamW: the loss gradient is 0, so only the decay acts
    g = weight_decay * p_l2  # Adam + L2: the decay IS the gradient
    m_l2 = betas[0] * m_l2 + (1 - betas[0]) * g
    v_l2 = betas[1] * v_l2 + (1 - betas[1]) * g * g
    p_l2 -= lr * (m_l2 / (1 - betas[0] ** t)) / (math.sqrt(v_l2 / (1 - betas[1] ** t)) + eps)
print(f"after 200 steps, lr {lr}, wd {weight_decay}: AdamW p = {p_adamw:.3f} (shrinks by lr*wd per step); "
      f"Adam+L2 p = {p_l2:.3f} (moves ~lr per step, whatever wd is)")
check(abs(p_adamw - (1 - lr * weight_decay) ** 200) < 1e-12, "AdamW's decay is the plain shrink (1 - lr*wd)^steps")
# Adam+L2 decays a weight by ~lr per step whether wd is 1e-4 or 1, and barely at all for weights
# whose loss gradient is large (v is then large): not what "weight decay" was meant to be.


# %% [markdown]
# ## 4. Against torch.optim.AdamW (this section needs torch)

# %%
heading("4. Against torch.optim.AdamW (this section needs torch)")
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison with torch.optim.AdamW")
if torch is not None:
    start = model.state_dict()
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in start.items()}
    reference = torch.optim.AdamW([{"params": [t for t in tensors.values() if t.ndim > 1], "weight_decay": weight_decay},
                                   {"params": [t for t in tensors.values() if t.ndim <= 1], "weight_decay": 0.0}],
                                  lr=lr, betas=betas, eps=eps)
    optimizer = AdamW(model.parameters, model.ops, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    fixed_grads = {name: rng.normal(size=value.shape) for name, value in start.items()}  # the same g every step
    for name, value in fixed_grads.items():
        model.grads[name][...] = value
        tensors[name].grad = torch.tensor(value)
    for _ in range(5):
        optimizer.step()
        reference.step()
    worst = max(np.abs(tensors[name].detach().numpy() - model.params[name]).max() for name in start)
    print(f"5 steps, two parameter groups: largest difference to torch {worst:.1e}")
    check(worst < 1e-12, "minimlp's AdamW equals torch.optim.AdamW with decay on matrices only")


# %% [markdown]
# ## 5. The schedule: linear warmup, then half a cosine

# %%
heading("5. The schedule: linear warmup, then half a cosine")
show_source(lr_at)
# Early in training, Adam's v is a poor estimate and the weights are random: big steps can wreck
# them. Warmup ramps lr up over the first steps; the cosine then lowers it smoothly to min_lr, so
# the last steps fine-tune instead of jumping around.
total, warmup, base = 300, 30, 5e-4
rates = [lr_at(step, base_lr=base, total_steps=total, warmup_steps=warmup) for step in range(total + 1)]
import matplotlib.pyplot as plt  # noqa: E402

figure, axis = plt.subplots(figsize=(6.5, 3.5))
axis.plot(rates)
axis.axvline(warmup, color="grey", ls="--", lw=0.8)
axis.set_xlabel("optimizer step")
axis.set_ylabel("learning rate")
axis.set_title(f"lr_at: warmup {warmup} steps to {base}, cosine to min_lr over {total}")
show_figure(figure, "10_schedule.png")
check(rates[0] == 1e-6 and rates[warmup] == base and abs(rates[-1] - 1e-5) < 1e-15,
      "the schedule starts at warmup_lr, reaches base_lr at warmup_steps, ends at min_lr")
check(all(a <= b for a, b in zip(rates[:warmup], rates[1:warmup + 1])) and all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:])),
      "it rises during warmup and only falls afterwards")

# LAMB, the paper's optimizer, in one line: the Adam update u of each tensor is rescaled by
# ||p|| / ||u||, so every layer moves by the same fraction of its own size (made for batch 2048+).
check(Lamb.__doc__ is not None and "trust" in Lamb.__doc__, "minimlp.optim.Lamb is there too; read its docstring")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Set weight_decay to 0.5 and redo section 3. -> AdamW's p shrinks 10x faster per step (to 0.37); Adam+L2's
#    barely changes: its step size does not depend on wd at all.
# 2. Remove the bias correction (use m and v instead of m_hat, v_hat) in section 2. How large is
#    the first step? -> m = 0.1 g and v = 0.001 g^2, so m/sqrt(v) ~ 3.2: three times lr at step 1.
# 3. Turn off the decay mask (decay every tensor) and train lesson 11 for longer: what happens to
#    the LayerScale gammas and Affine alphas? -> they are pulled towards 0, fighting the gains
#    the network needs; that is why 1-D parameters are excluded (docs/reference.md, Training recipe).
# 4. Replace AdamW by Lamb(model.parameters, lr=5e-3, weight_decay=0.2) in lesson 11. -> it trains too; LAMB's
#    advantage shows at the paper's batch size of 2048, not at 64.

# %%
print("\nLesson 10 done: AdamW = Adam + decoupled decay on matrices; lr = warmup then cosine.")
