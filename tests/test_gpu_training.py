"""Training on the GPU, end to end: train.py --device gpu, an ImageNet-shaped run that matches the CPU step
for step, checkpoints that move between GPU and CPU, and the out-of-memory message.

Everything here needs a CUDA GPU with CuPy and is skipped without one, except the CPU-to-CPU case of the
checkpoint test (a checkpoint is host NumPy, so the same test covers every pair of devices). On a GPU
machine, the whole GPU verification is one command, from the repository root:

    python -m pytest -q tests/ && python benchmarks/gpu_checks.py

(the first part also runs every layer, model, loss, optimizer, feed and AMP test on CuPy through the
`xp` fixture; the second measures the TF32 and AMP tolerances and the peak memory of ResMLP-S12).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimlp import create_model
from minimlp.backend import gpu_available
from minimlp.training.checkpoint import load_checkpoint
from minimlp.data.device_feed import DeviceFeed
from minimlp.data.loader import Loader
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.step import train_step
from minimlp.data.synthetic import ensure_shapes_dataset
from tests.conftest import GPU_SKIP_REASON
from tests.imagetools import save_image
from tests.test_train import FAST, read_log, train

requires_gpu = pytest.mark.skipif(not gpu_available(), reason=GPU_SKIP_REASON)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=24, val_per_class=6)


@requires_gpu
@pytest.mark.parametrize("amp", [[], ["--amp"], ["--amp", "--amp-dtype", "bfloat16"]],
                         ids=["float32", "amp", "bfloat16"])
def test_the_demo_trains_on_the_gpu(tmp_path, amp):
    """`python train.py --device gpu` (the embedded demo), one epoch: it learns and reports GPU memory; --amp is
    float16 on the GPU (loss scaling: skipped steps logged), bfloat16 has no loss scaler."""
    result = train("--device", "gpu", "--epochs", 1, "--output", tmp_path, *amp)
    assert "device: gpu (TF32 matmuls on)" in result.stdout
    record = read_log(tmp_path)[0]
    assert record["train_loss"] < np.log(10) and record["val_top1"] > 10  # better than chance on 10 classes
    assert 0 < record["peak_gpu_mem_gb"] < 80
    assert ("skipped_steps" in record) == (amp == ["--amp"])


class Samples:
    """A dataset as the Loader sees it: (path, label) pairs."""

    def __init__(self, samples):
        self.samples = samples


@requires_gpu
@pytest.mark.parametrize("precision_name", ["float32", "float16", "bfloat16"])
def test_imagenet_shaped_steps_match_the_cpu(tmp_path, precision_name):
    """ResMLP-S12, 224 px, 1000 classes, generated JPEGs: three steps on the GPU give the CPU's losses.

    TF32 is off in this process (CUPY_TF32 unset: CuPy's default), so both devices compute in float32 and
    differ only in the order of additions. In float16 the GPU's cuBLAS float16 GEMM meets the CPU's emulation; in
    bfloat16 cuBLAS's bfloat16 GEMM meets the CPU's (oneDNN where installed), the same roundings of the operands."""
    assert os.environ.get("CUPY_TF32", "0") == "0", "run this test with TF32 off (CUPY_TF32 unset or 0)"
    rng = np.random.default_rng(0)
    samples = [(save_image(tmp_path / f"img{i}.JPEG", size=(256 + 8 * i, 200), seed=i), int(rng.integers(1000)))
               for i in range(12)]
    loader = Loader(Samples(samples), batch_size=4, train=True, img_size=224, seed=0, workers=0)
    losses = {}
    for device in ("cpu", "gpu"):
        model = create_model("resmlp_s12", device=device, seed=0, drop_path=0.05)
        optimizer, precision = AdamW(model.parameters, model.ops, lr=5e-4), policy(precision_name)
        losses[device] = [float(train_step(model, optimizer, x, y, 5e-4, precision, smoothing=0.1)[0])
                          for x, y in DeviceFeed(device, model.dtype).batches(loader.epoch(0))]
    assert len(losses["gpu"]) == 3
    # step 1: the same weights and images, float32 sums in another order; later steps: after AdamW updates,
    # whose first steps are lr * sign(g) and so amplify the tiny differences of near-zero gradients
    first, later = dict(float32=(1e-5, 1e-3), float16=(1e-3, 3e-3), bfloat16=(3e-3, 1e-2))[precision_name]
    np.testing.assert_allclose(losses["gpu"][0], losses["cpu"][0], rtol=first)
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=later)


@pytest.mark.parametrize("first, then", [
    ("cpu", "cpu"),
    pytest.param("gpu", "cpu", marks=requires_gpu),
    pytest.param("cpu", "gpu", marks=requires_gpu),
])
def test_a_checkpoint_moves_between_devices(shapes, tmp_path, first, then):
    """A checkpoint written on one device resumes on the other: it holds host NumPy arrays only, the resumed
    model evaluates as the saved one did, and training goes on as it would have on the first device."""
    train("--data", shapes, "--epochs", 1, *FAST, "--device", first, "--output", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    weights, optimizer_state, meta = load_checkpoint(checkpoint)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in weights.values())
    assert optimizer_state["m"].dtype == np.float32

    saved = read_log(tmp_path / "run")[0]
    result = train("--eval-only", "--resume", checkpoint, "--data", shapes, "--workers", 0, "--device", then)
    val_loss = float(result.stdout.split("val loss ")[1].split()[0])
    assert val_loss == pytest.approx(saved["val_loss"], rel=1e-4)  # printed to 4 decimals

    continued = {}
    for device in dict.fromkeys([then, first]):  # one run when both are the same device
        train("--resume", checkpoint, "--epochs", 2, "--device", device, "--output", tmp_path / device)
        continued[device] = read_log(tmp_path / device)
    assert [record["epoch"] for record in continued[then]] == [2]
    assert continued[then][0]["train_loss"] < saved["train_loss"]
    # float32 on two BLAS libraries through 15 AdamW steps (the same run when first == then)
    assert continued[then][0]["train_loss"] == pytest.approx(continued[first][0]["train_loss"], rel=1e-2)


@requires_gpu
def test_out_of_memory_is_one_clear_line(tmp_path):
    """CuPy's pool limit stands in for a small GPU: the demo at batch 128 does not fit in 8 MB."""
    result = subprocess.run([sys.executable, "train.py", "--device", "gpu", "--epochs", "1", "--workers", "0",
                             "--output", str(tmp_path)], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUPY_GPU_MEMORY_LIMIT": str(8 * 2 ** 20)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert "the GPU ran out of memory with --batch-size 128" in result.stderr
    assert "try a smaller --batch-size, e.g. 64" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr
