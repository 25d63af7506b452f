"""minimlp: ResMLP written from scratch in NumPy/CuPy, every forward and backward pass by hand."""
from .model import PRESETS, ResMLP, create_model

__all__ = ["PRESETS", "ResMLP", "create_model"]
