"""Data parallel (minimlp.parallel.distributed, minimlp.parallel.allreduce): K ranks x batch b against one process x K*b.

The MPI tests launch `mpiexec -n 2` themselves (the mpich wheel's, beside this Python), so `python -m
pytest` stays the one test command. On the CPU the gradients travel by MPI's Iallreduce; the NCCL path
runs where CuPy finds a GPU (one GPU: a communicator of size 1, the buckets and their streams) and is
skipped elsewhere, saying so.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minimlp import backend, create_model
from minimlp.parallel.allreduce import BucketedMean, bucket_ranges
from minimlp.training.checkpoint import load_checkpoint
from minimlp.data.datasets import load_datasets
from minimlp.parallel.distributed import OtherRankOutput, SingleProcess
from minimlp.parallel.launcher import environment_without_mpi, launched_by_mpi, mpiexec
from minimlp.precision import policy
from minimlp.optim import AdamW
from minimlp.data.sampler import RepeatedAugmentationSampler
from minimlp.step import train_step
from minimlp.data.synthetic import ensure_shapes_dataset
from minimlp.training.trainer import ERASING_STREAM, Trainer

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "resmlp_tiny", "--img-size", "16", "--warmup-epochs", "0", "--lr", "3e-3", "--scale", "0.5", "1",
        "--workers", "0", "--save-every", "0", "--drop-path", "0.1", "--repeated-aug", "--reprob", "0.5"]


needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install -r requirements-mpi.txt brings MPICH)")


def launch(ranks, *args, check=True, timeout=300):
    """mpiexec -n ranks python args...; ranks=1 runs the plain process, without MPI."""
    command = [sys.executable, *map(str, args)]
    if ranks > 1:
        command = [mpiexec(), "-n", str(ranks), *command]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=environment_without_mpi())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """80 train images (divisible by 2 ranks: the epochs of 1 and 2 ranks have the same batches), 30 val."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=8, val_per_class=3)


# ---------------------------------------------------------------------------------------------
# Without MPI: launch detection, buckets, backward's reports, the one-process stand-in.
# ---------------------------------------------------------------------------------------------
def test_mpi_is_detected_from_the_launchers_variables():
    assert not launched_by_mpi({"HOME": "/root"})
    assert launched_by_mpi({"PMI_RANK": "1", "PMI_SIZE": "2"})  # MPICH, Intel MPI (Hydra)
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})  # Open MPI
    assert launched_by_mpi({"PMIX_RANK": "0"})  # PMIx launchers (srun)


def test_buckets_cover_the_buffer_once_at_parameter_boundaries_from_its_end():
    model = create_model("resmlp_tiny", img_size=16, dtype="float64")
    parameters = model.parameters
    starts = {where.start for where in parameters.slices.values()}
    for bucket_bytes in (1, 64 * 1024, 10 ** 9):
        ranges = bucket_ranges(parameters, bucket_bytes)
        assert ranges[0][1] == parameters.size and ranges[-1][0] == 0
        assert all(later[1] == earlier[0] for earlier, later in zip(ranges, ranges[1:]))  # contiguous, descending
        assert all(start in starts for start, _ in ranges)
        assert all((stop - start) * 8 >= bucket_bytes for start, stop in ranges[:-1])
    assert len(bucket_ranges(parameters, 1)) == len(parameters.slices)  # one parameter each
    assert len(bucket_ranges(parameters, 10 ** 9)) == 1


def forward_for_backward(model, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(4, 3, 16, 16))
    logits = model.forward(images, train=True)
    return rng.normal(size=logits.shape) / 4


