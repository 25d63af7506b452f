# %% [markdown]
# # Lesson 14: mixed precision. float16 and bfloat16, float32 accumulation, loss scaling, the skipped step
#
# A GPU's tensor cores multiply 16-bit numbers many times faster than 32-bit ones. `train.py --amp`
# uses them for the matrix products only: their operands are rounded to float16, the products are
# summed in float32, and everything else (weights, optimizer moments, elementwise layers, the loss)
# stays float32. Three questions decide whether that trains as well as float32:
#
# 1. what a 16-bit float keeps and loses               (mantissa bits, exponent range)
# 2. why the products must be summed in float32       (and why that costs nothing extra)
# 3. what happens to small gradients                  (they underflow; loss scaling lifts them)
#
# On the CPU, minimlp emulates the float16 matmul exactly as train.py does there (operands rounded to
# float16, multiplied in float32): this lesson runs that emulation through the library's own training
# step. Section 5 then trains in bfloat16, this CPU's own 16-bit type (`--amp --amp-dtype bfloat16`, the
# CPU's default): no loss scaler, and, where the CPU has bfloat16 instructions, faster products.
# Pictures: lessons/out/14_rounding.png, 14_gradients.png, 14_loss_scale.png.
#
# Run: python lessons/14_mixed_precision.py        (10-25 s on 2 busy cores)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import best_of, check, heading, show_figure, show_source

import numpy as np

from minimlp import create_model, layers, precision
from minimlp.loss_scaling import LossScaler
from minimlp.precision import Precision, policy
from minimlp.optim import AdamW
from minimlp.step import train_step
from minimlp.data.synthetic import SHAPES_CLASSES, draw_image
from minimlp.data.device_feed import normalize

import matplotlib.pyplot as plt  # noqa: E402  (after _lesson, which chose the file-writing backend)

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. What float16 and bfloat16 keep: mantissa bits and exponent range
#
# A float is sign * 1.mantissa * 2^exponent. The mantissa bits set the precision (eps = 2^-bits is
# the gap after 1.0), the exponent bits the range:
#
#     exponent  mantissa   eps          smallest normal   largest
#     float32        8        23      2^-23         2^-126 ~ 1e-38    ~ 3.4e38
#     float16        5        10      2^-10         2^-14  ~ 6.1e-5   65504
#     bfloat16       8         7      2^-7          2^-126 ~ 1e-38    ~ 3.4e38
#
# bfloat16 is float32 with its last 16 bits cut off: float32's range, 3 fewer mantissa bits than
# float16. float16 trades range for precision. Below its smallest normal float16 still has
# "subnormal" numbers (0.mantissa * 2^-14, evenly spaced by 2^-24 ~ 6e-8), with fewer and fewer
# significant bits; below half of 2^-24 a value rounds to 0.

# %%
heading("1. What float16 and bfloat16 keep: mantissa bits and exponent range")
half = np.finfo(np.float16)
print(f"float16: eps {half.eps} = 2^{np.log2(half.eps):.0f}, smallest normal {half.smallest_normal:.3g}, "
      f"smallest subnormal {half.smallest_subnormal:.3g}, max {half.max}")
check(half.eps == 2.0 ** -10 and half.smallest_normal == 2.0 ** -14 and half.smallest_subnormal == 2.0 ** -24,
      "float16: eps 2^-10, smallest normal 2^-14, smallest subnormal 2^-24")
# The largest float16: the largest mantissa 1.1111111111b = 2 - 2^-10 times the largest exponent 2^15.
check(float(half.max) == (2 - 2.0 ** -10) * 2.0 ** 15 == 65504, "float16's max is (2 - 2^-10) * 2^15 = 65504")
# Anything from 65520 up (halfway to the next step, 65536) rounds to inf: the loss scaler's signal.
with np.errstate(over="ignore"):
    check(np.float16(65519) == 65504 and np.isinf(np.float16(65520)), "65519 rounds to 65504, 65520 to inf")


