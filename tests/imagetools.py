"""Tiny image files and folders for tests: real files in every Pillow mode, never constant images."""
from pathlib import Path

import numpy as np
from PIL import Image

from minimlp.data.transforms import to_chw, to_rgb

# The file format each mode is saved in by default (JPEG cannot hold alpha, palettes or 16 bits).
DEFAULT_EXTENSION = {"RGB": ".jpg", "L": ".jpg", "CMYK": ".jpg", "P": ".png", "RGBA": ".png",
                     "LA": ".png", "I;16": ".png", "1": ".png"}


def smooth_rgb(size, seed=0):
    """uint8 (height, width, 3) image of random smooth colour gradients plus mild noise.

    size = (width, height), as Pillow counts. Varied enough that a wrong crop, flip or channel
    order changes it, smooth enough that resampling methods agree closely.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    image = np.stack(channels, axis=-1) + rng.normal(0, 0.01, (height, width, 3))
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_image(size, mode="RGB", seed=0):
    """A PIL image of `mode` and size (width, height) with smooth non-constant content."""
    rgb = Image.fromarray(smooth_rgb(size, seed))
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return Image.fromarray(gray)  # uint16 -> mode I;16
    if mode in ("RGBA", "LA"):
        alpha = np.linspace(64, 255, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint8)
        image = rgb.convert(mode[:-1])
        image.putalpha(Image.fromarray(alpha))
        return image
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


def save_image(path, size=(40, 30), mode="RGB", seed=0, quality=95):
    """Write an image of `mode` to `path` (format from the extension, JPEG/WebP at `quality`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(size, mode, seed).save(path, quality=quality)  # formats without quality ignore it
    return path


def make_image_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30), modes=("RGB",),
                      splits=("train", "val")):
    """root/<split>/<class>/img<i><ext> for each split and class; returns Path(root).

    Image i of a class has mode modes[i % len(modes)], saved in that mode's default format
    (DEFAULT_EXTENSION) and with a seed unique to (split, class, i).
    """
    root = Path(root)
    for split_index, split in enumerate(splits):
        for class_index, name in enumerate(classes):
            for index in range(per_class):
                mode = modes[index % len(modes)]
                seed = (split_index * 1000 + class_index) * 1000 + index
                save_image(root / split / name / f"img{index}{DEFAULT_EXTENSION[mode]}", size, mode, seed)
    return root


def load_rgb(path):
    """The whole image at `path` as uint8 (3, H, W), no resizing: what the loader decodes, before its crop."""
    with Image.open(path) as image:
        return to_chw(to_rgb(image))