def test_backward_reports_each_range_of_the_buffer_once_final():
    model = create_model("resmlp_tiny", img_size=16, dtype="float64", drop_path=0.2, seed=1)
    dlogits = forward_for_backward(model)
    model.backward(dlogits)
    final = model.parameters.grad.copy()

    model.drop_path_rng = np.random.default_rng([1, 1])  # the masks of the first pass again
    forward_for_backward(model)
    model.parameters.grad[...] = np.nan  # what backward has not written yet
    reports = []

    def grads_ready(offset):
        grad = model.parameters.grad
        np.testing.assert_array_equal(grad[offset:], final[offset:])  # final from offset to the end
        reports.append(offset)

    model.backward(dlogits, grads_ready=grads_ready)
    slices = model.parameters.slices
    depth = model.config["depth"]
    assert reports == ([slices["norm.alpha"].start] + [slices[f"blocks.{i}.gamma_1"].start
                                                        for i in reversed(range(depth))] + [0])


class RecordingTransport:
    """A one-rank transport that notes, for each bucket, where backward stood when its all-reduce started."""

    size = 1

    def __init__(self):
        self.started = []
        self.backward_done = False

    def start(self, bucket):
        self.started.append((bucket.size, self.backward_done))

    def progress(self):
        pass

    def finish(self):
        pass


def test_buckets_start_while_backward_runs_and_the_mean_of_one_rank_is_the_gradient():
    model = create_model("resmlp_tiny", img_size=16, dtype="float64", seed=2)
    dlogits = forward_for_backward(model)
    model.backward(dlogits)
    expected = model.parameters.grad.copy()

    transport = RecordingTransport()
    averaging = BucketedMean(model.parameters, transport, bucket_bytes=64 * 1024)
    forward_for_backward(model)
    original_backward = model.backward

    def backward_then_mark(*args, **kwargs):
        result = original_backward(*args, **kwargs)
        transport.backward_done = True
        return result

    model.backward = backward_then_mark
    # report(0) comes inside backward: every bucket started before backward returned, the last one at its end
    averaging.backward(model, dlogits)
    assert len(transport.started) == len(averaging.buckets) > 3
    assert sum(size for size, _ in transport.started) == model.parameters.size
    assert not any(done for _, done in transport.started)
    np.testing.assert_array_equal(model.parameters.grad, expected)


def test_one_process_backward_is_model_backward():
    """The step is given a world (sync) under data parallel only: one process's world has no backward, nor a
    skip decision to agree on, for the step to go through."""
    world = SingleProcess()
    assert not hasattr(world, "backward") and not hasattr(world, "all_true")


def test_ranks_erase_their_places_of_the_global_batch_and_draw_their_own_mixup():
    def trainer_on(rank, size):  # what the two generators read of a Trainer
        return SimpleNamespace(position=dict(epoch=2, batch=5), settings=dict(seed=7),
                               world=SimpleNamespace(rank=rank, size=size))

    def first_draws(generators):
        return [generator.random() for generator in generators]

    one_process = first_draws(Trainer.image_generators(trainer_on(0, 1), ERASING_STREAM, 8))
    ranks = [first_draws(Trainer.image_generators(trainer_on(rank, 2), ERASING_STREAM, 4)) for rank in (0, 1)]
    assert ranks[0] == one_process[0::2] and ranks[1] == one_process[1::2]  # places r, r + K, ...
    mixups = [Trainer.mixup_generator(trainer_on(rank, 2)).random() for rank in (0, 1)]
    assert mixups[0] != mixups[1]


def test_a_global_batch_that_does_not_split_over_the_ranks_names_what_would():
    from minimlp.training.config import per_rank_batch
    three_ranks = SimpleNamespace(world_size=3)
    assert per_rank_batch(2049, three_ranks, "--recipe's batch") == 683
    with pytest.raises(ValueError, match=r"--recipe resmlp-s12's batch of 2048 images does not split over 3 ranks: "
                                         r"give --batch-size 682 \(per rank: a global batch of 2046\), or start 2 or 4 "
                                         r"ranks \(--batch-size 1024 or 512 each\)$"):
        per_rank_batch(2048, three_ranks, "--recipe resmlp-s12's batch")
    with pytest.raises(ValueError, match=r"global batch of 7 images does not split over 8 ranks: start 7 ranks "
                                         r"\(--batch-size 1 each\)$"):  # no more ranks divide it
        per_rank_batch(7, SimpleNamespace(world_size=8), "the checkpoint's global batch", fixed=True)


