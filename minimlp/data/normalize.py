"""The device side of the pixels: ImageNet's channel statistics (timm's IMAGENET_DEFAULT_MEAN/STD) and
normalize, which turns the uint8 batches the loader sends into the float batches the model takes, on the
device they were copied to (minimlp.data.device_feed). The Pillow side (minimlp.data.transforms) never
normalizes; only RandAugment's fill borrows the mean.
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
