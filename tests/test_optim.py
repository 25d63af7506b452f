"""AdamW and Lamb against torch.optim.AdamW and timm.optim.Lamb, on a stand-in quadratic model and on
the whole ResMLP against timm's; gradient clipping against torch; checkpoint resume; the schedule, also
against timm's CosineLRScheduler."""
import io

import numpy as np
import pytest

from minimlp import create_model, ops
from minimlp.backend import to_numpy
from minimlp.tools.gradcheck import relative_error
from minimlp.precision import policy
from minimlp.optim import AdamW, Lamb, clip_grad_norm
from minimlp.parameters import Parameters
from minimlp.schedule import lr_at
from minimlp.step import train_step
from minimlp.tools.pytorch_references import timm, timm_twin, torch
from minimlp.weights import official_to_timm

# matrices and a conv-like kernel take weight decay, the 1-D tensors do not
SHAPES = {"weight": (5, 4), "bias": (5,), "scale": (4,), "kernel": (3, 2, 2)}
MAGNITUDES = {"weight": 0.2, "bias": 1.0, "scale": 1.0, "kernel": 5.0}  # Lamb trust ratios below and above 1
SCHEDULE = dict(base_lr=0.05, total_steps=20, warmup_steps=4, min_lr=1e-3, warmup_lr=1e-2)


class Quadratic:
    """A stand-in model: loss = 1/2 sum c (p - t)^2 over every parameter, with random curvature c > 0
    and target t, so the gradient c (p - t) changes with the parameters and is never trivial. The tensors
    differ in magnitude (MAGNITUDES), as a network's do."""

    def __init__(self, xp, seed=0):
        rng = np.random.default_rng(seed)
        self.parameters = Parameters(SHAPES, xp, "float64")
        self.ops = ops.REFERENCE_OPERATIONS  # what AdamW takes its update from (float64: the reference)
        size = self.parameters.size
        magnitude = np.concatenate([np.full(np.prod(shape), MAGNITUDES[name]) for name, shape in SHAPES.items()])
        self.parameters.data[...] = xp.asarray(magnitude * rng.normal(size=size))
        self.curvature = xp.asarray(rng.uniform(0.5, 2.0, size))
        self.target = xp.asarray(magnitude * rng.normal(size=size))

    def backward(self):
        # dL/dp = c (p - t), written into grad (overwrite, as model.backward does)
        self.parameters.grad[...] = self.curvature * (self.parameters.data - self.target)

    def torch_twin(self):
        """The same parameters as torch tensors, and a function computing the same loss from them."""
        host = {name: to_numpy(value) for name, value in self.parameters.values.items()}
        tensors = {name: torch.tensor(value, requires_grad=True) for name, value in host.items()}
        curvature, target = torch.from_numpy(to_numpy(self.curvature)), torch.from_numpy(to_numpy(self.target))

        def loss():
            flat = torch.cat([tensor.reshape(-1) for tensor in tensors.values()])
            return 0.5 * (curvature * (flat - target) ** 2).sum()

        return tensors, loss


def decay_groups(tensors, weight_decay, decays):
    """torch parameter groups: weight_decay where decays(name), 0 elsewhere."""
    return [{"params": [t for name, t in tensors.items() if decays(name)], "weight_decay": weight_decay},
            {"params": [t for name, t in tensors.items() if not decays(name)], "weight_decay": 0.0}]


