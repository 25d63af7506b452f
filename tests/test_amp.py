"""Mixed precision (minimlp.precision, minimlp.loss_scaling): the three policies, 16-bit matmuls with float32
accumulation, bfloat16's rounding, the loss scaler and its skipped step, a whole step's gradients against
float64, training that follows float32, and resumes that keep a run's precision.

On the CPU the 16-bit matmuls are emulated (operands rounded, multiplied in float32); the `xp` tests run the
same checks on cuBLAS's float16 and bfloat16 GEMMs where a GPU is present."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from minimlp import backend, create_model, loss_scaling
from minimlp.loss_scaling import LossScaler
from minimlp.optim import AdamW
from minimlp.precision import HALF_DTYPES, HALF_ROUNDING, Precision, autocast, matmul, policy, round_to_bfloat16
from minimlp.step import train_step
from minimlp.training.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import GPU_SKIP_REASON
from tests.test_train import FAST, ROOT, read_log, train


def half_rounded_product(a, b, dtype):
    """The exact product of the 16-bit-rounded operands (float64), what a 16-bit GEMM approximates."""
    rounded = HALF_ROUNDING[dtype]
    return rounded(a).astype(np.float64) @ rounded(b).astype(np.float64)


def test_the_three_policies():
    assert policy("float32") == Precision("float32", None, None)  # nothing: the step calls nothing of it
    assert policy("bfloat16") == Precision("bfloat16", "bfloat16", None)  # no loss scaler
    float16 = policy("float16")
    assert float16.matmul_dtype == "float16" and float16.loss_scaler.scale == 2.0 ** 16
    assert policy("float16").loss_scaler is not float16.loss_scaler  # each run its own scaler
    with pytest.raises(ValueError, match="'float8'.*float32, float16, bfloat16"):
        policy("float8")


def test_matmul_outside_autocast_is_the_plain_product(xp):
    rng = np.random.default_rng(0)
    a, b = xp.asarray(rng.normal(size=(5, 7)), xp.float32), xp.asarray(rng.normal(size=(7, 3)), xp.float32)
    assert (matmul(a, b) == a @ b).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_autocast_matmul_rounds_operands_to_half_and_accumulates_in_float32(xp, transposed, dtype):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 96)).astype(np.float32)
    b = rng.normal(size=(40, 96) if transposed else (96, 40)).astype(np.float32)
    b_used = b.T if transposed else b  # a transposed view, as the layers pass weight.T
    with autocast(dtype):
        out = matmul(xp.asarray(a), xp.asarray(b).T if transposed else xp.asarray(b))
    assert out.dtype == np.float32 and out.shape == (64, 40)
    out = out.get() if hasattr(out, "get") else out
    exact = half_rounded_product(a, b_used, dtype)
    # float32 accumulation of 96 exact products: errors of a few float32 ulps of the row's magnitude
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    # and the rounding really happened: the float32 product differs by far more
    assert np.abs(a.astype(np.float64) @ b_used - exact).max() > 1e-3


def test_autocast_is_restored_after_the_block():
    a = np.full((2, 2), 1 / 3, np.float32)
    with autocast("bfloat16"):
        with autocast(None):
            assert (matmul(a, a) == a @ a).all()
        assert (matmul(a, a) != a @ a).any()
    assert (matmul(a, a) == a @ a).all()
    with pytest.raises(ValueError, match="autocast\\('float64'\\)"):
        with autocast("float64"):
            pass


def test_bfloat16_rounding_is_round_to_nearest_even_as_torch_does():
    """Every kind of float32: random bit patterns (NaNs, infs, subnormals included), ties, the largest
    finite values (which round to inf), against torch's float32 -> bfloat16 conversion."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (rng.integers(0, 2 ** 16, 1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    edges = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    values = np.concatenate([values, ties, edges])
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).float().numpy()
    ours = round_to_bfloat16(values)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # NaN where NaN
    assert (ours.view(np.uint32) & 0xFFFF == 0)[~np.isnan(values)].all()  # bfloat16s: the low 16 bits are 0
    assert round_to_bfloat16(np.float32(1 + 2 ** -8)) == 1 and round_to_bfloat16(np.float32(1 + 3 * 2 ** -8)) == 1 + 2 ** -6


