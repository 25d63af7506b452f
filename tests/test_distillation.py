"""DeiT's DistillationLoss (facebookresearch/deit losses.py), written here in PyTorch from its formulas with
timm's criteria as the base loss, against ours: the loss and d loss / d logits, in float64."""
import numpy as np
import pytest

from minimlp.training.distillation import distillation_loss
from minimlp.tools.gradcheck import numerical_gradients, relative_error
from minimlp.tools.pytorch_references import timm, torch  # noqa: F401
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402

F = torch.nn.functional


def deit_loss(outputs, labels, teacher_outputs, kind, alpha, tau, smoothing):
    """DeiT main.py's criterion choice and losses.py's DistillationLoss.forward, one head (outputs_kd = outputs)."""
    if labels.ndim == 2:  # Mixup/CutMix targets: smoothing is in them
        base_criterion = SoftTargetCrossEntropy()
    elif smoothing:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        base_criterion = torch.nn.CrossEntropyLoss()
    base_loss = base_criterion(outputs, labels)
    if kind == "none":
        return base_loss
    if kind == "soft":
        distillation = F.kl_div(F.log_softmax(outputs / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
                                reduction="sum", log_target=True) * (tau * tau) / outputs.numel()
    else:
        distillation = F.cross_entropy(outputs, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation * alpha


def batch(seed, size=6, classes=7, soft_targets=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (size, classes))
    teacher = rng.normal(0, 3, (size, classes))
    if soft_targets:
        targets = rng.dirichlet(np.ones(classes), size)
    else:
        targets = rng.integers(0, classes, size)
    return logits, targets, teacher


CASES = [dict(kind="none", alpha=0.5, tau=1.0, smoothing=0.1), dict(kind="soft", alpha=0.5, tau=1.0, smoothing=0.1),
         dict(kind="soft", alpha=0.3, tau=3.0, smoothing=0.0), dict(kind="hard", alpha=0.5, tau=1.0, smoothing=0.1),
         dict(kind="hard", alpha=0.9, tau=1.0, smoothing=0.0)]


@pytest.mark.parametrize("soft_targets", [False, True], ids=["labels", "mixup targets"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['kind']}-a{c['alpha']}-t{c['tau']}-s{c['smoothing']}" for c in CASES])
def test_loss_and_gradient_equal_deits(xp, case, soft_targets):
    logits, targets, teacher = batch(0, soft_targets=soft_targets)
    smoothing = 0.0 if soft_targets else case["smoothing"]
    loss, dlogits = distillation_loss(xp.asarray(logits), xp.asarray(targets), xp.asarray(teacher),
                                      case["kind"], case["alpha"], case["tau"], smoothing)

    torch_logits = torch.tensor(logits, requires_grad=True)
    torch_targets = torch.tensor(targets)
    expected = deit_loss(torch_logits, torch_targets, torch.tensor(teacher), case["kind"], case["alpha"],
                         case["tau"], smoothing)
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-12)
    assert relative_error(dlogits, torch_logits.grad.numpy()) < 1e-12


def test_soft_term_gradient_by_finite_differences():
    logits, targets, teacher = batch(1)

    def loss_of(z):
        return np.array(float(distillation_loss(z, targets, teacher, "soft", alpha=1.0, tau=2.0)[0]))

    _, dlogits = distillation_loss(logits, targets, teacher, "soft", alpha=1.0, tau=2.0)
    numerical, = numerical_gradients(loss_of, [logits], np.array(1.0))
    assert relative_error(dlogits, numerical) < 1e-7


def test_alpha_weighs_the_terms_and_distillation_pulls_toward_the_teacher():
    logits, targets, teacher = batch(2)
    base, _ = distillation_loss(logits, targets, teacher, "none")
    only_teacher, dlogits = distillation_loss(logits, targets, teacher, "hard", alpha=1.0)
    half, _ = distillation_loss(logits, targets, teacher, "hard", alpha=0.5)
    assert float(half) == pytest.approx((float(base) + float(only_teacher)) / 2, rel=1e-12)
    rows = np.arange(len(teacher))
    assert (dlogits[rows, teacher.argmax(axis=1)] < 0).all()  # a step down the gradient raises the teacher's class
    soft_same, soft_grad = distillation_loss(teacher.copy(), targets, teacher, "soft", alpha=1.0)
    assert abs(float(soft_same)) < 1e-14 and np.abs(soft_grad).max() < 1e-15  # no loss when student = teacher


@pytest.mark.parametrize("settings, complaint", [
    (dict(kind="medium"), r"--distillation-type 'medium'"), (dict(alpha=1.5), r"--distillation-alpha 1.5"),
    (dict(tau=0.0), r"--distillation-tau 0.0"), (dict(teacher=np.zeros((6, 3))), r"teacher logits of shape \(6, 7\)")])
def test_bad_arguments_are_named(settings, complaint):
    logits, targets, teacher = batch(3)
    teacher = settings.pop("teacher", teacher)
    with pytest.raises(ValueError, match=complaint):
        distillation_loss(logits, targets, teacher, **dict(dict(kind="soft"), **settings))
