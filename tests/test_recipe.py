"""The paper's recipe in train.py: --recipe, the defaults derived from a user's dataset, every new flag's
validation, the teacher of distillation, and runs with everything on (they learn; interrupted and resumed
they equal an uninterrupted run, EMA included). Also the plain progress lines of a redirected run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train as train_script
from minimlp import create_model
from minimlp.training.checkpoint import load_checkpoint
from minimlp.training.config import LARGE_DATASET, DataFacts, complete_settings, dataset_defaults
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.training.teacher import load_teacher
from minimlp.weights import WeightsError
from tests.imagetools import make_image_folder
from tests.test_train import read_log, train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--model", "resmlp_tiny", "--img-size", "16", "--batch-size", "16", "--workers", "0", "--scale", "0.5", "1"]
# The whole recipe at the scale of a test: every augmentation and regularizer of --recipe resmlp-s12 on, with
# what a 300-image set trained for seconds needs instead of ImageNet's model, size, batch, optimizer and rate.
# 32 px, not SMALL's 16: at 16 px RandAugment, CutMix and erasing leave the three classes too little to learn
# from in 12 epochs (measured: top-1 27-52% over seeds 0-2, chance 33%; at 32 px 67-68%, val loss 1.12 -> 0.66-0.84).
WHOLE_RECIPE = ["--recipe", "resmlp-s12", *SMALL, "--img-size", "32", "--opt", "adamw", "--lr", "3e-3",
                "--warmup-epochs", "1", "--model-ema", "--model-ema-decay", "0.95"]




@pytest.fixture(scope="module")
def shapes3(tmp_path_factory):
    """Three shapes10 classes (checkerboard, circle, horizontal stripes), 100 train and 30 val images each."""
    source = ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=100, val_per_class=30)
    data = tmp_path_factory.mktemp("shapes3")
    for split in ("train", "val"):
        (data / split).mkdir()
        for name in ("checkerboard", "circle", "horizontal_stripes"):
            (data / split / name).symlink_to(source / split / name)
    return data


def facts_of(num_train, image_side=224, device="cpu", memory_bytes=1e12, num_classes=10):
    """What the derived defaults see of a dataset, without one: its size, its images' typical side, the device."""
    facts = DataFacts([("image.png", 0)] * num_train, num_classes, 100, device)
    facts.image_side, facts.memory_bytes = image_side, memory_bytes
    return facts


def settings(*argv, meta=None, num_train=None, **facts):
    """train.py's flags completed as a run completes them -> (args, the lines it prints)."""
    args = train_script.parse_args([str(value) for value in argv])
    lines = complete_settings(args, meta)
    if num_train is not None:
        lines += dataset_defaults(args, facts_of(num_train, **facts))
    return args, lines


# ---------------------------------------------------------------------------------------------
# Defaults: the demo, the paper's recipe, a user's dataset
# ---------------------------------------------------------------------------------------------
def test_recipe_sets_every_value_of_the_paper_and_explicit_flags_win(tmp_path):
    args, lines = settings("--data", tmp_path, "--recipe", "resmlp-s12")
    paper = dict(model="resmlp_s12", img_size=224, opt="lamb", lr=5e-3, weight_decay=0.2, batch_size=2048,
                 epochs=400, warmup_epochs=5, smoothing=0.1, repeated_aug=True, aa="rand-m9-mstd0.5-inc1",
                 train_interpolation="bicubic", reprob=0.25, remode="pixel", recount=1, mixup=0.8, cutmix=1.0,
                 mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", drop_path=0.05, crop_pct=0.9,
                 scale=(0.08, 1.0), amp=False)
    assert {key: getattr(args, key) for key in paper} == paper
    assert lines[0].startswith("recipe resmlp-s12") and "--opt lamb" in lines[0] and "--mixup 0.8" in lines[0]
    assert dataset_defaults(args, facts_of(1000)) == []  # the recipe leaves nothing to derive
    args, lines = settings("--data", tmp_path, "--recipe", "resmlp-s12", "--batch-size", 256, "--mixup", 0)
    assert args.batch_size == 256 and args.mixup == 0 and args.cutmix == 1.0
    assert args.lr == pytest.approx(5e-3 * 256 / 2048)  # the paper's rate for its batch, scaled linearly
    assert "--batch-size 256" in lines[1] and "--mixup 0" in lines[1]
    assert settings("--data", tmp_path, "--recipe", "resmlp-s12", "--lr", 1e-3)[0].lr == 1e-3
    assert settings("--data", tmp_path, "--recipe", "resmlp-s24")[0].drop_path == 0.1


