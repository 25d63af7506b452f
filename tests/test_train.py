"""train.py end to end, as a user runs it (subprocesses), on tiny generated image folders."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimlp import create_model
from minimlp.backend import gpu_available
from minimlp.training.checkpoint import load_checkpoint
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.weights import official_to_timm
from tests.imagetools import make_image_folder, save_image

ROOT = Path(__file__).resolve().parent.parent
# A small, fast configuration: 16 px shapes, 16 patches; seconds per run on 2 cores.
FAST = ["--model", "resmlp_tiny", "--img-size", "16", "--batch-size", "16", "--warmup-epochs", "0", "--lr", "3e-3",
        "--scale", "0.5", "1", "--workers", "0"]
TINY = FAST[:4]  # just the model and its size


def train(*args, check=True, timeout=300):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small copy of the demo's shapes10 dataset: 10 classes, 24 train and 6 val images each."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=24, val_per_class=6)


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """The folder of a finished 4-epoch run on the small shapes10 copy."""
    output = tmp_path_factory.mktemp("trained")
    train("--data", shapes, "--epochs", 4, "--output", output, *FAST)
    return output


def test_training_learns_and_logs(shapes, trained):
    log = read_log(trained)
    assert [record["epoch"] for record in log] == [1, 2, 3, 4]
    assert set(log[0]) >= {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "seconds"}
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in log)
    for name in ["checkpoint.npz", "best.npz", "config.json"]:
        assert (trained / name).is_file()
    assert not list(trained.glob("*.tmp"))  # atomic writes leave no temporary behind
    _, _, meta = load_checkpoint(trained / "checkpoint.npz")
    assert meta["classes"] == sorted(p.name for p in (shapes / "train").iterdir())
    assert meta["position"]["epoch"] == 4 and meta["model"]["img_size"] == 16


def test_analyze_a_checkpoint_trained_here(trained, tmp_path):
    from minimlp.tools.analyze import main as analyze
    assert analyze([str(trained / "checkpoint.npz"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sparsity.csv").read_text().count("\n") == 1 + 6  # header + one row per block
    assert (tmp_path / "summary.txt").is_file() and list(tmp_path.glob("cross_patch_layer_*.png"))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(shapes, tmp_path):
    settings = ["--data", shapes, "--epochs", 5, *FAST, "--drop-path", "0.1"]
    train(*settings, "--output", tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, settings), "--output",
                                str(interrupted)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines arrive as printed
    for line in process.stdout:  # Ctrl-C as soon as the first epoch is logged: somewhere inside epoch 2
        if line.startswith("epoch 1/5"):
            process.send_signal(signal.SIGINT)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 130, output
    assert "continue with --resume" in output
    _, _, meta = load_checkpoint(interrupted / "checkpoint.npz")
    assert meta["position"]["epoch"] < 5  # really stopped early
    train("--resume", interrupted / "checkpoint.npz")

    straight_weights, straight_optimizer, _ = load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    resumed_weights, resumed_optimizer, _ = load_checkpoint(interrupted / "checkpoint.npz")
    for name, value in straight_weights.items():
        np.testing.assert_array_equal(resumed_weights[name], value, err_msg=name)
    np.testing.assert_array_equal(resumed_optimizer["m"], straight_optimizer["m"])
    np.testing.assert_array_equal(resumed_optimizer["v"], straight_optimizer["v"])
    straight_log, resumed_log = read_log(tmp_path / "straight"), read_log(interrupted)
    for key in ["epoch", "train_loss", "val_loss", "val_top1", "lr"]:
        assert [r[key] for r in resumed_log] == [r[key] for r in straight_log], key


def test_parallel_workers_give_the_same_run(shapes, tmp_path):
    train("--data", shapes, "--epochs", 1, *FAST, "--output", tmp_path / "serial")
    train("--data", shapes, "--epochs", 1, *FAST, "--workers", 2, "--output", tmp_path / "parallel")
    a, _, _ = load_checkpoint(tmp_path / "serial" / "checkpoint.npz")
    b, _, _ = load_checkpoint(tmp_path / "parallel" / "checkpoint.npz")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_eval_only_on_a_checkpoint_and_on_published_weights(shapes, trained, tmp_path):
    result = train("--eval-only", "--resume", trained / "checkpoint.npz", "--data", shapes, "--workers", 0)
    last = read_log(trained)[-1]
    assert f"top-1 {last['val_top1']:.2f}%" in result.stdout and f"top-5 {last['val_top5']:.2f}%" in result.stdout

    from safetensors.numpy import save_file  # timm's hub format, timm's names
    weights, _, _ = load_checkpoint(trained / "checkpoint.npz")
    save_file({k: np.ascontiguousarray(v) for k, v in official_to_timm(weights).items()}, str(tmp_path / "w.safetensors"))
    result = train("--eval-only", "--resume", tmp_path / "w.safetensors", "--data", shapes, "--workers", 0,
                   "--model", "resmlp_tiny", "--img-size", 16)
    assert f"top-1 {last['val_top1']:.2f}%" in result.stdout


def test_flat_imagenet_val_folder_and_every_image_mode(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, classes=("n01440764", "n01443537"), per_class=4, size=(40, 30),
                      modes=("RGB", "L", "CMYK", "P", "RGBA", "LA", "I;16"), splits=("train",))
    (data / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n01440764", "n01443537", "n01443537"]):
        save_image(data / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", size=(50, 40), seed=i)
        rows.append(f"ILSVRC2012_val_{i + 1:08d},{wnid} 1 2 30 40")
    (data / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (data / "train" / "n01443537" / "extra.webp").parent.mkdir(exist_ok=True)
    save_image(data / "train" / "n01443537" / "extra.webp", size=(33, 47), seed=9)
    result = train("--data", data, "--epochs", 1, "--output", tmp_path / "run", *TINY, "--batch-size", 4,
                   "--workers", 0)
    assert "3 val images, 2 classes" in result.stdout
    assert read_log(tmp_path / "run")[0]["val_top1"] in (0.0, 100 / 3, 200 / 3, 100.0)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming what and where, a non-zero exit, no traceback.
# ---------------------------------------------------------------------------------------------
def _fails_clearly(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_bad_data_folders(tmp_path):
    _fails_clearly(train("--data", tmp_path / "absent", check=False), str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    _fails_clearly(train("--data", tmp_path / "empty", check=False), str(tmp_path / "empty"), "train")
    (tmp_path / "noclasses" / "train").mkdir(parents=True)
    (tmp_path / "noclasses" / "val").mkdir()
    _fails_clearly(train("--data", tmp_path / "noclasses", check=False), "no class folders")
    make_image_folder(tmp_path / "hollow", classes=("a", "b"), per_class=2)
    for image in (tmp_path / "hollow" / "train" / "b").iterdir():
        image.unlink()
    _fails_clearly(train("--data", tmp_path / "hollow", check=False), str(tmp_path / "hollow" / "train" / "b"))


def test_bad_flags(tmp_path, shapes):
    _fails_clearly(train("--model", "resmlp_99", check=False), "--model", "resmlp_99")
    _fails_clearly(train("--data", shapes, "--batch-size", 100000, *TINY, check=False), "--batch-size 100000")
    _fails_clearly(train("--data", shapes, "--epochs", 0, check=False), "--epochs")
    _fails_clearly(train("--eval-only", check=False), "--eval-only needs --resume")
    for flags, named in [(["--scale", "1", "0.5"], "--scale"), (["--crop-pct", "0"], "--crop-pct"),
                         (["--lr", "-1"], "--lr"), (["--weight-decay", "-0.1"], "--weight-decay"),
                         (["--drop-path", "1"], "--drop-path"), (["--patch-size", "0"], "--patch-size")]:
        _fails_clearly(train("--data", shapes, *flags, check=False), named)
    if not gpu_available():
        _fails_clearly(train("--device", "gpu", check=False), "--device gpu")


def test_checkpoint_from_another_model_or_dataset(shapes, trained, tmp_path):
    checkpoint = trained / "checkpoint.npz"
    _fails_clearly(train("--resume", checkpoint, "--model", "resmlp_s12", check=False),
                   str(checkpoint), "--model resmlp_tiny (now resmlp_s12)")
    _fails_clearly(train("--resume", checkpoint, "--batch-size", 8, check=False), "--batch-size 16 (now 8)")
    _fails_clearly(train("--resume", checkpoint, "--seed", 3, check=False), "--seed 0 (now 3)")
    other = tmp_path / "other"
    make_image_folder(other, classes=("a", "b", "c"), per_class=2, size=(20, 20))
    _fails_clearly(train("--resume", checkpoint, "--data", other, check=False), "number of classes 10 (now 3)")
    model = create_model("resmlp_tiny", num_classes=10, img_size=16, dim=32)
    np.savez(tmp_path / "narrow.npz", **model.state_dict())
    _fails_clearly(train("--eval-only", "--resume", tmp_path / "narrow.npz", "--data", shapes, "--model",
                         "resmlp_tiny", "--img-size", 16, "--workers", 0, check=False),
                   "weights do not fit resmlp_tiny", "wrong shape")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    _fails_clearly(train("--resume", tmp_path / "garbage.npz", check=False), "garbage.npz", "not a readable")


def test_a_resume_refused_for_a_changed_flag_is_a_resume_error_not_a_weights_error():
    from minimlp.training.checkpoint import ResumeError, check_compatible
    from minimlp.weights import WeightsError
    meta = dict(model=dict(name="resmlp_tiny", img_size=16, num_classes=2, drop_path=0.0, patch_size=4),
                classes=["a", "b"], settings=dict(opt="adamw", seed=0, batch_size=4, world_size=1))
    settings = dict(model="resmlp_tiny", img_size=16, drop_path=0.0, patch_size=None, opt="lamb", seed=0,
                    batch_size=4, world_size=1, data=None)
    with pytest.raises(ResumeError, match=r"run/checkpoint.npz was trained with --opt adamw \(now lamb\)") as refused:
        check_compatible("run/checkpoint.npz", meta, settings, ["a", "b"])
    assert not isinstance(refused.value, WeightsError)  # the file is fine: the flags do not continue it
    with pytest.raises(ResumeError, match="other classes"):
        check_compatible("run/checkpoint.npz", meta, settings, ["a", "c"], eval_only=True)


def test_corrupt_image_is_skipped_and_named(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, classes=("a", "b"), per_class=4, size=(24, 24))
    broken = data / "train" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = train("--data", data, "--epochs", 1, "--output", tmp_path / "run", *TINY, "--batch-size", 4,
                   "--workers", 0)
    assert f"skipping unreadable image {broken}" in result.stderr


def test_the_trainer_runs_the_erasing_mixup_and_criterion_it_is_given(tmp_path):
    """train.py builds the augmentations and the loss; the trainer applies them in DeiT's order, then steps."""
    from minimlp.data.datasets import load_datasets
    from minimlp.data.loader import Loader
    from minimlp.layers import CrossEntropy
    from minimlp.optim import make_optimizer
    from minimlp.training.trainer import Trainer
    make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4, size=(16, 16))
    train_set, _ = load_datasets(tmp_path / "data")
    loader = Loader(train_set, 4, train=True, img_size=16, workers=0)
    model = create_model("resmlp_tiny", num_classes=3, img_size=16, depth=1)
    seen = []

    def erasing(images, generators):
        seen.append(("erasing", len(generators)))
        return images

    def mixup(images, labels, generator):
        seen.append(("mixup", labels.ndim))
        return images, np.eye(3)[labels]  # soft targets

    class Recording(CrossEntropy):
        def __call__(self, logits, targets):
            seen.append(("criterion", targets.shape, self.smoothing))
            return super().__call__(logits, targets)

    settings = dict(epochs=1, warmup_epochs=0, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, clip_grad=0.0, seed=0)
    optimizer = make_optimizer("adamw", model.parameters, model.ops, 1e-3, 0.05)
    trainer = Trainer(model, Recording(model.ops, 0.0), optimizer, loader, loader, train_set.classes, settings, tmp_path,
                      erasing=erasing, mixup=mixup)
    images, labels = next(trainer.feed.batches(loader.epoch(0)))
    loss = trainer.learn_from_batch(images, labels)
    assert seen == [("erasing", 4), ("mixup", 1), ("criterion", (4, 3), 0.0)] and np.isfinite(float(loss))
    assert trainer.optimizer.step_count == 1
