"""Which implementation of each operation a model runs: chosen once, when the model is built.

The reference is plain `xp` code that reads like the math: the layers and the loss of minimlp.layers,
and the optimizer update of minimlp.optim. A fast path is a module that offers some of
the same functions, with the same signatures and the same results (caches included), doing the work
in fewer passes over memory:

    minimlp.fast.cuda_kernels   fused CUDA kernels, for CuPy arrays on the GPU
    minimlp.fast.cpu_kernels    fused, multi-threaded loops compiled by Numba, for NumPy arrays on the CPU

`select(device, dtype, fast)` starts from the reference and replaces what the device's fast module
offers (its OPERATIONS). The one object it returns is given to the model (create_model(..., ops=), kept as
`model.ops`), to the loss (minimlp.layers.CrossEntropy, which training and evaluation both run) and to the
optimizer (AdamW takes its update from it); nothing tests for a fast path on every call, and there is no
global switch. The dependency runs one way: this module lists the reference functions of layers and
optim, which never import it. tests/test_fast_paths.py runs every fast operation and
the reference on the same inputs.
"""
import importlib
from types import SimpleNamespace

import numpy as np

from . import layers, optim

REFERENCE = dict(
    affine_forward=layers.affine_forward, affine_backward=layers.affine_backward,
    linear_forward=layers.linear_forward, linear_backward=layers.linear_backward,
    token_mixing_forward=layers.token_mixing_forward, token_mixing_backward=layers.token_mixing_backward,
    bias_gelu_forward=layers.bias_gelu_forward, bias_gelu_backward=layers.bias_gelu_backward,
    patch_embed_forward=layers.patch_embed_forward, patch_embed_backward=layers.patch_embed_backward,
    residual_forward=layers.residual_forward, residual_backward=layers.residual_backward,
    mean_pool_forward=layers.mean_pool_forward, mean_pool_backward=layers.mean_pool_backward,
    softmax_cross_entropy=layers.softmax_cross_entropy, adamw_update=optim.adamw_update,
)
REFERENCE_OPERATIONS = SimpleNamespace(name="reference", **REFERENCE)
FAST_MODULES = {"gpu": "minimlp.fast.cuda_kernels", "cpu": "minimlp.fast.cpu_kernels"}


def fast_module(device, dtype):
    """The fast-path module for arrays of `dtype` on `device` ('cpu' or 'gpu'), or None where there is
    none (the CPU one needs Numba: without it, the reference runs)."""
    try:
        module = importlib.import_module(FAST_MODULES[device])
    except ImportError:
        return None
    return module if np.dtype(dtype) in module.DTYPES else None


def select(device, dtype, fast=True):
    """The operations a model on `device` with parameters of `dtype` runs. `name` says which path:
    'reference', or the fast module's name."""
    module = fast_module(device, dtype) if fast else None
    if module is None:
        return REFERENCE_OPERATIONS
    module.prepare()  # what the fast path needs set up once in the process (the CPU's: the allocator)
    fast_operations = {name: getattr(module, name) for name in module.OPERATIONS}
    return SimpleNamespace(**{**REFERENCE, **fast_operations, "name": module.__name__.rsplit(".", 1)[1]})
