"""minimlp.training.plot: curves.png from a run's log.jsonl, comparisons of runs, and logs it must read or refuse."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from minimlp.training import plot


def write_log(folder, epochs=6, lr=3e-3, start=1, mode="w"):
    """A log.jsonl as trainer.py writes it: one record per epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", mode) as log:
        for epoch in range(start, start + epochs):
            log.write(json.dumps(dict(epoch=epoch, train_loss=2.3 * math.exp(-epoch / 4) + 0.8,
                                      val_loss=2.2 * math.exp(-epoch / 3) + 0.4, val_top1=85 * (1 - math.exp(-epoch / 2)),
                                      val_top5=99.0, lr=lr * (1 + math.cos(math.pi * epoch / 8)) / 2 + 1e-5,
                                      images_per_s=180.0, seconds=28.0)) + "\n")
    return folder


def test_draw_run_writes_a_picture_into_the_run_folder(tmp_path):
    run = write_log(tmp_path / "runs" / "A")
    path = plot.draw_run(run)
    assert path == run / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 800
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something is drawn, not a blank canvas
    assert not list(run.glob(".*tmp"))  # written through a temporary file, renamed


def test_redrawing_after_every_epoch_replaces_the_picture(tmp_path):
    run = write_log(tmp_path / "A", epochs=1)
    first = plot.draw_run(run).read_bytes()
    write_log(run, epochs=1, start=2, mode="a")
    assert plot.draw_run(run).read_bytes() != first


def test_the_command_compares_runs_in_one_figure(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "A")
    write_log(tmp_path / "B", epochs=4, lr=1e-3)
    monkeypatch.chdir(tmp_path)
    assert plot.main(["A", "B"]) == 0
    assert (tmp_path / "comparison.png").is_file()
    assert plot.main(["A", "B", "--out", "ab.png"]) == 0 and (tmp_path / "ab.png").is_file()
    assert plot.main(["A"]) == 0 and (tmp_path / "A" / "curves.png").is_file()
    assert capsys.readouterr().out.splitlines()[-1] == "wrote A/curves.png"


def test_read_log_takes_the_latest_run_and_ignores_a_line_being_written(tmp_path):
    run = write_log(tmp_path / "A", epochs=5)
    write_log(run, epochs=3, mode="a")  # a new run into the same folder: epochs 1, 2, 3 again
    with open(run / "log.jsonl", "a") as log:
        log.write('{"epoch": 4, "train_lo')  # unterminated: the trainer is writing it
    records = plot.read_log(run)
    assert [record["epoch"] for record in records] == [1, 2, 3]


@pytest.mark.parametrize("case, message", [("no folder", "no such folder"), ("no log", "no log.jsonl"),
                                           ("empty log", "no epoch logged yet"), ("garbage", "log.jsonl:1: not a JSON"),
                                           ("missing field", "log.jsonl:2: no val_top1")])
def test_logs_that_cannot_be_drawn_are_one_line_and_exit_status_2(tmp_path, capsys, case, message):
    run = tmp_path / "A"
    if case != "no folder":
        run.mkdir()
    if case == "empty log":
        (run / "log.jsonl").write_text("")
    if case == "garbage":
        (run / "log.jsonl").write_text("epoch 1 loss 2\n{}\n")
    if case == "missing field":
        write_log(run, epochs=1)
        with open(run / "log.jsonl", "a") as log:
            log.write(json.dumps(dict(epoch=2, train_loss=1.0, val_loss=1.0, lr=1e-3)) + "\n")
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minimlp.training.plot: error: ") and message in err