def torch_step(optimizer, loss, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    value = loss()
    value.backward()
    optimizer.step()
    return value.item()


def assert_close(ours, tensors, tolerance):
    for name, tensor in tensors.items():
        error = relative_error(ours[name], tensor.detach().numpy().reshape(ours[name].shape))
        assert error < tolerance, f"{name}: relative error {error:.2e}"


def run_standin(xp, make_ours, make_theirs, weight_decay, steps=20, schedule=True):
    model = Quadratic(xp)
    tensors, loss = model.torch_twin()
    optimizer = make_ours(model)
    reference = make_theirs(decay_groups(tensors, weight_decay, lambda name: len(SHAPES[name]) > 1))
    for step in range(steps):
        lr = lr_at(step, **SCHEDULE) if schedule else SCHEDULE["base_lr"]
        model.backward()
        optimizer.lr = lr
        optimizer.step()
        torch_step(reference, loss, lr)
    assert_close(model.parameters.values, tensors, 1e-12)
    return model


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [False, True])
def test_adamw_matches_torch(xp, schedule):
    options = dict(betas=(0.8, 0.99), eps=1e-8, weight_decay=0.3)
    model = run_standin(xp, lambda model: AdamW(model.parameters, model.ops, **options),
                        lambda groups: torch.optim.AdamW(groups, lr=1.0, betas=options["betas"], eps=options["eps"]),
                        options["weight_decay"], schedule=schedule)
    initial = to_numpy(Quadratic(xp).parameters.data)
    assert np.abs(to_numpy(model.parameters.data) - initial).min() > 1e-3, "every parameter should have moved"


LAMB_OPTIONS = [
    dict(),  # timm's defaults: clipping at 1, grad averaging, bias correction, no trust clip
    dict(weight_decay=0.2, max_grad_norm=None, trust_clip=True),
    dict(weight_decay=0.2, always_adapt=True, max_grad_norm=100.0),
    dict(weight_decay=0.0, grad_averaging=False, bias_correction=False, betas=(0.8, 0.99)),
    dict(weight_decay=0.0, always_adapt=True, trust_clip=True),
]


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=lambda options: ",".join(options) or "defaults")
def test_lamb_matches_timm(xp, options):
    weight_decay = options.get("weight_decay", 0.01)
    run_standin(xp, lambda model: Lamb(model.parameters, **options),
                lambda groups: timm.optim.Lamb(groups, lr=1.0, **{k: v for k, v in options.items() if k != "weight_decay"}),
                weight_decay)


def test_lamb_leaves_grad_unchanged(xp):
    model = Quadratic(xp)
    model.backward()
    grad = to_numpy(model.parameters.grad).copy()
    assert np.linalg.norm(grad) > 1.0, "the test needs a gradient that the default clipping scales"
    Lamb(model.parameters).step()
    assert np.array_equal(to_numpy(model.parameters.grad), grad)


# ---------------------------------------------------------------------------------------------
SMALL = dict(num_classes=10, img_size=16, patch_size=4, dim=16, depth=2)  # 16 patches, 64 hidden


