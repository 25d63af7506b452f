"""A model's parameters and gradients, each stored in one flat buffer.

`values[name]` and `grads[name]` are reshaped views into `data` and `grad`. The optimizer can
therefore update every parameter with a few whole-buffer operations (one pass over memory, and
on the GPU one kernel per operation instead of one per tensor), and the layers still see
ordinary named arrays. Views stay valid only while the buffers are changed in place: write
`values[name][...] = new`, never rebind.
"""
import math

import numpy as np


class Parameters:
    def __init__(self, shapes, xp, dtype):
        """shapes: {name: shape} in a fixed order (the checkpoint order)."""
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.slices = {}
        offset = 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.size = offset
        self.data = xp.zeros(offset, dtype=self.dtype)
        self.grad = xp.zeros(offset, dtype=self.dtype)
        self.values = {name: self.data[s].reshape(self.shapes[name]) for name, s in self.slices.items()}
        self.grads = {name: self.grad[s].reshape(self.shapes[name]) for name, s in self.slices.items()}

    def decay_mask(self):
        """1 for weights that take weight decay (matrices, conv kernels), 0 for 1-D parameters:
        Affine alpha/beta, LayerScale gammas and biases (docs/reference.md, Training recipe: no decay on 1-D)."""
        mask = np.zeros(self.size, dtype=self.dtype)
        for name, shape in self.shapes.items():
            if len(shape) > 1:
                mask[self.slices[name]] = 1
        return self.xp.asarray(mask)
