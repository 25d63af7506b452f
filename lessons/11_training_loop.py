# %% [markdown]
# # Lesson 11: a training loop that learns
#
# Everything is in place: a model whose forward and backward we trust (lessons 1-9), a loss
# (lesson 6) and an optimizer with a schedule (lesson 10). Training is a loop:
#
#     for each step:
#     pick a batch of images and labels
#     train_step(model, optimizer, images, labels, lr=lr_at(step, ...), precision=policy("float32"))
#
# and train_step (minimlp.step, the one step that train.py, the benchmarks and the tests run too) is
#
#     logits = model.forward(images, train=True)
#     loss, dlogits = softmax_cross_entropy(logits, targets)  # (smoothed) cross-entropy; dlogits = (p - q) / B
#     model.backward(dlogits)                 # fills model.grads (overwrites)
#     (float16 only: loss scaling, which may skip a step: lesson 14)
#     clip them if asked (clip_grad)
#     optimizer.lr = lr                       # warmup, then cosine
#     optimizer.step()                        # updates model.params in place
#
# The data: minimlp.data.synthetic's "shapes10", ten classes of small drawn images (circle, ring,
# square, triangle, cross, stripes in three directions, checkerboard, dots) on noisy backgrounds.
# train.py writes them to disk as PNG files and reads them with a parallel loader; here we draw a
# small set straight into memory with the same function, so the lesson runs in seconds on a CPU.
#
# What you will see: example images (lessons/out/11_examples.png), the loop itself, a loss curve and
# validation accuracy (lessons/out/11_training.png), and per-class accuracy. The trained weights are
# saved to lessons/out/11_shapes_resmlp.npz for lesson 13.
#
# Run: python lessons/11_training_loop.py        (about 10 s on 2 cores)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import check, heading, output_dir, show_figure, show_source

import time

import numpy as np

from minimlp import create_model
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.schedule import lr_at
from minimlp.step import train_step
from minimlp.data.synthetic import SHAPES_CLASSES, draw_image, draw_split
from minimlp.data.device_feed import normalize

TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 30
STEPS, BATCH, BASE_LR, WEIGHT_DECAY, SMOOTHING = 500, 64, 3e-3, 0.05, 0.1


# %% [markdown]
# ## 1. The data: shapes10, drawn in memory

# %%
heading("1. The data: shapes10, drawn in memory")
show_source(draw_image)
show_source(draw_split)
# Each image has its own random generator, seeded by (seed, split, class, index): the same images on
# every machine, and validation images that never appear in training.

start = time.perf_counter()
train_images, train_labels = draw_split(0, TRAIN_PER_CLASS, seed=11)  # uint8 (B, 3, 32, 32), labels (B,)
val_images, val_labels = draw_split(1, VAL_PER_CLASS, seed=11)
print(f"drew {len(train_images)} training and {len(val_images)} validation images in {time.perf_counter() - start:.1f} s; "
      f"classes: {', '.join(SHAPES_CLASSES)}")
import matplotlib.pyplot as plt  # noqa: E402

figure, axes = plt.subplots(3, 10, figsize=(12, 4))
for label, name in enumerate(SHAPES_CLASSES):
    for row in range(3):
        axes[row, label].imshow(train_images[label * TRAIN_PER_CLASS + row].transpose(1, 2, 0))
        axes[row, label].axis("off")
    axes[0, label].set_title(name.replace("_", "\n"), fontsize=8)
show_figure(figure, "11_examples.png")

# uint8 pixels -> floats with ImageNet's mean and std per colour (minimlp.data.device_feed.normalize):
# inputs centred near 0 with spread near 1, what the initialization assumes.
train_x, val_x = normalize(train_images), normalize(val_images)
print(f"normalized: {train_x.dtype}, mean {train_x.mean():+.2f}, std {train_x.std():.2f}")


# %% [markdown]
# ## 2. The model and the optimizer
#
# resmlp_tiny, shrunk so that a CPU trains it in seconds: patch 8 on 32 px gives a 4x4 grid of
# N = 16 patches, d = 64, 2 blocks. float32, as in real training.

# %%
heading("2. The model and the optimizer")
model = create_model("resmlp_tiny", dim=64, depth=2, patch_size=8, seed=0)
optimizer = AdamW(model.parameters, model.ops, lr=BASE_LR, weight_decay=WEIGHT_DECAY)
print(f"{model.config['name']} with {model.num_params():,} parameters, {model.num_patches} patches; "
      f"AdamW lr {BASE_LR}, weight decay {WEIGHT_DECAY}, label smoothing {SMOOTHING}, batch {BATCH}, {STEPS} steps")


def accuracy(images, labels):
    predictions = np.concatenate([model.forward(images[i:i + 256]).argmax(axis=1) for i in range(0, len(images), 256)])
    return float((predictions == labels).mean()), predictions


