"""shapes10: the built-in dataset that `python train.py` uses when no --data is given.

Ten classes of procedurally drawn 32x32 images, written once as PNG files in the ImageFolder layout
(train/<class>/*.png, val/<class>/*.png) into a cache folder ($XDG_CACHE_HOME/minimlp, by default
~/.cache/minimlp). Every image has its own random generator seeded by (seed, split, class, index), so
the dataset is the same on every machine.

Each image: a two-colour gradient background with pixel noise, one to three distractors (thin
segments, small blobs) and one object of the class, of a colour that contrasts with the background:
    shapes (random size, position, rotation):  circle, ring, square, triangle, cross
    textures inside a round or square patch:   horizontal_stripes, vertical_stripes,
                                               diagonal_stripes, checkerboard, dots
Telling a ring from a circle, a square from a checkerboard or stripe orientations apart needs
spatial structure, not colour statistics.

Drawing is plain numpy: each shape is a boolean mask of point coordinates, evaluated on a 4x finer
grid and averaged down, which antialiases the edges.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..training.progress import Progress, write

SHAPES_CLASSES = ("checkerboard", "circle", "cross", "diagonal_stripes", "dots",
                  "horizontal_stripes", "ring", "square", "triangle", "vertical_stripes")
IMAGE_SIZE = 32
SUPERSAMPLE = 4
TRAIN_PER_CLASS = 500
VAL_PER_CLASS = 100
SPLITS = ("train", "val")


def cache_root():
    """$XDG_CACHE_HOME/minimlp, or ~/.cache/minimlp."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minimlp"


def ensure_shapes_dataset(root=None, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0):
    """The shapes10 dataset folder inside `root` (default cache_root()), generated if absent.

    Generation writes into a temporary folder beside it and renames it when complete, so an
    interrupted run leaves no folder that could be mistaken for a finished dataset. It says so on
    stdout and shows its progress (minimlp.training.progress) on stderr.
    """
    root = Path(root) if root is not None else cache_root()
    folder = root / f"shapes10-{IMAGE_SIZE}px-{train_per_class}x{val_per_class}-seed{seed}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.partial-"))
    images = len(SHAPES_CLASSES) * (train_per_class + val_per_class)
    write(f"generating the shapes10 dataset once: {images} PNG files into {folder}", sys.stdout)
    try:
        with Progress(images, "shapes10", unit="image") as progress:  # ~12 s on 2 cores for the default 6000
            generate_shapes_dataset(partial, train_per_class, val_per_class, seed, progress)
        os.rename(partial, folder)
    except OSError:
        if not folder.is_dir():  # a concurrent run that finished first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def generate_shapes_dataset(folder, train_per_class, val_per_class, seed=0, progress=None):
    """Write folder/{train,val}/<class>/<class>_<index>.png; progress: a minimlp.training.progress.Progress
    counted one step per image, or None."""
    counts = {"train": train_per_class, "val": val_per_class}
    for split_index, split in enumerate(SPLITS):
        for class_index, name in enumerate(SHAPES_CLASSES):
            class_dir = Path(folder) / split / name
            class_dir.mkdir(parents=True)
            for index in range(counts[split]):
                image = draw_image(name, image_generator(seed, split_index, class_index, index))
                Image.fromarray(image).save(class_dir / f"{name}_{index:04d}.png")
                if progress is not None:
                    progress.update(1)


def draw_split(split_index, per_class, seed=0):
    """A split in memory (0 train, 1 val), the images generate_shapes_dataset would write for the same seed:
    uint8 images (B, 3, IMAGE_SIZE, IMAGE_SIZE) and labels (B,), class by class."""
    images, labels = [], []
    for class_index, name in enumerate(SHAPES_CLASSES):
        for index in range(per_class):
            images.append(draw_image(name, image_generator(seed, split_index, class_index, index)))
            labels.append(class_index)
    return np.stack(images).transpose(0, 3, 1, 2), np.array(labels)


def image_generator(seed, split_index, class_index, index):
    """Each image's own generator: the same images on every machine, and val images never seen in training."""
    return np.random.default_rng([seed, split_index, class_index, index])


# ---------------------------------------------------------------- one image

def draw_image(class_name, rng):
    """uint8 (IMAGE_SIZE, IMAGE_SIZE, 3) image of class `class_name`."""
    x, y = pixel_grid()
    background_color = random_color(rng)
    canvas = gradient_background(x, y, background_color, rng)
    for _ in range(rng.integers(1, 4)):
        paint(canvas, distractor_mask(x, y, rng), random_color(rng))
    paint(canvas, OBJECT_DRAWERS[class_name](x, y, rng), contrasting_color(background_color, rng))
    image = downsample(canvas) + rng.normal(0, 0.03, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def pixel_grid():
    """x, y coordinates in output pixels of the points of the fine grid, each (4*32, 4*32)."""
    centers = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(centers, centers, indexing="ij")
    return x, y


def downsample(canvas):
    """(32*4, 32*4, 3) -> (32, 32, 3) by averaging each 4x4 block."""
    return canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))


def paint(canvas, mask, color):
    canvas[mask] = color


def random_color(rng):
    return rng.uniform(0, 1, 3)


def contrasting_color(background_color, rng):
    """A random colour whose brightness differs from the background's by at least 0.35."""
    while True:
        color = random_color(rng)
        if abs(color.mean() - background_color.mean()) >= 0.35:
            return color