def test_demo_defaults_keep_the_augmentation_off():
    args, lines = settings()
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.repeated_aug, args.model_ema) == \
        ("none", 0.0, 0.0, 0.0, False, False)
    assert args.train_interpolation == "bilinear" and args.hflip == 0.5 and args.lr == 3e-3 and lines == []


def test_defaults_derived_from_a_small_dataset_learn_where_deits_rule_does_not(tmp_path):
    """The issue's case: 1.4k images, resmlp_tiny, batch 64, 40 epochs: DeiT's rule gave 6e-5 and 5 warmup
    epochs (40% top-1); 3e-3 and 1 warmup epoch reached 98%."""
    args, lines = settings("--data", tmp_path, "--model", "resmlp_tiny", "--img-size", 32, "--epochs", 40,
                           "--batch-size", 64, num_train=1437)
    assert args.lr == pytest.approx(3e-3 * np.sqrt(64 / 128)) and args.warmup_epochs == 2
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.repeated_aug) == ("none", 0.0, 0.0, 0.0, False)
    text = "\n".join(lines)
    assert "1,437 training images (a small set)" in text and "--lr 0.00212:" in text and "sqrt" in text
    assert "--warmup-epochs 2:" in text and "--no-repeated-aug" in text


def test_defaults_derived_from_an_imagenet_sized_set_are_the_papers_regime(tmp_path):
    args, lines = settings("--data", tmp_path, num_train=1_281_167)
    assert args.model == "resmlp_s12" and args.lr == pytest.approx(5e-4 * 256 / 512) and args.warmup_epochs == 5
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.repeated_aug) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, True)
    assert "DeiT's rule" in "\n".join(lines)
    args, lines = settings("--data", tmp_path, "--model", "resmlp_tiny", num_train=LARGE_DATASET)
    assert args.aa == "none", "resmlp_tiny underfits a large set: light augmentation"
    args, lines = settings("--data", tmp_path, "--lr", 1e-3, "--aa", "rand-m7", "--no-repeated-aug",
                           num_train=1_281_167)
    assert (args.lr, args.aa, args.repeated_aug, args.mixup) == (1e-3, "rand-m7", False, 0.8), "flags given win"
    assert not any("--lr" in line for line in lines)


def test_a_checkpoint_from_before_the_augmentations_resumes_without_them(tmp_path):
    meta = {"settings": dict(data=str(tmp_path), model="resmlp_tiny", img_size=16, batch_size=16, lr=1e-3,
                             warmup_epochs=1.0, epochs=4, seed=0)}
    args, _ = settings("--resume", tmp_path / "checkpoint.npz", meta=meta, num_train=2_000_000)
    assert (args.aa, args.reprob, args.mixup, args.repeated_aug, args.train_interpolation) == \
        ("none", 0.0, 0.0, False, "bilinear")


@pytest.mark.parametrize("flags, named", [
    (["--aa", "rand-x9"], "--aa"), (["--aa", "augmix-m5"], "--aa"), (["--hflip", "1.5"], "--hflip"),
    (["--reprob", "-0.1"], "--reprob"), (["--recount", "0"], "--recount"), (["--mixup", "-1"], "--mixup"),
    (["--cutmix", "-1"], "--cutmix"), (["--cutmix-minmax", "0.8", "0.2"], "--cutmix-minmax"),
    (["--mixup-prob", "2"], "--mixup-prob"), (["--mixup-switch-prob", "-1"], "--mixup-switch-prob"),
    (["--model-ema-decay", "1.5"], "--model-ema-decay"), (["--distillation-alpha", "2"], "--distillation-alpha"),
    (["--distillation-tau", "0"], "--distillation-tau"), (["--distillation-type", "hard"], "--teacher-model"),
    (["--workers", "-1"], "--workers"), (["--eval-only"], "--resume")])
