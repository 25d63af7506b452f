"""What long runs meet, injected on purpose: a loader worker killed, SIGTERM and SIGHUP, kill -9 mid-epoch,
two runs into one folder, a kill between the log line and the checkpoint, a double Ctrl-C while writing,
a full disk, resume surprises, datasets that lie, and errors that must name what is wrong.

Runs are train.py as a user starts it (subprocesses, killed for real) or, where a fault is injected into
Python itself (a write that fails, a kill at one precise line), train.main in this process. Every run is
the small FAST configuration of test_train.py on a small shapes10 copy: seconds each.
"""
import fcntl
import json
import os
import queue
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from minimlp.training.checkpoint import load_checkpoint, save_checkpoint
from minimlp.data.datasets import DataError, load_datasets
from minimlp.data.loader import Loader
from minimlp.data.synthetic import ensure_shapes_dataset
from tests.imagetools import make_image_folder, save_image
from tests.test_train import FAST, ROOT, TINY, read_log, train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses Linux signals")

EPOCHS = 4  # the SIGTERM/SIGHUP test needs an epoch after the resumed run's first one
SETTINGS = ["--epochs", EPOCHS, *FAST, "--drop-path", "0.1"]  # drop path: its generator must resume too
COMPARED = ["epoch", "train_loss", "val_loss", "val_top1", "lr"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), train_per_class=24, val_per_class=6)


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    """An uninterrupted run, the reference of every resumed one. Started from the dataset's parent folder
    with a relative --data: every resume below runs from the repository and must still find the data."""
    output = tmp_path_factory.mktemp("straight")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", shapes.name, *map(str, SETTINGS),
                             "--output", str(output)], cwd=shapes.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def read_meta(path):
    """A checkpoint's meta, without its arrays."""
    with np.load(path) as archive:
        return json.loads(str(archive["meta"]))


def assert_same_run(folder, reference):
    weights, optimizer, meta = load_checkpoint(folder / "checkpoint.npz")
    reference_weights, reference_optimizer, _ = load_checkpoint(reference / "checkpoint.npz")
    for name, value in reference_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    for name in ("m", "v"):
        np.testing.assert_array_equal(optimizer[name], reference_optimizer[name], err_msg=name)
    log, reference_log = read_log(folder), read_log(reference)
    assert [record["epoch"] for record in log] == list(range(1, EPOCHS + 1))  # each line once, none lost
    for key in COMPARED:
        assert [record[key] for record in log] == [record[key] for record in reference_log], key
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