# NumPy has no bfloat16 dtype (ml_dtypes adds one); bfloat16 is the top half of a float32, so the library
# rounds the bits by hand (the CPU fast path does the same inside its loops, the GPU in one kernel):
show_source(precision.round_to_bfloat16)
to_bfloat16 = precision.round_to_bfloat16

print(f"bfloat16 of 1 + 2^-8 (a tie) = {to_bfloat16(1 + 2 ** -8)}, of 1 + 2^-8 + 2^-9 = {to_bfloat16(1 + 2 ** -8 + 2 ** -9)}"
      f", of pi = {to_bfloat16(np.pi)}, of 1e38 = {to_bfloat16(1e38):.4g}, of 1e-38 = {to_bfloat16(1e-38):.4g}")
check(to_bfloat16(1 + 2 ** -7) == 1 + 2 ** -7 and to_bfloat16(1 + 2 ** -8) == 1 and to_bfloat16(1 + 2 ** -8 + 2 ** -9) == 1 + 2 ** -7,
      "bfloat16 keeps 7 mantissa bits: 1 + 2^-7 exact, 1 + 2^-8 is a tie to even (1), a bit more rounds up")
check(np.isfinite(to_bfloat16(3e38)) and to_bfloat16(1e-38) > 0, "bfloat16 keeps float32's range: 3e38 and 1e-38 survive")
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None
    print("(ml_dtypes is not installed: the by-hand rounding is not compared with its bfloat16 type)")
