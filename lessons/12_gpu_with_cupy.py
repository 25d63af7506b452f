# %% [markdown]
# # Lesson 12: the same code on a GPU, with CuPy
#
# CuPy is NumPy for NVIDIA GPUs: cupy.exp, cupy.matmul, array.reshape, ... with the same names and
# semantics, but the arrays live in GPU memory and every operation launches a GPU kernel. So a
# function written against an array module `xp`, never against `np` directly, runs on both:
#
#     def gelu_forward(x):
#         xp = get_xp(x)          # numpy for a NumPy array, cupy for a CuPy array
#         ...
#         xp.exp(slope, out=slope)
#
# minimlp decides where arrays live in ONE place, minimlp.backend; every layer takes its `xp` from
# the data it is handed. The model is created for a device ("cpu", "gpu" or "auto") and moves its
# input there.
#
# What you will see: the backend's few functions; the xp idea on NumPy; what a fused GPU kernel buys
# (an estimate of memory traffic, and a measurement of what separate passes cost on the CPU); and,
# ONLY IF this machine has an NVIDIA GPU with CuPy, the same model on both devices, compared, and a
# fused GELU forward checked against the plain xp code. Without a GPU those parts say so and skip.
#
# Run: python lessons/12_gpu_with_cupy.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import best_of, check, heading, show_source

import time

import numpy as np

from minimlp import backend, create_model, layers


# %% [markdown]
# ## 1. One place decides where arrays live: minimlp.backend

# %%
heading("1. One place decides where arrays live: minimlp.backend")
show_source(backend.get_xp)
show_source(backend.resolve_device)
show_source(backend.to_device)
has_gpu = backend.gpu_available()
print(f"this machine: {'an NVIDIA GPU with CuPy' if has_gpu else 'no GPU with CuPy'}; device 'auto' -> "
      f"{backend.resolve_device('auto')!r}")
if not has_gpu:
    try:
        backend.resolve_device("gpu")
    except backend.DeviceError as error:
        print(f"asking for 'gpu' here raises DeviceError: {error}")
# What a person sees is a message that says what is missing and how to get it; nothing falls back
# to the CPU silently when the GPU was asked for.


# %% [markdown]
# ## 2. The xp idea, on NumPy
#
# A layer never names numpy. Give it NumPy arrays and get_xp returns numpy; give it CuPy arrays and
# the very same lines run on the GPU. Our own function written the same way:

# %%
heading("2. The xp idea, on NumPy")


def softplus(x):
    xp = backend.get_xp(x)  # the array module of the data
    return xp.log1p(xp.exp(-xp.abs(x))) + xp.maximum(x, 0)  # log(1 + e^x), stable for large |x|


values = np.linspace(-50, 50, 11)
check(backend.get_xp(values) is np and np.allclose(softplus(values), np.logaddexp(0, values)),
      "an xp-function on NumPy arrays runs on NumPy (and equals log(1 + e^x))")
# The model is created for a device; it moves inputs there itself (backend.to_device) and its
# outputs stay there: backend.to_numpy brings them back to the host.
model = create_model("resmlp_tiny", dim=32, depth=2, patch_size=8, num_classes=10, device="cpu")
images = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
labels = np.arange(8)
logits_cpu = model.forward(images, train=True)
loss_cpu, dlogits = layers.cross_entropy(logits_cpu, labels)
model.backward(dlogits)
grads_cpu = backend.to_numpy(model.parameters.grad).copy()
print(f"on {model.device}: xp = {model.xp.__name__}, logits {type(logits_cpu).__name__} {logits_cpu.shape}, loss {float(loss_cpu):.4f}")


# %% [markdown]
# ## 3. What a fused kernel buys

# %%
heading("3. What a fused kernel buys")
show_source(layers.gelu_forward)
# On a GPU each xp line is its own kernel: it reads its inputs from GPU memory and writes its result
# back. gelu_forward runs: *c, erf, +1, *0.5 (Phi), x*x, *(-0.5), exp, *x, *c, +cdf (the slope), x*cdf:
# about 11 kernels, each streaming one or two full-size arrays in and one out. The arithmetic is
# trivial; the time is all memory traffic. A FUSED kernel does the whole formula per element in registers:
#     read x once -> compute -> write GELU(x) and the slope once.
# Estimate for ResMLP-S12, batch 128: the hidden activation (N*B, 4d) of one block, float32:
elements = 196 * 128 * 1536
array_bytes = elements * 4
unfused_transfers = 2 * 8 + 3 * 3  # eight passes that read one array and write one; *x, +cdf, x*cdf read two
fused_transfers = 3  # read x; write GELU(x) and the slope
bandwidth = 3.35e12  # bytes/s, an H100's memory bandwidth
print(f"hidden activation: {elements / 1e6:.1f} M floats = {array_bytes / 1e6:.0f} MB")
print(f"unfused ~{unfused_transfers} array transfers = {unfused_transfers * array_bytes / bandwidth * 1e3:.2f} ms per block at "
      f"3.35 TB/s; fused {fused_transfers} = {fused_transfers * array_bytes / bandwidth * 1e3:.2f} ms")
# x 12 blocks x (forward + backward), every step: elementwise layers are a real share of a GPU
# step once the matmuls run on tensor cores. The same holds on the CPU, where each NumPy pass
# also streams the array through memory. Measured here: the library's gelu_forward against one
# plain multiply of the same size (the least any elementwise layer can do).
x = np.random.default_rng(1).normal(size=4_000_000).astype(np.float32)
dy = np.ones_like(x)


