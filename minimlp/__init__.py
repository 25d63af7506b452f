"""minimlp: ResMLP written from scratch in NumPy/CuPy, every forward and backward pass by hand.

The modules here are the math a reader comes for: layers (every layer and the loss, forward beside
backward), model, optim, schedule, parameters, precision and loss_scaling, step (the one training step),
ops (the reference or a fast path, chosen once), backend and weights. The folders hold what serves it:
fast (the fast paths), data (files to batches on the device), training (the run), parallel (many
processes) and tools (weight analysis, the PyTorch references, gradient checks).
"""
from .fast import cpu_settings  # noqa: F401  first: thread settings that NumPy's OpenBLAS reads when it loads
from .model import PRESETS, ResMLP, create_model

__all__ = ["PRESETS", "ResMLP", "create_model"]