if ml_dtypes is not None:
    samples = (rng.normal(size=100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32)
    check((samples.astype(ml_dtypes.bfloat16).astype(np.float32) == to_bfloat16(samples)).all(),
          "the by-hand bfloat16 rounding equals ml_dtypes.bfloat16 on 100,000 values")

# The picture: relative rounding error against magnitude. Flat where the number is normal (the
# mantissa's precision), rising in float16's subnormals, 1 where it flushes to 0, inf beyond max.
magnitudes = np.geomspace(1e-12, 3e38, 4000).astype(np.float32)
with np.errstate(over="ignore"):
    error16 = np.abs(magnitudes.astype(np.float16).astype(np.float32) - magnitudes) / magnitudes
errorbf = np.abs(to_bfloat16(magnitudes) - magnitudes) / magnitudes
figure, axis = plt.subplots(figsize=(9, 3.8))
axis.loglog(magnitudes, np.where(np.isfinite(error16), error16, np.nan), ".", ms=1.5, label="float16 (5 exponent, 10 mantissa bits)")
axis.loglog(magnitudes, errorbf + 1e-12, ".", ms=1.5, label="bfloat16 (8 exponent, 7 mantissa bits)")
for x, y, text in [(2.0 ** -24, 2e-7, "float16 smallest subnormal"), (2.0 ** -14, 2e-6, "float16 smallest normal"),
                   (65504, 2e-7, "float16 max (inf beyond)")]:
    axis.axvline(x, color="grey", lw=0.7, ls="--")
    axis.text(x * 1.5, y, text, fontsize=7)
axis.set_ylim(1e-7, 3)
axis.set_xlabel("|x|")
axis.set_ylabel("relative rounding error")
axis.set_title("float16: more precision in a narrow range; bfloat16: less precision, float32's range")
axis.legend(loc="upper right", markerscale=6, fontsize=8)
show_figure(figure, "14_rounding.png")
in_range = (magnitudes > 1e-4) & (magnitudes < 6e4)
check(error16[in_range].max() <= 2.0 ** -11 and errorbf[in_range].max() <= 2.0 ** -8,
      "in float16's normal range the relative error is at most 2^-11 (float16) and 2^-8 (bfloat16): half an eps")


# %% [markdown]
# ## 2. A matmul with half operands and float32 accumulation

# %%
heading("2. A matmul with half operands and float32 accumulation")
show_source(precision.matmul)
show_source(precision._half_matmul_emulated)
# Why the emulation is exact: a float16 has an 11-bit significand (10 stored bits and the implicit 1),
# so the product of two has at most 22 significant bits, and float32 holds 24. The exponents fit as
# well: the smallest product is 2^-24 * 2^-24 = 2^-48 (float32's smallest normal is 2^-126), the
# largest 65504^2 ~ 4.3e9. So every float16 x float16 product is EXACT in float32: multiplying the
# rounded operands in float32 is what a tensor core does; only the order of the additions differs.
bit_patterns = rng.integers(0, 2 ** 16, size=(2, 1_000_000), dtype=np.uint16)
a_half, b_half = bit_patterns[0].view(np.float16), bit_patterns[1].view(np.float16)
finite = np.isfinite(a_half) & np.isfinite(b_half)  # every finite float16, subnormals included
a_half, b_half = a_half[finite], b_half[finite]
product32 = a_half.astype(np.float32) * b_half.astype(np.float32)
product64 = a_half.astype(np.float64) * b_half.astype(np.float64)
check((product32 == product64).all(), f"all {finite.sum():,} products of random float16 pairs are exact in float32")
a32, b32 = rng.normal(size=(2, 100_000)).astype(np.float32)
check((a32 * b32 != a32.astype(np.float64) * b32.astype(np.float64)).mean() > 0.9,
      "while float32 x float32 products are almost never exact in float32 (48 significant bits)")

# Why the SUM must be float32: a float16 sum stops growing when the addend falls below half a step.
# From 2048 on the step between float16 numbers is 2, so 2048 + 1 rounds back to 2048.
count16 = np.cumsum(np.ones(4096, np.float16), dtype=np.float16)[-1]
print(f"adding 1.0 4096 times in float16 gives {count16}")
check(count16 == 2048, "a float16 accumulator stalls at 2048 when adding ones")
# A real matrix product, K = 4096 (fc1's K is 128 here, 384 in ResMLP-S12; the gradient dW = dy^T x
# sums over every token of the batch: K = N*B = 50,176 at B = 256).
inner = 4096
a = rng.normal(size=(8, inner)).astype(np.float32)
b = rng.normal(size=(inner, 8)).astype(np.float32)
exact = a.astype(np.float16).astype(np.float64) @ b.astype(np.float16).astype(np.float64)  # the rounded operands, exactly
with precision.autocast():
    ours = precision.matmul(a, b)
# One at a time, in the same order: the exact products summed in a float32 and in a float16 accumulator.
terms = a.astype(np.float16).astype(np.float32)[:, :, None] * b.astype(np.float16).astype(np.float32)[None, :, :]
summed32 = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1, :]
summed16 = np.cumsum(terms.astype(np.float16), axis=1, dtype=np.float16)[:, -1, :]
largest_entry = np.abs(exact).max()
error_ours, error32, error16 = (np.abs(result - exact).max() / largest_entry for result in (ours, summed32, summed16))
print(f"autocast matmul: dtype {ours.dtype}, error (relative to the largest entry) {error_ours:.1e}; one term at a "
      f"time in a float32 accumulator {error32:.1e}, in a float16 accumulator {error16:.1e}")
check(ours.dtype == np.float32 and error_ours < 1e-5, "autocast's matmul returns float32, within float32 rounding of the exact product")
check(error16 > 100 * error32, "the same products summed in float16 are 100x (and more) less accurate than in float32")


# %% [markdown]
# ## 3. Why gradients underflow in float16
#
# Every matrix product of the model goes through precision.matmul (minimlp.layers imports it). To see
# what the backward pass would hand to float16, we listen to it: a stand-in for layers.matmul that
# records its operands, then calls the real one. One float32 forward and backward of resmlp_tiny
# (dim 128, 6 blocks, 64 patches of 4x4 px) on 32 shapes10 images.

