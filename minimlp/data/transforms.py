"""Image file -> uint8 array (3, H, W), on the host (the device normalizes: minimlp.data.device_feed).

Decoding goes through Pillow, from any mode (RGB, L, CMYK, P, RGBA, LA, I;16, ...) to RGB. For
training, large JPEGs are decoded at a reduced size (Pillow's draft mode: libjpeg scales by 1/2, 1/4
or 1/8 while decoding, much cheaper than a full decode) whenever the region we need stays at least
the output size; the crop box is always chosen on the original size first, so draft mode changes
speed, not which part of the image is seen. Evaluation decodes in full by default, so that it equals
timm's transform (within 1 level) on images of any size: on large JPEGs (2048x1536) draft mode moves
many pixels by several levels, which changes measured accuracy.

Training (and draft-mode evaluation) crops a box of the source, then resizes the crop to the output
(decode_region): torchvision's resized_crop step for step, so a train crop's pixels are its
RandomResizedCrop's. (Pillow's `resize(..., box=...)` would skip the copy, but its filter reads the
pixels around the box: a ring of up to 4 px differs, by up to 65 levels on noise.)

    train_transform: RandomResizedCrop (torchvision's algorithm) with the training interpolation
                     (bilinear, bicubic, or 'random': either, per image, as timm), horizontal flip with
                     probability hflip, then RandAugment (minimlp.data.randaugment) if given.
    eval_transform:  resize the shorter side to int(img_size / crop_pct), bicubic; center crop img_size
                     (decoded and resized whole, then cropped, unless draft=True).

All randomness comes from the numpy Generator passed in, so a sample's augmentation is reproducible.
"""
import math

import numpy as np
from PIL import Image

TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")  # DeiT's --train-interpolation (default bicubic)
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# ---------------------------------------------------------------- decoding

def to_rgb(image):
    """A decoded PIL image of any mode -> RGB. 16-bit images keep their top 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image), 0, 65535) >> 8
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # as Pillow asks, avoids its warning about palette transparency
    return image.convert("RGB")


def to_chw(image):
    """RGB PIL image -> uint8 array (3, H, W)."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def decode_region(image, box, out_size, resample, draft=True):
    """Decode the region `box` = (left, top, right, bottom) of an opened, not yet loaded image: cropped,
    then resized to out_size = (width, height), as an RGB PIL image (torchvision's resized_crop: the filter
    sees the crop's pixels only, its edges repeated).

    draft: for a JPEG, ask draft mode for the smallest scale at which the box still covers out_size
    pixels, then map the box into the reduced image. Without it, the whole image is decoded. A box that
    does not fall on whole pixels (mapped, or eval_crop_box's) is rounded to them, as Pillow's crop does.
    """
    left, top, right, bottom = box
    needed_scale = max(out_size[0] / (right - left), out_size[1] / (bottom - top))
    if draft and needed_scale < 1:
        requested = (math.ceil(image.width * needed_scale), math.ceil(image.height * needed_scale))
        original_width = image.width
        drafted = image.draft("RGB", requested)  # None for formats without draft mode
        if drafted is not None:
            shrink = drafted[1][2] / original_width  # 1, 1/2, 1/4 or 1/8
            box = tuple(coordinate * shrink for coordinate in box)
    return to_rgb(image.crop(tuple(round(coordinate) for coordinate in box))).resize(out_size, resample)


# ---------------------------------------------------------------- training transform

def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box on a width x height image -> (left, top, crop_w, crop_h).

    Up to 10 tries of area ~ U(scale) * image area and log aspect ratio ~ U(log ratio); if none fits,
    the largest centered crop whose aspect ratio is clamped into `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def train_resampling(interpolation, rng):
    """The Pillow filter of the train crop; 'random' draws bilinear or bicubic (timm's choice per image)."""
    if interpolation == "random":
        return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[rng.integers(2)]
    if interpolation not in RESAMPLING:
        raise ValueError(f"--train-interpolation {interpolation!r}: choose one of {', '.join(TRAIN_INTERPOLATIONS)}")
    return RESAMPLING[interpolation]


def train_transform(path, img_size, rng, scale=(0.08, 1.0), interpolation="bilinear", hflip=0.5,
                    auto_augment=None):
    """RandomResizedCrop(img_size, scale) + horizontal flip (probability hflip) + auto_augment
    (a minimlp.data.randaugment.RandAugment, or None) -> uint8 (3, img_size, img_size).

    rng (numpy Generator) is drawn from in this order: crop box, filter ('random' interpolation only),
    flip (always drawn, whatever hflip is), then RandAugment's draws.
    """
    with Image.open(path) as image:
        left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, rng, scale)
        box = (left, top, left + crop_w, top + crop_h)
        crop = decode_region(image, box, (img_size, img_size), train_resampling(interpolation, rng))
    if rng.random() < hflip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if auto_augment is not None:
        crop = auto_augment(crop, rng)
    return to_chw(crop)


# ---------------------------------------------------------------- evaluation transform

def eval_resize_size(width, height, img_size, crop_pct=0.875):
    """Size (w, h) after resizing the shorter side to int(img_size / crop_pct), aspect kept
    (the longer side is truncated, as torchvision's Resize does)."""
    short = int(img_size / crop_pct)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_offset(resized_size, img_size):
    """(left, top) of the img_size x img_size center crop of an image of resized_size = (w, h)."""
    return (int(round((resized_size[0] - img_size) / 2)), int(round((resized_size[1] - img_size) / 2)))


def eval_crop_box(width, height, img_size, crop_pct=0.875):
    """The center crop of the resized image, mapped back to the original: (left, top, right, bottom)."""
    resized_w, resized_h = eval_resize_size(width, height, img_size, crop_pct)
    left, top = center_crop_offset((resized_w, resized_h), img_size)
    scale_x, scale_y = resized_w / width, resized_h / height
    return (left / scale_x, top / scale_y, (left + img_size) / scale_x, (top + img_size) / scale_y)


def eval_transform(path, img_size, crop_pct=0.875, draft=False):
    """Resize shorter side to int(img_size / crop_pct) (bicubic), center crop img_size -> uint8 (3, img_size, img_size).

    By default the image is decoded in full, resized whole, then cropped: torchvision's Resize +
    CenterCrop (timm's and DeiT's eval transform) step for step, so the pixels are theirs. (Resizing
    only the crop box, as training does, moves a quarter of the pixels of some sizes by 1 level.)
    draft=True decodes large JPEGs at a reduced size and resizes the box: faster, but no longer the
    pixels that the published accuracies were measured on."""
    with Image.open(path) as image:
        if draft:
            box = eval_crop_box(image.width, image.height, img_size, crop_pct)
            return to_chw(decode_region(image, box, (img_size, img_size), Image.Resampling.BICUBIC, draft=True))
        resized_size = eval_resize_size(image.width, image.height, img_size, crop_pct)
        left, top = center_crop_offset(resized_size, img_size)
        resized = to_rgb(image).resize(resized_size, Image.Resampling.BICUBIC)
    return to_chw(resized.crop((left, top, left + img_size, top + img_size)))
