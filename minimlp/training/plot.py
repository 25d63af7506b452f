"""Pictures of training runs, drawn from their log.jsonl: train/val loss, top-1 and learning rate per epoch.

    python -m minimlp.training.plot runs/A                  # writes runs/A/curves.png
    python -m minimlp.training.plot runs/A runs/B           # compares them in one figure: comparison.png
    python -m minimlp.training.plot runs/A runs/B --out ab.png

draw_run(run_folder) writes run_folder/curves.png; the trainer calls it after every epoch, so the
picture of a run in progress is never more than an epoch old. The PNG is written to a temporary file
and renamed over the old one: an image viewer never sees half a picture.

log.jsonl holds one JSON record per epoch (epoch, train_loss, val_loss, val_top1, val_top5, lr, ...).
If the epoch numbers start again (a new run written into the same folder), the latest run is drawn.
"""
import json
import sys
from pathlib import Path

# Figures are built as matplotlib Figure objects and saved with its Agg renderer, without pyplot (as in
# minimlp.tools.analyze): drawing from inside training changes no global matplotlib state, leaves no figure open.
from matplotlib.figure import Figure

from .command_line import ArgumentParser
from .run_folder import write_atomically

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
REQUIRED_FIELDS = ("epoch", "train_loss", "val_loss", "val_top1", "lr")


class PlotError(ValueError):
    """A run folder or log that cannot be drawn, said in one line."""


def read_log(run_folder):
    """The records of the latest run in run_folder/log.jsonl, in epoch order.

    A last line without its newline is a record being written: it is left out if it does not parse.
    Any other line that does not parse, or lacks a field drawn here, is a PlotError naming file and line."""
    path = Path(run_folder) / LOG_NAME
    if not path.is_file():
        where = "no such folder" if not Path(run_folder).is_dir() else f"no {LOG_NAME} in it (not a train.py run?)"
        raise PlotError(f"{run_folder}: {where}")
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line: being written right now
                break
            raise PlotError(f"{path}:{number}: not a JSON record") from None
        missing = [field for field in REQUIRED_FIELDS if not isinstance(record, dict) or field not in record]
        if missing:
            raise PlotError(f"{path}:{number}: no {', '.join(missing)} in the record")
        if records and record["epoch"] <= records[-1]["epoch"]:
            records = []  # the epochs start again: a new run in the same folder
        records.append(record)
    if not records:
        raise PlotError(f"{path}: no epoch logged yet")
    return records


def draw(runs, title=None):
    """A Figure of the runs, [(label, records)]: loss (train dashed, val solid), val top-1, learning rate."""
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    loss_axes, top1_axes, lr_axes = figure.subplots(1, 3)
    marker = "o" if max(len(records) for _, records in runs) <= 20 else None
    for index, (label, records) in enumerate(runs):
        colour = f"C{index}"
        epochs = [record["epoch"] for record in records]
        best = max(record["val_top1"] for record in records)
        loss_axes.plot(epochs, [record["train_loss"] for record in records], "--", color=colour, marker=marker,
                       markersize=3, label=f"{label} train")
        loss_axes.plot(epochs, [record["val_loss"] for record in records], "-", color=colour, marker=marker,
                       markersize=3, label=f"{label} val")
        top1_axes.plot(epochs, [record["val_top1"] for record in records], "-", color=colour, marker=marker,
                       markersize=3, label=f"{label}: last {records[-1]['val_top1']:.2f}%, best {best:.2f}%")
        lr_axes.plot(epochs, [record["lr"] for record in records], "-", color=colour, marker=marker,
                     markersize=3, label=label)
    loss_axes.set(title="loss (train: label-smoothed; val: not)", xlabel="epoch", ylabel="cross-entropy")
    top1_axes.set(title="validation top-1", xlabel="epoch", ylabel="%")
    lr_axes.set(title="learning rate at the end of the epoch", xlabel="epoch", yscale="log")
    for axes in (loss_axes, top1_axes, lr_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    for axes in (loss_axes, top1_axes) if len(runs) == 1 else (loss_axes, top1_axes, lr_axes):
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def save(figure, path):
    """Write the figure as a PNG, atomically (minimlp.training.run_folder.write_atomically)."""
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100))
    return Path(path)


def draw_run(run_folder):
    """Draw run_folder/log.jsonl into run_folder/curves.png; returns its path. PlotError if there is no log
    or no epoch in it yet."""
    run_folder = Path(run_folder)
    records = read_log(run_folder)
    return save(draw([(run_folder.name, records)], title=str(run_folder)), run_folder / CURVES_NAME)


def compare_runs(run_folders, out):
    """Draw several runs in one figure, written to `out`; returns its path. Runs are labelled by their
    folder's name, or by their whole path where two names are the same."""
    names = [Path(folder).name for folder in run_folders]
    labels = names if len(set(names)) == len(names) else [str(folder) for folder in run_folders]
    return save(draw([(label, read_log(folder)) for label, folder in zip(labels, run_folders)]), out)


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m minimlp.training.plot",
        description="Draw the curves of train.py runs from their log.jsonl: train/val loss, top-1, learning rate. "
                    f"One run: RUN/{CURVES_NAME}. Several: one figure comparing them.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (train.py's --output)")
    parser.add_argument("--out", type=Path, help=f"the PNG to write (default: RUN/{CURVES_NAME} for one run, "
                                                 "comparison.png here for several)")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 1 and args.out is None:
            path = draw_run(args.runs[0])
        else:
            path = compare_runs(args.runs, args.out or Path("comparison.png"))
    except (PlotError, OSError) as error:
        print(f"minimlp.training.plot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
