"""The settings table (minimlp.training.settings): train.py's flags, defaults, checks, --help and resumed settings
made from one declaration each; --opt-eps/--opt-betas against timm's create_optimizer with DeiT's arguments;
teacher paths stored absolute; the defaults derived from the dataset and the device; the memory and time
estimates, and the refusals that come before the defaults block."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train as train_script
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.optim import make_optimizer
from minimlp.tools.pytorch_references import timm, torch
from minimlp.training import estimates
from minimlp.data.datasets import load_datasets
from minimlp.training.config import DataFacts
from minimlp.training.settings import BY_NAME, RESUMED_SETTINGS, SETTINGS, derived, help_text
from tests.imagetools import make_image_folder
from tests.test_optim import SHAPES, Quadratic, assert_close
from tests.test_recipe import facts_of, settings

ROOT = Path(__file__).resolve().parent.parent


def parser_actions():
    parser = argparse.ArgumentParser()
    train_script.add_arguments(parser)
    return {action.dest: action for action in parser._actions if action.dest != "help"}


# ---------------------------------------------------------------------------------------------
# One declaration per setting
# ---------------------------------------------------------------------------------------------
def test_every_flag_is_a_row_of_the_table_and_its_help_says_the_default_the_run_takes(tmp_path):
    actions = parser_actions()
    assert list(actions) == [setting.name for setting in SETTINGS]
    demo, _ = settings()
    data, _ = settings("--data", tmp_path)
    for setting in SETTINGS:
        assert actions[setting.name].help == help_text(setting).replace("%", "%%")
        for args, value in [(demo, setting.demo), (data, setting.data), (demo, setting.default),
                            (data, setting.default)]:
            if value is None or derived(value) or setting.name in ("data", "eval_only"):
                continue
            assert getattr(args, setting.name) == value, setting.name
            written = " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else (
                {True: "on", False: "off"}[value] if isinstance(value, bool) else
                f"{value:g}" if isinstance(value, float) else str(value))
            assert written in help_text(setting), setting.name


def test_the_help_of_a_derived_default_is_the_rule_the_run_applies():
    """--help said --lr was "5e-4 * batch_size / 512 with --data" while a run chose another rate."""
    args, lines = settings("--data", "somewhere", num_train=1437, image_side=32)
    for name in ("model", "img_size", "batch_size", "epochs", "lr", "warmup_epochs", "aa"):
        rule = BY_NAME[name].data
        assert rule.summary in help_text(BY_NAME[name])
        value, reason = rule(args, facts_of(1437, image_side=32), name)
        assert getattr(args, name) == value and reason in "\n".join(lines), name


def test_resumed_settings_come_from_the_table():
    assert RESUMED_SETTINGS == [setting.name for setting in SETTINGS if setting.resumed]
    assert {"opt_eps", "opt_betas", "amp_dtype", "teacher_path", "smoothing"} <= set(RESUMED_SETTINGS)
    assert not {"device", "workers", "output", "resume", "tf32", "fast", "eval_only"} & set(RESUMED_SETTINGS)
    saved = dict(data="/data", model="resmlp_tiny", img_size=16, batch_size=8, epochs=3, lr=1e-3, warmup_epochs=1.0,
                 seed=0, opt="lamb", opt_eps=1e-7, opt_betas=[0.8, 0.99], amp_dtype="float16", smoothing=0.2)
    args, _ = settings("--resume", "run/checkpoint.npz", meta={"settings": saved})
    assert (args.opt_eps, args.opt_betas, args.amp_dtype, args.smoothing) == (1e-7, (0.8, 0.99), "float16", 0.2)


@pytest.mark.parametrize("setting", [setting for setting in SETTINGS if setting.check is not None],
                         ids=lambda setting: setting.flag)
def test_every_range_of_the_table_is_checked_with_one_line_naming_the_flag(setting):
    outside = {"at least 1": 0, "positive": 0, "0 or more": -1, "within 0..1": 1.5, "in [0, 1)": 1}
    value = outside[setting.check.phrase]
    with pytest.raises(ValueError) as error:
        settings("--data", "somewhere", setting.flag, value)
    assert str(error.value) == f"{setting.flag} must be {setting.check.phrase}, got {setting.type(value)}"


@pytest.mark.parametrize("betas", [["0.9"], ["0.9", "1.0"]])
def test_opt_betas_needs_two_betas_below_1(betas):
    with pytest.raises(ValueError, match="--opt-betas needs two numbers in"):
        settings("--opt-betas", *betas)


# ---------------------------------------------------------------------------------------------
# --opt-eps and --opt-betas: what DeiT gives timm's create_optimizer
# ---------------------------------------------------------------------------------------------
class TorchQuadratic(torch.nn.Module):
    """Quadratic's parameters as a torch module, for timm's create_optimizer (which takes weight decay off the
    1-D tensors, as the decay mask does)."""

    def __init__(self, model):
        super().__init__()
        for name, value in model.parameters.values.items():
            self.register_parameter(name, torch.nn.Parameter(torch.tensor(np.array(value))))
        self.curvature, self.target = (torch.from_numpy(np.array(array)) for array in (model.curvature, model.target))

    def loss(self):
        flat = torch.cat([getattr(self, name).reshape(-1) for name in SHAPES])
        return 0.5 * (self.curvature * (flat - self.target) ** 2).sum()


@pytest.mark.parametrize("flags", [["--opt", "lamb"], ["--opt", "adamw"],
                                   ["--opt", "lamb", "--opt-eps", "1e-5", "--opt-betas", "0.8", "0.99"],
                                   ["--opt", "adamw", "--opt-eps", "1e-3", "--opt-betas", "0.5", "0.9"]])
def test_the_optimizer_is_the_one_deit_builds_with_timms_create_optimizer(flags):
    """DeiT hands every optimizer --opt-eps (default 1e-8) and --opt-betas (default: the optimizer's); timm's Lamb
    alone defaults to eps 1e-6, which changes LAMB's first steps on small gradients."""
    args, _ = settings(*flags, "--weight-decay", 0.2, "--lr", 0.01)
    deit = argparse.Namespace(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9,
                              opt_eps=1e-8 if "--opt-eps" not in flags else float(flags[3]),
                              opt_betas=None if "--opt-betas" not in flags else [float(flags[5]), float(flags[6])])
    model = Quadratic(np)
    model.parameters.data[...] *= 1e-3  # small gradients, where eps matters
    model.target[...] *= 1e-3
    reference = TorchQuadratic(model)
    theirs = timm.optim.create_optimizer(deit, reference)
    ours = make_optimizer(args.opt, model.parameters, model.ops, args.lr, args.weight_decay, args.opt_eps,
                          args.opt_betas)
    for _ in range(10):
        model.backward()
        ours.step()
        theirs.zero_grad()
        reference.loss().backward()
        theirs.step()
    assert_close(model.parameters.values, dict(reference.named_parameters()), 1e-12)


def test_a_checkpoint_from_before_opt_eps_resumes_with_the_eps_it_trained_with():
    saved = dict(data="/data", model="resmlp_tiny", img_size=16, batch_size=8, epochs=3, lr=1e-3, seed=0, opt="lamb")
    assert settings("--resume", "run/checkpoint.npz", meta={"settings": saved})[0].opt_eps == 1e-6
    assert settings("--resume", "run/checkpoint.npz", meta={"settings": dict(saved, opt="adamw")})[0].opt_eps == 1e-8


# ---------------------------------------------------------------------------------------------
# Teacher paths
# ---------------------------------------------------------------------------------------------
def test_teacher_path_is_stored_absolute_and_an_old_relative_one_resolved_against_the_run_folder(tmp_path):
    args, _ = settings("--teacher-path", "teachers/t.npz", "--teacher-model", "resmlp_tiny")
    assert args.teacher_path == Path(os.getcwd()) / "teachers" / "t.npz"
    saved = dict(model="resmlp_tiny", img_size=16, batch_size=8, epochs=3, lr=1e-3, seed=0, teacher_path="t.npz",
                 teacher_model="resmlp_tiny", distillation_type="hard")
    args, _ = settings("--resume", tmp_path / "run" / "checkpoint.npz", meta={"settings": saved})
    assert args.teacher_path == tmp_path / "run" / "t.npz"
    saved["teacher_path"] = str(tmp_path / "elsewhere" / "t.npz")
    assert settings("--resume", tmp_path / "run" / "checkpoint.npz",
                    meta={"settings": saved})[0].teacher_path == tmp_path / "elsewhere" / "t.npz"


# ---------------------------------------------------------------------------------------------
# Defaults from the data and the device
# ---------------------------------------------------------------------------------------------
def test_a_small_set_of_small_images_gets_a_model_size_batch_and_epochs_that_fit_a_cpu():
    """The issue's case: 1,437 train images of 32 px, no flag but --data: S12 at 224 px, batch 256 and 300 epochs
    (12 hours on 2 cores) before; now resmlp_tiny at 32 px, batch 64, about 1,000 steps."""
    args, lines = settings("--data", "somewhere", num_train=1437, image_side=32)
    assert (args.model, args.img_size, args.batch_size, args.epochs) == ("resmlp_tiny", 32, 64, 46)
    text = "\n".join(lines)
    assert "--model resmlp_tiny: images of 32 px" in text and "--img-size 32: the images' typical size is 32" in text
    assert "--batch-size 64: 256, lowered for an epoch of 22 steps" in text and "--epochs 46:" in text


def test_the_typical_image_size_is_the_median_shorter_side_of_the_files(tmp_path):
    make_image_folder(tmp_path / "wide", classes=("a", "b"), per_class=3, size=(40, 30))
    make_image_folder(tmp_path / "tall", classes=("c", "d"), per_class=4, size=(50, 90))
    train_set, val_set = load_datasets(tmp_path / "wide")
    assert DataFacts(train_set.samples, 2, len(val_set), "cpu").image_side == 30
    samples = train_set.samples + load_datasets(tmp_path / "tall")[0].samples
    assert DataFacts(samples, 4, 0, "cpu").image_side == 50  # the median of 30 six times and 50 eight times
    (tmp_path / "wide" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    assert DataFacts(load_datasets(tmp_path / "wide")[0].samples, 2, 0, "cpu").image_side == 30


def test_imagenet_on_a_gpu_keeps_s12_at_224_and_odd_sizes_round_to_whole_patches():
    args, _ = settings("--data", "imagenet", num_train=1_281_167, image_side=375, device="gpu")
    assert (args.model, args.img_size, args.batch_size, args.epochs) == ("resmlp_s12", 224, 256, 300)
    args, _ = settings("--data", "photos", num_train=5000, image_side=500, device="gpu")
    assert (args.model, args.img_size) == ("resmlp_s12", 224)
    args, _ = settings("--data", "photos", num_train=5000, image_side=500, device="cpu")
    assert (args.model, args.img_size) == ("resmlp_tiny", 64), "S12's step takes seconds on a CPU"
    assert settings("--data", "d", num_train=5000, image_side=50)[0].img_size == 48
    assert settings("--data", "d", "--model", "resmlp_s12", num_train=5000, image_side=100)[0].img_size == 96


def test_the_derived_batch_is_the_largest_that_fits_the_memory():
    args, lines = settings("--data", "imagenet", num_train=1_281_167, image_side=375, device="gpu",
                           memory_bytes=8e9)
    fits = sum(estimates.peak_memory(args, 10, "gpu").values())
    assert args.batch_size < 256 and fits <= 8e9 < sum(estimates.peak_memory(args, 10, "gpu", 2 * args.batch_size)
                                                         .values())
    assert "the most that fits the gpu's 8.0 GB" in "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Runs: the estimates, the refusals before the defaults block
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """shapes10 at 32 px: 10 classes of 20 train and 4 val images."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=20, val_per_class=4)


# A child's peak resident memory (ru_maxrss) starts at its parent's size when it forks: measured from pytest, which
# holds torch and timm, it reads 3 GB whatever train.py uses. So a small Python process starts train.py and reports
# its peak, in kilobytes, as its last line of standard error.
PEAK_OF_CHILD = ("import os, subprocess, sys\n"
                 "child = subprocess.Popen(sys.argv[1:])\n"
                 "_, status, usage = os.wait4(child.pid, 0)\n"
                 "print(usage.ru_maxrss, file=sys.stderr)\n"
                 "sys.exit(os.waitstatus_to_exitcode(status))\n")


def test_the_memory_estimate_is_within_a_third_of_the_measured_peak_and_the_time_is_said_first(small_images,
                                                                                                 tmp_path):
    # Twice: a first run on a machine also compiles the Numba loops (it says so), and LLVM's memory while it
    # compiles (up to 3 GB measured) is not the training's; the second run loads them from the disk cache.
    for run in ("compiles", "measured"):
        flags = ["--data", small_images, "--model", "resmlp_tiny", "--img-size", 32, "--batch-size", 64,
                 "--epochs", 2, "--workers", 0, "--output", tmp_path / run]
        result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, str(ROOT / "train.py"),
                                 *map(str, flags)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    stdout = result.stdout
    measured = int(result.stderr.splitlines()[-1]) * 1024  # Linux: kilobytes
    estimate = next(line for line in stdout.splitlines() if line.startswith("estimated peak memory: "))
    estimated = float(estimate.split()[3]) * 1e9
    assert measured / 1.33 < estimated < measured * 1.33, (estimate, measured)
    lines = stdout.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("estimated time: "))
    assert said < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2  train loss"))
    assert "for the rest of the run (2.0 epochs" in lines[said] or "for the rest of the run (1." in lines[said]


def test_a_batch_whose_peak_does_not_fit_is_refused_in_one_line_before_anything_is_allocated(small_images, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(small_images), "--model",
                             "resmlp_b24", "--img-size", "224", "--batch-size", "128", "--workers", "0", "--output",
                             str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--batch-size 128 needs about" in result.stderr and "give --batch-size " in result.stderr
    assert "defaults for" not in result.stdout and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["batch larger than the set", "another run's results"])
def test_refusals_come_before_the_defaults_block(small_images, tmp_path, case):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "log.jsonl").write_text("{}\n")
    flags = (["--batch-size", "100000"] if case == "batch larger than the set" else ["--output", taken])
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(small_images), "--workers", "0",
                             *map(str, flags)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "defaults for" not in result.stdout and "estimated" not in result.stdout, result.stdout
