"""Learning-rate schedule: linear warmup, then half a cosine down to a floor (DeiT/timm's recipe),
counted in optimizer steps. The training loop sets `optimizer.lr = lr_at(step, ...)` before each step.

DeiT's defaults: warmup_lr 1e-6 and min_lr 1e-5. Unlike DeiT's use of timm's CosineLRScheduler (whose
cosine runs from epoch 0 and is overwritten during warmup), the cosine here starts where the warmup ends,
so the schedule reaches base_lr exactly at warmup_steps and min_lr exactly at total_steps: timm's
scheduler with warmup_prefix=True, stepped per update (docs/reference.md, Training recipe: the warmup and
cosine schedule; tests/test_optim.py compares the two at every step).
"""
import math


def lr_at(step, *, base_lr, total_steps, warmup_steps=0, min_lr=1e-5, warmup_lr=1e-6):
    """The learning rate for the update with 0-based index `step`, a Python float:

        step < warmup_steps:          warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        warmup_steps <= step <= total: min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2,
                                       progress = (step - warmup_steps) / (total_steps - warmup_steps)
        step > total_steps:           min_lr
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"the schedule needs 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
