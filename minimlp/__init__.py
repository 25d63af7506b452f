"""minimlp: ResMLP written from scratch in NumPy/CuPy, every forward and backward pass by hand."""
from .fast import cpu_settings  # noqa: F401  first: thread settings that NumPy's OpenBLAS reads when it loads
from .model import PRESETS, ResMLP, create_model

__all__ = ["PRESETS", "ResMLP", "create_model"]
