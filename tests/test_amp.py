"""Mixed precision (minimlp.precision, minimlp.loss_scaling): float16 matmuls with float32 accumulation, the loss scaler, a
skipped step, training that matches float32, and exact resume of an --amp run with its loss scale.

On the CPU the float16 matmul is emulated (operands rounded to float16, multiplied in float32); the
`xp` tests run the same checks on cuBLAS's float16 GEMM where a GPU is present."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from minimlp import create_model
from minimlp.training.checkpoint import load_checkpoint, save_checkpoint
from minimlp.loss_scaling import LossScaler, NoLossScaling
from minimlp.optim import AdamW
from minimlp.precision import AMP_DTYPE, autocast, matmul
from minimlp.step import train_step
from tests.test_train import FAST, ROOT, read_log, train


def half_rounded_product(a, b):
    """The exact product of the float16-rounded operands (float64), what a float16 GEMM approximates."""
    return a.astype(AMP_DTYPE).astype(np.float64) @ b.astype(AMP_DTYPE).astype(np.float64)


def test_matmul_outside_autocast_is_the_plain_product(xp):
    rng = np.random.default_rng(0)
    a, b = xp.asarray(rng.normal(size=(5, 7)), xp.float32), xp.asarray(rng.normal(size=(7, 3)), xp.float32)
    assert (matmul(a, b) == a @ b).all()


@pytest.mark.parametrize("transposed", [False, True])
def test_autocast_matmul_rounds_operands_to_half_and_accumulates_in_float32(xp, transposed):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 96)).astype(np.float32)
    b = rng.normal(size=(40, 96) if transposed else (96, 40)).astype(np.float32)
    b_used = b.T if transposed else b  # a transposed view, as the layers pass weight.T
    with autocast():
        out = matmul(xp.asarray(a), xp.asarray(b).T if transposed else xp.asarray(b))
    assert out.dtype == np.float32 and out.shape == (64, 40)
    out = out.get() if hasattr(out, "get") else out
    exact = half_rounded_product(a, b_used)
    # float32 accumulation of 96 exact products: errors of a few float32 ulps of the row's magnitude
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    # and the rounding to float16 really happened: the float32 product differs by far more
    assert np.abs(a.astype(np.float64) @ b_used - exact).max() > 1e-3


def test_autocast_is_restored_after_the_block():
    a = np.full((2, 2), 1 / 3, np.float32)
    with autocast():
        with autocast(False):
            assert (matmul(a, a) == a @ a).all()
        assert (matmul(a, a) != a @ a).any()
    assert (matmul(a, a) == a @ a).all()


def test_loss_scaler_backs_off_on_overflow_and_grows_after_clean_steps():
    scaler = LossScaler(init_scale=1024, growth_interval=3)
    for finite, scale in [(True, 1024), (True, 1024), (True, 2048), (False, 1024), (True, 1024), (True, 1024),
                          (True, 2048)]:
        scaler.update(finite)
        assert scaler.scale == scale
    assert scaler.skipped_steps == 1
    restored = LossScaler()
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))  # as it travels in a checkpoint
    assert restored.state_dict() == scaler.state_dict() == dict(scale=2048, clean_steps=0, skipped_steps=1)


def test_unscale_is_exact_and_one_inf_or_nan_is_found(xp):
    model = create_model("resmlp_tiny", img_size=8, dim=8, depth=1, device="cpu" if xp is np else "gpu")
    grad = model.parameters.grad
    values = xp.asarray(np.random.default_rng(2).normal(size=grad.shape), grad.dtype)
    scaler = LossScaler(init_scale=2.0 ** 16)
    grad[...] = values * scaler.scale
    assert scaler.unscale(model.parameters)
    assert (grad == values).all()  # dividing by a power of two loses nothing
    for bad in (np.inf, -np.inf, np.nan):
        grad[...] = values
        grad[grad.size // 2] = bad
        assert not scaler.unscale(model.parameters)


class TinyRun:
    """resmlp_tiny at 16 px and its optimizer, stepped by the one training step (minimlp.step)."""

    def __init__(self, amp, scale=2.0 ** 16):
        self.model = create_model("resmlp_tiny", img_size=16, seed=0)
        self.optimizer = AdamW(self.model.parameters, self.model.ops, lr=1e-3)
        self.scaler = LossScaler(init_scale=scale) if amp else NoLossScaling()

    def train_step(self, images, labels):
        loss, _ = train_step(self.model, self.optimizer, images, labels, 1e-3, self.scaler, smoothing=0.1,
                             clip_grad=1.0)
        return float(loss)


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(16, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 16)


def test_a_step_with_overflowing_gradients_is_skipped_and_the_next_one_taken():
    trainer = TinyRun(amp=True, scale=2.0 ** 40)  # S * gradients beyond float16's 65504
    model = trainer.model
    before = model.parameters.data.copy()
    trainer.train_step(*batch(0))
    assert trainer.scaler.skipped_steps == 1 and trainer.scaler.scale == 2.0 ** 39
    assert (model.parameters.data == before).all() and trainer.optimizer.step_count == 0
    trainer.scaler.scale = 2.0 ** 10
    trainer.train_step(*batch(0))
    assert trainer.optimizer.step_count == 1 and (model.parameters.data != before).any()


def test_amp_steps_follow_float32_steps():
    """Ten steps on the same batches: float16 matmul inputs change the losses by a fraction of a percent."""
    losses = {}
    for amp in (False, True):
        trainer = TinyRun(amp)
        losses[amp] = [trainer.train_step(*batch(step % 3)) for step in range(10)]
        if amp:
            assert trainer.scaler.skipped_steps == 0
    np.testing.assert_allclose(losses[True], losses[False], rtol=5e-3)
    assert losses[True] != losses[False]  # the AMP run did use float16


def test_amp_run_resumes_exactly_with_its_loss_scale(tmp_path):
    """An --amp checkpoint carries the loss scaler: a run stopped by Ctrl-C and resumed ends exactly where an
    uninterrupted one ends, and a resumed run continues with the checkpoint's scale and counts."""
    from minimlp.data.synthetic import ensure_shapes_dataset
    shapes = ensure_shapes_dataset(tmp_path / "cache", train_per_class=24, val_per_class=6)
    settings = ["--data", shapes, "--epochs", 3, *FAST, "--amp"]
    train(*settings, "--output", tmp_path / "straight")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, settings), "--output",
                                str(tmp_path / "resumed")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:  # Ctrl-C once the first epoch is logged: somewhere inside epoch 2
        if line.startswith("epoch 1/3"):
            process.send_signal(signal.SIGINT)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 130, output
    train("--resume", tmp_path / "resumed" / "checkpoint.npz")
    straight, resumed = (load_checkpoint(tmp_path / run / "checkpoint.npz") for run in ("straight", "resumed"))
    for name, value in straight[0].items():
        np.testing.assert_array_equal(resumed[0][name], value, err_msg=name)
    np.testing.assert_array_equal(resumed[1]["v"], straight[1]["v"])
    assert resumed[2]["loss_scaler"] == straight[2]["loss_scaler"]
    assert [r["train_loss"] for r in read_log(tmp_path / "resumed")] == \
        [r["train_loss"] for r in read_log(tmp_path / "straight")]

    # the scaler's state really comes from the checkpoint: change it there, resume, and find it continued
    weights, optimizer_state, meta = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    meta["loss_scaler"] = dict(scale=1024.0, clean_steps=7, skipped_steps=3)
    save_checkpoint(tmp_path / "edited" / "checkpoint.npz", weights, optimizer_state, meta)
    train("--resume", tmp_path / "edited" / "checkpoint.npz", "--epochs", 4)
    record = read_log(tmp_path / "edited")[-1]
    steps = 240 // 16  # one epoch of the small shapes10 copy
    assert (record["loss_scale"], record["skipped_steps"]) == (1024.0, 3)
    assert load_checkpoint(tmp_path / "edited" / "checkpoint.npz")[2]["loss_scaler"]["clean_steps"] == 7 + steps