# %% [markdown]
# ## 3. The loop

# %%
heading("3. The loop")
show_source(train_step)
# Read it with the docstring above: forward, loss, backward, then the optimizer at this step's learning
# rate. The precision policy is for mixed precision (lesson 14); float32's has no loss scaler, so the step
# calls nothing of it, and every step is taken. The loss comes back as a 0-d array: float() reads it.
rng = np.random.default_rng(0)
steps_per_epoch = len(train_x) // BATCH
losses_seen, val_curve = [], []
start = time.perf_counter()
for step in range(STEPS):
    if step % steps_per_epoch == 0:  # a new epoch: a new random order of the training set
        order = rng.permutation(len(train_x))
    batch = order[(step % steps_per_epoch) * BATCH:(step % steps_per_epoch + 1) * BATCH]
    lr = lr_at(step, base_lr=BASE_LR, total_steps=STEPS, warmup_steps=STEPS // 10)
    loss, _ = train_step(model, optimizer, train_x[batch], train_labels[batch], lr, policy("float32"),
                         smoothing=SMOOTHING)
    losses_seen.append(float(loss))
    if (step + 1) % 100 == 0:
        val_accuracy, _ = accuracy(val_x, val_labels)
        val_curve.append((step + 1, val_accuracy))
        print(f"step {step + 1:4d}  lr {optimizer.lr:.1e}  train loss (last 100) {np.mean(losses_seen[-100:]):.3f}  "
              f"val accuracy {val_accuracy:.1%}")
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
# What to notice: the loss hardly moves during the warmup (lr is tiny, and LayerScale keeps the
# blocks near the identity), then falls. It cannot reach 0: with label smoothing 0.1 over 10
# classes the best possible loss is the entropy of the smoothed target, about 0.50.


# %% [markdown]
# ## 4. Results

# %%
heading("4. Results")
val_accuracy, predictions = accuracy(val_x, val_labels)
per_class = {name: float((predictions[val_labels == label] == label).mean()) for label, name in enumerate(SHAPES_CLASSES)}
for name, value in sorted(per_class.items(), key=lambda item: item[1]):
    print(f"  {name:20s} {value:6.1%}")
# Typically the textures (stripes, checkerboard) are learned before the outlines (ring vs circle,
# square vs triangle): telling those apart needs the token mixing to relate distant patches.
figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.plot(losses_seen, lw=0.6, alpha=0.5, label="per step")
left.plot(np.arange(49, STEPS), np.convolve(losses_seen, np.ones(50) / 50, mode="valid"), label="mean of 50 steps")
left.set_xlabel("step")
left.set_ylabel("training loss (label smoothing 0.1)")
left.legend()
right.plot(*zip(*val_curve), "o-")
right.axhline(0.1, color="grey", ls="--", lw=0.8, label="chance (10 classes)")
right.set_xlabel("step")
right.set_ylabel("validation accuracy")
right.set_ylim(0, 1)
right.legend()
show_figure(figure, "11_training.png")
weights_path = output_dir() / "11_shapes_resmlp.npz"
np.savez(weights_path, **model.state_dict())
print(f"  weights saved: {weights_path} (official names; lesson 13 reads them)")

first, last = np.mean(losses_seen[:50]), np.mean(losses_seen[-50:])
print(f"mean loss of the first 50 steps {first:.3f}, of the last 50 {last:.3f}; validation accuracy {val_accuracy:.1%}")
check(last < 0.75 * first, "the training loss went down by more than a quarter")
check(val_accuracy > 0.4, "validation accuracy is far above chance (10%): the model learned, not memorized")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Set WEIGHT_DECAY = 0 and SMOOTHING = 0, and TRAIN_PER_CLASS = 20. Compare train and val
#    accuracy. -> with little data and no regularization the gap between them (overfitting) grows.
# 2. Remove the warmup (warmup_steps=0) and raise BASE_LR to 1e-2. -> the first steps can throw the
#    loss up before it falls; with warmup the same lr is usually fine.
# 3. Add a random horizontal flip to each batch (train_x[batch][..., ::-1]). Which classes should
#    it NOT confuse, and which augmentation would hurt? -> flips keep every class; a 90-degree
#    rotation would turn horizontal stripes into vertical ones, changing the label.
# 4. Replace the token mixing by the identity (set every blocks.i.attn.weight to np.eye(16) and
#    keep it fixed by zeroing its gradient before optimizer.step()). How far does accuracy drop?
#    -> without patches talking, only the mean over patches combines them: shapes that need
#    spatial relations (ring vs circle) suffer most.
# 5. The same training from the command line, with files, a parallel loader and checkpoints:
#    python train.py (see the repository README) uses shapes10 by default.

# %%
print("\nLesson 11 done: forward, loss, backward, lr, step: the loss falls and the model generalizes.")
