# %% [markdown]
# # Lesson 17: the moving average of the weights (EMA), and why evaluating it helps
#
# With a learning rate that is not (yet) tiny, stochastic gradient steps do not settle at a minimum:
# every batch pushes the weights a little in its own direction, and they keep bouncing around the
# bottom of the valley. An average of the recent weights sits closer to the bottom than any one of them.
# DeiT (and ResMLP's recipe, `train.py --model-ema`) keeps such an average beside the model, updated
# after every step and evaluated in the model's place:
#
#     ema <- decay * ema + (1 - decay) * weights          (minimlp.training.ema.ModelEma, one flat buffer)
#
# 1. what the average weighs: geometric weights, the window 1/(1 - decay), the lag, the noise it removes
# 2. the picture on a valley of two weights: noisy steps and their average
# 3. a small demo: resmlp_tiny shrunk to dim 64, depth 2, trained briefly with noisy steps on shapes10
#    drawn in memory (train.py's demo data, smaller), val loss of raw vs EMA weights
#
# Pictures: lessons/out/17_valley.png, 17_ema_training.png.
#
# Run: python lessons/17_weight_ema.py        (about 15 s on 2 cores)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, show_figure, show_source

import time

import numpy as np

from minimlp import create_model, layers
from minimlp.training.ema import ModelEma
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.schedule import lr_at
from minimlp.step import train_step
from minimlp.data.synthetic import draw_split
from minimlp.data.device_feed import normalize

import matplotlib.pyplot as plt  # noqa: E402  (after _lesson, which chose the file-writing backend)

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. What the moving average weighs

# %%
heading("1. What the moving average weighs")
show_source(ModelEma.update)
show_source(ModelEma.swapped_into.__wrapped__)  # (the function inside @contextmanager)
# Unrolled, after t updates with weights w_1 .. w_t (the average starts as a copy of w_0):
#     ema_t = d^t w_0 + (1 - d) [w_t + d w_{t-1} + d^2 w_{t-2} + ...]
# A step k steps back weighs (1 - d) d^k: geometric, and the weights (with d^t for w_0) sum to 1.
# The window: the most recent step weighs 1 - d, as in a plain mean over N = 1 / (1 - d) steps, and
# d^N = (1 - 1/N)^N ~ 1/e: the last N steps carry 1 - 1/e = 63% of the weight. d = 0.99 is a window
# of 100 steps; DeiT's 0.99996 one of 25,000 steps (20 epochs of ImageNet at batch 1024).
decay = 0.99
window = 1 / (1 - decay)
sequence = rng.normal(size=(300, 5))  # 300 "steps" of a 5-weight model
ema = ModelEma(sequence[0], decay=decay)
for weights in sequence[1:]:
    ema.update(weights)
steps_back = np.arange(len(sequence) - 1)
closed_form = decay ** (len(sequence) - 1) * sequence[0] + ((1 - decay) * decay ** steps_back[:, None] * sequence[:0:-1]).sum(axis=0)
check(np.allclose(ema.data, closed_form, rtol=1e-12, atol=1e-14), "ModelEma after 299 updates = d^t w_0 + (1 - d) sum_k d^k w_{t-k}")
last_window_share = 1 - decay ** round(window)
print(f"decay {decay}: window 1 / (1 - d) = {window:.0f} steps, which carry {last_window_share:.1%} of the weight")
check(abs(last_window_share - (1 - np.exp(-1))) < 0.01, "the last 1 / (1 - d) steps carry 1 - 1/e ~ 63% of the weight")
steps_per_epoch = 1_281_167 // 1024
print(f"DeiT's decay 0.99996: a window of {1 / (1 - 0.99996):,.0f} steps = {1 / (1 - 0.99996) / steps_per_epoch:.0f} epochs "
      f"of ImageNet at batch 1024 ({steps_per_epoch} steps each)")

# The price, a lag: while the weights move steadily (w_t = t), the average trails them by
# sum_k k (1 - d) d^k = d / (1 - d) = 99 steps. The gain, less noise: weights that are a fixed
# point plus independent noise of variance s^2 give an average of variance
#     (1 - d)^2 sum_k d^(2k) s^2 = s^2 (1 - d) / (1 + d)  ~ s^2 / (2 N)
ramp = ModelEma(np.zeros(1), decay=decay)
for step in range(1, 2001):
    ramp.update(np.array([float(step)]))
lag = 2000 - ramp.data[0]
print(f"weights moving 1 per step: after 2000 steps the average is {lag:.3f} steps behind (d / (1 - d) = {decay / (1 - decay):.0f})")
check(abs(lag - decay / (1 - decay)) < 1e-6, "the average lags a steady trend by d / (1 - d) steps")
noise_std, components = 0.5, 20_000
noisy = ModelEma(np.zeros(components), decay=decay)
for step in range(1000):
    noisy.update(noise_std * rng.standard_normal(components))
predicted = noise_std ** 2 * (1 - decay) / (1 + decay) * (1 - decay ** 2000)  # (the last factor: a finite run)
print(f"noise of variance {noise_std ** 2}: the average's variance {noisy.data.var():.5f}, predicted {predicted:.5f} "
      f"({noise_std ** 2 / predicted:.0f}x less)")
check(abs(noisy.data.var() / predicted - 1) < 0.05, "white noise of variance s^2 leaves s^2 (1 - d) / (1 + d) in the average")


# %% [markdown]
# ## 2. A valley of two weights: noisy steps and their average
#
# The loss (a w_1^2 + b w_2^2) / 2, and gradients with noise, as a batch gives them. Gradient descent
# with a fixed step size keeps bouncing; the EMA of its iterates sits near the bottom (0, 0).

# %%
heading("2. A valley of two weights: noisy steps and their average")
curvature = np.array([1.0, 8.0])
point = np.array([2.5, 1.2])
valley_ema = ModelEma(point, decay=0.95)
path, averaged_path = [point.copy()], [point.copy()]
for step in range(400):
    noisy_gradient = curvature * point + 0.8 * rng.standard_normal(2)
    point -= 0.1 * noisy_gradient
    valley_ema.update(point)
    path.append(point.copy())
    averaged_path.append(valley_ema.data.copy())
path, averaged_path = np.array(path), np.array(averaged_path)
valley_loss = lambda w: 0.5 * (curvature * w ** 2).sum(axis=-1)  # noqa: E731
raw_loss, ema_loss = valley_loss(path[200:]).mean(), valley_loss(averaged_path[200:]).mean()
print(f"mean loss over the last 200 steps: iterates {raw_loss:.4f}, their EMA (decay 0.95) {ema_loss:.4f}")
check(ema_loss < 0.5 * raw_loss, "in the noisy valley the average's loss is less than half of the iterates'")
figure, axis = plt.subplots(figsize=(7, 4.2))
grid_x, grid_y = np.meshgrid(np.linspace(-1.2, 2.7, 200), np.linspace(-1.0, 1.4, 200))
axis.contour(grid_x, grid_y, 0.5 * (curvature[0] * grid_x ** 2 + curvature[1] * grid_y ** 2), levels=12, colors="grey",
             linewidths=0.5)
axis.plot(path[:, 0], path[:, 1], ".-", lw=0.4, ms=2, color="tab:red", alpha=0.6, label="noisy gradient steps")
axis.plot(averaged_path[:, 0], averaged_path[:, 1], "-", lw=1.8, color="tab:blue", label="their EMA (decay 0.95)")
axis.plot(0, 0, "k*", ms=10)
axis.set_xlabel("w1")
axis.set_ylabel("w2")
axis.set_title("the iterates bounce around the bottom; their average sits near it")
axis.legend(fontsize=8)
show_figure(figure, "17_valley.png")


# %% [markdown]
# ## 3. The demo: resmlp_tiny on shapes10, raw weights vs their EMA
#
# Lesson 11's set-up, made noisy on purpose: batches of 16 and a constant learning rate after a
# short warmup (a schedule that decays to 0 averages by itself at the end, leaving the EMA less to do).
# The training loop is the trainer's: train_step, then ema.update after every step; evaluation of the
# average swaps it into the model's buffer and back (as train.py --model-ema does).

# %%
heading("3. The demo: resmlp_tiny on shapes10, raw weights vs their EMA")
TRAIN_PER_CLASS, VAL_PER_CLASS, STEPS, BATCH, LR, DECAY, EVERY = 150, 30, 1500, 16, 3e-3, 0.99, 50

start = time.perf_counter()
train_images, train_labels = draw_split(0, TRAIN_PER_CLASS, seed=17)  # minimlp.data.synthetic, as lesson 11 draws
val_images, val_labels = draw_split(1, VAL_PER_CLASS, seed=17)
train_x, val_x = normalize(train_images), normalize(val_images)
model = create_model("resmlp_tiny", dim=64, depth=2, patch_size=8, seed=0)
optimizer = AdamW(model.parameters, model.ops, lr=LR, weight_decay=0.05)
ema = ModelEma(model.parameters.data, decay=DECAY)
print(f"{len(train_x)} training and {len(val_x)} validation images drawn in {time.perf_counter() - start:.1f} s; "
      f"{model.num_params():,} parameters, batch {BATCH}, lr {LR} constant after 50 warmup steps, EMA decay {DECAY} "
      f"(window {1 / (1 - DECAY):.0f} steps, {len(train_x) // BATCH} steps an epoch)")


def validation():
    logits = model.forward(val_x)
    loss, _ = layers.cross_entropy(logits, val_labels)  # no smoothing: the plain validation loss
    return float(loss), float((logits.argmax(axis=1) == val_labels).mean())


order = np.random.default_rng(1)
curve = []  # (step, raw loss, raw accuracy, EMA loss, EMA accuracy)
start = time.perf_counter()
for step in range(STEPS):
    batch = order.integers(0, len(train_x), BATCH)
    train_step(model, optimizer, train_x[batch], train_labels[batch], precision=policy("float32"), smoothing=0.1,
               lr=lr_at(step, base_lr=LR, total_steps=10 ** 9, warmup_steps=50))  # total far away: ~constant
    ema.update(model.parameters.data)
    if (step + 1) % EVERY == 0:
        own = model.parameters.data.copy()
        raw = validation()
        with ema.swapped_into(model.parameters.data):
            averaged = validation()
        assert (model.parameters.data == own).all(), "swapped_into must give the weights back bit for bit"
        curve.append((step + 1, *raw, *averaged))
        if (step + 1) % 300 == 0:
            print(f"step {step + 1:5d}  val loss raw {raw[0]:.3f} EMA {averaged[0]:.3f}   val accuracy raw {raw[1]:.1%} EMA {averaged[1]:.1%}")
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
curve = np.array(curve)
last_third = curve[-len(curve) // 3:]
raw_end, ema_end = last_third[:, 1].mean(), last_third[:, 3].mean()
print(f"mean val loss over the last third of training: raw {raw_end:.3f}, EMA {ema_end:.3f}; "
      f"its spread between evaluations: raw {np.diff(last_third[:, 1]).std():.3f}, EMA {np.diff(last_third[:, 3]).std():.3f}")
check(ema_end < raw_end - 0.02, "over the last third of training the EMA weights have the lower validation loss")
check(np.diff(last_third[:, 3]).std() < np.diff(last_third[:, 1]).std(), "and it jumps less from one evaluation to the next")
falling = curve[(curve[:, 0] >= 200) & (curve[:, 0] <= 400)]  # after the warmup, while the loss falls fast
check((falling[:, 3] > falling[:, 1]).all(), "from step 200 to 400, while the loss falls fast, the EMA is behind: the lag of section 1")

figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
left.plot(curve[:, 0], curve[:, 1], "o-", ms=3, color="tab:red", label="raw weights")
left.plot(curve[:, 0], curve[:, 3], "o-", ms=3, color="tab:blue", label=f"EMA, decay {DECAY}")
left.set_xlabel("step")
left.set_ylabel("validation loss")
left.legend()
left.set_title("early: the average lags; later: it sits lower and steadier")
right.plot(curve[:, 0], curve[:, 2], "o-", ms=3, color="tab:red", label="raw weights")
right.plot(curve[:, 0], curve[:, 4], "o-", ms=3, color="tab:blue", label=f"EMA, decay {DECAY}")
right.axhline(0.1, color="grey", ls="--", lw=0.8, label="chance")
right.set_xlabel("step")
right.set_ylabel("validation accuracy")
right.set_ylim(0, 1)
right.legend()
show_figure(figure, "17_ema_training.png")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Rerun section 3 with DECAY = 0.999 (window 1000 steps, most of the run). -> the EMA lags for most
#    of the run: an average spanning the whole run includes the bad early weights.
# 2. Replace the constant learning rate by lr_at(step, base_lr=LR, total_steps=STEPS, warmup_steps=50)
#    (cosine to 0). Does the EMA still win at the end? -> by much less: a learning rate going to 0
#    shrinks the bouncing itself, which is what the average removed.
# 3. timm's ModelEma does not correct the start (the average begins at the initial weights). What
#    weight does w_0 keep after t steps, and when does that matter? -> d^t: after the window it is
#    1/e, after 5 windows under 1%; it matters only for runs shorter than a few windows.
# 4. Why can ResMLP's EMA be one flat buffer, while a ResNet's EMA must also average batch-norm
#    statistics? -> ResMLP has no buffers besides its weights (Affine instead of normalization).
# 5. Why is an average of weights a sensible model at all, when the loss is not convex? -> the
#    iterates of one run stay in one basin, near each other (a window of steps), where the loss is
#    close to convex; averaging weights of two unrelated runs would not work.

# %%
print("\nLesson 17 done: the EMA of the weights is a geometric average over ~1/(1 - decay) steps: it lags, and it removes the bounce.")
