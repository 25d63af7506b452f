"""minimlp.training.progress: whole plain lines when output is not a terminal, tqdm bars when it is, warnings always
on lines of their own."""
import io
import subprocess
import sys
from pathlib import Path

from minimlp.training import progress
from minimlp.training.progress import Progress, track, write

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_n_steps_and_at_the_end_with_the_latest_postfix():
    log = io.StringIO()
    bar = Progress(45, "epoch 2/15", every=20, file=log)
    for step in range(45):
        bar.update(1, loss=f"{1 / (step + 1):.3f}", lr=3e-3)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split("  ")[:2] for line in lines] == [["epoch 2/15", "20/45 batch"], ["epoch 2/15", "40/45 batch"],
                                                        ["epoch 2/15", "45/45 batch"]]
    assert lines[0].endswith("loss 0.050  lr 0.003") and lines[2].endswith("loss 0.022  lr 0.003")
    assert "eta" in lines[0] and "eta" not in lines[2]
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")


def test_a_resumed_count_prints_at_the_same_multiples_and_every_0_only_at_the_end():
    log = io.StringIO()
    with Progress(50, "epoch 1/2", initial=15, every=20, file=log) as bar:
        for _ in range(35):
            bar.update()
    assert [line.split("  ")[1] for line in log.getvalue().splitlines()] == ["20/50 batch", "40/50 batch",
                                                                           "50/50 batch"]
    quiet = io.StringIO()
    assert list(track(range(30), 30, "eval", every=0, file=quiet)) == list(range(30))
    assert quiet.getvalue().count("\n") == 1 and quiet.getvalue().startswith("eval  30/30 batch")


def test_warnings_between_plain_lines_are_lines_of_their_own():
    log = io.StringIO()
    bar = Progress(10, "epoch 1/1", every=4, file=log)
    for step in range(10):
        bar.update()
        if step == 5:
            write("warning: skipping unreadable image x.jpg (truncated)", log)
        if step == 6:
            bar.write("step 7: inf/NaN gradients at loss scale 65536, step skipped", log)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[1] == "warning: skipping unreadable image x.jpg (truncated)"
    assert lines[2] == "step 7: inf/NaN gradients at loss scale 65536, step skipped"
    assert all(line.strip() for line in lines) and len(lines) == 5


def test_on_a_terminal_it_is_a_tqdm_bar_and_a_written_line_stays_whole():
    screen = Terminal()
    bar = Progress(10, "epoch 1/1", file=screen)
    for _ in range(5):
        bar.update(1, loss="1.0")
    bar.write("warning: skipping unreadable image x.jpg (truncated)", screen)
    bar.close()
    text = screen.getvalue()
    assert "\r" in text and "epoch 1/1" in text and "loss=1.0" in text  # tqdm's redraws
    assert "\nwarning: skipping unreadable image x.jpg (truncated)\n" in text.replace("\r", "\n")
    assert bar.bar is not None and progress.is_terminal(screen)


def test_redirected_output_of_both_streams_keeps_its_order(tmp_path):
    """stdout is block-buffered when redirected, stderr is not: write() flushes the other stream first."""
    script = ("import sys\nfrom minimlp.training.progress import Progress, write\n"
              "print('output: runs/x')\n"
              "bar = Progress(4, 'epoch 1/1', every=2)\n"
              "for step in range(4):\n"
              "    bar.update()\n"
              "    if step == 0: write('warning: skipping unreadable image a.jpg (truncated)')\n"
              "    if step == 2: print('a line on stdout')\n"
              "bar.close()\n"
              "write('epoch 1/1  train loss 1.0', sys.stdout)\n")
    with open(tmp_path / "log.txt", "w") as log:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "output: runs/x", "warning: skipping unreadable image a.jpg (truncated)", "epoch 1/1", "a line on stdout",
        "epoch 1/1", "epoch 1/1"]
    assert lines[2].split("  ")[1] == "2/4 batch" and lines[4].split("  ")[1] == "4/4 batch"


def test_a_line_at_least_every_10_seconds_however_few_the_steps(monkeypatch):
    """An epoch of 5 slow steps (every=20 never reached before the end) still shows where it is: a line at the
    first step after 10 s without one, and the trainer's cue (due) to read its loss back for it."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    log = io.StringIO()
    bar = Progress(5, "epoch 1/300", every=20, file=log)  # started at 0 s
    due = []
    for end in (4.0, 11.0, 13.0, 25.0, 30.0):  # when each step ends
        now[0] = end
        due.append(bar.due())
        bar.update(1)
    assert due == [False, True, False, True, False]
    assert [line.split("  ")[1] for line in log.getvalue().splitlines()] == ["2/5 batch", "4/5 batch", "5/5 batch"]
