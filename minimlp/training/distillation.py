"""DeiT's distillation loss (Touvron et al. 2021, facebookresearch/deit losses.py DistillationLoss), applied
to ResMLP's single head: the loss and its gradient with respect to our logits, given the teacher's
logits for the same (augmented) batch. DeiT's flags: --distillation-type {none,soft,hard}
--distillation-alpha 0.5 --distillation-tau 1.0.

    loss, dlogits = distillation_loss(logits, targets, teacher_logits, kind="hard", alpha=0.5, tau=1.0)
    criterion = Distillation(teacher, "hard", 0.5, 1.0).criterion_for(images, smoothing)   # what the trainer runs

    loss = (1 - alpha) * base + alpha * distill
    base     the usual cross-entropy: targets are labels (B,) with label smoothing `smoothing`, or soft
             targets (B, C) from Mixup/CutMix (smoothing already in them: pass 0), as DeiT's criterion
    soft     T^2 / (B C) * sum_{b,c} q_bc (log q_bc - log p_bc),  p = softmax(z / T), q = softmax(t / T)
             (KL(q || p), divided by the number of logits B C as DeiT does, not by B)
             d/dz = T / (B C) * (p - q)
    hard     cross-entropy of z against the teacher's top class argmax_c t_bc, no smoothing
             d/dz = (softmax(z) - onehot(argmax t)) / B
DeiT's distilled models have a second head for the teacher; ResMLP has one, so the same logits z
serve both terms. The teacher never gets a gradient: its logits are an input, from wherever the
trainer computes them (a PyTorch teacher on the same batch, or predictions stored beforehand).
"""
from ..backend import get_xp
from ..layers import cross_entropy, log_softmax

KINDS = ("none", "soft", "hard")


def soft_distillation(logits, teacher_logits, tau):
    """-> (loss, dlogits) of DeiT's soft term (see the module docstring)."""
    xp = get_xp(logits)
    student_log_probs = log_softmax(logits / tau)
    teacher_log_probs = log_softmax(teacher_logits / tau)
    teacher_probs = xp.exp(teacher_log_probs)
    count = logits.size  # B C
    loss = (teacher_probs * (teacher_log_probs - student_log_probs)).sum() * (tau * tau / count)
    dlogits = (xp.exp(student_log_probs) - teacher_probs) * (tau / count)
    return loss, dlogits


def hard_distillation(logits, teacher_logits):
    """-> (loss, dlogits) of DeiT's hard term: cross-entropy against the teacher's argmax."""
    return cross_entropy(logits, teacher_logits.argmax(axis=1), smoothing=0.0)


def distillation_loss(logits, targets, teacher_logits=None, kind="soft", alpha=0.5, tau=1.0, smoothing=0.0):
    """logits (B, C); targets (B,) labels or (B, C) probabilities; teacher_logits (B, C) (unused for 'none')
    -> (loss, a 0-d array on the logits' device; dlogits (B, C))."""
    if kind not in KINDS:
        raise ValueError(f"--distillation-type {kind!r}: choose none, soft or hard")
    if not 0 <= alpha <= 1:
        raise ValueError(f"--distillation-alpha {alpha}: must be within 0..1")
    if not tau > 0:
        raise ValueError(f"--distillation-tau {tau}: must be > 0")
    base_loss, base_dlogits = cross_entropy(logits, targets, smoothing)
    if kind == "none":
        return base_loss, base_dlogits
    if teacher_logits is None or teacher_logits.shape != logits.shape:
        raise ValueError(f"{kind} distillation needs teacher logits of shape {tuple(logits.shape)}, got "
                         f"{None if teacher_logits is None else tuple(teacher_logits.shape)}")
    teacher_logits = get_xp(logits).asarray(teacher_logits, dtype=logits.dtype)
    if kind == "soft":
        distill_loss, distill_dlogits = soft_distillation(logits, teacher_logits, tau)
    else:
        distill_loss, distill_dlogits = hard_distillation(logits, teacher_logits)
    loss = base_loss * (1 - alpha) + distill_loss * alpha
    return loss, base_dlogits * (1 - alpha) + distill_dlogits * alpha


class Distillation:
    """What the trainer is given for --distillation-type soft/hard: the teacher (minimlp.training.teacher) and
    the loss's settings. criterion_for(images, smoothing) runs the teacher on the very batch the student sees
    and returns the step's criterion (logits, targets) -> (loss, dlogits)."""

    def __init__(self, teacher, kind, alpha, tau):
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau

    def criterion_for(self, images, smoothing):
        teacher_logits = self.teacher(images)

        def criterion(logits, targets):
            return distillation_loss(logits, targets, teacher_logits, self.kind, self.alpha, self.tau, smoothing)
        return criterion
