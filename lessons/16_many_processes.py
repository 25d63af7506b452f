# %% [markdown]
# # Lesson 16: many processes. Data parallel training is "the gradient of a sum is the sum of the gradients"
#
# The loss of a batch is a mean over its images, so its gradient is the mean of the images' gradients.
# Split a batch of B images over K processes ("ranks"), let each compute the gradient of its B/K
# images with its own copy of the model, average the K gradients (an all-reduce), and every rank holds
# exactly the gradient of the whole batch: every rank then takes the same optimizer step and keeps the
# same weights. That is all of data parallelism; the rest is making the averaging cheap.
#
# 1. the identity, checked in one process with the library's model (float64)
# 2. the same through the library's data-parallel code, `mpiexec -n 2` (skipped, saying so, without MPI)
# 3. the ring all-reduce, from scratch: why each GPU moves 2 (K-1)/K of the gradients
# 4. what bucketing and overlap buy, in numbers: ResMLP-S12's 61 MB of gradients against its step
#
# Picture: lessons/out/16_overlap.png (when the buckets travel during backward).
#
# Run: python lessons/16_many_processes.py        (about 5 s on 2 cores, mpiexec included)

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import REPO_ROOT, check, heading, output_dir, show_figure, show_source

import subprocess
import sys
from pathlib import Path

import numpy as np

from minimlp import create_model, layers
from minimlp.parallel import distributed
from minimlp.parallel.allreduce import BucketedMean, bucket_ranges
from minimlp.parallel.launcher import environment_without_mpi, mpiexec
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.step import train_step
from minimlp.data.synthetic import SHAPES_CLASSES, draw_image
from minimlp.data.device_feed import normalize

RANK_FLAG = "--as-a-rank"  # section 2 starts this file again under mpiexec with this flag and a folder
THIS_FILE = REPO_ROOT / "lessons" / "16_many_processes.py"  # not __file__: a notebook has none
GLOBAL_BATCH, LR = 16, 1e-3


def small_model():
    """resmlp_tiny shrunk as in lesson 11 (16 patches, d = 64, 2 blocks), float64 for exact comparisons,
    with drop path on: its masks are random, and must be the same however the batch is split."""
    return create_model("resmlp_tiny", dim=64, depth=2, patch_size=8, drop_path=0.2, dtype="float64", seed=0)


def global_batch():
    labels = np.arange(GLOBAL_BATCH) % len(SHAPES_CLASSES)
    images = np.stack([draw_image(SHAPES_CLASSES[label], np.random.default_rng([16, index]))
                       for index, label in enumerate(labels)]).transpose(0, 3, 1, 2)
    return normalize(images, dtype="float64"), labels


def run_as_a_rank(folder):
    """One rank of `mpiexec -n K`: its share of the global batch (positions rank, rank + K, ..., as the
    loader shards an epoch), one train_step with sync=world, and what it ends with saved for the parent."""
    world = distributed.MPIWorld(bucket_bytes=64 * 1024)  # small buckets: several even for this model
    world.quiet_other_ranks()
    model = small_model()
    model.drop_path_shard = (world.rank, world.size)  # draw the global batch's masks, keep this rank's
    images, labels = global_batch()
    mine = slice(world.rank, None, world.size)
    optimizer = AdamW(model.parameters, model.ops, lr=LR, weight_decay=0.05)
    loss, finite = train_step(model, optimizer, images[mine], labels[mine], lr=LR, precision=policy("float32"),
                              smoothing=0.1, sync=world)
    losses_of_ranks = world.sum([float(loss)])
    description = world.describe("cpu")
    if world.is_writer:
        print(description)
        print(f"rank 0: {len(images[mine])} of {GLOBAL_BATCH} images; buckets {world.averaging[id(model.parameters)].buckets}")
    np.savez(Path(folder) / f"rank{world.rank}.npz", grad=model.parameters.grad, weights=model.parameters.data,
             loss=losses_of_ranks[0] / world.size, finite=finite)


if RANK_FLAG in sys.argv:
    run_as_a_rank(sys.argv[sys.argv.index(RANK_FLAG) + 1])
    sys.exit(0)