@pytest.mark.parametrize("name", ["AdamW", "Lamb"])
def test_full_model_matches_timm(xp, device, name):
    """20 steps of the whole ResMLP against timm's ResMLP with torch.optim.AdamW / timm.optim.Lamb,
    from the same initialization on the same batches: the losses and every parameter agree."""
    model = create_model("resmlp_tiny", device=device, dtype="float64", seed=0, **SMALL)
    twin = timm_twin(model)
    official_names = list(model.parameters.shapes)
    timm_names = dict(zip(official_to_timm({name: np.zeros(1) for name in official_names}), official_names))
    decays = lambda timm_name: len(model.parameters.shapes[timm_names[timm_name]]) > 1  # noqa: E731
    groups = decay_groups(dict(twin.named_parameters()), 0.05 if name == "AdamW" else 0.2, decays)
    if name == "AdamW":
        optimizer, reference = AdamW(model.parameters, model.ops, weight_decay=0.05), torch.optim.AdamW(groups)
        schedule = dict(base_lr=1e-3, total_steps=20, warmup_steps=5)
    else:
        optimizer, reference = Lamb(model.parameters, weight_decay=0.2), timm.optim.Lamb(groups)
        schedule = dict(base_lr=5e-3, total_steps=20, warmup_steps=5)
    rng = np.random.default_rng(1)
    for step in range(20):
        images = rng.normal(size=(4, 3, 16, 16))
        labels = rng.integers(0, 10, size=4)
        lr = lr_at(step, **schedule)
        loss, _ = train_step(model, optimizer, images, labels, lr, policy("float32"))
        expected = torch_step(reference, lambda: torch.nn.functional.cross_entropy(
            twin(torch.from_numpy(images)), torch.from_numpy(labels)), lr)
        assert abs(float(loss) - expected) < 1e-9 * abs(expected), f"step {step}: {float(loss)} != {expected}"
    timm_state = twin.state_dict()
    for official, value in official_to_timm(model.state_dict()).items():
        error = relative_error(value, timm_state[official].numpy())
        assert error < 1e-9, f"{official}: relative error {error:.2e}"


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(xp, max_norm):
    rng = np.random.default_rng(2)
    parameters = Parameters(SHAPES, xp, "float64")
    grad = 3.0 * rng.normal(size=parameters.size)
    parameters.grad[...] = xp.asarray(grad)
    tensors = {name: torch.zeros(shape, dtype=torch.float64, requires_grad=True) for name, shape in SHAPES.items()}
    for name, tensor in tensors.items():
        tensor.grad = torch.from_numpy(grad[parameters.slices[name]].reshape(SHAPES[name]).copy())
    norm = clip_grad_norm(parameters, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
    assert abs(float(norm) - expected.item()) < 1e-13 * expected.item()
    for name, tensor in tensors.items():
        assert relative_error(parameters.grads[name], tensor.grad.numpy()) < 1e-14
    if max_norm < float(norm):
        assert abs(np.linalg.norm(to_numpy(parameters.grad)) - max_norm) < 1e-5
    else:
        assert np.array_equal(to_numpy(parameters.grad), grad)


# ---------------------------------------------------------------------------------------------
OPTIMIZERS = {"AdamW": lambda model: AdamW(model.parameters, model.ops, betas=(0.8, 0.99), weight_decay=0.3),
              "Lamb": lambda model: Lamb(model.parameters, weight_decay=0.2, trust_clip=True)}


def train(model, optimizer, steps):
    for _ in range(steps):
        model.backward()
        optimizer.lr = lr_at(optimizer.step_count, **SCHEDULE)
        optimizer.step()


def npz_round_trip(state):
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(xp, name):
    """10 steps in one go == 5 steps, checkpoint (through an .npz file), a fresh optimizer built with
    other settings, load, 5 steps: parameters and moments bitwise equal."""
    straight = Quadratic(xp)
    straight_optimizer = OPTIMIZERS[name](straight)
    train(straight, straight_optimizer, 10)

    first = Quadratic(xp)
    first_optimizer = OPTIMIZERS[name](first)
    train(first, first_optimizer, 5)
    checkpoint = npz_round_trip(first_optimizer.state_dict())
    resumed = Quadratic(xp)
    resumed.parameters.data[...] = first.parameters.data
    resumed_optimizer = (AdamW(resumed.parameters, resumed.ops) if name == "AdamW" else  # default hyper-parameters:
                         Lamb(resumed.parameters))  # the checkpoint restores them
    resumed_optimizer.load_state_dict(checkpoint)
    train(resumed, resumed_optimizer, 5)

    assert resumed_optimizer.step_count == 10
    for ours, theirs in [(resumed.parameters.data, straight.parameters.data),
                         (resumed_optimizer.m, straight_optimizer.m), (resumed_optimizer.v, straight_optimizer.v)]:
        assert np.array_equal(to_numpy(ours), to_numpy(theirs))
    assert not np.array_equal(to_numpy(resumed.parameters.data), to_numpy(first.parameters.data))


def test_load_state_dict_errors(xp):
    model = Quadratic(xp)
    state = AdamW(model.parameters, model.ops).state_dict()
    with pytest.raises(ValueError, match="for 'AdamW', not Lamb"):
        Lamb(model.parameters).load_state_dict(state)
    smaller = type("Model", (), {"parameters": Parameters({"weight": (5, 4)}, xp, "float64"),
                                 "ops": ops.REFERENCE_OPERATIONS})()
    with pytest.raises(ValueError, match=f"m of size {model.parameters.size}, but the model has 20 parameters"):
        AdamW(smaller.parameters, smaller.ops).load_state_dict(state)
    del state["v"]
    with pytest.raises(ValueError, match="missing v"):
        AdamW(model.parameters, model.ops).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
def test_schedule_warmup_and_endpoints():
    settings = dict(base_lr=5e-4, total_steps=100, warmup_steps=10, min_lr=1e-5, warmup_lr=1e-6)
    assert lr_at(0, **settings) == 1e-6
    assert lr_at(5, **settings) == pytest.approx((1e-6 + 5e-4) / 2, rel=1e-15)
    warmup = [lr_at(step, **settings) for step in range(11)]
    assert np.allclose(np.diff(warmup), (5e-4 - 1e-6) / 10, rtol=1e-12, atol=0)  # linear
    assert lr_at(10, **settings) == 5e-4
    assert lr_at(100, **settings) == 1e-5
    assert lr_at(150, **settings) == 1e-5
    assert lr_at(0, base_lr=1.0, total_steps=10) == 1.0  # no warmup starts at base_lr


def test_schedule_cosine_decay():
    settings = dict(base_lr=5e-4, total_steps=100, warmup_steps=10, min_lr=1e-5, warmup_lr=1e-6)
    decay = [lr_at(step, **settings) for step in range(10, 101)]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:]))
    assert lr_at(55, **settings) == pytest.approx((5e-4 + 1e-5) / 2, rel=1e-15)  # half-way down


