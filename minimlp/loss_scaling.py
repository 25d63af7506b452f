"""Loss scaling: how float16 mixed precision keeps small gradients alive (minimlp.precision.policy("float16")).

Why loss scaling. float16 flushes magnitudes below ~6e-8 to zero, and many gradients are that small.
Multiplying dlogits by S (2**16 to start) multiplies every gradient by S (backward is linear in
dlogits), lifting them into float16's range; dividing the flat gradient buffer by S afterwards
restores them exactly (S is a power of two). Too large an S overflows float16 (max 65504) to inf: the
step is then skipped and S halved; after `growth_interval` clean steps S doubles again. The rule and
defaults are torch.cuda.amp.GradScaler's.

float32 and bfloat16 need none (bfloat16 has float32's exponent range): their policies have no loss
scaler, and the training step (minimlp.step) calls these methods under float16 only.
"""
import numpy as np


class LossScaler:
    """Dynamic loss scaling with torch.cuda.amp.GradScaler's rule and defaults, for --amp --amp-dtype float16.

    scale: S, the factor dlogits is multiplied by; clean_steps: steps since S last changed;
    skipped_steps: optimizer steps skipped so far in the run (all three are checkpointed)."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.clean_steps = 0
        self.skipped_steps = 0

    def scale_gradient(self, dlogits):
        # d(S * loss)/dlogits = S * dlogits: every gradient of backward comes out S times larger
        return dlogits * self.scale

    def unscale(self, parameters):
        """grad <- grad / S, in place on the flat buffer; True when every gradient is finite.

        One reduction decides: inf or NaN anywhere makes the sum inf or NaN. (A sum of finite float32
        gradients would have to exceed 3e38 to overflow.) Reading the answer waits for the GPU."""
        grad = parameters.grad
        grad *= 1.0 / self.scale
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in NumPy's sum is the expected signal
            return bool(parameters.xp.isfinite(grad.sum()))

    def update(self, finite):
        """After each step: halve S after a skipped step; double it after growth_interval clean ones."""
        if not finite:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self):
        return dict(scale=self.scale, clean_steps=self.clean_steps, skipped_steps=self.skipped_steps)

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])

