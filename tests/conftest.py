"""Shared fixtures. `xp` runs a test once on NumPy and, where a CUDA GPU and CuPy are present,
once more on CuPy: the same test function, never a copied GPU test file.

Skipped tests are summed up as one line per reason, with how many tests and files it skipped
(pytest_terminal_summary below): on a CPU machine the GPU cases would otherwise print ~40 lines of the
same reason. `-rs` (or `-ra`) brings back pytest's own line per skipped test, and this summary steps aside.
"""
import collections

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


def pytest_terminal_summary(terminalreporter, config):
    """SKIPPED <count> tests in <files> files: <reason>, one line per reason (pytest.ini's -r has no 's')."""
    reportchars = config.getoption("reportchars") or ""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped or any(char in reportchars for char in "saAN"):
        return
    tests, files = collections.Counter(), collections.defaultdict(set)
    for report in skipped:
        reason = skip_reason(report)
        tests[reason] += 1
        files[reason].add(report.nodeid.split("::")[0])
    terminalreporter.write_sep("=", "skipped tests, by reason (-rs lists each one)")
    for reason, count in tests.most_common():
        terminalreporter.write_line(f"SKIPPED {count} {'test' if count == 1 else 'tests'} in {len(files[reason])} "
                                    f"{'file' if len(files[reason]) == 1 else 'files'}: {reason}")


def skip_reason(report):
    """The reason a test was skipped, without pytest's 'Skipped: ' prefix."""
    if isinstance(report.longrepr, tuple):  # (path, line, message), as pytest keeps a skip
        message = report.longrepr[2]
    else:
        message = str(report.longrepr)
    return message.removeprefix("Skipped: ")