# %%
heading("3. Why gradients underflow in float16")
labels = np.arange(32) % len(SHAPES_CLASSES)
images = normalize(np.stack([draw_image(SHAPES_CLASSES[label], np.random.default_rng([14, index]))
                             for index, label in enumerate(labels)]).transpose(0, 3, 1, 2))
model = create_model("resmlp_tiny", seed=0)
recorded = None


def listening_matmul(a, b, half_result=False):
    if recorded is not None:
        recorded.append((a, b))
    return precision.matmul(a, b, half_result)


layers.matmul = listening_matmul
try:
    recorded = forward_products = []
    logits = model.forward(images, train=True)
    loss, dlogits = layers.cross_entropy(logits, labels, smoothing=0.1)
    recorded = backward_products = []
    model.backward(dlogits)
finally:
    recorded, layers.matmul = None, precision.matmul
# In backward, each product has one operand that came from forward (a weight, or an activation kept
# for backward) and one that is a gradient (dy). Tell them apart by memory: a forward value is a view
# of the parameter buffer or of an operand that forward used.
forward_values = [operand for pair in forward_products for operand in pair] + [model.parameters.data]
gradient_operands = [[operand for operand in pair if not any(np.may_share_memory(operand, seen) for seen in forward_values)]
                     for pair in backward_products]
check(all(len(found) == 1 for found in gradient_operands),
      f"each of backward's {len(backward_products)} products has exactly one gradient operand")
dy = np.concatenate([found[0].ravel() for found in gradient_operands])
nonzero = dy[dy != 0]
flushed = float(((dy != 0) & (dy.astype(np.float16) == 0)).mean())
subnormal = float(((np.abs(dy) < 2.0 ** -14) & (dy != 0)).mean())
print(f"{dy.size:,} gradient values enter backward's products; median |dy| {np.median(np.abs(nonzero)):.1e}, "
      f"largest {np.abs(dy).max():.3f}")
print(f"in float16: {flushed:.1%} round to 0, {subnormal:.3%} are subnormal (fewer than 11 significant bits)")
# Why so small: dlogits = (p - q) / B is at most 1/B = 0.03; the head's weights (std 0.02) and the
# mean over 64 patches (1/64) shrink it ~1000x before the last block; LayerScale (0.1) and each
# Linear's small weights shrink it further inside the blocks.
check(flushed > 0.05, "more than 5% of resmlp_tiny's backward signal would be flushed to zero in float16")
scale = 2.0 ** 16
with np.errstate(over="ignore"):
    scaled16 = (dy * scale).astype(np.float16)
flushed_scaled = float(((dy != 0) & (scaled16 == 0)).mean())
print(f"multiplied by S = 2^16 first: {flushed_scaled:.4%} round to 0, {np.isinf(scaled16).sum()} overflow")
check(flushed_scaled < 1e-4 and not np.isinf(scaled16).any(), "times 2^16 almost nothing flushes, and nothing overflows")
flushed_bf16 = int(((dy != 0) & (to_bfloat16(dy) == 0)).sum())
check(flushed_bf16 == 0, "in bfloat16 nothing flushes (float32's range): why bfloat16 needs no loss scaling")

# Does it matter for the weights' gradients? The library's training step with lr = 0 leaves the
# weights as they are and the unscaled gradients in model.parameters.grad: compare float32 with
# float16 matmuls at loss scale 1 (no scaling) and 2^16 (train.py's starting scale).
optimizer = AdamW(model.parameters, model.ops, lr=0.0)


def gradients_with(precision):
    weights = model.parameters.data.copy()
    train_step(model, optimizer, images, labels, lr=0.0, precision=precision, smoothing=0.1)
    assert (model.parameters.data == weights).all(), "lr = 0 must leave the weights unchanged"
    return model.parameters.grad.copy()


reference = gradients_with(policy("float32"))
shown = ["head.weight", "blocks.5.mlp.fc2.weight", "blocks.3.mlp.fc1.weight", "blocks.0.attn.weight",
         "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"]
