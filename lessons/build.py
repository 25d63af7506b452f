"""Every lesson executed as a notebook and rendered as a web page with its outputs and figures inline:

    python -m lessons.build             # every lesson -> lessons/pages/ (git-ignored); open index.html
    python -m lessons.build 04 11       # only lessons 04 and 11 (a number, or a lesson's file)
    python -m lessons.build --out DIR   # somewhere else

For each lesson NN_name.py it writes NN_name.ipynb (the executed notebook) and NN_name.html (text,
code, outputs and figures in one file), then index.html, a page linking them all. Each lesson runs
top to bottom in a fresh python3 kernel started in lessons/, as Jupyter runs it: jupytext reads the
`# %%` cells, nbclient executes them, nbconvert writes the page. A failing check stops the lesson at
its cell; the page shows the error up to there, and the command exits 1 naming the lessons that failed.
Figures are also written where the scripts write them (lessons/out/, or $MINIMLP_LESSON_OUT).

Needs the test requirements (jupytext, nbclient, ipykernel, nbconvert): pip install -r requirements-test.txt
"""
import argparse
import html
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter

LESSONS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = LESSONS_DIR / "pages"
CELL_TIMEOUT_S = 300  # the longest cell (lesson 14's, 17's training) takes well under a minute on 2 cores


def lesson_files():
    return sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))


def execute(lesson):
    """The lesson (a `# %%` file) as a notebook executed in lessons/, and why it stopped early (None if
    it ran to its end)."""
    notebook = jupytext.read(lesson)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(LESSONS_DIR)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # not its warning about TCP
    try:
        client.execute()
    except CellExecutionError as error:
        return notebook, f"{error.ename}: {error.evalue}"
    except (CellTimeoutError, DeadKernelError) as error:
        return notebook, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return notebook, None


def title_of(notebook, lesson):
    """The lesson's title: the first line of its first markdown cell, without the '#' (else its file name)."""
    first = next((cell for cell in notebook.cells if cell.cell_type == "markdown" and cell.source.strip()), None)
    return first.source.splitlines()[0].lstrip("# ").strip() if first else lesson.name


def build(lessons, out):
    """Execute and render `lessons` into `out`; returns [(lesson, title, seconds, failure or None)]."""
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(embed_images=True)
    results = []
    for lesson in lessons:
        start = time.perf_counter()
        notebook, failure = execute(lesson)
        seconds = time.perf_counter() - start
        nbformat.write(notebook, out / f"{lesson.stem}.ipynb")
        page, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": lesson.stem}})
        (out / f"{lesson.stem}.html").write_text(page, encoding="utf-8")
        results.append((lesson, title_of(notebook, lesson), seconds, failure))
        print(f"{lesson.stem:32s} {seconds:6.1f} s  {'FAILED: ' + failure if failure else 'ok'}", flush=True)
    (out / "index.html").write_text(index_page(results), encoding="utf-8")
    return results


def index_page(results):
    rows = "\n".join(
        f'<li><a href="{lesson.stem}.html">{html.escape(title)}</a> '
        f'<small>({lesson.name}, {seconds:.0f} s{", FAILED: " + html.escape(failure) if failure else ""})</small></li>'
        for lesson, title, seconds, failure in results)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>minimlp lessons</title></head>\n"
            "<body><h1>minimlp lessons: from pixels to a trained ResMLP</h1>\n"
            "<p>Each page is a lesson executed as a notebook, with its outputs and figures. "
            "The sources are lessons/NN_name.py in the repository.</p>\n"
            f"<ol>\n{rows}\n</ol>\n</body></html>\n")


def chosen_lessons(names):
    """Lesson files for command-line names: '04' (a number) or a path to a lesson file."""
    if not names:
        return lesson_files()
    chosen = []
    for name in names:
        if Path(name).is_file():
            chosen.append(Path(name).resolve())
            continue
        matches = [lesson for lesson in lesson_files() if lesson.name.startswith(f"{name}_")]
        if not matches:
            print(f"python -m lessons.build: no lesson {name!r}: give a lesson's number (01 .. "
                  f"{lesson_files()[-1].name[:2]}) or the path of a lesson file", file=sys.stderr)
            sys.exit(2)
        chosen += matches
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lessons.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers (04) or files; all lessons if none")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    results = build(chosen_lessons(args.lessons), args.out)
    failed = [lesson.name for lesson, _, _, failure in results if failure]
    print(f"{len(results) - len(failed)} of {len(results)} lessons ran to their end; pages: {args.out / 'index.html'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