class Run:
    """train.py in a session of its own (so a test can kill whatever it left), read line by line."""

    def __init__(self, *args, cwd=ROOT):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.pid = self.process.pid
        self.lines, self.seen = queue.Queue(), []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.process.stdout:
            self.seen.append(line)
            self.lines.put(line)
        self.lines.put(None)

    @property
    def output(self):
        return "".join(self.seen)

    def wait_for(self, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"ended ({self.process.wait()}) before the line:\n{self.output}")
            if predicate(line):
                return line

    def finish(self, timeout=120):
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s (a hang):\n{self.output}") from None
        self.reader.join(timeout=10)  # the rest of the output (unless orphans still hold the pipe)
        return code

    def kill_everything(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


@pytest.fixture
def runs():
    """Start Runs; whatever a test leaves running (a hang, orphans of a failing run) is killed afterwards."""
    started = []

    def start(*args, **options):
        started.append(Run(*args, **options))
        return started[-1]

    yield start
    for run in started:
        run.kill_everything()


def epoch_done(number):
    return lambda line: line.startswith(f"epoch {number}/") and "train loss" in line


def children(pid):
    """Live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def workers_of(pid):
    """The multiprocessing workers among the children of `pid` (not its resource tracker)."""
    def command(child):
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return b""
    return [child for child in children(pid) if b"spawn_main" in command(child)]


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def in_process(*args):
    """train.main in this process: for faults injected into Python (monkeypatch) at a precise point."""
    import train as train_py
    return train_py.main([str(arg) for arg in args])


# ---------------------------------------------------------------------------------------------
# 1. A loader worker dies.
# ---------------------------------------------------------------------------------------------
def test_a_killed_loader_worker_is_replaced_and_the_run_is_unchanged(shapes, straight, tmp_path, runs):
    run = runs("--data", shapes, *SETTINGS, "--workers", 2, "--output", tmp_path / "run")
    run.wait_for(lambda line: line.startswith("output:"))
    wait_until(lambda: workers_of(run.pid), 60, "loader workers started")
    victim, *others = workers_of(run.pid)
    os.kill(victim, signal.SIGKILL)  # as the out-of-memory killer does
    assert run.finish(timeout=120) == 0, run.output
    assert f"(pid {victim}) was killed by SIGKILL" in run.output and "a new one takes its" in run.output
    assert_same_run(tmp_path / "run", straight)
    assert not any(alive(pid) for pid in others)


class DyingSettings:
    """TransformSettings whose every image kills the worker decoding it (picklable: a module-level class)."""
    train = False

    def transform(self, path, epoch, position):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_batch_that_keeps_killing_its_worker_names_it_quickly(tmp_path):
    from minimlp.data.workers import WorkerDied
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(16, 16))
    train_set, _ = load_datasets(tmp_path / "data")
    loader = Loader(train_set, 2, train=False, img_size=16, workers=1)
    loader.settings = DyingSettings()
    started = time.monotonic()
    with pytest.raises(WorkerDied, match=r"loader worker 0 \(pid \d+\) was killed by SIGKILL.*3 workers in a row"):
        next(loader.epoch(0))
    assert time.monotonic() - started < 60 and loader.pool is None and not workers_of(os.getpid())


def test_a_worker_that_keeps_dying_stops_the_run_with_a_checkpoint_at_the_last_step(shapes, tmp_path):
    """The trainer's side: the loader gives up (WorkerDied) in the middle of epoch 1."""
    from minimlp import create_model
    from minimlp.layers import CrossEntropy
    from minimlp.optim import make_optimizer
    from minimlp.training.signals import EXIT_WORKER_DIED, Interrupted
    from minimlp.training.trainer import Trainer
    from minimlp.data.workers import WorkerDied
    train_set, val_set = load_datasets(shapes)
    loader = Loader(train_set, 16, train=True, img_size=16, workers=0)

    class GivingUp:  # the real loader's batches, then the death of batch 3
        def __len__(self):
            return len(loader)

        def epoch(self, epoch, start_batch=0):
            for index, batch in enumerate(loader.epoch(epoch, start_batch)):
                if index == 3:
                    raise WorkerDied("loader worker 1 (pid 4242) was killed by SIGKILL; 3 workers in a row died")
                yield batch

    model = create_model("resmlp_tiny", num_classes=10, img_size=16)
    settings = dict(epochs=2, warmup_epochs=0, lr=3e-3, min_lr=1e-5, warmup_lr=1e-6, smoothing=0.1, clip_grad=0.0,
                    seed=0)
    optimizer = make_optimizer("adamw", model.parameters, model.ops, 3e-3, 0.05)
    trainer = Trainer(model, CrossEntropy(model.ops, 0.1), optimizer, GivingUp(), GivingUp(), train_set.classes,
                      settings, tmp_path)
    with pytest.raises(Interrupted, match=r"pid 4242.*epoch 1, batch 3/15 \(checkpoint saved\); continue with "
                                          r"--resume .*checkpoint.npz") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == EXIT_WORKER_DIED
    position = read_meta(tmp_path / "checkpoint.npz")["position"]
    assert position["batch"] == 3 and position["images"] == 48 and position["loss_sum"] > 0


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGHUP. 3. Work lost between epochs (--save-every), kill -9 and orphans.
# ---------------------------------------------------------------------------------------------
def test_sigterm_then_sighup_save_and_the_resumed_run_is_exact(straight, tmp_path, runs):
    folder = tmp_path / "run"
    data = json.loads((straight / "config.json").read_text())["data"]
    run = runs("--data", data, *SETTINGS, "--output", folder)
    run.wait_for(epoch_done(1))
    run.process.send_signal(signal.SIGTERM)  # somewhere in epoch 2 (its training or its evaluation)
    assert run.finish() == 128 + signal.SIGTERM, run.output
    assert "SIGTERM: saving a checkpoint" in run.output and "continue with --resume" in run.output
    assert read_meta(folder / "checkpoint.npz")["position"]["epoch"] < EPOCHS
    resumed = runs("--resume", folder / "checkpoint.npz")
    resumed.wait_for(lambda line: "train loss" in line)  # the end of epoch 2 or 3
    resumed.process.send_signal(signal.SIGHUP)  # somewhere in the next one
    assert resumed.finish() == 128 + signal.SIGHUP, resumed.output
    assert "SIGHUP: saving a checkpoint" in resumed.output
    train("--resume", folder / "checkpoint.npz")
    assert_same_run(folder, straight)
    assert "leaked" not in run.output + resumed.output  # no semaphore left to the resource tracker


def test_a_terminal_that_hangs_up_is_let_go_and_the_run_saves(straight, tmp_path):
    # train.py on a terminal of its own (a pseudo-terminal, the session's controlling one), which then goes
    # away as an ssh connection drops: the kernel sends SIGHUP, and every write to the terminal fails
    folder = tmp_path / "run"
    data = json.loads((straight / "config.json").read_text())["data"]
    terminal, its_end = os.openpty()

    def own_session_on_the_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", data, *map(str, SETTINGS),
                                "--output", str(folder)], cwd=ROOT, stdin=its_end, stdout=its_end, stderr=its_end,
                               preexec_fn=own_session_on_the_terminal)
    os.close(its_end)
    shown = b""
    try:
        while b"train loss" not in shown:  # the end of epoch 1, drawn on the terminal
            shown += os.read(terminal, 65536)
    except OSError:  # the run ended early: its output says why
        pass
    os.close(terminal)  # the terminal hangs up
    try:
        code = process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running 120 s after the hangup:\n{shown.decode(errors='replace')}") from None
    assert code == 128 + signal.SIGHUP, shown.decode(errors="replace")
    assert read_meta(folder / "checkpoint.npz")["position"]["epoch"] >= 1
    train("--resume", folder / "checkpoint.npz")
    assert_same_run(folder, straight)