def test_other_ranks_print_only_warnings_and_keep_their_last_line():
    import io
    real = io.StringIO()
    output = OtherRankOutput(real, "rank 1/2")
    output.write("epoch 1/3  10/20 batch\rloss 2.1\n")
    output.write("warning: skipping unreadable image x.jpg (truncated)\nerror: the GPU ran out of memory")
    output.write("\n")
    assert real.getvalue() == "rank 1/2: warning: skipping unreadable image x.jpg (truncated)\n"
    assert output.last_line == "error: the GPU ran out of memory"


# ---------------------------------------------------------------------------------------------
# Under mpiexec -n 2, on the CPU.
# ---------------------------------------------------------------------------------------------
AGREEMENT = """
import pathlib, sys
from minimlp.parallel.distributed import MPIWorld
world = MPIWorld()
finite = world.all_true(world.rank == 0)  # rank 1 saw inf/NaN: every rank skips the step
stop = world.max(15 if world.rank == 1 else 0)  # rank 1 received SIGTERM: every rank stops
sums = world.sum([world.rank + 1, 10]).tolist()
checkpoint = world.from_writer(lambda: dict(read_by=world.rank))
# each rank writes its own file: mpiexec forwards the ranks' stdout in pieces that can interleave
pathlib.Path(sys.argv[1], f"rank{world.rank}.txt").write_text(f"{world.rank} {finite} {stop} {sums} {checkpoint}")
"""


@needs_mpi
def test_ranks_agree_on_skipping_stopping_sums_and_what_rank_0_read(tmp_path):
    launch(2, "-c", AGREEMENT, tmp_path, timeout=60)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == [
        "0 False 15 [3.0, 20.0] {'read_by': 0}", "1 False 15 [3.0, 20.0] {'read_by': 0}"]


def max_difference(a, b):
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


@needs_mpi
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 2e-6)])
def test_two_ranks_end_where_one_process_with_the_global_batch_ends(shapes, tmp_path, dtype, tolerance):
    """8 steps through the library with repeated augmentation, drop path, smoothing and clipping; evaluation
    sharded. Two ranks x 8 images against one process x 16."""
    script = ROOT / "tests" / "data_parallel_run.py"
    launch(1, script, tmp_path / "one", "--data", shapes, "--batch-size", 16, "--steps", 8, "--dtype", dtype)
    launch(2, script, tmp_path / "two", "--data", shapes, "--batch-size", 8, "--steps", 8, "--dtype", dtype)
    one, two = (np.load(tmp_path / name / "weights.npz") for name in ("one", "two"))
    assert max_difference(one, two) < tolerance
    result_one, result_two = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    assert result_two["val_images"] == result_one["val_images"] == 30  # every validation image exactly once
    assert result_two["batches_per_epoch"] == result_one["batches_per_epoch"] == 5  # 80 images x 3 / 3 / 16
    for key in ("val_loss", "val_top1", "val_top5"):
        assert result_two[key] == pytest.approx(result_one[key], rel=1e-9 if dtype == "float64" else 1e-5)


