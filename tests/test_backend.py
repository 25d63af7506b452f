"""Device selection and the backend's array helpers."""
import math

import numpy as np
import pytest
import scipy.special

from minimlp import backend


def test_unknown_device_is_a_clear_error():
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu': choose auto, cpu or gpu"):
        backend.resolve_device("tpu")


def test_auto_and_cpu():
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("auto") == ("gpu" if backend.gpu_available() else "cpu")


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU: the missing-GPU error cannot occur")
def test_gpu_without_one_says_what_to_do():
    with pytest.raises(backend.DeviceError, match="--device gpu"):
        backend.resolve_device("gpu")


def test_float32_erf_is_accurate_everywhere():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(scale=2, size=300_000), np.linspace(-6, 6, 20001), [0.0, 1e-30, -1e-6, 50, -50],
                        rng.uniform(-1e-3, 1e-3, 1000)]).astype(np.float32)  # several pieces, tails, tiny values
    exact = scipy.special.erf(x.astype(np.float64))
    ours = backend.erf(x)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.abs(ours - exact).max() < 5e-7
    tiny = np.abs(x) < 1e-2
    assert (np.abs(ours[tiny] - exact[tiny]) <= 3e-7 * np.abs(exact[tiny]) + 1e-38).all()  # relative near 0
    two_d = x[:300_000].reshape(600, 500)
    np.testing.assert_array_equal(backend.erf(two_d), ours[:300_000].reshape(600, 500))


def libm_erf(x):
    """The C library's erf (Python's math.erf), elementwise: a witness independent of SciPy and CuPy."""
    return np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, dtype=np.float64))


def test_float64_erf_matches_the_c_library():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(scale=2, size=1230), np.linspace(-7, 7, 1401), [0.0, 1e-300, -1e-8, 30.0, -30.0]])
    np.testing.assert_allclose(backend.erf(x.reshape(-1, 2)), libm_erf(x).reshape(-1, 2), rtol=1e-15, atol=0)


def test_erf_on_the_device(xp):
    x = np.linspace(-5, 5, 2001)
    np.testing.assert_allclose(backend.to_numpy(backend.erf(xp.asarray(x))), libm_erf(x), rtol=1e-14, atol=1e-15)


def test_moving_arrays(xp, device):
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    moved = backend.to_device(host, device, "float32")
    assert backend.get_xp(moved) is xp and moved.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(moved), host.astype(np.float32))
