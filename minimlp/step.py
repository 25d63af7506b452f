"""One training step: forward, loss, backward, loss scaling, clipping, the optimizer. Every caller uses
this one function: the trainer, the benchmarks, the tests and the lessons.

    scaler = NoLossScaling()          # float32; LossScaler() for --amp (minimlp.loss_scaling)
    loss, finite = train_step(model, optimizer, images, labels, lr=lr_at(step, ...), scaler=scaler)

`images` is a normalized float batch (B, C, H, W) on any device (it is moved to the model's);
`targets` class indices (B,) or probabilities (B, C) (soft targets, e.g. from Mixup/CutMix).
`sync`, data parallel (minimlp.parallel.distributed): averages the gradients over the ranks as backward produces
them, and makes one skip decision for all ranks, before clipping and the optimizer; the default is
the one-process stand-in that does neither.
`criterion`, when given, replaces the loss: a callable (logits, targets) -> (loss, dlogits), e.g. DeiT's
distillation loss (minimlp.training.distillation); `smoothing` is then the criterion's business, not the step's.
"""
from .parallel.distributed import SingleProcess
from .losses import CrossEntropy
from .optim import clip_grad_norm
from .precision import autocast

ONE_PROCESS = SingleProcess()


def train_step(model, optimizer, images, targets, lr, scaler, smoothing=0.0, clip_grad=0.0, criterion=None,
               sync=ONE_PROCESS):
    """One optimizer step. Returns (loss, finite): the batch's mean loss as a 0-d array left on the device
    (reading it would make the host wait for the GPU at every step), and whether the step was taken
    (False only under loss scaling, when a gradient held inf or NaN: the scaler then lowers its scale)."""
    with autocast(scaler.half_precision):
        logits = model.forward(images, train=True)
        loss, dlogits = (criterion or CrossEntropy(model.ops, smoothing))(logits, targets)  # evaluation's loss too
        sync.backward(model, scaler.scale_gradient(dlogits))  # model.backward; over K ranks, the mean gradient
    finite = sync.all_true(scaler.unscale(model.parameters))
    if finite:
        if clip_grad:
            clip_grad_norm(model.parameters, clip_grad)
        optimizer.lr = lr
        optimizer.step()
    scaler.update(finite)
    return loss, finite
