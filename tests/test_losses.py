"""Softmax cross-entropy: PyTorch's F.cross_entropy (label smoothing, probability targets), finite
differences, and stability for large logits."""
import numpy as np
import pytest

from minimlp.tools.gradcheck import numerical_gradients, relative_error
from minimlp.losses import cross_entropy
from minimlp.tools.pytorch_references import torch

F = torch.nn.functional


def _torch_loss(logits, targets, smoothing):
    tensor = torch.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(tensor, torch.from_numpy(targets), label_smoothing=smoothing)
    loss.backward()
    return loss.item(), tensor.grad.numpy()


def _targets(rng, kind, batch, classes):
    if kind == "indices":
        return rng.integers(0, classes, size=batch)
    soft = rng.random((batch, classes)) ** 3  # uneven, like a Mixup of two smoothed one-hots
    return soft / soft.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_pytorch(xp, kind, smoothing):
    rng = np.random.default_rng(0)
    logits, targets = 3 * rng.normal(size=(6, 11)), _targets(rng, kind, 6, 11)
    loss, dlogits = cross_entropy(xp.asarray(logits), xp.asarray(targets), smoothing=smoothing)
    expected_loss, expected_grad = _torch_loss(logits, targets, smoothing)
    assert abs(float(loss) - expected_loss) < 1e-12 * abs(expected_loss)
    assert relative_error(dlogits, expected_grad) < 1e-10


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_cross_entropy_matches_finite_differences(xp, kind):
    rng = np.random.default_rng(1)
    logits, targets = xp.asarray(rng.normal(size=(4, 5))), xp.asarray(_targets(rng, kind, 4, 5))
    _, dlogits = cross_entropy(logits, targets, smoothing=0.1)
    one = xp.asarray(1.0)
    numerical = numerical_gradients(lambda z: cross_entropy(z, targets, smoothing=0.1)[0], [logits], one)[0]
    assert relative_error(dlogits, numerical) < 1e-7


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_is_stable_for_huge_logits(xp, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 2e4 - 1.0]])
    targets = np.array([0, 2])
    loss, dlogits = cross_entropy(xp.asarray(logits, dtype=dtype), xp.asarray(targets), smoothing=0.1)
    expected_loss, expected_grad = _torch_loss(logits, targets, 0.1)  # float64 reference
    assert np.isfinite(float(loss)) and bool(xp.isfinite(dlogits).all())
    assert abs(float(loss) - expected_loss) < 1e-6 * expected_loss
    assert relative_error(dlogits, expected_grad) < 1e-6