def test_every_new_flag_is_validated_with_one_line_naming_it(flags, named):
    with pytest.raises(ValueError) as error:
        settings(*flags)
    message = str(error.value)
    assert named in message and "\n" not in message


def test_deits_own_flag_and_model_names_are_aliases():
    deit = train_script.parse_args(["--model", "resmlp_12", "--data-path", "imagenet", "--input-size", "192",
                                    "--eval", "--resume", "w.npz"])
    ours = train_script.parse_args(["--model", "resmlp_s12", "--data", "imagenet", "--img-size", "192",
                                    "--eval-only", "--resume", "w.npz"])
    assert vars(deit) == vars(ours)
    assert train_script.parse_args(["--model", "resmlp_big_24_224"]).model == "resmlp_b24"


def test_choices_are_refused_by_the_parser(capsys):
    for flags in (["--recipe", "resmlp-s99"], ["--remode", "blur"], ["--mixup-mode", "row"],
                  ["--train-interpolation", "nearest"], ["--distillation-type", "medium"]):
        with pytest.raises(SystemExit) as exit_:
            train_script.parse_args(flags)
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and flags[0] in error and error.count("\n") == 1  # one line, not the usage


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------
def test_a_minimlp_teacher_gives_its_models_logits(tmp_path):
    model = create_model("resmlp_tiny", num_classes=5, img_size=16, seed=3)
    np.savez(tmp_path / "teacher.npz", **model.state_dict())
    teacher = load_teacher("resmlp_tiny", tmp_path / "teacher.npz", num_classes=5, img_size=16, device="cpu")
    images = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(teacher(images), model.forward(images))
    with pytest.raises(WeightsError, match="--teacher-path"):
        load_teacher("resmlp_tiny", tmp_path / "teacher.npz", num_classes=7, img_size=16, device="cpu")


def test_a_pytorch_teacher_runs_a_timm_model_on_the_same_batch(tmp_path):
    from minimlp.tools.pytorch_references import timm, torch
    reference = timm.create_model("test_resnet", num_classes=5).eval()
    torch.save({"model": reference.state_dict()}, tmp_path / "deit_style.pth")  # DeiT's teacher checkpoints
    teacher = load_teacher("test_resnet", tmp_path / "deit_style.pth", num_classes=5, img_size=32, device="cpu")
    images = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    logits = teacher(images)
    assert isinstance(logits, np.ndarray) and logits.shape == (4, 5)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsError, match="does not fit --teacher-model test_resnet"):
        load_teacher("test_resnet", tmp_path / "deit_style.pth", num_classes=7, img_size=32, device="cpu")
    with pytest.raises(ValueError, match="--teacher-model no_such_net"):
        load_teacher("no_such_net", tmp_path / "deit_style.pth", num_classes=5, img_size=32, device="cpu")


# ---------------------------------------------------------------------------------------------
# Runs (subprocesses, as a user runs train.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whole_recipe_run(shapes3, tmp_path_factory):
    """12 epochs with every augmentation of the recipe on (RandAugment, erasing, Mixup/CutMix, repeated
    augmentation, bicubic, drop path) and the EMA: the run folder and its output."""
    output = tmp_path_factory.mktemp("whole_recipe")
    result = train("--data", shapes3, *WHOLE_RECIPE, "--epochs", 12, "--output", output)
    return output, result


def test_the_whole_recipe_trains(whole_recipe_run):
    output, result = whole_recipe_run
    log = read_log(output)
    assert len(log) == 12 and {"ema_val_loss", "ema_val_top1", "ema_val_top5"} <= set(log[0])
    assert "EMA top-1" in result.stdout and "recipe resmlp-s12" in result.stdout
    assert min(r["val_loss"] for r in log[-4:]) < log[0]["val_loss"] - 0.05
    assert max(r["val_top1"] for r in log[-4:]) > 100 / 3 + 10, "chance is 33%"
    config = json.loads((output / "config.json").read_text())
    assert config["aa"] == "rand-m9-mstd0.5-inc1" and config["repeated_aug"] and config["mixup"] == 0.8
    assert (output / "curves.png").is_file()