errors = {}
for label, scale in [("S = 1", 1.0), ("S = 2^16", 2.0 ** 16)]:  # policy("float16") with its scaler started at S
    gradient = gradients_with(Precision("float16", "float16", LossScaler(init_scale=scale)))
    errors[label] = [np.linalg.norm(gradient[model.parameters.slices[name]] - reference[model.parameters.slices[name]])
                     / np.linalg.norm(reference[model.parameters.slices[name]]) for name in shown]
print(f"{'relative error of the gradient vs float32':44s} {'S = 1':>9s} {'S = 2^16':>9s}")
for name, unscaled, scaled in zip(shown, errors["S = 1"], errors["S = 2^16"]):
    print(f"  {name:42s} {unscaled:9.1e} {scaled:9.1e}")
fc1 = shown.index("blocks.0.mlp.fc1.weight")
check(errors["S = 1"][fc1] > 0.03 and errors["S = 2^16"][fc1] < 3e-3,
      "unscaled, the first block's fc1 gradient is >3% off; scaled by 2^16 it is within 0.3% of float32")
check(max(errors["S = 2^16"]) < 3e-3, "with S = 2^16 every gradient shown is within 0.3% (float16's 2^-11 rounding)")
# What is left at S = 2^16 (~3e-4) is the 11-bit mantissa: scaling fixes the range, not the precision.

figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
exponents = np.log2(np.abs(nonzero))
left.hist(exponents, bins=120, color="tab:blue", alpha=0.7, label="|dy| (S = 1)")
left.hist(exponents + 16, bins=120, color="tab:green", alpha=0.5, label="|dy| x 2^16")
for x, text in [(-25, "rounds to 0 below"), (-14, "smallest normal"), (np.log2(65504), "max")]:
    left.axvline(x, color="grey", lw=0.8, ls="--")
    left.text(x + 0.3, left.get_ylim()[1] * 0.9, text, fontsize=7, rotation=90, va="top")
left.axvspan(exponents.min() - 1, -25, color="red", alpha=0.08)
left.set_xlabel("log2 |gradient value| entering backward's products")
left.set_ylabel("count")
left.set_title(f"resmlp_tiny's backward: {flushed:.0%} flush to zero in float16")
left.legend(fontsize=8)
positions = np.arange(len(shown))
right.bar(positions - 0.2, errors["S = 1"], width=0.4, label="float16 matmuls, S = 1")
right.bar(positions + 0.2, errors["S = 2^16"], width=0.4, label="float16 matmuls, S = 2^16")
right.set_yscale("log")
right.set_xticks(positions, [name.replace(".weight", "") for name in shown], rotation=30, ha="right", fontsize=8)
right.set_ylabel("relative error of the weight gradient vs float32")
right.legend(fontsize=8)
show_figure(figure, "14_gradients.png")


# %% [markdown]
# ## 4. Dynamic loss scaling and the skipped step

# %%
heading("4. Dynamic loss scaling and the skipped step")
show_source(LossScaler.unscale)
show_source(LossScaler.update)
show_source(train_step)
# S should be as large as possible without overflowing. Which S is that? The largest gradient
# value entering a float16 product, times S, must stay below 65520. Here the largest is dlogits
# itself (at most 1/B): predict how many steps a scaler started at 2^30 skips before it finds an S
# that fits. Each skipped step halves S; the weights must not move in a skipped step.
largest = float(np.abs(dy).max())
start_exponent = 30
predicted_skips = next(k for k in range(start_exponent + 1) if largest * 2.0 ** (start_exponent - k) < 65520)
print(f"largest |dy| = {largest:.4f}: S must be below 65520 / {largest:.4f} = {65520 / largest:,.0f} = 2^{np.log2(65520 / largest):.2f}; "
      f"from 2^{start_exponent} that takes {predicted_skips} halvings")