OUTSIDE_THE_LOOP = """
import sys, time
from minimlp.training.signals import quit_on_stop_signals
try:
    with quit_on_stop_signals():  # what train.py runs under while it scans the data or evaluates
        open(sys.argv[1], "w").close()
        time.sleep(60)
except KeyboardInterrupt as stop:
    print(f"interrupted ({stop})", file=sys.stderr)  # train.py's last words: they must not fail on a closed terminal
    sys.exit(stop.exit_code)
"""


def test_a_terminal_that_hangs_up_outside_the_training_loop_ends_the_run_with_129(tmp_path):
    terminal, its_end = os.openpty()

    def own_session_on_the_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", OUTSIDE_THE_LOOP, str(ready)], cwd=ROOT, stdin=its_end,
                               stdout=its_end, stderr=its_end, preexec_fn=own_session_on_the_terminal)
    os.close(its_end)
    wait_until(ready.exists, 30, "the script to start")
    os.close(terminal)
    assert process.wait(30) == 128 + signal.SIGHUP


def test_kill_9_mid_epoch_resumes_from_the_time_based_checkpoint_and_leaves_no_orphan(straight, tmp_path, runs):
    folder = tmp_path / "run"
    data = json.loads((straight / "config.json").read_text())["data"]
    run = runs("--data", data, *SETTINGS, "--workers", 1, "--save-every", 0.002, "--output", folder)

    def saved_mid_epoch():
        try:
            return read_meta(folder / "checkpoint.npz")["position"]["batch"] > 0
        except Exception:  # not there yet
            return False
    wait_until(saved_mid_epoch, 60, "a checkpoint inside an epoch")
    workers = workers_of(run.pid)
    assert workers
    os.kill(run.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    wait_until(lambda: not any(alive(pid) for pid in workers), 10, f"the workers {workers} end with their parent")
    (folder / "checkpoint.npz.tmp").write_bytes(b"left by an older kill")  # a leftover of any name is cleaned
    train("--resume", folder / "checkpoint.npz", "--workers", 0, "--save-every", 0)
    assert_same_run(folder, straight)


def test_data_is_stored_as_an_absolute_path(straight, shapes):
    assert read_meta(straight / "checkpoint.npz")["settings"]["data"] == str(shapes)
    assert json.loads((straight / "config.json").read_text())["data"] == str(shapes)


# ---------------------------------------------------------------------------------------------
# 4. Runs clobber each other.
# ---------------------------------------------------------------------------------------------
def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "run.lock"}