@needs_mpi
def test_a_batch_made_short_by_an_unreadable_image_weighs_by_its_images(shapes, tmp_path):
    """One training image is unreadable: some batches lose it, on one rank only. The global batch's mean
    gradient weighs each rank by its images (drop path off: its masks are drawn for full batches)."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    train_set, _ = load_datasets(data)
    fourth = RepeatedAugmentationSampler(len(train_set), seed=3, repeats=3).epoch_order(0)[3]  # the script's order
    broken = Path(train_set.samples[fourth][0])  # in the first batch, and on rank 1 of 2
    broken.write_bytes(b"not an image")
    script = ROOT / "tests" / "data_parallel_run.py"
    common = ["--data", data, "--steps", 8, "--dtype", "float64", "--drop-path", 0]
    one = launch(1, script, tmp_path / "one", *common, "--batch-size", 16)
    launch(2, script, tmp_path / "two", *common, "--batch-size", 8)
    assert f"skipping unreadable image {broken}" in one.stderr
    weights = [np.load(tmp_path / name / "weights.npz") for name in ("one", "two")]
    assert max_difference(*weights) < 1e-12


@needs_mpi
def test_repeated_augmentation_on_a_number_of_images_that_two_ranks_do_not_split(shapes, tmp_path):
    """79 training images: one process x 16 takes 79 positions of the repeated order, 4 batches; two ranks x 8
    take 39 each (floor), 4 batches too, so 8 steps (two epochs) end at the same weights. With timm's ceil(79 / 2)
    = 40 per rank they made 5 batches an epoch and the second epoch began elsewhere."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    first_image = load_datasets(data)[0].samples[0][0]
    Path(first_image).unlink()
    script = ROOT / "tests" / "data_parallel_run.py"
    common = ["--data", data, "--steps", 8, "--dtype", "float64"]
    launch(1, script, tmp_path / "one", *common, "--batch-size", 16)
    launch(2, script, tmp_path / "two", *common, "--batch-size", 8)
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two")]
    assert [result["batches_per_epoch"] for result in results] == [4, 4]
    weights = [np.load(tmp_path / name / "weights.npz") for name in ("one", "two")]
    assert max_difference(*weights) < 1e-12


def train(ranks, *args, check=True):
    return launch(ranks, ROOT / "train.py", *args, check=check)


EPOCHS = 6  # 5 steps each


@pytest.fixture(scope="module")
def one_process_run(shapes, tmp_path_factory):
    """train.py in one process x 16 images, float32, drop path, repeated augmentation and random erasing on."""
    output = tmp_path_factory.mktemp("one")
    train(1, "--data", shapes, "--epochs", EPOCHS, *FAST, "--batch-size", 16, "--output", output)
    return output


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def with_broken_images(shapes, folder, broken):
    """A copy of the shapes set in `folder` whose training images broken(samples) picks are not images."""
    shutil.copytree(shapes, folder)
    train_set, _ = load_datasets(folder)
    paths = broken(train_set)
    for path in paths:
        Path(path).write_bytes(b"not an image")
    return folder, paths


SHORT = ["--epochs", 1, *FAST, "--drop-path", 0, "--reprob", 0]  # a short batch shifts drop path's and erasing's draws


@pytest.fixture(scope="module")
def short_batch_runs(shapes, tmp_path_factory):
    """One epoch of train.py with one unreadable training image: one process x 16, two ranks x 8."""
    folder = tmp_path_factory.mktemp("short")
    data, _ = with_broken_images(shapes, folder / "data", lambda train_set: [train_set.samples[5][0]])
    outputs = folder / "one", folder / "two"
    runs = [train(1, "--data", data, *SHORT, "--batch-size", 16, "--output", outputs[0]),
            train(2, "--data", data, *SHORT, "--batch-size", 8, "--output", outputs[1])]
    return data, outputs, runs


@needs_mpi
def test_the_logged_train_loss_counts_the_images_of_short_batches_over_the_ranks(short_batch_runs):
    """The image count is all-reduced with the loss: 2 ranks log the loss of one process (they logged 2.30783 against
    2.29332, counting rank 0's images twice)."""
    data, outputs, runs = short_batch_runs
    assert "skipping unreadable image" in runs[0].stderr and "skipping unreadable image" in runs[1].stderr
    one, two = (read_log(output)[0] for output in outputs)
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)


@needs_mpi
@pytest.mark.parametrize("ranks, flags, error", [
    (2, ["--img-size", 32], "was made with --img-size 16 (now 32): use the same settings"),  # check_compatible
    (3, [], "error: the checkpoint's global batch of 16 images does not split over 3 ranks: start 2 or 4 ranks "
            "(--batch-size 8 or 4 each)")])  # advice that can be followed
