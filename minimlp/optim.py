"""Optimizers that update a model's flat parameter buffer (minimlp.parameters) in place.

    optimizer = AdamW(model.parameters, model.ops, lr=5e-4, weight_decay=0.05)   # ops: minimlp.ops.select
    for step in range(total_steps):
        loss, dlogits = criterion(model.forward(images, train=True), labels)       # minimlp.layers.CrossEntropy
        model.backward(dlogits)                       # overwrites model.parameters.grad
        clip_grad_norm(model.parameters, 5.0)         # optional, scales grad in place
        optimizer.lr = lr_at(step, base_lr=5e-4, total_steps=total_steps, warmup_steps=...)
        optimizer.step()

Weight decay applies only where `parameters.decay_mask()` is 1 (matrices and conv kernels), never to
1-D parameters (Affine alpha/beta, LayerScale gammas, biases). AdamW works on whole buffers, a few
vectorised operations per step whatever the number of tensors; Lamb's trust ratio is per tensor, so it
loops over the named slices for the norms. Neither optimizer changes `grad`. AdamW's update over the buffers
is one of the device's operations it is given (`ops.adamw_update`: adamw_update below, or a fused kernel of
minimlp.fast); LAMB has no fast path.
"""
import math

import numpy as np

from .backend import get_xp, to_numpy


def clip_grad_norm(parameters, max_norm):
    """Scale `parameters.grad` in place so that its global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_ does. Returns the norm before clipping, a 0-d array on the
    parameters' device (float() it when needed, so a GPU step need not wait for it)."""
    xp = parameters.xp
    grad = parameters.grad
    total_norm = xp.sqrt(xp.dot(grad, grad))  # ||g||_2 over every parameter at once
    # g <- g * min(1, max_norm / (||g|| + 1e-6))   (torch's 1e-6 guards against a zero norm)
    grad *= xp.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return total_norm


class Optimizer:
    """What AdamW and Lamb share: the parameters, the first and second moments m and v as flat
    buffers like `grad`, the step count, the decay mask, and checkpointing of all of it.

    `lr` is a plain attribute: the training loop sets it before every step (minimlp.schedule).
    """

    hyperparameters = {}  # {name: conversion back from a checkpoint} of the settings a checkpoint records

    def __init__(self, parameters, lr):
        self.parameters = parameters
        self.xp = self.parameters.xp
        self.lr = lr
        self.m = self.xp.zeros_like(self.parameters.data)  # first moment (running mean of g)
        self.v = self.xp.zeros_like(self.parameters.data)  # second moment (running mean of g^2)
        self.step_count = 0
        self.decay_mask = self.parameters.decay_mask()

    def state_dict(self):
        """Host NumPy copies of m and v, the step count and every hyper-parameter (lr included).
        Flat {str: array or scalar} entries, so it can go into an .npz file as it is."""
        state = {"optimizer": type(self).__name__, "step": self.step_count, "lr": self.lr,
                 "m": to_numpy(self.m).copy(), "v": to_numpy(self.v).copy()}
        for name in self.hyperparameters:
            value = getattr(self, name)
            state[name] = math.nan if value is None else value  # NaN: .npz files cannot hold None
        return state

    def load_state_dict(self, state):
        """Restore what state_dict() returned (also after a round trip through np.savez/np.load,
        which turns scalars into 0-d arrays). The moments are copied into the existing buffers."""
        name = type(self).__name__
        if str(state.get("optimizer")) != name:
            raise ValueError(f"optimizer state is for {state.get('optimizer')!r}, not {name}: "
                             f"resume with the optimizer the checkpoint was written by")
        missing = [key for key in ("step", "lr", "m", "v", *self.hyperparameters) if key not in state]
        if missing:
            raise ValueError(f"{name} state is missing {', '.join(missing)}")
        for key in ("m", "v"):
            size = np.size(state[key])
            if size != self.parameters.size:
                raise ValueError(f"{name} state holds {key} of size {size}, but the model has "
                                 f"{self.parameters.size} parameters: the checkpoint is for another model")
        self.m[...] = self.xp.asarray(state["m"], dtype=self.m.dtype).reshape(-1)
        self.v[...] = self.xp.asarray(state["v"], dtype=self.v.dtype).reshape(-1)
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])
        for key, convert in self.hyperparameters.items():
            setattr(self, key, convert(state[key]))


def _optional_float(value):
    """A float, or None where the checkpoint holds NaN (how state_dict() writes None)."""
    value = float(value)
    return None if math.isnan(value) else value


def _floats(values):
    return tuple(float(value) for value in np.asarray(values).reshape(-1))