scaler = LossScaler(init_scale=2.0 ** start_exponent, growth_interval=4)
float16 = Precision("float16", "float16", scaler)  # policy("float16"), with this scaler
optimizer = AdamW(model.parameters, model.ops, lr=1e-3, weight_decay=0.05)
history = []  # (log2 S used, step taken?)
skips_behaved = []  # per skipped step: weights unchanged bit for bit, and S halved
for step in range(24):
    used, weights = scaler.scale, model.parameters.data.copy()
    with np.errstate(invalid="ignore"):  # an overflowed step's check sum meets inf - inf = NaN: expected here
        loss, finite = train_step(model, optimizer, images, labels, lr=1e-3, precision=float16, smoothing=0.1)
    history.append((np.log2(used), finite))
    if not finite:
        skips_behaved.append(bool((model.parameters.data == weights).all()) and scaler.scale == used / 2)
skipped_first = next(step for step, (_, finite) in enumerate(history) if finite)
print("S used at each step:", " ".join(f"2^{e:.0f}{'' if ok else 'x'}" for e, ok in history), " (x: skipped)")
check(skipped_first == predicted_skips, f"the scaler skipped exactly the {predicted_skips} steps predicted from the largest gradient")
check(all(skips_behaved), f"in each of the {len(skips_behaved)} skipped steps the weights stayed the same bit for bit and S halved")
check(scaler.skipped_steps == sum(not ok for _, ok in history), "skipped_steps counts every skipped step")
# After growth_interval (here 4; train.py: 2000, as PyTorch's GradScaler) clean steps S doubles,
# probing whether a larger scale fits now; if not, one skipped step halves it back. A few skips in
# thousands of steps cost nothing, and S follows the gradients as they shrink during training.
doubled = [step for step in range(1, len(history)) if history[step][0] == history[step - 1][0] + 1]
check(doubled and all(all(ok for _, ok in history[step - 4:step]) for step in doubled),
      "S doubled only after 4 clean steps in a row")

figure, axis = plt.subplots(figsize=(9, 3.2))
steps = np.arange(len(history))
used_exponents = np.array([e for e, _ in history])
taken = np.array([ok for _, ok in history])
axis.step(steps, used_exponents, where="mid", color="grey", lw=0.8)
axis.plot(steps[taken], used_exponents[taken], "o", color="tab:green", label="step taken")
axis.plot(steps[~taken], used_exponents[~taken], "x", color="tab:red", ms=9, label="overflow: step skipped, S halved")
axis.axhline(np.log2(65520 / largest), color="tab:blue", ls="--", lw=0.8, label="65520 / largest gradient")
axis.set_xlabel("training step")
axis.set_ylabel("log2 of the loss scale S")
axis.legend(fontsize=8)
show_figure(figure, "14_loss_scale.png")


# %% [markdown]
# ## 5. bfloat16 on this CPU: no loss scaler, and the speed
#
# bfloat16 keeps float32's exponent, so section 3's problem does not arise: nothing that float32 keeps
# flushes to zero. Its policy has no loss scaler, and the training step (shown in section 4) then skips
# the whole `if scaler is not None` part: no scale, no finiteness check read back, no skipped step.

# %%
heading("5. bfloat16 on this CPU: no loss scaler, and the speed")
bfloat16 = policy("bfloat16")
print(bfloat16)
check(bfloat16.loss_scaler is None and policy("float32").loss_scaler is None,
      "float32's and bfloat16's policies have no loss scaler: the step calls nothing of them")
# The price is precision: 8 significant bits (2^-8 relative rounding) instead of float16's 11. Section 3's
# comparison again, at the weights section 4 trained to (lr = 0: the gradients only):
reference = gradients_with(policy("float32"))
errors = {}
for label, chosen in [("float16, S = 1", Precision("float16", "float16", LossScaler(init_scale=1.0))),
                      ("float16, S = 2^16", policy("float16")), ("bfloat16", bfloat16)]:
    gradient = gradients_with(chosen)
    errors[label] = [np.linalg.norm(gradient[model.parameters.slices[name]] - reference[model.parameters.slices[name]])
                     / np.linalg.norm(reference[model.parameters.slices[name]]) for name in shown]
print(f"{'relative error of the gradient vs float32':44s}" + "".join(f"{label:>19s}" for label in errors))
for index, name in enumerate(shown):
    print(f"  {name:42s}" + "".join(f"{values[index]:19.1e}" for values in errors.values()))
check(errors["bfloat16"][fc1] < errors["float16, S = 1"][fc1] / 3,
      "unscaled, bfloat16's fc1 gradient is several times closer to float32 than unscaled float16's (nothing flushed)")
check(max(errors["bfloat16"]) < 4 * 2.0 ** -8,
      "every bfloat16 gradient shown is within a few 2^-8 of float32 (its rounding, with no scale at all)")

# The speed. Where the CPU has bfloat16 instructions (avx512_bf16, amx_bf16) and oneDNN is installed
# (minimlp/fast/bf16_gemm.py), precision.matmul hands bfloat16 products to them: each product of two
# bfloat16s is exact in float32, the hardware sums them in float32, several times the float32 rate.
# One product of ResMLP-S12's fc1 shape at batch 8 (1568 tokens x 384 -> 1536), float32 against bfloat16:
from minimlp.fast import bf16_gemm  # noqa: E402
tokens, weight = rng.normal(size=(1568, 384)).astype(np.float32), rng.normal(size=(384, 1536)).astype(np.float32)
flops = 2 * tokens.shape[0] * tokens.shape[1] * weight.shape[1]
seconds32 = best_of(lambda: tokens @ weight)
with precision.autocast("bfloat16"):
    seconds16 = best_of(lambda: precision.matmul(tokens, weight))
    product = precision.matmul(tokens, weight)
print(f"{bf16_gemm.cpu_name()}: float32 {flops / seconds32 / 1e9:.0f} GFLOP/s, bfloat16 "
      f"{flops / seconds16 / 1e9:.0f} GFLOP/s ({'oneDNN' if bf16_gemm.available() else 'emulated: '}"
      f"{bf16_gemm.missing_instruction() or bf16_gemm.unavailable_reason() or ''})")
exact = to_bfloat16(tokens).astype(np.float64) @ to_bfloat16(weight).astype(np.float64)
check(np.abs(product - exact).max() < 1e-5 * np.abs(exact).max(),
      "the bfloat16 product is the exact product of the rounded operands, summed in float32")
if bf16_gemm.available():
    check(seconds16 < seconds32, "with the CPU's bfloat16 instructions the product is faster than float32's")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Rerun section 3 with a batch of 256 instead of 32. Does more or less of dy flush? -> more:
#    dlogits = (p - q) / B shrinks with B, so every gradient behind it does too.
# 2. Section 5's bfloat16 errors are about 8x float16's at S = 2^16. Why 8, and would a loss scale help
#    bfloat16? -> 2^-8 / 2^-11 = 8: the significand sets the error once nothing flushes; scaling by a
#    power of two changes only exponents, so it leaves bfloat16's rounding exactly as it was.
# 3. Why is the product of a float16 and a bfloat16 not always exact in float32? -> 11 + 8 = 19
#    significant bits fit, but 2^-126 (a small bfloat16) x 2^-24 (a float16 subnormal) = 2^-150 lies
#    below float32's smallest subnormal 2^-149: exactness needs the exponent range too.
# 4. Why does unscale() divide by S with one multiplication by 1/S and no rounding? -> S is a power
#    of two: multiplying by 2^-k changes only the exponent (unless the result is subnormal).
# 5. A single inf in one bucket of a data-parallel run: why must every rank skip the step? ->
#    otherwise the ranks' weights differ from then on; minimlp.step asks sync.all_true(finite).

# %%
print("\nLesson 14 done: half operands, float32 sums; float16's tiny gradients need a loss scale and an overflow "
      "skips the step; bfloat16 needs neither.")