def gradient_background(x, y, color, rng):
    """(n, n, 3) linear gradient from `color` to a nearby colour along a random direction."""
    other_color = np.clip(color + rng.normal(0, 0.15, 3), 0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    along = (x * np.cos(angle) + y * np.sin(angle)) / (IMAGE_SIZE * np.sqrt(2)) + 0.5
    weight = np.clip(along, 0, 1)[..., None]
    return (1 - weight) * color + weight * other_color


def rotated(x, y, center, angle):
    """Coordinates (u, v) of the points relative to `center`, in axes rotated by `angle` radians."""
    dx, dy = x - center[0], y - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def random_center(rng, margin):
    return rng.uniform(margin, IMAGE_SIZE - margin, 2)


# ---------------------------------------------------------------- the five shapes

def shape_frame(x, y, rng):
    """(u, v, radius) for a shape of random radius, position and rotation."""
    radius = rng.uniform(7, 13)
    u, v = rotated(x, y, random_center(rng, 0.8 * radius), rng.uniform(0, 2 * np.pi))
    return u, v, radius


def circle(x, y, rng):
    u, v, radius = shape_frame(x, y, rng)
    return u ** 2 + v ** 2 < radius ** 2


def ring(x, y, rng):
    u, v, radius = shape_frame(x, y, rng)
    distance_squared = u ** 2 + v ** 2
    return ((0.55 * radius) ** 2 < distance_squared) & (distance_squared < radius ** 2)


def square(x, y, rng):
    u, v, radius = shape_frame(x, y, rng)
    return np.maximum(np.abs(u), np.abs(v)) < 0.8 * radius


def triangle(x, y, rng):
    """Equilateral: inside all three edges, each at the inradius (radius / 2) from the center."""
    u, v, radius = shape_frame(x, y, rng)
    inside = np.ones_like(u, dtype=bool)
    for edge_angle in np.pi / 2 + np.arange(3) * 2 * np.pi / 3:
        inside &= u * np.cos(edge_angle) + v * np.sin(edge_angle) < radius / 2
    return inside


def cross(x, y, rng):
    u, v, radius = shape_frame(x, y, rng)
    half_width = 0.25 * radius
    return (((np.abs(u) < half_width) & (np.abs(v) < radius))
            | ((np.abs(v) < half_width) & (np.abs(u) < radius)))


# ---------------------------------------------------------------- the five textures

def texture_patch(x, y, rng):
    """Mask of a round or square patch of random size and position, where a texture is drawn."""
    radius = rng.uniform(9, 14)
    u, v = rotated(x, y, random_center(rng, 0.7 * radius), rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:
        return u ** 2 + v ** 2 < radius ** 2
    return np.maximum(np.abs(u), np.abs(v)) < 0.85 * radius


def stripes(x, y, rng, angle):
    """Stripes running along `angle` (radians, jittered by up to 10 degrees) inside a patch."""
    patch = texture_patch(x, y, rng)
    period = rng.uniform(3.5, 5.0)
    angle += rng.uniform(-1, 1) * np.radians(10)
    _, across = rotated(x, y, (0.0, 0.0), angle)
    return patch & ((across + rng.uniform(0, period)) % period < period / 2)


def horizontal_stripes(x, y, rng):
    return stripes(x, y, rng, 0.0)


def vertical_stripes(x, y, rng):
    return stripes(x, y, rng, np.pi / 2)


def diagonal_stripes(x, y, rng):
    return stripes(x, y, rng, np.pi / 4 if rng.random() < 0.5 else -np.pi / 4)


def checkerboard(x, y, rng):
    patch = texture_patch(x, y, rng)
    cell = rng.uniform(3.5, 5.0)
    u, v = rotated(x, y, rng.uniform(0, cell, 2), rng.uniform(0, np.pi / 2))
    return patch & ((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0)


def dots(x, y, rng):
    patch = texture_patch(x, y, rng)
    spacing = rng.uniform(4.5, 6.0)
    u, v = rotated(x, y, rng.uniform(0, spacing, 2), rng.uniform(0, np.pi / 2))
    offset_u, offset_v = u % spacing - spacing / 2, v % spacing - spacing / 2
    return patch & (offset_u ** 2 + offset_v ** 2 < (0.27 * spacing) ** 2)


OBJECT_DRAWERS = {"circle": circle, "ring": ring, "square": square, "triangle": triangle, "cross": cross,
                  "horizontal_stripes": horizontal_stripes, "vertical_stripes": vertical_stripes,
                  "diagonal_stripes": diagonal_stripes, "checkerboard": checkerboard, "dots": dots}


# ---------------------------------------------------------------- clutter

def distractor_mask(x, y, rng):
    """A thin segment (3-8 px long, 1 px wide) or a small blob (radius 1-1.8 px) anywhere."""
    start = random_center(rng, 0)
    if rng.random() < 0.5:
        return (x - start[0]) ** 2 + (y - start[1]) ** 2 < rng.uniform(1.0, 1.8) ** 2
    length = rng.uniform(3, 8)
    along, across = rotated(x, y, start, rng.uniform(0, 2 * np.pi))
    return (np.abs(across) < 0.5) & (along > 0) & (along < length)