def _flag(value):
    return bool(np.asarray(value).item())


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), exactly as torch.optim.AdamW with two
    parameter groups: weight_decay on the decay mask, 0 elsewhere. Per step t, with g = grad:

        p <- p - lr * wd * p                         (only where decay_mask is 1)
        m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g^2
        p <- p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
    """

    hyperparameters = {"betas": _floats, "eps": float, "weight_decay": float}

    def __init__(self, parameters, ops, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05):
        super().__init__(parameters, lr)
        self.betas = tuple(float(beta) for beta in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.update = ops.adamw_update  # the reference below, or the device's fast path (minimlp.ops.select)

    def step(self):
        beta1, beta2 = self.betas
        self.step_count += 1
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        self.update(self.parameters.data, self.parameters.grad, self.m, self.v, self.decay_mask,
                    self.lr * self.weight_decay, self.betas, self.lr / bias1, math.sqrt(bias2), self.eps)


def adamw_update(param, grad, m, v, decay_mask, lr_decay, betas, step_size, sqrt_bias2, eps):
    """One AdamW update over the flat buffers, in place on param, m and v (the reference; fast paths offer
    the same function). lr_decay = lr * weight_decay; step_size = lr / (1 - b1^t); sqrt_bias2 = sqrt(1 - b2^t)."""
    xp = get_xp(param)
    beta1, beta2 = betas
    # p <- p - lr * wd * mask * p
    if lr_decay:
        param -= lr_decay * decay_mask * param
    # m <- b1 m + (1 - b1) g
    m *= beta1
    m += (1 - beta1) * grad
    # v <- b2 v + (1 - b2) g^2
    v *= beta2
    v += (1 - beta2) * grad * grad
    # p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    denominator = xp.sqrt(v)
    denominator /= sqrt_bias2
    denominator += eps
    param -= step_size * m / denominator


class Lamb(Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), the optimizer of the
    ResMLP paper, matching timm.optim.Lamb (the NVIDIA FusedLAMB variant) with two parameter groups:
    weight_decay on the decay mask, 0 elsewhere. Per step t, with g = grad (left unchanged):

        g <- g / max(1, ||g|| / max_grad_norm)          global norm over all parameters
        m <- b1 m + b3 g,  b3 = 1 - b1 (grad_averaging) or 1;   v <- b2 v + (1 - b2) g^2
        u <- m_hat / (sqrt(v_hat) + eps) + wd * p        (m_hat, v_hat bias-corrected if bias_correction)
        p <- p - lr * r * u,   r = ||p|| / ||u|| per tensor (1 if either norm is 0; min(r, 1) if trust_clip)

    Like timm, the weight decay is coupled (added to the update), and the trust ratio r is applied only
    to tensors that take weight decay (r = 1 on 1-D ones and everywhere when wd = 0) unless always_adapt.

    Mirrored from timm, with timm's defaults: lr, bias_correction, betas, eps, weight_decay,
    grad_averaging, max_grad_norm (None turns the clipping off), trust_clip, always_adapt.
    Not mirrored (later additions, outside the paper and the ResMLP recipe): caution, decoupled_decay,
    corrected_weight_decay, foreach (an implementation switch).
    """

    hyperparameters = {"betas": _floats, "eps": float, "weight_decay": float, "bias_correction": _flag,
                       "grad_averaging": _flag, "max_grad_norm": _optional_float, "trust_clip": _flag,
                       "always_adapt": _flag}

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False):
        super().__init__(parameters, lr)
        self.betas = tuple(float(beta) for beta in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.bias_correction = bool(bias_correction)
        self.grad_averaging = bool(grad_averaging)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.trust_clip = bool(trust_clip)
        self.always_adapt = bool(always_adapt)

    def adapted_names(self):
        """The tensors whose update is scaled by the trust ratio."""
        shapes = self.parameters.shapes
        if self.always_adapt:
            return list(shapes)
        return [name for name, shape in shapes.items() if self.weight_decay and len(shape) > 1]

    def step(self):
        xp, p, g, m, v = self.xp, self.parameters.data, self.parameters.grad, self.m, self.v
        beta1, beta2 = self.betas
        self.step_count += 1
        if self.bias_correction:
            bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        else:
            bias1, bias2 = 1.0, 1.0
        # g <- g / max(1, ||g|| / max_grad_norm)   (a new array: the model's grad stays as it was)
        if self.max_grad_norm is not None:
            g = g / xp.maximum(xp.sqrt(xp.dot(g, g)) / self.max_grad_norm, 1.0)
        # m <- b1 m + b3 g
        m *= beta1
        m += (1 - beta1 if self.grad_averaging else 1.0) * g
        # v <- b2 v + (1 - b2) g^2
        v *= beta2
        v += (1 - beta2) * g * g
        # u <- (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + wd * mask * p
        update = (m / bias1) / (xp.sqrt(v) / math.sqrt(bias2) + self.eps)
        if self.weight_decay:
            update += self.weight_decay * self.decay_mask * p
        # u <- r * u,  r = ||p|| / ||u|| per tensor
        for name in self.adapted_names():
            part = self.parameters.slices[name]
            update[part] *= self.trust_ratio(xp.linalg.norm(p[part]), xp.linalg.norm(update[part]))
        # p <- p - lr * u
        p -= self.lr * update

    def trust_ratio(self, weight_norm, update_norm):
        """||p|| / ||u||, or 1 where either norm is 0; at most 1 with trust_clip. Stays a 0-d device
        array (xp.where instead of an `if`), so the GPU need not stop for it."""
        xp = self.xp
        both_positive = (weight_norm > 0) & (update_norm > 0)
        ratio = xp.where(both_positive, weight_norm / xp.where(both_positive, update_norm, 1.0), 1.0)
        return xp.minimum(ratio, 1.0) if self.trust_clip else ratio


def make_optimizer(name, parameters, ops, lr, weight_decay, eps=None, betas=None):
    """The optimizer --opt names, 'adamw' or 'lamb', over `parameters` (minimlp.parameters), AdamW's update from
    `ops` (minimlp.ops.select). eps and betas (--opt-eps, --opt-betas) go to either, as DeiT hands them to timm's
    create_optimizer; None leaves the optimizer's own."""
    given = {key: value for key, value in dict(eps=eps, betas=betas).items() if value is not None}
    if name == "adamw":
        return AdamW(parameters, ops, lr=lr, weight_decay=weight_decay, **given)
    if name == "lamb":
        return Lamb(parameters, lr=lr, weight_decay=weight_decay, **given)
    raise ValueError(f"--opt {name!r}: choose adamw or lamb")