def timm_schedule(steps, base_lr, total_steps, warmup_steps=0, min_lr=1e-5, warmup_lr=1e-6):
    """timm's CosineLRScheduler configured as lr_at (docs/reference.md, Training recipe: the warmup and
    cosine schedule): the cosine starts after the warmup (warmup_prefix), one cycle, counted in updates
    (t_in_epochs=False, step_update). Returns the learning rate it sets before each of `steps` updates."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=total_steps - warmup_steps, lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
    rates = []
    for step in range(steps):
        scheduler.step_update(step)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("settings", [
    SCHEDULE,
    dict(base_lr=5e-4, total_steps=1000, warmup_steps=50),  # DeiT's warmup_lr and min_lr (the defaults)
    dict(base_lr=5e-3, total_steps=400, warmup_steps=5, min_lr=1e-5, warmup_lr=1e-6),  # the paper's, in epochs
    dict(base_lr=1e-3, total_steps=37, warmup_steps=0, min_lr=0.0),
    dict(base_lr=1e-4, total_steps=30, warmup_steps=29, min_lr=1e-6, warmup_lr=1e-3),  # warmup from above
], ids=["test-settings", "deit-defaults", "paper", "no-warmup", "long-warmup"])
def test_schedule_equals_timm_cosine_scheduler(settings):
    steps = settings["total_steps"] + 5  # and past the end, where both stay at min_lr
    expected = timm_schedule(steps, **settings)
    ours = [lr_at(step, **settings) for step in range(steps)]
    for step, (mine, theirs) in enumerate(zip(ours, expected)):
        assert abs(mine - theirs) <= 1e-12 * theirs + 1e-300, f"step {step}: {mine!r} != timm's {theirs!r}"


@pytest.mark.parametrize("step,warmup_steps,total_steps", [(0, 10, 10), (0, -1, 10), (-1, 0, 10)])
def test_schedule_rejects_bad_arguments(step, warmup_steps, total_steps):
    with pytest.raises(ValueError):
        lr_at(step, base_lr=1e-3, total_steps=total_steps, warmup_steps=warmup_steps)
