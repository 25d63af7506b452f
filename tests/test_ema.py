"""The weight average against timm's ModelEma and ModelEmaV2 (what DeiT keeps), bit for bit in float32."""
import numpy as np
import pytest

from minimlp.backend import to_numpy
from minimlp.training.ema import ModelEma
from minimlp.parameters import Parameters
from minimlp.tools.pytorch_references import timm, torch

SHAPES = {"weight": (4, 3), "bias": (4,), "gamma": (2, 2, 3)}


class TorchTwin(torch.nn.Module):
    """Parameters of SHAPES, in that order, like our flat buffer's parts."""

    def __init__(self):
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(shape)))

    def load_flat(self, flat, parameters):
        with torch.no_grad():
            for name, part in parameters.slices.items():
                getattr(self, name).copy_(torch.from_numpy(flat[part].reshape(SHAPES[name])))


def flat_state(module):
    return np.concatenate([value.detach().numpy().ravel() for value in module.state_dict().values()])


@pytest.mark.parametrize("decay", [0.9, 0.99996])
@pytest.mark.parametrize("timm_class", ["ModelEma", "ModelEmaV2"])
def test_average_equals_timms_bit_for_bit(xp, decay, timm_class):
    parameters = Parameters(SHAPES, xp, "float32")
    rng = np.random.default_rng(0)
    parameters.data[...] = xp.asarray(rng.normal(size=parameters.size), dtype=np.float32)
    twin = TorchTwin()
    twin.load_flat(to_numpy(parameters.data), parameters)

    ours = ModelEma(parameters.data, decay=decay)
    theirs = getattr(timm.utils.model_ema, timm_class)(twin, decay=decay)
    for _ in range(40):  # weights wander as if trained
        parameters.data += xp.asarray(rng.normal(0, 0.1, parameters.size), dtype=np.float32)
        twin.load_flat(to_numpy(parameters.data), parameters)
        ours.update(parameters.data)
        theirs.update(twin)
    expected = flat_state(theirs.ema if timm_class == "ModelEma" else theirs.module)
    assert ours.data.dtype == np.float32
    assert np.array_equal(to_numpy(ours.data), expected)
    assert not np.array_equal(to_numpy(ours.data), to_numpy(parameters.data))


def test_average_is_the_weighted_sum_in_float64():
    weights = np.array([1.0, -2.0, 4.0])
    ema = ModelEma(weights, decay=0.75)
    history = [weights.copy()]
    for step in range(1, 6):
        weights[...] = weights * 0.5 + step
        history.append(weights.copy())
        ema.update(weights)
    # ema_t = 0.75^t w_0 + sum_s 0.25 * 0.75^(t-s) w_s
    expected = 0.75 ** 5 * history[0] + sum(0.25 * 0.75 ** (5 - s) * history[s] for s in range(1, 6))
    np.testing.assert_allclose(ema.data, expected, rtol=1e-14)
    assert ema.data is not weights


def test_swapped_into_shows_the_average_then_restores(xp):
    parameters = Parameters(SHAPES, xp, "float32")
    parameters.data[...] = xp.arange(parameters.size, dtype=np.float32)
    ema = ModelEma(parameters.data, decay=0.5)
    own = to_numpy(parameters.data).copy()
    parameters.data += 10
    ema.update(parameters.data)  # ema = own + 5
    with ema.swapped_into(parameters.data):
        assert np.array_equal(to_numpy(parameters.values["bias"]), own[12:16] + 5)  # the views see it
    assert np.array_equal(to_numpy(parameters.data), own + 10)

    with pytest.raises(RuntimeError):
        with ema.swapped_into(parameters.data):
            raise RuntimeError("evaluation failed")
    assert np.array_equal(to_numpy(parameters.data), own + 10)


def test_state_dict_round_trip_and_named_weights(xp):
    parameters = Parameters(SHAPES, xp, "float32")
    parameters.data[...] = xp.asarray(np.random.default_rng(1).normal(size=parameters.size), dtype=np.float32)
    ema = ModelEma(parameters.data, decay=0.9)
    parameters.data *= 2
    ema.update(parameters.data)
    state = ema.state_dict()
    assert all(isinstance(value, np.ndarray) for value in state.values())  # fits a .npz checkpoint

    restored = ModelEma(xp.zeros(parameters.size, dtype=np.float32), decay=0.5)
    restored.load_state_dict(state)
    assert restored.decay == 0.9 and np.array_equal(to_numpy(restored.data), to_numpy(ema.data))
    parameters.data += 1
    ema.update(parameters.data)
    restored.update(parameters.data)
    assert np.array_equal(to_numpy(restored.data), to_numpy(ema.data))  # resuming continues exactly

    named = ema.named_weights(parameters)
    assert {name: value.shape for name, value in named.items()} == SHAPES
    assert np.array_equal(named["gamma"].ravel(), to_numpy(ema.data)[16:])

    with pytest.raises(ValueError, match="does not fit this model's 28 parameters"):
        ModelEma(xp.zeros(28, dtype=np.float32)).load_state_dict({"data": np.zeros(5), "decay": np.array(0.9)})


def test_decay_outside_zero_one():
    with pytest.raises(ValueError, match="--model-ema-decay 1.5"):
        ModelEma(np.zeros(3), decay=1.5)