# %% [markdown]
# ## 1. The gradient of a sum is the sum of the gradients
#
# The batch loss is L = (1/B) sum_i l_i, so  dL/dw = (1/B) sum_i dl_i/dw.  Cut the B images into K
# parts of b_k images, with part losses L_k = (1/b_k) sum_{i in k} l_i:
#
#     dL/dw = sum_k (b_k / B) dL_k/dw        and with equal parts (b_k = B/K):  (1/K) sum_k dL_k/dw
#
# One condition hides in "l_i": each image's loss must not depend on the other images of the batch.
# ResMLP has no batch norm (Affine instead), so it holds; drop path's masks are random per image, and
# need care: every rank draws the masks of the whole global batch from the same generator and keeps its
# own images' (ResMLP.drop_path_shard), so image i gets the same mask however the batch is split.

# %%
heading("1. The gradient of a sum is the sum of the gradients")
show_source(create_model("resmlp_tiny", dim=8, depth=1, patch_size=8)._drop_path_masks)
images, labels = global_batch()


def gradient(model, part):
    logits = model.forward(images[part], train=True)
    loss, dlogits = layers.cross_entropy(logits, labels[part], smoothing=0.1)
    model.backward(dlogits)  # OVERWRITES model.parameters.grad
    return model.parameters.grad.copy()


whole = gradient(small_model(), slice(None))
ranks = 4
parts = []
for rank in range(ranks):  # K = 4 models, as 4 processes would hold them: each its own copy, same weights
    model = small_model()
    model.drop_path_shard = (rank, ranks)
    parts.append(gradient(model, slice(rank, None, ranks)))  # rank r takes images r, r + K, ...
averaged = np.mean(parts, axis=0)
difference = np.abs(averaged - whole).max() / np.abs(whole).max()
print(f"{GLOBAL_BATCH} images on 1 model vs 4 x {GLOBAL_BATCH // ranks} on 4 models, averaged: largest difference "
      f"{difference:.1e} of the largest gradient (float64 rounding); one part alone is off by "
      f"{np.abs(parts[0] - whole).max() / np.abs(whole).max():.2f}")
check(difference < 1e-12, "the mean of the 4 parts' gradients is the whole batch's gradient, drop path included")
# Unequal parts: the plain mean weighs the small part too much; the weights b_k / B fix it. (Drop path
# off here: with it on, each part would also have to be given its images' masks.)
plain = [create_model("resmlp_tiny", dim=64, depth=2, patch_size=8, dtype="float64", seed=0) for _ in range(3)]
whole_plain = gradient(plain[0], slice(None))
part_a, part_b = gradient(plain[1], slice(0, 12)), gradient(plain[2], slice(12, 16))
largest = np.abs(whole_plain).max()
check(np.abs((12 * part_a + 4 * part_b) / 16 - whole_plain).max() < 1e-12 * largest
      and np.abs((part_a + part_b) / 2 - whole_plain).max() > 1e-3 * largest,
      "parts of 12 and 4 images: the gradient is (12 g_a + 4 g_b) / 16, not (g_a + g_b) / 2")


# %% [markdown]
# ## 2. The same over 2 processes: mpiexec -n 2, through the library's data-parallel code
#
# train.py under mpiexec connects to an MPIWorld (minimlp.parallel.distributed) and passes it to the one
# training step as sync=world. Its backward runs the model's backward and averages the flat gradient
# buffer in buckets, each started as soon as backward reports that its part is final:

# %%
heading("2. The same over 2 processes: mpiexec -n 2, through the library's data-parallel code")
show_source(BucketedMean.backward)
show_source(BucketedMean.grads_ready)
# Here this file starts itself again under `mpiexec -n 2` (run_as_a_rank, at its top): each rank
# takes 8 of the 16 images, runs train_step(..., sync=world), and saves its gradient and weights.
launcher = mpiexec()
try:
    import mpi4py  # noqa: F401
except ImportError:
    mpi4py = None
if launcher is None or mpi4py is None:
    print(f"skipping section 2: {'no mpiexec found' if launcher is None else 'mpi4py is not installed'} "
          "(pip install -r requirements-mpi.txt brings MPICH and mpi4py); sections 1, 3 and 4 need no MPI")