def test_redirected_output_is_plain_lines(whole_recipe_run):
    """Not a terminal: no tqdm bar fragments, progress as whole lines."""
    _, result = whole_recipe_run
    assert "\r" not in result.stdout and "\r" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch 3/12  ")]
    assert progress and all("batch" in line for line in progress)
    assert [line for line in result.stdout.splitlines() if line.startswith("epoch 3/12  train loss")]


def test_with_everything_on_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(shapes3, tmp_path):
    run = ["--data", shapes3, *WHOLE_RECIPE, "--epochs", 3]
    train(*run, "--output", tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, run), "--output", str(interrupted)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # Ctrl-C as soon as the first epoch is logged: somewhere inside epoch 2
        if line.startswith("epoch 1/3  train loss"):
            process.send_signal(signal.SIGINT)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 130, output
    assert load_checkpoint(interrupted / "checkpoint.npz")[2]["position"]["epoch"] < 3
    train("--resume", interrupted / "checkpoint.npz")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.npz", extra=True)
    resumed = load_checkpoint(interrupted / "checkpoint.npz", extra=True)
    for name, value in straight[0].items():
        np.testing.assert_array_equal(resumed[0][name], value, err_msg=name)
    for key in ("m", "v"):
        np.testing.assert_array_equal(resumed[1][key], straight[1][key])
    assert straight[3]["ema"]["data"].size == sum(value.size for value in straight[0].values())
    np.testing.assert_array_equal(resumed[3]["ema"]["data"], straight[3]["ema"]["data"])
    for key in ("epoch", "train_loss", "val_loss", "val_top1", "ema_val_loss", "ema_val_top1", "lr"):
        assert [r[key] for r in read_log(interrupted)] == [r[key] for r in read_log(tmp_path / "straight")], key


def test_eval_only_of_the_ema_and_distillation_from_a_trained_teacher(shapes3, whole_recipe_run, tmp_path):
    output, _ = whole_recipe_run
    last = read_log(output)[-1]
    result = train("--eval-only", "--resume", output / "checkpoint.npz", "--model-ema", "--data", shapes3,
                   "--workers", 0)
    assert "(EMA)" in result.stdout and f"top-1 {last['ema_val_top1']:.2f}%" in result.stdout
    result = train("--data", shapes3, *SMALL, "--img-size", 32, "--epochs", 1, "--output", tmp_path / "student",
                   "--distillation-type", "hard", "--teacher-model", "resmlp_tiny",
                   "--teacher-path", output / "best.npz")
    assert "teacher: resmlp_tiny (minimlp)" in result.stdout and "hard distillation, alpha 0.5" in result.stdout
    assert np.isfinite(read_log(tmp_path / "student")[0]["train_loss"])


def test_defaults_on_a_small_set_learn(shapes3, tmp_path):
    result = train("--data", shapes3, *SMALL, "--epochs", 6, "--output", tmp_path / "run")
    assert "defaults for 300 training images (a small set)" in result.stdout and "--lr 0.00106:" in result.stdout
    log = read_log(tmp_path / "run")
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.05
    assert min(r["val_loss"] for r in log[-3:]) < log[0]["val_loss"] - 0.05


def test_warnings_sit_on_lines_of_their_own(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, classes=("a", "b"), per_class=4, size=(24, 24))
    broken = data / "train" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with open(tmp_path / "log.txt", "w") as log:  # `> log.txt 2>&1`
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data), "--epochs", "1", "--output",
                        str(tmp_path / "run"), *SMALL[:4], "--batch-size", "4", "--workers", "0"], cwd=ROOT,
                       stdout=log, stderr=subprocess.STDOUT, timeout=300, check=True)
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text
    warnings = [line for line in text.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping unreadable image {broken} (")
