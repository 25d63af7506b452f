"""An exponential moving average of the weights (DeiT's --model-ema --model-ema-decay 0.99996), kept as
one flat buffer beside the model's own (`model.parameters.data`), as timm's ModelEma / ModelEmaV2.

    ema = ModelEma(model.parameters.data, decay=0.99996)     # starts as a copy of the weights
    ...optimizer step...; ema.update(model.parameters.data)  # after every step
    with ema.swapped_into(model.parameters.data):            # evaluate the averaged weights
        evaluate(model, val_loader)
    checkpoint arrays: ema.state_dict(); on resume: ema.load_state_dict(arrays)

    ema <- ema * decay + weights * (1 - decay)      (timm's formula and float rounding, in the weights' dtype)

With decay 0.99996 the average spans about 1 / (1 - decay) = 25,000 steps: at DeiT's batch 1024
about 20 epochs of ImageNet. ResMLP has no buffers (no batch norm), so the weights are the whole state.
"""
import contextlib

import numpy as np

from ..backend import get_xp, to_numpy


class ModelEma:
    def __init__(self, weights, decay=0.99996):
        """weights: the model's flat parameter buffer (numpy or cupy); copied, never held."""
        if not 0 <= decay <= 1:
            raise ValueError(f"--model-ema-decay {decay}: must be within 0..1 (DeiT uses 0.99996)")
        self.decay = float(decay)
        self.data = weights.copy()

    def update(self, weights):
        """One step of the average, in place: data = data * decay + weights * (1 - decay)."""
        self.data *= self.data.dtype.type(self.decay)
        self.data += weights * weights.dtype.type(1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, weights):
        """Inside the block `weights` (the model's buffer, and so every view of it) holds the average;
        after it, its own values again, bit for bit."""
        xp = get_xp(weights)
        own = weights.copy()
        xp.copyto(weights, self.data)
        try:
            yield weights
        finally:
            xp.copyto(weights, own)

    def named_weights(self, parameters):
        """{official name: host array} of the average, as model.state_dict() gives the weights (so it can
        be saved as a weights file and evaluated alone). parameters: the model's Parameters."""
        flat = to_numpy(self.data)
        return {name: flat[part].reshape(parameters.shapes[name]).copy() for name, part in parameters.slices.items()}

    def state_dict(self):
        """{name: numpy array}, for a checkpoint."""
        return {"data": to_numpy(self.data).copy(), "decay": np.array(self.decay)}

    def load_state_dict(self, state):
        data = np.asarray(state["data"])
        if data.shape != self.data.shape:
            raise ValueError(f"EMA state of {data.size} values does not fit this model's {self.data.size} "
                             "parameters (a checkpoint of another model?)")
        self.data[...] = get_xp(self.data).asarray(data, dtype=self.data.dtype)
        self.decay = float(state["decay"])
