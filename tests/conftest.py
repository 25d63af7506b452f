"""Shared fixtures. `xp` runs a test once on NumPy and, where a CUDA GPU and CuPy are present,
once more on CuPy: the same test function, never a copied GPU test file."""
import numpy as np
import pytest

from minimlp import backend

GPU_SKIP_REASON = "no CUDA GPU with CuPy on this machine (GPU tests run only where one is present)"


def pytest_generate_tests(metafunc):
    if "xp" in metafunc.fixturenames:
        metafunc.parametrize("xp", ["numpy", "cupy"], indirect=True)


@pytest.fixture
def xp(request):
    if request.param == "numpy":
        return np
    if not backend.gpu_available():
        pytest.skip(GPU_SKIP_REASON)
    return backend.get_module("gpu")


@pytest.fixture
def device(xp):
    """'cpu' or 'gpu', matching the `xp` fixture."""
    return "cpu" if xp is np else "gpu"