def test_a_checkpoint_refused_on_every_rank_is_one_line_and_no_abort(short_batch_runs, tmp_path, ranks, flags, error):
    _, outputs, _ = short_batch_runs
    result = train(ranks, "--resume", outputs[0] / "checkpoint.npz", *flags, "--output", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(error) == 1 and "stopping every rank" not in result.stderr, result.stderr


@needs_mpi
def test_a_batch_larger_than_a_ranks_share_is_one_line_naming_a_batch_that_works(shapes, tmp_path):
    result = train(2, "--data", shapes, *FAST, "--batch-size", 48, "--output", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr
    error = (f"error: --batch-size 48 is larger than each rank's share of the training set (40 images per epoch on "
             f"each of 2 ranks, of 80 in {shapes / 'train'}): give --batch-size 40 or less (it is per rank).")
    assert result.stderr.count(error) == 1 and "stopping every rank" not in result.stderr, result.stderr


def test_the_augmentations_that_are_on_are_printed_at_the_start(short_batch_runs):
    runs = short_batch_runs[2]
    assert [run.stdout.count("augmentations: RandomResizedCrop scale 0.5-1 ") for run in runs] == [1, 1]
    assert "repeated augmentation (3 copies)" in runs[0].stdout  # FAST's --repeated-aug


@needs_mpi
def test_a_class_no_rank_can_read_is_refused_by_every_rank_at_once_with_one_warning_per_file(shapes, tmp_path):
    """Each rank sees half of a class's files: counted over the ranks, the class is found unreadable in epoch 1, as
    one process finds it; one error line, exit code 2, no abort, and each file warned once (not once per rank)."""
    def one_class(train_set):
        return [path for path, label in train_set.samples if label == 3]

    data, broken = with_broken_images(shapes, tmp_path / "data", one_class)
    result = train(2, "--data", data, *SHORT, "--no-repeated-aug", "--batch-size", 8, "--output", tmp_path / "run",
                   check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(f"error: no image of class {Path(broken[0]).parent.name} in") == 1, result.stderr
    assert "stopping every rank" not in result.stderr
    assert [result.stderr.count(f"skipping unreadable image {path} ") for path in broken] == [1] * len(broken)


@needs_mpi
def test_train_py_on_two_ranks_equals_one_process(shapes, one_process_run, tmp_path):
    two = train(2, "--data", shapes, "--epochs", EPOCHS, *FAST, "--batch-size", 8, "--output", tmp_path)
    assert "data parallel: 2 ranks" in two.stdout and "global batch 2 x 8 = 16" in two.stdout
    assert two.stdout.count(f"epoch {EPOCHS}/{EPOCHS}  train loss") == 1  # rank 0 alone prints
    one_weights, one_optimizer, one_meta = load_checkpoint(one_process_run / "checkpoint.npz")
    two_weights, two_optimizer, two_meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert two_meta["settings"]["world_size"] == 2 and one_meta["settings"]["world_size"] == 1
    assert two_meta["position"]["global_step"] == one_meta["position"]["global_step"] == 5 * EPOCHS
    assert max_difference(one_weights, two_weights) < 1e-5  # measured 1.8e-6
    assert float(np.abs(one_optimizer["m"] - two_optimizer["m"]).max()) < 1e-6
    for a, b in zip(read_log(one_process_run), read_log(tmp_path), strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


@needs_mpi
def test_ranks_started_with_other_flags_refuse_to_start(shapes, tmp_path):
    # rank 0 with --lr 3e-3, rank 1 with --lr 1e-3: MPMD syntax, one command per rank. Their --workers differ
    # too, which is allowed (each machine its own cores: the default is the core count).
    common = [sys.executable, str(ROOT / "train.py"), "--data", str(shapes), "--epochs", "1", *FAST,
              "--batch-size", "8", "--output", str(tmp_path / "run")]
    command = [mpiexec(), "-n", "1", *common, ":", "-n", "1", *common, "--lr", "1e-3", "--workers", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=environment_without_mpi())
    assert result.returncode == 2, result.stderr  # every rank refuses in order: no MPI_Abort
    refusal = "error: rank 1 was started with other settings than rank 0: --lr 0.001 (rank 0: 0.003); start every"
    assert result.stderr.count(refusal) == 1, result.stderr
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@needs_mpi
@pytest.mark.parametrize("flags, error", [
    (["--eval-only"], "error: --eval-only needs --resume CHECKPOINT_OR_WEIGHTS"),  # a flag, checked in config.py
    (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
    (["--data", "/nonexistent"], "error: --data folder /nonexistent does not exist")])  # the dataset, on every rank
def test_a_bad_flag_or_dataset_on_every_rank_is_one_line_and_no_abort(tmp_path, flags, error):
    result = train(2, *FAST, *flags, "--output", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(error) == 1 and "stopping every rank" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def start_two_ranks(shapes, output, epochs=30):
    """train.py on 2 ranks x 8, its output read line by line."""
    command = [mpiexec(), "-n", "2", sys.executable, str(ROOT / "train.py"), "--data", str(shapes), "--epochs",
               str(epochs), *FAST, "--batch-size", "8", "--output", str(output)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**environment_without_mpi(), "PYTHONUNBUFFERED": "1"})


def wait_for_line(process, start):
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(start):
            return lines
    raise AssertionError("".join(lines))


@needs_mpi
def test_sigterm_stops_every_rank_at_one_step_and_one_process_resumes_the_two_rank_checkpoint(shapes, one_process_run,
                                                                                               tmp_path):
    """SIGTERM to mpiexec (which passes it on to both ranks) inside the run: one checkpoint by rank 0, every
    rank stopped after the same step; one process x 16 continues it to the end of the one-process run."""
    process = start_two_ranks(shapes, tmp_path, epochs=EPOCHS)
    wait_for_line(process, f"epoch 1/{EPOCHS}  train loss")
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=60) == 143, output
    assert output.count("SIGTERM: stopped") == 1, output  # rank 0's line only
    _, _, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["settings"]["world_size"] == 2 and 5 <= meta["position"]["global_step"] < 5 * EPOCHS

    train(1, "--resume", tmp_path / "checkpoint.npz", "--batch-size", 16)  # another K, the same global batch
    resumed_weights, _, resumed_meta = load_checkpoint(tmp_path / "checkpoint.npz")
    one_weights, _, _ = load_checkpoint(one_process_run / "checkpoint.npz")
    assert resumed_meta["settings"]["world_size"] == 1 and resumed_meta["position"]["epoch"] == EPOCHS
    assert max_difference(one_weights, resumed_weights) < 1e-5


@needs_mpi
def test_a_killed_rank_stops_the_whole_job_within_seconds(shapes, tmp_path):
    process = start_two_ranks(shapes, tmp_path / "run")
    lines = wait_for_line(process, "data parallel: 2 ranks")
    rank_1 = int(re.search(r"rank 1: \S+ pid (\d+)", lines[-1]).group(1))
    wait_for_line(process, "epoch 1/30  train loss")
    segments = mpich_segments_of(rank_1)
    assert segments, "MPICH maps a shared-memory segment in every rank of a machine"
    killed = time.monotonic()
    os.kill(rank_1, signal.SIGKILL)
    output = process.stdout.read()
    code = process.wait(timeout=60)
    assert time.monotonic() - killed < 15, output
    assert code != 0
    assert f"PID {rank_1}" in output  # MPICH's Hydra names the rank that died (pid -> rank: the start-up line)
    assert not [path for path in segments if Path(path).exists()]  # nothing left in /dev/shm (2.1 MB each)


def mpich_segments_of(pid):
    """The /dev/shm/mpich_shm_* files that process `pid` has mapped, by name, whether the name is still there
    or not (only this job's, whatever other jobs on the machine hold in /dev/shm)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[5] for line in lines if "/dev/shm/mpich_shm_" in line}


@pytest.mark.parametrize("rank, lines", [(0, 1), (1, 0)])
def test_mpiexec_without_mpi4py_is_one_line_from_rank_0_and_exit_2(tmp_path, rank, lines):
    """MPI is optional at install (requirements-mpi.txt): mpiexec's variables without an importable mpi4py."""
    hidden = tmp_path / "mpi4py"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    environment = {**environment_without_mpi(), "PMI_RANK": str(rank), "PMI_SIZE": "2", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, ROOT / "train.py", "--epochs", "1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=environment)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: mpiexec started this process, but mpi4py cannot be imported (No "
                                          "module named mpi4py): pip install -r requirements-mpi.txt, or run without "
                                          "mpiexec (one process)"][:lines]


def gpu_count():
    return backend.get_module("gpu").cuda.runtime.getDeviceCount() if backend.gpu_available() else 0


@needs_mpi
@pytest.mark.skipif(gpu_count() < 2, reason="two ranks on two GPUs over NCCL need two GPUs (not run here)")
def test_two_gpus_over_nccl_end_where_one_gpu_with_the_global_batch_ends(shapes, tmp_path):
    script = ROOT / "tests" / "data_parallel_run.py"
    launch(1, script, tmp_path / "one", "--data", shapes, "--batch-size", 16, "--dtype", "float64", "--device", "gpu")
    launch(2, script, tmp_path / "two", "--data", shapes, "--batch-size", 8, "--dtype", "float64", "--device", "gpu")
    one, two = (np.load(tmp_path / name / "weights.npz") for name in ("one", "two"))
    assert max_difference(one, two) < 1e-12


# ---------------------------------------------------------------------------------------------
# The NCCL path: where CuPy finds a GPU.
# ---------------------------------------------------------------------------------------------
def test_nccl_buckets_on_one_gpu_average_to_the_gradient():
    """A communicator of size 1 on one GPU: the buckets' all-reduces on their own stream, each after an event
    on the compute stream, the compute stream waiting for the last; the gradient comes out unchanged (the
    mean over one rank), and a training step equals the one-process step."""
    if not backend.gpu_available():
        pytest.skip("the NCCL path needs a CUDA GPU with CuPy (not run here)")
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("CuPy finds no NCCL library: pip install nvidia-nccl-cu12")
    from minimlp.parallel.allreduce import NCCLAllreduce

    import cupy
    transport = NCCLAllreduce(1, 0, nccl.get_unique_id(), timeout=60, on_timeout=pytest.fail)
    results = []
    for sync in (None, "nccl"):
        model = create_model("resmlp_tiny", img_size=16, device="gpu", seed=5)
        optimizer = AdamW(model.parameters, model.ops, lr=1e-3)
        images = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
        if sync == "nccl":
            averaging = BucketedMean(model.parameters, transport, bucket_bytes=64 * 1024)
            assert len(averaging.buckets) > 3

            class OneGPU(SingleProcess):
                def backward(self, model, dlogits):
                    averaging.backward(model, dlogits)
            sync = OneGPU()
        for _ in range(3):
            train_step(model, optimizer, images, np.arange(8) % 10, 1e-3, policy("float32"), sync=sync)
        cupy.cuda.get_current_stream().synchronize()
        results.append(backend.to_numpy(model.parameters.data))
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-6)


def test_ranks_compare_the_code_of_every_sub_package_and_train_py():
    """check_same refuses ranks that run other code: the hashes cover minimlp/ and its folders, and train.py."""
    from minimlp.parallel.distributed import source_hashes
    hashes = source_hashes()
    for path in ("minimlp/layers.py", "minimlp/training/trainer.py", "minimlp/data/loader.py", "train.py"):
        assert path in hashes
    assert "minimlp/__init__.py" in hashes and "minimlp/data/__init__.py" in hashes  # no two files under one name
