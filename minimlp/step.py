"""One training step: forward, loss, backward, loss scaling (float16 only), clipping, the optimizer. Every
caller uses this one function: the trainer, the benchmarks, the tests and the lessons.

    precision = policy("bfloat16")    # minimlp.precision: "float32", "float16" (loss scaling), "bfloat16"
    loss, taken = train_step(model, optimizer, images, labels, lr=lr_at(step, ...), precision=precision)

`images` is a normalized float batch (B, C, H, W) on any device (it is moved to the model's);
`targets` class indices (B,) or probabilities (B, C) (soft targets, e.g. from Mixup/CutMix).
`sync`, data parallel only (minimlp.parallel.distributed's MPIWorld): averages the gradients over the ranks
as backward produces them, and makes one skip decision for all ranks, before clipping and the optimizer.
In one process (sync None) backward is model.backward.
`criterion`, when given, replaces the loss: a callable (logits, targets) -> (loss, dlogits), e.g. DeiT's
distillation loss (minimlp.training.distillation); `smoothing` is then the criterion's business, not the step's.
"""
from .layers import CrossEntropy
from .optim import clip_grad_norm
from .precision import autocast


def train_step(model, optimizer, images, targets, lr, precision, smoothing=0.0, clip_grad=0.0, criterion=None,
               sync=None):
    """One optimizer step. Returns (loss, taken): the batch's mean loss as a 0-d array left on the device
    (reading it would make the host wait for the GPU at every step), and whether the step was taken
    (False only under float16's loss scaling, when a gradient held inf or NaN: the scaler then lowers its scale)."""
    scaler = precision.loss_scaler  # float16's; None in float32 and bfloat16 (float32's range: nothing to scale)
    with autocast(precision.matmul_dtype):
        logits = model.forward(images, train=True)
        loss, dlogits = (criterion or CrossEntropy(model.ops, smoothing))(logits, targets)  # evaluation's loss too
        if scaler is not None:
            dlogits = scaler.scale_gradient(dlogits)
        if sync is None:
            model.backward(dlogits)
        else:  # data parallel: model.backward, and the mean gradient over the K ranks
            sync.backward(model, dlogits)
    if scaler is not None:  # inf/NaN in any gradient (on any rank): every rank skips the step, S is halved
        finite = scaler.unscale(model.parameters)
        finite = finite if sync is None else sync.all_true(finite)
        scaler.update(finite)
        if not finite:
            return loss, False
    if clip_grad:
        clip_grad_norm(model.parameters, clip_grad)
    optimizer.lr = lr
    optimizer.step()
    return loss, True
