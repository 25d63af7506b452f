"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a normalized batch on the device, with the
label-smoothed soft targets of timm.data.Mixup (DeiT's --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0
--mixup-switch-prob 0.5 --mixup-mode batch --smoothing 0.1).

    mixup = Mixup(num_classes=1000, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets = mixup(images, labels, rng)    # images (B, 3, H, W) on the device, mixed in place;
                                                    # targets (B, num_classes) float32 soft targets
    loss, dlogits = cross_entropy(logits, targets)  # smoothing is already in the targets: pass 0

Each image i is paired with image B-1-i (the batch reversed) and takes a weight lam of itself:
    mixup:   x_i <- lam x_i + (1 - lam) x_{B-1-i}                   lam ~ Beta(mixup_alpha, mixup_alpha)
    cutmix:  the box of x_i is replaced by the same box of x_{B-1-i}; lam ~ Beta(cutmix_alpha, cutmix_alpha)
             sets the box side sqrt(1 - lam) H x sqrt(1 - lam) W around a uniform centre, clipped at the
             borders, and lam is then corrected to 1 - (clipped box area) / (H W)
    targets: y_i = lam smooth(e_{label_i}) + (1 - lam) smooth(e_{label_{B-1-i}}),
             smooth(e) = (1 - s) e + s / C
Per batch (mode 'batch'): with probability `prob`, one lam and one choice of mixup or cutmix (cutmix
with probability `switch_prob` when both are on) for the whole batch. Per element ('elem'): each image
draws its own. Per pair ('pair'): images i and B-1-i share theirs and swap boxes.

Randomness: all of it is drawn on the host from a numpy Generator (`draw`), in timm's order of draws,
then applied on the device (`apply`); so CPU and GPU runs draw the same. The arithmetic follows timm's
float32 rounding, so for the same lam and box the images and targets equal timm's bit for bit.
"""
import numpy as np

from ..backend import get_xp

MODES = ("batch", "pair", "elem")
KEEP, MIXUP, CUTMIX = 0, 1, 2  # what happens to an image


def smoothed_one_hot(labels, num_classes, smoothing, xp, dtype="float32"):
    """(B,) class indices -> (B, C): on = 1 - s + s/C at the label, off = s/C elsewhere (timm's values)."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    targets = xp.full((labels.shape[0], num_classes), off_value, dtype=dtype)
    targets[xp.arange(labels.shape[0]), labels] = on_value
    return targets


def cutmix_box(lam, height, width, rng):
    """timm's rand_bbox: a box of sides int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) centred at a uniform
    pixel, clipped at the borders -> (top, bottom, left, right), bottom/right exclusive.

    lam keeps its numpy type as in timm: a float32 lam (per element) computes the sides in float32, a
    Python float (per batch) in float64."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y = int(rng.integers(0, height))
    centre_x = int(rng.integers(0, width))
    top, bottom = np.clip([centre_y - cut_h // 2, centre_y + (cut_h + 1) // 2], 0, height)
    left, right = np.clip([centre_x - cut_w // 2, centre_x + (cut_w + 1) // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


def cutmix_box_minmax(minmax, height, width, rng):
    """timm's rand_bbox_minmax: sides uniform in [int(side min), int(side max)), position uniform inside."""
    cut_h = int(rng.integers(int(height * minmax[0]), int(height * minmax[1])))
    cut_w = int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
    top = int(rng.integers(0, height - cut_h + 1))
    left = int(rng.integers(0, width - cut_w + 1))
    return top, top + cut_h, left, left + cut_w


def box_lam(box, height, width):
    """lam corrected for the clipped box: the fraction of the image that stays its own."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / float(height * width)


class MixPlan:
    """What `apply` does to a batch of B images: for image i, kinds[i] (KEEP, MIXUP or CUTMIX), lams[i]
    (float64 holding timm's lam: float32 values per element, float64 per batch) and, for CUTMIX,
    boxes[i] = (top, bottom, left, right)."""

    def __init__(self, kinds, lams, boxes):
        self.kinds, self.lams, self.boxes = kinds, lams, boxes

    def __repr__(self):
        return f"MixPlan(kinds={self.kinds.tolist()}, lams={self.lams.tolist()}, boxes={self.boxes.tolist()})"


class Mixup:
    """Mixup/CutMix with timm's parameters (see the module docstring). `mode`: 'batch', 'pair' or 'elem'.
    cutmix_minmax: (min, max) box side fractions instead of cutmix_alpha (timm then forces alpha 1)."""

    def __init__(self, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
                 switch_prob=0.5, mode="batch", label_smoothing=0.1, correct_lam=True):
        problems = []
        if mode not in MODES:
            problems.append(f"--mixup-mode {mode!r}: choose batch, pair or elem")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            problems.append(f"--mixup {mixup_alpha} / --cutmix {cutmix_alpha}: alphas must be >= 0")
        if mixup_alpha <= 0 and cutmix_alpha <= 0 and cutmix_minmax is None:
            problems.append("--mixup and --cutmix are both 0: nothing to mix (do not build a Mixup)")
        if cutmix_minmax is not None and not (len(cutmix_minmax) == 2
                                              and 0 <= cutmix_minmax[0] < cutmix_minmax[1] <= 1):
            problems.append(f"--cutmix-minmax {cutmix_minmax}: give two fractions, min < max, within 0..1")
        for flag, value in (("--mixup-prob", prob), ("--mixup-switch-prob", switch_prob)):
            if not 0 <= value <= 1:
                problems.append(f"{flag} {value}: must be within 0..1")
        if not 0 <= label_smoothing < 1:
            problems.append(f"--smoothing {label_smoothing}: must be within [0, 1)")
        if num_classes < 1:
            problems.append(f"num_classes {num_classes}: must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing = label_smoothing
        self.correct_lam = correct_lam or cutmix_minmax is not None

    # ------------------------------------------------------------ drawing (host, numpy Generator)

    def draw_for_batch(self, rng):
        """timm's _params_per_batch -> (lam: float, use_cutmix: bool); lam 1 means no mixing."""
        if not rng.random() < self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            return float(rng.beta(alpha, alpha)), use_cutmix
        if self.mixup_alpha > 0:
            return float(rng.beta(self.mixup_alpha, self.mixup_alpha)), False
        return float(rng.beta(self.cutmix_alpha, self.cutmix_alpha)), True

    def draw_per_element(self, count, rng):
        """timm's _params_per_elem -> (lam float32 (count,), use_cutmix bool (count,))."""
        use_cutmix = np.zeros(count, dtype=bool)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(count) < self.switch_prob
            lam_cutmix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=count)
            lam_mixup = rng.beta(self.mixup_alpha, self.mixup_alpha, size=count)
            lam_mix = np.where(use_cutmix, lam_cutmix, lam_mixup)
        elif self.mixup_alpha > 0:
            lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, size=count)
        else:
            use_cutmix = np.ones(count, dtype=bool)
            lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=count)
        lam = np.where(rng.random(count) < self.prob, lam_mix.astype(np.float32), np.float32(1))
        return lam, use_cutmix

    def draw_box(self, lam, height, width, rng):
        """-> (box, lam corrected when correct_lam)."""
        if self.cutmix_minmax is not None:
            box = cutmix_box_minmax(self.cutmix_minmax, height, width, rng)
        else:
            box = cutmix_box(lam, height, width, rng)
        return box, (box_lam(box, height, width) if self.correct_lam else lam)

    def draw(self, batch_size, height, width, rng):
        """The MixPlan for a batch of batch_size images of height x width, from rng (numpy Generator)."""
        kinds = np.full(batch_size, KEEP, dtype=np.int8)
        lams = np.ones(batch_size, dtype=np.float64)
        boxes = np.zeros((batch_size, 4), dtype=np.int64)
        if self.mode == "batch":
            lam, use_cutmix = self.draw_for_batch(rng)
            if lam != 1.0:
                if use_cutmix:
                    box, lam = self.draw_box(lam, height, width, rng)
                    boxes[:] = box
                kinds[:] = CUTMIX if use_cutmix else MIXUP
                lams[:] = lam
            return MixPlan(kinds, lams, boxes)
        # 'elem': each image its own; 'pair': the first half draws, image B-1-i mirrors image i
        count = batch_size // 2 if self.mode == "pair" else batch_size
        lam, use_cutmix = self.draw_per_element(count, rng)
        for i in range(count):
            if lam[i] != 1:
                if use_cutmix[i]:
                    boxes[i], lam[i] = self.draw_box(lam[i], height, width, rng)  # stored as float32, as timm
                kinds[i] = CUTMIX if use_cutmix[i] else MIXUP
            lams[i] = lam[i]
        if self.mode == "pair":  # (an odd batch's middle image stays itself)
            mirrored = slice(batch_size - 1, batch_size - 1 - count, -1)
            kinds[mirrored], lams[mirrored], boxes[mirrored] = kinds[:count], lams[:count], boxes[:count]
        return MixPlan(kinds, lams, boxes)

    # ------------------------------------------------------------ applying (device, xp)

    def apply(self, images, labels, plan):
        """Mix `images` (B, 3, H, W) IN PLACE as `plan` says -> (images, targets (B, C) float32).

        Row by row, with the rounding of timm: keep = lam and other = 1 - lam rounded to the images' dtype
        (the targets' to float32),
            mixup:  x_i = x_i * keep + x_{B-1-i} * other          y_i = y_i * keep + y_{B-1-i} * other
        where the partner x_{B-1-i} is the image before any mixing (a copy of the reversed batch)."""
        xp = get_xp(images)
        labels = xp.asarray(labels)
        one_hot = smoothed_one_hot(labels, self.num_classes, self.label_smoothing, xp)
        keep, other = plan.lams.astype(np.float32), (1.0 - plan.lams).astype(np.float32)
        targets = one_hot * xp.asarray(keep)[:, None] + one_hot[::-1] * xp.asarray(other)[:, None]
        if (plan.kinds == KEEP).all():
            return images, targets
        keep, other = plan.lams.astype(images.dtype), (1.0 - plan.lams).astype(images.dtype)
        partners = images[::-1].copy()
        mixup_rows = np.flatnonzero(plan.kinds == MIXUP)
        if len(mixup_rows) == len(images):  # the whole batch: in place, no gather
            images *= xp.asarray(keep)[:, None, None, None]
            images += partners * xp.asarray(other)[:, None, None, None]
        elif len(mixup_rows):
            rows = xp.asarray(mixup_rows)
            row_keep = xp.asarray(keep[mixup_rows])[:, None, None, None]
            row_other = xp.asarray(other[mixup_rows])[:, None, None, None]
            images[rows] = images[rows] * row_keep + partners[rows] * row_other
        cutmix_rows = np.flatnonzero(plan.kinds == CUTMIX)
        if self.mode == "batch" and len(cutmix_rows):
            top, bottom, left, right = plan.boxes[0]
            images[:, :, top:bottom, left:right] = partners[:, :, top:bottom, left:right]
        else:
            for row in cutmix_rows:
                top, bottom, left, right = plan.boxes[row]
                images[row, :, top:bottom, left:right] = partners[row, :, top:bottom, left:right]
        return images, targets

    def __call__(self, images, labels, rng):
        """draw + apply: mixes `images` in place -> (images, targets)."""
        batch_size, _, height, width = images.shape
        return self.apply(images, labels, self.draw(batch_size, height, width, rng))
