"""Softmax cross-entropy with label smoothing and soft targets, returning the loss and its gradient.

    criterion = CrossEntropy(model.ops, smoothing=0.1)   # the loss training and evaluation compute
    loss, dlogits = criterion(logits, labels)

CrossEntropy runs the softmax cross-entropy of the operations it is given (minimlp.ops.select: the reference
below, or the device's fused kernel); cross_entropy is the same loss through the reference alone.
"""
from .backend import get_xp


def smoothed_targets(targets, num_classes, smoothing, dtype):
    """Target distribution q (B, C). `targets` are class indices (B,) or probabilities (B, C)
    (soft targets, e.g. from Mixup/CutMix). Label smoothing mixes in the uniform distribution:
    q = (1 - s) * targets + s / C  (timm's LabelSmoothingCrossEntropy for index targets)."""
    xp = get_xp(targets)
    if targets.ndim == 1:
        one_hot = xp.zeros((targets.shape[0], num_classes), dtype=dtype)
        one_hot[xp.arange(targets.shape[0]), targets] = 1
        targets = one_hot
    return (1.0 - smoothing) * targets.astype(dtype, copy=False) + smoothing / num_classes


def log_softmax(logits):
    # log p = z - max(z) - log(sum exp(z - max(z)))   stable for any size of logits: exp never overflows
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits, targets, smoothing=0.0):
    """Mean over the batch of -sum_c q_c log softmax(z)_c.

    logits (B, C); targets: indices (B,) or probabilities (B, C); returns (loss, a 0-d array on the
    logits' device: float() it when needed, so a GPU step need not wait for it; dlogits (B, C)).
    dL/dz = (softmax(z) - q) / B
    """
    xp = get_xp(logits)
    target_probs = smoothed_targets(xp.asarray(targets), logits.shape[1], smoothing, logits.dtype)
    return softmax_cross_entropy(logits, target_probs)


def softmax_cross_entropy(logits, target_probs):
    """logits, target_probs (B, C) -> (loss: mean over the batch of -sum_c q_c log p_c, a 0-d array;
    dlogits (B, C)).    dL/dz = (softmax(z) - q) / B"""
    xp = get_xp(logits)
    batch = logits.shape[0]
    log_probs = log_softmax(logits)
    loss = -(target_probs * log_probs).sum() / batch
    dlogits = (xp.exp(log_probs) - target_probs) / batch
    return loss, dlogits


class CrossEntropy:
    """The smoothed cross-entropy through `ops` (minimlp.ops.select), the one loss code that training (label
    smoothing `smoothing`; 0 under Mixup/CutMix, whose soft targets hold it) and evaluation (0) run."""

    def __init__(self, ops, smoothing=0.0):
        self.ops, self.smoothing = ops, smoothing

    def __call__(self, logits, targets):
        """logits (B, C); targets: indices (B,) or probabilities (B, C) -> (loss 0-d, dlogits (B, C))."""
        xp = get_xp(logits)
        target_probs = smoothed_targets(xp.asarray(targets), logits.shape[1], self.smoothing, logits.dtype)
        return self.ops.softmax_cross_entropy(logits, target_probs)
