"""Two independent witnesses for a hand-written backward, both in float64:

- central finite differences projected on an upstream gradient `dout` (CS231n style):
      dL/dx_i ~= sum((f(x + h e_i) - f(x - h e_i)) * dout) / 2h      with L = sum(f(x) * dout)
- PyTorch autograd on the same inputs: backward of sum(f(x) * dout).

Used by the tests and by lesson 7. Only torch_gradients needs torch (a test-only dependency); it imports
it when called, so the rest works without it.
"""
import numpy as np

from ..backend import to_numpy


def relative_error(ours, reference):
    """max |ours - reference| / max |reference|, in float64, on host copies of either backend's arrays."""
    ours, reference = to_numpy(ours).astype(np.float64), to_numpy(reference).astype(np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != {reference.shape}"
    scale = np.abs(reference).max()
    assert scale > 0, "a reference that is all zeros proves nothing"
    return np.abs(ours - reference).max() / scale


def numerical_gradients(forward, inputs, dout, step=1e-6):
    """forward(*inputs) -> output array. Returns d sum(output * dout) / d input for every input."""
    gradients = []
    for array in inputs:
        assert array.flags.c_contiguous, "perturbing a non-contiguous input would perturb a copy"
        gradient = np.zeros(array.shape)
        flat = array.reshape(-1)  # a view: perturbing it perturbs the input
        for i in range(flat.size):
            original = flat[i].item()
            flat[i] = original + step
            plus = float((forward(*inputs) * dout).sum())
            flat[i] = original - step
            minus = float((forward(*inputs) * dout).sum())
            flat[i] = original
            gradient.reshape(-1)[i] = (plus - minus) / (2 * step)
        gradients.append(gradient)
    return gradients


def torch_gradients(torch_forward, inputs, dout):
    """torch_forward(*tensors) -> tensor. Returns (output, [gradient of sum(output * dout) per input])."""
    import torch  # only here: the finite differences above need no torch

    tensors = [torch.tensor(to_numpy(array), dtype=torch.float64, requires_grad=True) for array in inputs]
    output = torch_forward(*tensors)
    (output * torch.tensor(to_numpy(dout))).sum().backward()
    return output.detach().numpy(), [tensor.grad.numpy() for tensor in tensors]
