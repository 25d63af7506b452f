"""The AdamW update as one multi-threaded Numba loop over the flat parameter buffer: the CPU fast path of
minimlp.optim.adamw_update (one of minimlp.fast.cpu_kernels' OPERATIONS; tests/test_fast_paths.py checks it
against the reference). Self-contained: it inlines nothing from another file, so Numba's on-disk cache,
which watches only the file a loop is defined in, never keeps stale machine code for it.
"""
import functools
import math

import numba
import numpy as np

F = np.float32
jit = functools.partial(numba.njit, parallel=True, fastmath=True, cache=True)


def adamw_update(param, grad, m, v, decay_mask, lr_decay, betas, step_size, sqrt_bias2, eps):
    """In place on param, m, v, as minimlp.optim.adamw_update; 1 - beta is rounded from double, as there."""
    beta1, beta2 = betas
    _adamw(param, grad, m, v, decay_mask, F(lr_decay), F(beta1), F(beta2), F(1 - beta1), F(1 - beta2),
           F(step_size), F(sqrt_bias2), F(eps))


@jit
def _adamw(param, grad, m, v, decay_mask, lr_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
           sqrt_bias2, eps):
    for i in numba.prange(param.shape[0]):
        p = param[i] - lr_decay * decay_mask[i] * param[i]
        g = grad[i]
        m[i] = beta1 * m[i] + one_minus_beta1 * g
        v[i] = beta2 * v[i] + one_minus_beta2 * g * g
        param[i] = p - step_size * m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps)
