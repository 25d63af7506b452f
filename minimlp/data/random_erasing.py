"""Random erasing (Zhong et al. 2017) on the normalized batch on the device, as timm's RandomErasing
(DeiT's --reprob 0.25 --remode pixel --recount 1).

    erasing = RandomErasing(probability=0.25, mode="pixel", max_count=1)
    images = erasing(images, rngs)       # images (B, C, H, W) normalized, on the device: erased IN PLACE;
                                         # rngs: one numpy Generator per image

Each image, with probability `probability`, gets `count` boxes (count = max_count, or uniform in
min_count..max_count when they differ). A box has area U(min_area, max_area) * H W / count and aspect
ratio h / w = exp(U(log min_aspect, log max_aspect)), h = round(sqrt(area * aspect)), w = round(sqrt(area
/ aspect)); if it does not fit strictly inside the image it is drawn again, up to 10 times, then
given up. Its top-left corner is uniform over the positions where it fits. The box is filled with
    pixel: per-pixel N(0, 1) noise      rand: one N(0, 1) value per channel      const: 0
which, on a normalized batch, is noise around the dataset mean (0 is the mean itself).

Randomness: each image's boxes and noise are drawn on the host from that image's own numpy Generator
(`draw`), then written on the device with one transfer (`apply`); so CPU and GPU runs erase the same
pixels, and the trainer, seeding each image's generator by its place in the global batch, erases the
same pixels on K ranks as one process with the K ranks' batches together.
"""
import math

import numpy as np

from ..backend import get_xp

MODES = ("pixel", "rand", "const")


class ErasePlan:
    """boxes: [(image index, top, left, height, width)]; noise: float32 host array, the boxes' fill values
    one after another (C h w values per box in 'pixel' mode, C in 'rand', none in 'const')."""

    def __init__(self, boxes, noise):
        self.boxes, self.noise = boxes, noise


class RandomErasing:
    """timm's RandomErasing with its defaults (see the module docstring); max_count None means min_count."""

    def __init__(self, probability=0.25, mode="pixel", min_count=1, max_count=None, min_area=0.02, max_area=1 / 3,
                 min_aspect=0.3, max_aspect=None):
        max_count = max_count or min_count
        max_aspect = max_aspect or 1 / min_aspect
        problems = []
        if not 0 <= probability <= 1:
            problems.append(f"--reprob {probability}: must be within 0..1")
        if mode not in MODES:
            problems.append(f"--remode {mode!r}: choose pixel, rand or const")
        if not 1 <= min_count <= max_count:
            problems.append(f"--recount {max_count}: must be at least 1 (and at least min_count {min_count})")
        if not 0 < min_area <= max_area <= 1 or not 0 < min_aspect <= max_aspect:
            problems.append(f"erasing area {min_area}..{max_area} / aspect {min_aspect}..{max_aspect}: "
                            "need 0 < min <= max (area at most 1)")
        if problems:
            raise ValueError("; ".join(problems))
        self.probability, self.mode = probability, mode
        self.min_count, self.max_count = min_count, max_count
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def from_flags(cls, reprob, remode, recount):
        """What DeiT's --reprob --remode --recount build (timm's create_transform): 1..recount boxes."""
        return cls(reprob, remode, min_count=1, max_count=recount)

    def draw_boxes(self, height, width, rng):
        """The boxes of one image: [(top, left, h, w)], empty when it is not erased (timm's order of draws)."""
        if rng.random() > self.probability:
            return []
        count = self.min_count if self.min_count == self.max_count else int(rng.integers(self.min_count,
                                                                                         self.max_count + 1))
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                area = rng.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                box_h = int(round(math.sqrt(area * aspect)))
                box_w = int(round(math.sqrt(area / aspect)))
                if box_w < width and box_h < height:
                    top = int(rng.integers(0, height - box_h + 1))
                    left = int(rng.integers(0, width - box_w + 1))
                    boxes.append((top, left, box_h, box_w))
                    break
        return boxes

    def draw(self, rngs, channels, height, width):
        """The ErasePlan of a batch from one generator per image: image i's boxes, then their fill, from rngs[i]."""
        boxes, noise = [], []
        values_per_box = {"pixel": lambda box_h, box_w: channels * box_h * box_w,
                          "rand": lambda box_h, box_w: channels, "const": lambda box_h, box_w: 0}[self.mode]
        for index, rng in enumerate(rngs):
            image_boxes = self.draw_boxes(height, width, rng)
            boxes += [(index, *box) for box in image_boxes]
            total = sum(values_per_box(box_h, box_w) for _, _, box_h, box_w in image_boxes)
            if total:
                noise.append(rng.standard_normal(total, dtype=np.float32))
        return ErasePlan(boxes, np.concatenate(noise) if noise else np.zeros(0, np.float32))

    def apply(self, images, plan):
        """Write the plan's boxes into images (B, C, H, W) IN PLACE; the noise goes to the device at once."""
        if not plan.boxes:
            return images
        xp = get_xp(images)
        channels = images.shape[1]
        noise = xp.asarray(plan.noise).astype(images.dtype, copy=False)
        offset = 0
        for index, top, left, box_h, box_w in plan.boxes:
            region = images[index, :, top:top + box_h, left:left + box_w]
            if self.mode == "pixel":
                size = channels * box_h * box_w
                region[...] = noise[offset:offset + size].reshape(channels, box_h, box_w)
            elif self.mode == "rand":
                size = channels
                region[...] = noise[offset:offset + size].reshape(channels, 1, 1)
            else:
                size = 0
                region[...] = 0
            offset += size
        return images

    def __call__(self, images, rngs):
        """draw + apply: erases `images` (B, C, H, W) in place and returns it; rngs: B generators, one per image."""
        if len(rngs) != images.shape[0]:
            raise ValueError(f"{len(rngs)} generators for a batch of {images.shape[0]} images: give one per image")
        return self.apply(images, self.draw(rngs, *images.shape[1:]))
