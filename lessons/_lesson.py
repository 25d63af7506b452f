"""What every lesson shares: the path to the library, the output folder, headings, source listings,
figures and the checks. Not a lesson itself (its name starts with an underscore).

A lesson is run as `python lessons/NN_name.py` from the repository root; Python then puts lessons/
(not the root) on the import path, so this module adds the root, and `import minimlp` works. Opened
as a notebook (jupytext, VS Code), its kernel starts in lessons/, and the same import finds this file.
In a notebook the markdown cells carry the section titles and figures are shown inline; run as a
script, the titles are printed and figures are only written to files.
"""
import inspect
import os
import sys
import textwrap
import time
from pathlib import Path

# The lessons multiply small matrices. At these sizes one BLAS thread is the fastest, and on a busy
# 2-core machine OpenBLAS's extra threads spin waiting for each other: lesson 11 then takes a minute
# instead of 6 s. So one thread, unless you say otherwise. This only works because every lesson
# imports this module BEFORE numpy (the setting is read when numpy loads OpenBLAS).
if "numpy" not in sys.modules:
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def in_notebook():
    """True inside a Jupyter kernel (a notebook, VS Code's interactive window), False for a script."""
    ipython = sys.modules.get("IPython")  # a script never imports IPython, so this costs it nothing
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


import matplotlib  # noqa: E402

if not in_notebook():
    matplotlib.use("Agg")  # a script writes PNG files and never opens a window


class LessonCheckFailed(AssertionError):
    """What a lesson taught did not hold on this run."""


def output_dir():
    """Where pictures go: $MINIMLP_LESSON_OUT, or lessons/out/ (git-ignored). Created if needed."""
    folder = Path(os.environ.get("MINIMLP_LESSON_OUT") or REPO_ROOT / "lessons" / "out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def heading(title):
    """Print a section's title in a script; in a notebook the markdown cell above already shows it."""
    if not in_notebook():
        print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))


def show_source(function, max_lines=40):
    """Print the library's own code for `function`, with the file and line it comes from."""
    lines, start = inspect.getsourcelines(function)
    path = Path(inspect.getsourcefile(function)).resolve().relative_to(REPO_ROOT)
    print(f"--- {path}:{start}")
    shown = lines[:max_lines]
    print(textwrap.indent("".join(shown).rstrip("\n"), "    "))
    if len(lines) > max_lines:
        print(f"    ... ({len(lines) - max_lines} more lines)")


def check(condition, message):
    """Raise LessonCheckFailed(message) unless condition holds; print a tick otherwise."""
    if not condition:
        raise LessonCheckFailed(message)
    print(f"  ok: {message}")


def show_figure(figure, name):
    """Write a matplotlib figure as output_dir()/name, close it, and show_picture it."""
    import matplotlib.pyplot as plt
    path = output_dir() / name
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    show_picture(path)


def show_picture(path, remark=""):
    """Print where a PNG was written and, in a notebook, show it inline (returns nothing, so a notebook
    prints no path after the picture)."""
    print(f"  picture written: {path}" + (f" {remark}" if remark else ""))
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=path))


def best_of(function, repeats=5):
    """The fastest of `repeats` timed calls of function(), in seconds (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)
