"""uint8 host batches -> normalized float batches on the model's device, the copy hidden behind compute.
This is the device side of the pixels: ImageNet's channel statistics (timm's IMAGENET_DEFAULT_MEAN/STD) and
normalize live here; the Pillow side (minimlp.data.transforms) never normalizes.

    feed = DeviceFeed(model.device, model.dtype)
    for x, y in feed.batches(loader.epoch(epoch)):    # x (B, 3, H, W) normalized, y (B,), on the device
        ...

On the CPU this is a pass-through: normalize, nothing to copy.

On the GPU, double buffering. Batches cross as uint8 (4x fewer bytes than float32) and are normalized
on the GPU. A copy from ordinary (pageable) host memory makes the host wait and cannot overlap
anything, so each batch is first written into page-locked ("pinned") host memory, from which the GPU
copies by DMA on its own stream while the previous step computes. Two slots, used in turn, each a
pinned host buffer and a device buffer, guarded by two CUDA events:
    copied    recorded on the copy stream after the copy: the compute stream waits for it before
              reading the device buffer, and the host before writing the pinned buffer again;
    consumed  recorded on the compute stream once the batch has been normalized (a new array), and
              once right after the slot's device buffers are allocated: the copy stream waits for it
              before writing the device buffer.
The allocation needs its event too. The device buffers come from CuPy's memory pool on the compute
stream, which hands out a block as soon as compute work freed it, even while kernels queued before
still read it: ordered on the compute stream, that is safe; written by the copy stream, it is not.
The batch of step k+1 is therefore already on its way when step k is handed to the GPU.
"""
import numpy as np

from ..backend import get_xp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(batch, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="float32"):
    """uint8 (B, 3, H, W) numpy or cupy -> (batch / 255 - mean) / std in `dtype`, same device.

    Batches travel to the device as uint8 (4x fewer bytes than float32) and are normalized there.
    Written as one multiply-add: x * (1 / (255 std)) + (-mean / std).
    """
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"normalize expects a uint8 batch of shape (B, 3, H, W), got {batch.dtype} {batch.shape}")
    xp = get_xp(batch)
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    multiplier = xp.asarray(1 / (255 * std), dtype=dtype).reshape(1, 3, 1, 1)
    offset = xp.asarray(-mean / std, dtype=dtype).reshape(1, 3, 1, 1)
    return batch.astype(dtype) * multiplier + offset


class DeviceFeed:
    def __init__(self, device, dtype):
        self.device, self.dtype = device, np.dtype(dtype)
        self.slots = [None, None]
        self.turn = 0
        self.copy_stream = None

    def batches(self, host_batches):
        """Yield (images normalized in self.dtype, labels) on the device for each (uint8 images (B, 3, H, W),
        int64 labels (B,)) of host_batches, in order."""
        if self.device == "cpu":
            for images, labels in host_batches:
                yield normalize(images, dtype=self.dtype), labels
            return
        staged = None
        for images, labels in host_batches:
            upcoming = self._stage(images, labels)  # starts copying while `staged` is still to be computed
            if staged is not None:
                yield self._receive(*staged)
            staged = upcoming
        if staged is not None:
            yield self._receive(*staged)

    def _stage(self, images, labels):
        """Start the asynchronous copy of one host batch into the next slot; returns (slot, batch size)."""
        import cupy
        if self.copy_stream is None:
            self.copy_stream = cupy.cuda.Stream(non_blocking=True)
        slot = self._slot_for(images, labels)
        batch = len(labels)
        slot.copied.synchronize()  # the pinned buffer's previous batch has left for the GPU
        np.copyto(slot.host_images[:batch], images)
        np.copyto(slot.host_labels[:batch], labels)
        self.copy_stream.wait_event(slot.consumed)  # the device buffer's previous batch has been normalized
        slot.device_images[:batch].set(slot.host_images[:batch], stream=self.copy_stream)
        slot.device_labels[:batch].set(slot.host_labels[:batch], stream=self.copy_stream)
        slot.copied.record(self.copy_stream)
        return slot, batch

    def _receive(self, slot, batch):
        """Normalize a staged batch on the compute (current) stream, once its copy has landed."""
        import cupy
        compute = cupy.cuda.get_current_stream()
        compute.wait_event(slot.copied)
        images = normalize(slot.device_images[:batch], dtype=self.dtype)
        labels = slot.device_labels[:batch].copy()  # its own array: the slot is free once these two have run
        slot.consumed.record(compute)
        return images, labels

    def _slot_for(self, images, labels):
        """The next slot, (re)allocated when this batch does not fit it (first use, larger batch, other size)."""
        index, self.turn = self.turn, 1 - self.turn
        slot = self.slots[index]
        if slot is None or images.shape[1:] != slot.host_images.shape[1:] or len(images) > len(slot.host_images):
            if slot is not None:  # nothing may still be reading or writing the buffers being dropped
                slot.copied.synchronize()
                slot.consumed.synchronize()
            slot = self.slots[index] = Slot(images.shape, labels.dtype)
        return slot


class Slot:
    """One batch's pinned host buffers, device buffers and the two events guarding them."""

    def __init__(self, images_shape, labels_dtype):
        import cupy
        self.host_images = pinned_empty(images_shape, np.uint8)
        self.host_labels = pinned_empty(images_shape[:1], labels_dtype)
        self.device_images = cupy.empty(images_shape, dtype=np.uint8)  # from the compute (current) stream's pool
        self.device_labels = cupy.empty(images_shape[:1], dtype=labels_dtype)
        self.copied, self.consumed = cupy.cuda.Event(), cupy.cuda.Event()
        # The first copy into the new buffers waits for the compute work queued before their allocation (it may
        # still use this memory); `copied`, never recorded, counts as complete: the first host write waits for nothing.
        self.consumed.record(cupy.cuda.get_current_stream())


def pinned_empty(shape, dtype):
    """A NumPy array in page-locked host memory (CuPy's pinned pool), which the GPU can copy from by DMA."""
    import cupy
    count = int(np.prod(shape))
    memory = cupy.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
    return np.frombuffer(memory, dtype, count).reshape(shape)