def test_a_new_run_into_a_finished_runs_folder_is_refused(straight, shapes, tmp_path):
    taken = tmp_path / "taken"
    shutil.copytree(straight, taken)
    before = snapshot(taken)
    result = train("--data", shapes, *SETTINGS, "--output", taken, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert str(taken) in line and "--resume" in line and "--output" in line
    assert snapshot(taken) == before
    # a run that stopped before its first checkpoint (a kill, a full disk) left a log but nothing to resume
    for name in ("checkpoint.npz", "best.npz"):
        (taken / name).unlink()
    result = train("--data", shapes, *SETTINGS, "--output", taken, check=False)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "--resume" not in line and "remove the folder" in line, line


def test_a_second_live_run_into_the_same_folder_is_refused(shapes, tmp_path, runs):
    busy = tmp_path / "busy"
    first = runs("--data", shapes, *SETTINGS, "--epochs", 1000, "--output", busy)
    first.wait_for(epoch_done(1))
    second = train("--resume", busy / "checkpoint.npz", check=False, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"{busy} is in use by another run (pid {first.pid})" in second.stderr
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 128 + signal.SIGTERM, first.output


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, runs):
    data = make_image_folder(tmp_path / "tiny", classes=("a", "b"), per_class=4, size=(16, 16))
    flags = ["--data", data, "--epochs", 1, *TINY, "--batch-size", 4, "--workers", 0]
    both = [runs(*flags, cwd=tmp_path), runs(*flags, cwd=tmp_path)]
    assert [run.finish() for run in both] == [0, 0], [run.output for run in both]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and [len(read_log(folder)) for folder in folders] == [1, 1]


# ---------------------------------------------------------------------------------------------
# 5. Leftovers and lost lines.
# ---------------------------------------------------------------------------------------------
class Killed(BaseException):
    """A kill -9 at one precise point of the run (nothing of the run's code catches it)."""


@pytest.mark.parametrize("name, nth, before", [("checkpoint.npz", 1, False),  # between checkpoint and best
                                               ("checkpoint.npz", 2, True)])  # between the log line and checkpoint
def test_a_kill_between_the_log_line_and_the_checkpoints_loses_and_repeats_nothing(straight, tmp_path, monkeypatch,
                                                                                     name, nth, before):
    folder = tmp_path / "run"
    data = json.loads((straight / "config.json").read_text())["data"]
    real_replace, count = os.replace, []

    def replace(source, destination):
        if Path(destination).name == name:
            count.append(destination)
            if len(count) == nth and before:
                raise Killed
            real_replace(source, destination)
            if len(count) == nth:
                raise Killed
            return
        real_replace(source, destination)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        in_process("--data", data, *SETTINGS, "--output", folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert in_process("--resume", folder / "checkpoint.npz") == 0
    assert_same_run(folder, straight)
    top1 = [record["val_top1"] for record in read_log(straight)]
    assert read_meta(folder / "best.npz")["position"]["epoch"] == top1.index(max(top1)) + 1  # the first best


def test_a_double_ctrl_c_while_writing_keeps_best_and_the_log_line(shapes, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    real_savez = np.savez

    def savez(*args, **kwargs):  # Ctrl-C twice in the middle of the first checkpoint write
        if not hasattr(savez, "pressed"):
            savez.pressed = True
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_savez(*args, **kwargs)
    monkeypatch.setattr(np, "savez", savez)
    assert in_process("--data", shapes, *SETTINGS, "--output", folder) == 130
    assert [record["epoch"] for record in read_log(folder)] == [1]
    assert read_meta(folder / "checkpoint.npz")["position"]["epoch"] == 1
    assert read_meta(folder / "best.npz")["position"]["epoch"] == 1
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def test_a_full_disk_names_the_file_and_leaves_no_temporary(shapes, tmp_path):
    folder = tmp_path / "run"

    def small_files():  # every file the run writes is at most 1 MB: the first checkpoint cannot be
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(shapes), *map(str, SETTINGS),
                             "--no-fast", "--output", str(folder)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, preexec_fn=small_files)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line == f"error: [Errno 27] could not write {folder / 'checkpoint.npz'}: File too large", result.stderr
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# 6. Resume surprises.
# ---------------------------------------------------------------------------------------------
def test_resume_after_the_last_epoch_writes_nothing(straight, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(straight, finished)
    before = snapshot(finished)
    result = train("--resume", finished / "checkpoint.npz", "--lr", 0.1, "--smoothing", 0.2)
    assert "nothing to do" in result.stdout
    assert snapshot(finished) == before


def test_resume_from_best_beside_a_newer_checkpoint_is_refused(straight, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(straight, folder)
    weights, optimizer, meta = load_checkpoint(folder / "checkpoint.npz")
    meta["position"].update(epoch=1, global_step=15)  # a best.npz from epoch 1
    save_checkpoint(folder / "best.npz", weights, optimizer, meta)
    before = snapshot(folder)
    result = train("--resume", folder / "best.npz", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert str(folder / "best.npz") in line and str(folder / "checkpoint.npz") in line and "--output" in line
    assert snapshot(folder) == before


def test_raising_epochs_on_resume_keeps_the_warmup(tmp_path):
    from minimlp import create_model
    from minimlp.layers import CrossEntropy
    from minimlp.optim import make_optimizer
    from minimlp.training.trainer import Trainer
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=(16, 16))
    train_set, _ = load_datasets(tmp_path / "data")
    loader = Loader(train_set, 4, train=True, img_size=16, workers=0)  # 4 steps per epoch
    model = create_model("resmlp_tiny", num_classes=2, img_size=16)
    optimizer = make_optimizer("adamw", model.parameters, model.ops, 1e-3, 0.05)
    settings = dict(epochs=1, warmup_epochs=2, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, seed=0)
    first = Trainer(model, CrossEntropy(model.ops), optimizer, loader, loader, train_set.classes, settings, tmp_path)
    peak = first.learning_rate(3)  # the warmup was clipped to the 1-epoch run: its last step is at the peak
    position = json.loads(json.dumps(dict(first.position, epoch=1, global_step=4)))  # through a checkpoint
    resumed = Trainer(model, CrossEntropy(model.ops), optimizer, loader, loader, train_set.classes,
                      dict(settings, epochs=3), tmp_path, position)
    assert peak == pytest.approx(1e-3)
    assert 0.95 * peak < resumed.learning_rate(4) <= peak  # the cosine goes on, no dip into a new warmup


# ---------------------------------------------------------------------------------------------
# 7. Datasets that lie.
# ---------------------------------------------------------------------------------------------
def test_a_symlink_loop_in_a_class_folder_adds_no_image(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=(16, 16))
    os.symlink(".", data / "train" / "a" / "again")
    train_set, val_set = load_datasets(data)
    assert len(train_set) == 6 and len(val_set) == 6
    os.symlink(data / "b_elsewhere", data / "train" / "b" / "more")  # a link to a folder of more images of b
    make_image_folder(tmp_path / "more", classes=("b",), per_class=2, size=(16, 16))
    os.rename(tmp_path / "more" / "train" / "b", data / "b_elsewhere")
    train_set, _ = load_datasets(data)
    assert len(train_set) == 8


def test_a_link_into_another_classs_folder_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=(16, 16))
    os.symlink("../b", data / "train" / "a" / "b_again")  # b's images would be labelled a as well
    with pytest.raises(DataError, match=r"a/b_again \(class a\) and .*/train/b \(class b\) are one folder"):
        load_datasets(data)


def test_a_class_whose_every_image_is_unreadable_stops_the_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, size=(16, 16))
    for index in range(6):
        (data / "train" / "b" / f"img{index}.jpg").unlink()
    for index in range(2):  # two files, never a whole batch of 4: each batch has readable images
        (data / "train" / "b" / f"broken{index}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    folder = tmp_path / "run"
    assert in_process("--data", data, "--epochs", 1, *TINY, "--batch-size", 4, "--workers", 0,
                      "--output", folder) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no image of class b in ") and "broken" in line
    assert "(checkpoint saved): fix the data, then continue with --resume" in line  # the steps done are kept
    assert read_meta(folder / "checkpoint.npz")["position"]["global_step"] >= 1


def test_a_validation_class_that_cannot_be_read_keeps_the_epochs_training(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, size=(16, 16))
    for path in (data / "val" / "b").iterdir():
        path.write_bytes(b"\xff\xd8\xff not a jpeg")
    folder = tmp_path / "run"
    assert in_process("--data", data, "--epochs", 1, *TINY, "--batch-size", 4, "--workers", 0,
                      "--output", folder) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(data / "val" / "b") in line and "(checkpoint saved)" in line
    position = read_meta(folder / "checkpoint.npz")["position"]
    assert (position["epoch"], position["batch"]) == (0, 3), "the epoch's training, saved before its evaluation"


def huge_png(path, side):
    """A PNG whose header says side x side pixels (its data is a stub: Pillow warns at opening)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_huge_png_is_named(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(16, 16))
    huge = huge_png(data / "val" / "a" / "huge.png", 10000)
    _, val_set = load_datasets(data)
    for _ in Loader(val_set, 8, train=False, img_size=16, workers=0).epoch(0):
        pass
    warnings = [line for line in capsys.readouterr().err.splitlines() if "pixels" in line]
    assert warnings and all(str(huge) in line for line in warnings), warnings


# ---------------------------------------------------------------------------------------------
# 8. Errors without a name: one line naming the file or flag, exit 2, nothing written before.
# ---------------------------------------------------------------------------------------------
def fails_naming(capsys, folder, args, *fragments):
    assert in_process(*args, "--output", folder) == 2
    error = capsys.readouterr().err
    line = error.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in error, error
    for fragment in fragments:
        assert str(fragment) in line, line
    assert not folder.exists()


def flat_val_dataset(root):
    make_image_folder(root, classes=("n01440764", "n01443537"), per_class=2, size=(16, 16), splits=("train",))
    save_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", size=(16, 16))
    return root


def test_broken_checkpoints_are_named(shapes, straight, tmp_path, capsys):
    for meta, fragment in [("{}", "lacks classes"), ("not json", "is not JSON"), ("[1, 2]", "lacks classes")]:
        path = tmp_path / f"meta_{len(meta)}.npz"
        np.savez(path, **{"model/stem.proj.weight": np.zeros(3, np.float32)}, meta=np.array(meta))
        fails_naming(capsys, tmp_path / "out", ["--resume", path], path, fragment)
        fails_naming(capsys, tmp_path / "out", ["--eval-only", "--resume", path, "--data", shapes], path, fragment)
    good = read_meta(straight / "checkpoint.npz")  # a real checkpoint's meta, one entry broken at a time
    unresumable = tmp_path / "unresumable.npz"
    np.savez(unresumable, **{"model/stem.proj.weight": np.zeros(3, np.float32)},
             meta=np.array(json.dumps(dict(classes=good["classes"], model=good["model"], settings={}))))
    fails_naming(capsys, tmp_path / "out", ["--resume", unresumable], unresumable, "lacks position, drop_path_rng")
    for key, broken, fragment in [("model", {}, "'model' of its 'meta' entry lacks name"),
                                  ("model", "x", "'model' of its 'meta' entry is not a dict"),
                                  ("model", {key: value for key, value in good["model"].items() if key != "drop_path"},
                                   "'model' of its 'meta' entry lacks drop_path"),
                                  ("position", {}, "'position' of its 'meta' entry lacks epoch"),
                                  ("classes", {"a": 1}, "'classes' of its 'meta' entry is not a list")]:
        path = tmp_path / f"broken_{key}_{type(broken).__name__}.npz"
        np.savez(path, **{"model/stem.proj.weight": np.zeros(3, np.float32)},
                 meta=np.array(json.dumps({**good, key: broken})))
        fails_naming(capsys, tmp_path / "out", ["--resume", path], path, fragment)
    not_a_zip = tmp_path / "not_a_zip.npz"
    not_a_zip.write_bytes(b"hello")
    for flags in (["--resume", not_a_zip], ["--eval-only", "--resume", not_a_zip, "--data", shapes]):
        fails_naming(capsys, tmp_path / "out", flags, not_a_zip, "not a zip archive")
    wrong_weights = tmp_path / "wrong_weights.npz"  # a sound meta, arrays of another model
    np.savez(wrong_weights, **{"model/stem.proj.weight": np.zeros(3, np.float32)}, meta=np.array(json.dumps(good)))
    fails_naming(capsys, tmp_path / "out", ["--resume", wrong_weights, "--data", shapes], wrong_weights,
                 "weights do not fit")
    published = tmp_path / "model.safetensors"
    from safetensors.numpy import save_file
    save_file({"stem.proj.weight": np.zeros(3, np.float32)}, str(published))
    fails_naming(capsys, tmp_path / "out", ["--resume", published], published, "--eval-only")


def test_broken_label_files_are_named(tmp_path, capsys):
    kaggle = flat_val_dataset(tmp_path / "kaggle")
    (kaggle / "LOC_val_solution.csv").write_bytes(b"\x89\xff\x00\x01binary\xfe\n" * 4)
    fails_naming(capsys, tmp_path / "out", ["--data", kaggle, *TINY], kaggle / "LOC_val_solution.csv")
    devkit = flat_val_dataset(tmp_path / "devkit")
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    (devkit / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really" + bytes(200))
    fails_naming(capsys, tmp_path / "out", ["--data", devkit, *TINY], devkit / "meta.mat")


@pytest.mark.parametrize("flags, named", [(["--warmup-epochs", "nan"], "--warmup-epochs"),
                                          (["--weight-decay", "nan"], "--weight-decay"),
                                          (["--lr", "inf"], "--lr"),
                                          (["--save-every", "-1"], "--save-every"),
                                          (["--img-size", "30"], "--img-size 30 is not a multiple of --patch-size 4")])
def test_bad_numbers_name_their_flag(shapes, tmp_path, capsys, flags, named):
    fails_naming(capsys, tmp_path / "out", ["--data", shapes, *FAST, *flags], named)