else:
    folder = output_dir() / "16_ranks"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("rank*.npz"):
        old.unlink()
    command = [launcher, "-n", "2", sys.executable, str(THIS_FILE), RANK_FLAG, str(folder)]
    print(f"$ mpiexec -n 2 python {THIS_FILE.name} {RANK_FLAG} {folder}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment_without_mpi())
    print(result.stdout.rstrip())
    if result.returncode != 0:
        print(result.stderr[-3000:])
    check(result.returncode == 0 and len(list(folder.glob("rank*.npz"))) == 2, "mpiexec -n 2 ran both ranks to the end")
    ranks_saved = [np.load(folder / f"rank{rank}.npz") for rank in range(2)]
    model = small_model()  # one process, the whole batch, the same step
    optimizer = AdamW(model.parameters, model.ops, lr=LR, weight_decay=0.05)
    loss, _ = train_step(model, optimizer, images, labels, lr=LR, precision=policy("float32"),
                         smoothing=0.1)
    gradient_error = max(np.abs(saved["grad"] - model.parameters.grad).max() for saved in ranks_saved)
    weight_error = max(np.abs(saved["weights"] - model.parameters.data).max() for saved in ranks_saved)
    print(f"one process x 16 images vs 2 ranks x 8: loss {float(loss):.12f} vs {float(ranks_saved[0]['loss']):.12f}; "
          f"largest difference of the gradient {gradient_error:.1e}, of the weights after the step {weight_error:.1e}")
    check(abs(float(loss) - float(ranks_saved[0]["loss"])) < 1e-12 and gradient_error < 1e-12 * np.abs(model.parameters.grad).max(),
          "the ranks' mean loss and each rank's averaged gradient are the one-process ones of all 16 images (float64)")
    check((ranks_saved[0]["weights"] == ranks_saved[1]["weights"]).all() and weight_error < 1e-12,
          "both ranks took the same step: their weights are equal bit for bit, and equal to the one-process step's")


# %% [markdown]
# ## 3. The ring all-reduce, from scratch
#
# K ranks in a ring, each with a buffer of M values. Cut every buffer into K chunks.
#
#     reduce-scatter, K-1 steps: rank r sends one chunk to rank r+1, which adds it to its own copy;
#     afterwards rank r holds the complete sum of chunk r+1.
#     all-gather,    K-1 steps: the complete chunks travel on around the ring, each copied on arrival.
#
# Every step every rank sends one chunk (M/K values) and receives one, all links busy at once: each
# rank sends 2 (K-1) M/K values in all, almost 2M, however many ranks there are. That is why a ring
# (NCCL's algorithm for large buffers) scales: the time is 2 (K-1)/K x M / bandwidth, not K x M.

# %%
heading("3. The ring all-reduce, from scratch")


def ring_allreduce(buffers):
    """buffers: K arrays of equal length (one per rank) -> (the K results, values sent by each rank)."""
    count = len(buffers)
    chunks = [np.array_split(buffer.copy(), count) for buffer in buffers]
    sent = [0] * count
    for step in range(count - 1):  # reduce-scatter: at step s, rank r sends chunk (r - s) mod K
        messages = [(rank, (rank - step) % count, chunks[rank][(rank - step) % count].copy()) for rank in range(count)]
        for rank, chunk, values in messages:
            chunks[(rank + 1) % count][chunk] += values
            sent[rank] += values.size
    for step in range(count - 1):  # all-gather: at step s, rank r sends chunk (r + 1 - s) mod K, now complete
        messages = [(rank, (rank + 1 - step) % count, chunks[rank][(rank + 1 - step) % count].copy()) for rank in range(count)]
        for rank, chunk, values in messages:
            chunks[(rank + 1) % count][chunk][...] = values
            sent[rank] += values.size
    return [np.concatenate(parts) for parts in chunks], sent


rng = np.random.default_rng(3)
for count in (2, 4, 8):
    buffers = [rng.normal(size=840) for _ in range(count)]
    results, sent = ring_allreduce(buffers)
    print(f"K = {count}: each rank sent {sent[0]} values of M = 840 = 2 (K-1)/K M = {2 * (count - 1) * 840 // count}")
    check(all(np.allclose(result, np.sum(buffers, axis=0)) for result in results)
          and all(values == 2 * (count - 1) * 840 // count for values in sent),
          f"K = {count}: every rank ends with the sum, having sent 2 (K-1)/K of the buffer")


# %% [markdown]
# ## 4. What bucketing and overlap buy, in numbers (ResMLP-S12, on paper)
#
# The gradients of ResMLP-S12: 15.35 M float32 values, 61.4 MB. The library cuts the flat buffer into
# buckets of ~25 MiB (PyTorch DDP's size) at parameter boundaries, from its end (backward's order):

# %%
heading("4. What bucketing and overlap buy, in numbers (ResMLP-S12, on paper)")
show_source(bucket_ranges)
s12 = create_model("resmlp_s12")
gradient_bytes = s12.parameters.size * 4
buckets = bucket_ranges(s12.parameters)
print(f"ResMLP-S12: {s12.parameters.size:,} parameters = {gradient_bytes / 1e6:.1f} MB of float32 gradients; buckets "
      + ", ".join(f"{(stop - start) * 4 / 1e6:.1f} MB" for start, stop in buckets))
check(sum(stop - start for start, stop in buckets) == s12.parameters.size
      and all(buckets[i][0] == buckets[i + 1][1] for i in range(len(buckets) - 1)),
      "the buckets cover the gradient buffer exactly once, end to start")

# When does each bucket start? Run the library's BucketedMean on the real model's backward (one image,
# on this CPU) with a transport that only writes down which report of backward started which bucket.
class WritingDown:
    """A transport that moves nothing: it notes, at each bucket's start, how many reports backward made."""
    size = 1

    def __init__(self):
        self.reports, self.started_after = [], []

    def start(self, bucket):
        self.started_after.append((len(self.reports), bucket.size * 4))

    def progress(self):
        pass

    def finish(self):
        pass


transport = WritingDown()
averaging = BucketedMean(s12.parameters, transport)
report = averaging.grads_ready
averaging.grads_ready = lambda offset: (transport.reports.append(offset), report(offset))  # listen to backward
one_image = np.random.default_rng(4).normal(size=(1, 3, 224, 224)).astype(np.float32)
s12.forward(one_image, train=True)
averaging.backward(s12, np.full((1, 1000), 1e-3, np.float32))
print(f"backward made {len(transport.reports)} reports (norm+head, blocks 11..0, patch embedding, and the final one); "
      f"buckets started after reports {[after for after, _ in transport.started_after]}")
# Backward's time on paper: benchmarks/NOTES.md predicts 38 ms for a step of 256 images on an H100
# (fused, float32/TF32), backward about two thirds of it. Its parts take time in proportion to their
# multiply-adds: per block 2 x (N^2 d + 2 x 4 d^2 N) per image (two products per forward one), the
# patch embedding 768 d N (no image gradient), the head nothing to speak of.
STEP_MS, BACKWARD_MS = 38.0, 25.0
patches, dim = 196, 384
block_work, embed_work = 2 * (patches ** 2 * dim + 2 * 4 * dim ** 2 * patches), 768 * dim * patches
work_after_report = np.cumsum([0.0] + [block_work] * 12 + [embed_work, 0.0])  # report k: after the k-th part
report_ms = BACKWARD_MS * work_after_report / work_after_report[-1]
check(len(transport.reports) == len(report_ms), "one report per part of backward, as the timing on paper assumes")


def exposed_ms(sizes_and_ready, bandwidth, latency, ranks):
    """Ring all-reduces one after another on one link, each starting when its bucket is ready and the link is
    free: 2 (K-1) steps of latency + 2 (K-1)/K bytes / bandwidth. -> (ms after backward ends, the timeline)."""
    link_free, timeline = 0.0, []
    for ready, size in sizes_and_ready:
        start = max(ready, link_free)
        link_free = start + 2 * (ranks - 1) * latency * 1e3 + 2 * (ranks - 1) / ranks * size / bandwidth * 1e3
        timeline.append((start, link_free))
    return max(0.0, link_free - BACKWARD_MS), timeline


def plans(bucket_bytes):
    """(ms at which each bucket is ready, bytes) for buckets of bucket_bytes, from backward's reports."""
    ready = []
    for start, stop in bucket_ranges(s12.parameters, bucket_bytes):
        first_report = next(k for k, offset in enumerate(transport.reports) if offset <= start)
        ready.append((report_ms[first_report], (stop - start) * 4))
    return ready


links = [("NVLink 4, one 8-GPU node", 350e9, 1e-6, 8), ("400 Gb/s network, 16 GPUs on 2 nodes", 40e9, 5e-6, 16),
         ("100 Gb/s Ethernet, 8 nodes", 10e9, 10e-6, 8), ("25 Gb/s Ethernet, 8 nodes", 2.5e9, 20e-6, 8)]
layouts = [("one all-reduce after backward", [(BACKWARD_MS, gradient_bytes)]), ("25 MiB buckets, overlapped", plans(25 * 2 ** 20)),
           ("one per tensor, overlapped", plans(1))]
print(f"step {STEP_MS:.0f} ms (backward {BACKWARD_MS:.0f} ms); ms the all-reduce adds to the step (assumed bandwidth; "
      f"latency per ring step):")
print(f"  {'link':38s} {'K':>3s} " + " ".join(f"{name:>30s}" for name, _ in layouts))
results = {}
for name, bandwidth, latency, ranks in links:
    results[name] = [exposed_ms(layout, bandwidth, latency, ranks) for _, layout in layouts]
    print(f"  {name:38s} {ranks:3d} " + " ".join(f"{extra:11.2f} ms = {extra / STEP_MS:5.1%} of a step" for extra, _ in results[name]))
nvlink, network, ethernet, slow = (results[name] for name, *_ in links)
check(all(bucketed[0] <= whole[0] for whole, bucketed, _ in results.values()),
      "25 MiB buckets never add more to the step than one all-reduce after backward")
check(nvlink[1][0] / STEP_MS < 0.005 and network[1][0] / STEP_MS < 0.02,
      "the bucketed all-reduce adds under 0.5% to the step over NVLink, under 2% over a 400 Gb/s network")
tensors = len(bucket_ranges(s12.parameters, 1))
check(network[2][0] > 2 * network[1][0], f"one all-reduce per tensor ({tensors} of them) pays {tensors} latencies: "
      "over a network, worse than buckets")
# What it means: with overlap only the last bucket (block 0 and the patch embedding, ~6 MB) waits for
# backward to end; the rest travels while backward computes. Buckets must be large enough that the
# latency of each all-reduce is small against its transfer, and few enough that the first starts early.
# Over slow links no layout hides 61 MB: then larger per-GPU batches (a longer backward), fewer bytes
# (bfloat16 gradients: half), or gradient accumulation over several batches before each all-reduce.

import matplotlib.pyplot as plt  # noqa: E402

figure, axes = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True)
for axis, (name, *_), (whole, bucketed, _) in zip(axes, links[1:3], [network, ethernet]):
    axis.broken_barh([(start, end - start) for start, end in zip(report_ms[:-1], report_ms[1:]) if end > start],
                     (2, 0.8), facecolors=["tab:blue", "tab:cyan"] * 8)
    axis.broken_barh([(start, end - start) for start, end in bucketed[1]], (1, 0.8), facecolors="tab:green", edgecolors="white")
    axis.broken_barh([(start, end - start) for start, end in whole[1]], (0, 0.8), facecolors="tab:red")
    axis.axvline(BACKWARD_MS, color="black", lw=0.8, ls="--")
    axis.set_yticks([0.4, 1.4, 2.4], [f"one all-reduce (+{whole[0]:.1f} ms)", f"25 MiB buckets (+{bucketed[0]:.1f} ms)",
                                      "backward: blocks 11..0, embed"], fontsize=8)
    axis.set_title(name, fontsize=9)
axes[-1].set_xlabel("ms since backward started (ResMLP-S12, 256 images per GPU, on paper)")
show_figure(figure, "16_overlap.png")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. In section 1, give every part's model the drop path generator of a fresh model but leave
#    drop_path_shard at (0, 1). Does the average still match? -> no: each part would draw masks for
#    its own 4 images from the start of the generator, not its images' masks of the global batch.
# 2. Batch norm would break section 1's identity. Why? -> its mean and variance are taken over the
#    batch: an image's loss depends on the other images, so the split changes the function.
# 3. With K = 8 ranks of 256 images the global batch is 2048: why does DeiT scale the learning rate
#    with it (lr = 5e-4 x batch / 512)? -> the averaged gradient has less noise; larger steps are safe.
# 4. How long is the all-reduce over 400 Gb/s for resmlp_b24 (116 M parameters)? -> 464 MB: 2 x 15/16
#    x 464 MB / 40 GB/s = 22 ms, against a step several times longer: still mostly hidden.
# 5. Run `mpiexec -n 2 python train.py --device cpu` (the demo on 2 ranks): what is the global batch?
#    -> 2 x --batch-size; the log says so at the start.

# %%
print("\nLesson 16 done: K ranks' mean gradient is the whole batch's; a ring moves ~2M per rank; buckets hide it behind backward.")
