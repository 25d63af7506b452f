"""What a run will cost, said before it costs it: its peak memory (from the model's shapes and the batch, before
anything is allocated) and its duration (from the speed of its first steps).

Peak memory, in float32 values (u = patches x dim, per image):
- activations kept for backward, per block 14u: the block's input, norm1's output, the token mixing's output,
  the middle sum, norm2's output (1u each), GELU's output and its slope (4u each), fc2's output (1u);
  plus the patch embedding's image and patches (2 x 3 x H x W) and the final norm (2u). At the start of
  backward they are all alive, with one block's gradients (8u: two of 4u) beside them;
- the parameters, their gradients and the optimizer's two moments (4 per parameter), its temporaries (2, LAMB 3)
  and the EMA's copy (1);
- the loader's buffers: the uint8 batches in flight (2 per worker, at least 1) and the device feed's float32
  batches (2);
- on the CPU, the process itself: the interpreter, NumPy, Pillow and the compiled Numba kernels
  (PROCESS_BYTES, measured), and a share for each loader worker (WORKER_BYTES); on the GPU, CuPy's context and
  cuBLAS's workspace (GPU_CONTEXT_BYTES).
tests/test_settings.py checks the estimate against the peak resident memory of a real run.
"""
import math
import os
import sys
import time

from ..model import PRESETS
from .progress import write

FLOAT_BYTES = 4
ACTIVATIONS_PER_BLOCK, BACKWARD_TRANSIENT = 14, 8  # in units of patches x dim, per image
PROCESS_BYTES = 260e6  # measured on the CPU: imports (~160 MB) and the Numba kernels' compilation (~100 MB)
WORKER_BYTES = 80e6  # a forked loader worker's own pages (decoding, its batch being built)
GPU_CONTEXT_BYTES = 0.4e9
TIMED_STEPS = 5  # steps timed, after the first (which compiles kernels and fills caches), for the time estimate


def model_shape(args, num_classes):
    config = {**PRESETS[args.model], **{key: value for key, value in dict(img_size=args.img_size,
                                                                          patch_size=args.patch_size).items()
                                         if value is not None}}
    patches = (config["img_size"] // config["patch_size"]) ** 2
    dim, depth, patch = config["dim"], config["depth"], config["patch_size"]
    parameters = (3 * patch * patch * dim + dim                                   # patch embedding
                  + depth * (patches * patches + patches + 8 * dim * dim + 5 * dim + 6 * dim)  # blocks
                  + 2 * dim + dim * num_classes + num_classes)                    # final norm, head
    return dict(patches=patches, dim=dim, depth=depth, img_size=config["img_size"], parameters=parameters)


def peak_memory(args, num_classes, device, batch_size=None):
    """{part: bytes} of the estimated peak (module docstring), for --batch-size (or batch_size)."""
    shape = model_shape(args, num_classes)
    batch = batch_size or args.batch_size
    unit = shape["patches"] * shape["dim"]
    pixels = 3 * shape["img_size"] ** 2
    per_image = (shape["depth"] * ACTIVATIONS_PER_BLOCK + 2 + BACKWARD_TRANSIENT) * unit + 2 * pixels
    optimizer_copies = 4 + (3 if args.opt == "lamb" else 2) + (1 if args.model_ema else 0)
    workers = args.workers or 0
    in_flight = max(1, 2 * workers)
    parts = dict(activations=batch * per_image * FLOAT_BYTES,
                 parameters=shape["parameters"] * optimizer_copies * FLOAT_BYTES,
                 loader=batch * pixels * (in_flight + 2 * FLOAT_BYTES))
    if device == "gpu":
        parts["context"] = GPU_CONTEXT_BYTES
    else:
        parts["process"] = PROCESS_BYTES + workers * WORKER_BYTES
    return parts


def device_memory_bytes(device):
    """Memory a run can have: the GPU's free memory, or the machine's available memory (MemAvailable)."""
    if device == "gpu":
        from .. import backend
        return backend.get_module("gpu").cuda.runtime.memGetInfo()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_fitting_batch(args, num_classes, device, memory, upto):
    """The largest batch, at most `upto` (halving from it), whose estimated peak fits `memory` (1 at least)."""
    batch = upto
    while batch > 1 and sum(peak_memory(args, num_classes, device, batch).values()) > memory:
        batch //= 2
    return batch


def memory_line(args, num_classes, device, memory):
    """The estimate, as printed before training; a ValueError (one line) when it does not fit `memory`."""
    parts = peak_memory(args, num_classes, device)
    total = sum(parts.values())
    where = "GPU" if device == "gpu" else "machine"
    if total > memory:
        fitting = largest_fitting_batch(args, num_classes, device, memory, args.batch_size)
        raise ValueError(f"--batch-size {args.batch_size} needs about {total / 1e9:.1f} GB at its peak, more than "
                         f"the {memory / 1e9:.1f} GB the {where} has free: give --batch-size {fitting} (estimated "
                         f"{sum(peak_memory(args, num_classes, device, fitting).values()) / 1e9:.1f} GB)")
    shown = ", ".join(f"{name} {value / 1e9:.2f}" for name, value in parts.items())
    return f"estimated peak memory: {total / 1e9:.2f} GB ({shown}) of the {where}'s {memory / 1e9:.1f} GB free"


class RunTimeEstimate:
    """Says once, after the first steps, how long the rest of the run will take. after_step(step) is the epoch
    loop's hook, called after every training step with the run's global step count. On the GPU it waits for the
    device at the two ends of the timed steps (the GPU runs ahead of the host), so that the steps timed are
    steps done. val_images and batch_size: this process's (data parallel: each rank's share)."""

    def __init__(self, total_steps, steps_per_epoch, val_images, batch_size, device):
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.val_images, self.batch_size, self.device = val_images, batch_size, device
        self.first = self.started = None
        self.said = False

    def synchronize(self):
        if self.device == "gpu":
            from .. import backend
            backend.get_module("gpu").cuda.runtime.deviceSynchronize()

    def after_step(self, step):
        if self.said:
            return
        if self.started is None:  # the first step compiles kernels and fills caches: time from its end
            self.synchronize()
            self.first, self.started = step, time.perf_counter()
            return
        if step - self.first < min(TIMED_STEPS, max(1, self.steps_per_epoch - 1)) and step < self.total_steps:
            return
        self.synchronize()
        per_step = (time.perf_counter() - self.started) / (step - self.first)
        write(self.line(per_step, step), sys.stdout)
        self.said = True

    def line(self, per_step, step):
        images_per_s = self.batch_size / per_step
        evaluation = self.val_images / (3 * images_per_s)  # a forward costs about a third of a training step
        epochs_left = (self.total_steps - step) / self.steps_per_epoch
        whole = (self.total_steps - step) * per_step + evaluation * math.ceil(epochs_left)
        return (f"estimated time: {duration(self.steps_per_epoch * per_step + evaluation)} per epoch, "
                f"{duration(whole)} for the rest of the run ({epochs_left:.1f} epochs; from the speed of steps "
                f"{self.first + 1}-{step}: {images_per_s:.0f} img/s)")


def duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
