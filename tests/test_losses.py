"""Softmax cross-entropy: PyTorch's F.cross_entropy (label smoothing, probability targets), finite
differences, and stability for large logits."""
import numpy as np
import pytest

from minimlp.tools.gradcheck import numerical_gradients, relative_error
from minimlp.layers import cross_entropy, softmax_cross_entropy
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


def test_training_and_evaluation_compute_the_loss_through_the_operations_the_model_was_given():
    """One loss code (layers.CrossEntropy over ops.softmax_cross_entropy) for the step and for evaluation."""
    from types import SimpleNamespace

    from minimlp import create_model
    from minimlp.ops import REFERENCE_OPERATIONS
    from minimlp.optim import AdamW
    from minimlp.precision import policy
    from minimlp.step import train_step
    from minimlp.training.evaluation import evaluate
    calls = []

    def recording(logits, target_probs):
        calls.append(target_probs.copy())
        return softmax_cross_entropy(logits, target_probs)

    operations = SimpleNamespace(**{**vars(REFERENCE_OPERATIONS), "softmax_cross_entropy": recording})
    model = create_model("resmlp_tiny", img_size=16, depth=1, ops=operations)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8), np.array([0, 3, 3, 9])
    train_step(model, AdamW(model.parameters, operations, lr=1e-3), images / 255.0, labels, 1e-3, policy("float32"),
               smoothing=0.1)
    loader = type("OneBatch", (), {"epoch": lambda self, epoch: iter([(images, labels)]), "__len__": lambda self: 1})()
    metrics = evaluate(model, loader)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[0], 0.9 * np.eye(10)[labels] + 0.01, rtol=1e-6)  # training: smoothed
    np.testing.assert_array_equal(calls[1], np.eye(10)[labels])  # evaluation: the same code, no smoothing
    assert np.isfinite(metrics["val_loss"])