@pytest.mark.skipif(not backend.gpu_available(), reason=GPU_SKIP_REASON)
def test_the_gpus_bfloat16_rounding_is_numpys():
    """cuda_kernels.to_bfloat16 (cuBLAS's bfloat16 operands) gives round_to_bfloat16's bits, from a transposed
    view as the layers pass weight.T; a NaN stays a NaN."""
    import cupy
    from minimlp.fast.cuda_kernels import to_bfloat16
    rng = np.random.default_rng(4)
    values = rng.integers(0, 2 ** 32, size=(300, 700), dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = to_bfloat16(cupy.asarray(values).T).get()
    expected = round_to_bfloat16(values.T)
    assert bits.dtype == np.uint16 and bits.flags.c_contiguous and bits.shape == (700, 300)
    kept = ~np.isnan(expected)
    np.testing.assert_array_equal(bits[kept], (expected.view(np.uint32)[kept] >> 16).astype(np.uint16))
    assert np.isnan((bits[~kept].astype(np.uint32) << 16).view(np.float32)).all()


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

    def __init__(self, precision):
        self.model = create_model("resmlp_tiny", img_size=16, seed=0)
        self.optimizer = AdamW(self.model.parameters, self.model.ops, lr=1e-3)
        self.precision = precision

    def take_step(self, images, labels):
        loss, taken = train_step(self.model, self.optimizer, images, labels, 1e-3, self.precision, smoothing=0.1,
                                 clip_grad=1.0)
        return float(loss), taken


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(16, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 16)


def test_a_float16_step_with_overflowing_gradients_is_skipped_and_the_next_one_taken():
    trainer = TinyRun(Precision("float16", "float16", LossScaler(init_scale=2.0 ** 40)))  # S * grads > 65504
    model, scaler = trainer.model, trainer.precision.loss_scaler
    before = model.parameters.data.copy()
    assert trainer.take_step(*batch(0))[1] is False
    assert scaler.skipped_steps == 1 and scaler.scale == 2.0 ** 39
    assert (model.parameters.data == before).all() and trainer.optimizer.step_count == 0
    scaler.scale = 2.0 ** 10
    assert trainer.take_step(*batch(0))[1] is True
    assert trainer.optimizer.step_count == 1 and (model.parameters.data != before).any()


def test_a_bfloat16_step_is_never_skipped():
    """Gradients that hold inf and NaN (an image of 3e38s overflows the forward): float16 skips the step;
    bfloat16 takes it, because it checks nothing (no loss scale, nothing read back from the device)."""
    images, labels = batch(0)
    images[0] = 3e38
    for name, taken in [("float16", False), ("bfloat16", True)]:
        trainer = TinyRun(policy(name))
        with np.errstate(all="ignore"):
            assert trainer.take_step(images, labels)[1] is taken
            assert not np.isfinite(trainer.model.parameters.grad).all()
        assert trainer.optimizer.step_count == int(taken)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_float32_and_bfloat16_steps_call_nothing_of_loss_scaling(name, monkeypatch):
    """Every function called during the step, recorded: none is loss scaling's (the float32 policy is
    nothing the step calls; bfloat16 pays for no scaler)."""
    trainer = TinyRun(policy(name))
    called = []

    def record(frame, event, arg):
        if event == "call":
            called.append(frame.f_code)
    sys.setprofile(record)
    try:
        trainer.take_step(*batch(0))
    finally:
        sys.setprofile(None)
    assert trainer.optimizer.step_count == 1 and called
    assert not [code.co_name for code in called if code.co_filename == loss_scaling.__file__]


def step_gradients(model, images, labels, precision):
    """The flat gradient of one train_step at lr 0 (weights unchanged), as float64."""
    optimizer = AdamW(model.parameters, model.ops, lr=0.0)
    train_step(model, optimizer, images, labels, 0.0, precision, smoothing=0.1)
    return model.parameters.grad.astype(np.float64)


def test_a_whole_bfloat16_step_has_float64_gradients_within_its_bound():
    """resmlp_tiny (32 px, 6 blocks of dim 128), batch 8: every parameter's gradient from a bfloat16 step
    against the float64 step of the same weights. Each product's operands carry a relative rounding error of
    at most 2^-8 (3.9e-3); errors of independent roundings add up in quadrature over a gradient's entries,
    and backward chains about 2 x 6 blocks of products, so the relative error of a gradient (its norm) stays
    within a few 2^-8: bound 4 x 2^-8 = 1.6% for every tensor (measured: 0.64% at most, blocks.1.norm1.beta).
    The float32 step's worst is 1000x smaller: the bfloat16 step did round."""
    rng = np.random.default_rng(5)
    images, labels = rng.normal(size=(8, 3, 32, 32)), rng.integers(0, 10, 8)
    reference = step_gradients(create_model("resmlp_tiny", dtype="float64", seed=2), images, labels, policy("float32"))
    ours = {name: step_gradients(create_model("resmlp_tiny", seed=2), images, labels, policy(name))
            for name in ("float32", "bfloat16")}
    model = create_model("resmlp_tiny", seed=2)
    errors = {name: {key: np.linalg.norm(gradient[where] - reference[where]) / np.linalg.norm(reference[where])
                     for key, where in model.parameters.slices.items()} for name, gradient in ours.items()}
    worst = max(errors["bfloat16"], key=errors["bfloat16"].get)
    assert errors["bfloat16"][worst] < 4 * 2.0 ** -8, f"{worst}: {errors['bfloat16'][worst]:.2e}"
    assert max(errors["float32"].values()) < 1e-2 * errors["bfloat16"][worst]


@pytest.mark.parametrize("name, tolerance", [("float16", 5e-3), ("bfloat16", 2e-2)])
def test_half_precision_steps_follow_float32_steps(name, tolerance):
    """Ten steps on the same batches: 16-bit matmul inputs change the losses by a fraction of a percent
    (bfloat16's 8-bit significand: more than float16's 11 bits)."""
    losses = {}
    for precision in ("float32", name):
        trainer = TinyRun(policy(precision))
        losses[precision] = [trainer.take_step(*batch(step % 3))[0] for step in range(10)]
        assert trainer.optimizer.step_count == 10  # none skipped
    np.testing.assert_allclose(losses[name], losses["float32"], rtol=tolerance)
    assert losses[name] != losses["float32"]  # the 16-bit run did round


def test_amp_run_resumes_exactly_with_its_loss_scale(tmp_path):
    """An --amp float16 checkpoint carries the loss scaler: a run stopped by Ctrl-C and resumed ends exactly
    where an uninterrupted one ends, and a resumed run continues with the checkpoint's scale and counts."""
    from minimlp.data.synthetic import ensure_shapes_dataset
    shapes = ensure_shapes_dataset(tmp_path / "cache", train_per_class=24, val_per_class=6)
    settings = ["--data", shapes, "--epochs", 3, *FAST, "--amp", "--amp-dtype", "float16"]
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


def test_a_resume_keeps_the_runs_precision(tmp_path):
    """A float16 run on the CPU (whose --amp-dtype default is bfloat16) resumes in float16; so does a checkpoint
    written before --amp-dtype existed (its settings lack it: --amp meant float16); a float32 run stays float32."""
    from minimlp.data.synthetic import ensure_shapes_dataset
    shapes = ensure_shapes_dataset(tmp_path / "cache", train_per_class=8, val_per_class=2)
    common = ["--data", shapes, *FAST]
    train(*common, "--epochs", 1, "--amp", "--amp-dtype", "float16", "--output", tmp_path / "half")
    weights, optimizer_state, meta = load_checkpoint(tmp_path / "half" / "checkpoint.npz")
    assert (meta["settings"]["amp"], meta["settings"]["amp_dtype"]) == (True, "float16")
    del meta["settings"]["amp_dtype"]
    save_checkpoint(tmp_path / "before" / "checkpoint.npz", weights, optimizer_state, meta)
    train(*common, "--epochs", 1, "--output", tmp_path / "full")
    for run in ("half", "before", "full"):
        result = train("--resume", tmp_path / run / "checkpoint.npz", "--epochs", 2)
        settings = load_checkpoint(tmp_path / run / "checkpoint.npz")[2]["settings"]
        record = read_log(tmp_path / run)[-1]
        if run == "full":
            assert settings["amp"] is False and "loss_scale" not in record and "mixed precision" not in result.stdout
        else:
            assert settings["amp_dtype"] == "float16" and "loss_scale" in record, run
            assert "mixed precision: float16" in result.stdout


def run_in_process(*args):
    """train.main in this process (so that the bfloat16 library's answers can be replaced)."""
    import train as train_py
    return train_py.main([str(arg) for arg in args])


def test_cpu_bfloat16_without_its_library_is_one_line_saying_what_to_install(tmp_path, monkeypatch, capsys):
    from minimlp.fast import bf16_gemm
    monkeypatch.setattr(bf16_gemm, "missing_instruction", lambda: None)
    monkeypatch.setattr(bf16_gemm, "unavailable_reason", lambda: f"bfloat16 on the CPU needs oneDNN: {bf16_gemm.INSTALL}")
    code = run_in_process("--device", "cpu", "--amp", "--amp-dtype", "bfloat16", "--output", tmp_path / "run")
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "--amp-dtype bfloat16" in error
    assert "pip install onednn-cpu-gomp" in error
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_cpu_bfloat16_without_the_instruction_says_so_and_trains_in_float32(monkeypatch):
    from minimlp.fast import bf16_gemm
    from minimlp.precision import run_precision
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(bf16_gemm, "unavailable_reason", lambda: "not asked: the instruction decides first")
    precision, line = run_precision("bfloat16", "cpu")
    assert precision == policy("float32") and "no bfloat16 instruction" in line and "float32" in line
    assert run_precision("bfloat16", "gpu")[0] == policy("bfloat16")  # the GPU's is cuBLAS's