plain_time = best_of(lambda: layers.gelu_forward(x))
one_pass = best_of(lambda: dy * x)
print(f"CPU, 4 M floats: gelu_forward {plain_time * 1e3:.1f} ms, a single multiply {one_pass * 1e3:.1f} ms "
      f"(x{plain_time / one_pass:.1f}): the price of separate passes (and of erf and exp)")


# %% [markdown]
# ## 4. On the GPU (only where one is present)

# %%
heading("4. On the GPU (only where one is present)")
if not has_gpu:
    print("No NVIDIA GPU with CuPy on this machine: the GPU comparison and the fused kernel are skipped.\n"
          "On a GPU machine: pip install \"cupy-cuda12x[ctk]\", then run this lesson again; everything above\n"
          "runs unchanged, and this section checks that the GPU gives the CPU's numbers.")
else:
    import cupy

    gpu_model = create_model("resmlp_tiny", dim=32, depth=2, patch_size=8, num_classes=10, device="gpu")
    gpu_model.load_state_dict(model.state_dict())  # the same weights on both devices
    logits_gpu = gpu_model.forward(images, train=True)  # NumPy input: the model moves it to the GPU
    loss_gpu, dlogits_gpu = layers.cross_entropy(logits_gpu, backend.to_device(labels, "gpu"))
    gpu_model.backward(dlogits_gpu)
    print(f"on {gpu_model.device}: xp = {gpu_model.xp.__name__}, logits {type(logits_gpu).__module__}.{type(logits_gpu).__name__}")
    logits_gap = np.abs(backend.to_numpy(logits_gpu) - logits_cpu).max() / np.abs(logits_cpu).max()
    grads_gap = np.abs(backend.to_numpy(gpu_model.parameters.grad) - grads_cpu).max() / np.abs(grads_cpu).max()
    print(f"GPU vs CPU, float32: logits differ by {logits_gap:.1e}, gradients by {grads_gap:.1e} (relative to the largest)")
    # float32 rounding differs between cuBLAS and OpenBLAS (and TF32 tensor cores, if enabled,
    # round more): equal to ~1e-5, not bit for bit.
    check(logits_gap < 1e-3 and grads_gap < 1e-3, "the same model gives the same logits and gradients on GPU and CPU")

    # The library's fused GELU forward (minimlp.fast.cuda_kernels, with fc1's bias): one kernel, the formula
    # per element. It sits beside the plain xp layers.bias_gelu_forward, the reference it is only trusted once it
    # matches; a model built on the GPU takes it (create_model(..., fast=True), the default: see
    # minimlp/ops.py), one built with fast=False keeps the reference.
    from minimlp.fast import cuda_kernels
    show_source(cuda_kernels.bias_gelu_forward)
    x_gpu = cupy.asarray(np.random.default_rng(2).normal(size=(196 * 128, 1536)).astype(np.float32))
    bias_gpu = cupy.asarray(np.random.default_rng(3).normal(size=1536).astype(np.float32))

    def gpu_time(function, repeats=20):
        function()
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        cupy.cuda.Device().synchronize()  # GPU work is asynchronous: wait before reading the clock
        return (time.perf_counter() - start) / repeats

    reference = layers.bias_gelu_forward(x_gpu, bias_gpu)
    plain_ms = gpu_time(lambda: layers.bias_gelu_forward(x_gpu, bias_gpu)) * 1e3
    fused = cuda_kernels.bias_gelu_forward(x_gpu, bias_gpu)
    fused_ms = gpu_time(lambda: cuda_kernels.bias_gelu_forward(x_gpu, bias_gpu)) * 1e3
    check(all(float(cupy.abs(ours - theirs).max()) < 1e-5 for ours, theirs in zip(fused, reference)),
          "the fused kernel's GELU and slope equal the library's plain xp bias_gelu_forward")
    print(f"GPU, {x_gpu.size / 1e6:.1f} M floats: plain xp bias_gelu_forward {plain_ms:.2f} ms, fused {fused_ms:.2f} ms")

check(backend.to_numpy(logits_cpu).shape == (8, 10) and np.isfinite(grads_cpu).all(),
      "the model ran forward and backward on this machine's default device")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Find every `np.` inside minimlp/layers.py. -> there is none: layers use get_xp(x) (or the
#    backend's erf), which is why they run on CuPy unchanged. Now look at minimlp/model.py: where
#    does it use np, and why is that fine? -> for host-side things: initialization drawn on the CPU
#    (the same numbers on every device), dtypes, drop-path masks drawn with a NumPy Generator.
# 2. Read minimlp/fast/cuda_kernels.py's bias_gelu_forward: which arrays does it read and write, and how many
#    passes over memory does the plain bias_gelu_forward in layers.py make? Hint: count the xp
#    operations in gelu_forward, plus the `x + bias`.
# 3. In section 3, count the bytes of ONE ResMLP-S12 training step that elementwise layers move
#    (Affine, LayerScale, GELU, residual adds), and compare with the 18 GFLOP of matmuls at ~500
#    TFLOP/s. -> elementwise work is memory-bound and can cost as much time as the matmuls.
# 4. Why does the model draw its initial weights with NumPy on the host even on a GPU? -> the same
#    seed then gives exactly the same model on CPU and GPU (section 4 relies on it via state_dict).

# %%
print("\nLesson 12 done: code written once against xp runs on NumPy and CuPy; fusion saves memory traffic.")
