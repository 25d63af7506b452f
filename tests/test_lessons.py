"""Every numbered lesson in lessons/ runs to its end twice: as a script (`python lessons/NN_name.py`) and as a
notebook (its `# %%` cells executed top to bottom in a Jupyter kernel by `python -m lessons.build`, which also
renders it as a web page). Each lesson finishes by checking what it taught (a gradient check passes, a loss
goes down) and stops with LessonCheckFailed when that does not hold, which fails its test either way. A new
lesson file NN_name.py is picked up here without editing this file."""
import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS_DIR = REPO_ROOT / "lessons"
LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 180  # each lesson aims at well under 20 s on 2 cores; this only stops a hung one
LESSON_IDS = [path.stem for path in LESSONS]


def test_lessons_are_found():
    assert LESSONS, f"no lesson files (NN_name.py) in {LESSONS_DIR}"


@pytest.fixture(scope="module")
def lesson_out(tmp_path_factory):
    """One picture folder for the whole run, as for a reader: lesson 13 then reuses the weights lesson 11
    saved instead of training again (run alone, it trains them itself)."""
    return tmp_path_factory.mktemp("lesson_out")


def lesson_environment(lesson_out):
    """Pictures to lesson_out; lessons/ on the import path, so that a lesson file elsewhere finds _lesson."""
    return {**os.environ, "MINIMLP_LESSON_OUT": str(lesson_out), "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(LESSONS_DIR), os.environ.get("PYTHONPATH")]))}


def script_failure(lesson, lesson_out):
    """Run the lesson as a script: None if it ran to its end, else what went wrong."""
    try:
        result = subprocess.run([sys.executable, str(lesson)], cwd=REPO_ROOT, env=lesson_environment(lesson_out),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{lesson.name} ran longer than {TIMEOUT_S} s"
    if result.returncode != 0:
        return (f"{lesson.name} exited with {result.returncode}\n--- stdout (end)\n{result.stdout[-3000:]}\n"
                f"--- stderr (end)\n{result.stderr[-3000:]}")
    return None


def build_pages(lessons, out, lesson_out):
    """python -m lessons.build --out OUT LESSON...: the command a reader runs; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "lessons.build", "--out", str(out), *map(str, lessons)],
                          cwd=REPO_ROOT, env=lesson_environment(lesson_out), capture_output=True, text=True,
                          timeout=TIMEOUT_S * len(lessons))


def notebook_failure(executed):
    """None if every code cell of the executed notebook ran without an error, else the first that did not."""
    if not executed.exists():
        return f"{executed.name} was not written"
    notebook = nbformat.read(executed, as_version=4)
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            if output.output_type == "error":
                traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(output.traceback))  # without colours
                return f"cell {number} failed: {output.ename}: {output.evalue}\n{traceback[-3000:]}"
        if cell.execution_count is None:
            return f"cell {number} did not run:\n{cell.source[:300]}"
    return None


@pytest.mark.parametrize("lesson", LESSONS, ids=LESSON_IDS)
def test_lesson_runs_and_its_checks_pass(lesson, lesson_out):
    failure = script_failure(lesson, lesson_out)
    assert failure is None, failure
    for png in lesson_out.glob(f"{lesson.name[:2]}_*.png"):
        assert png.stat().st_size > 1000, f"{lesson.name} wrote a suspiciously small picture {png.name}"


@pytest.mark.parametrize("lesson", LESSONS, ids=LESSON_IDS)
def test_every_section_is_a_notebook_cell(lesson):
    """The lesson opens as a notebook whose cells follow its sections: a markdown title cell first, and before
    each section's code (which starts with heading(title)) a markdown cell headed with the same title."""
    cells = jupytext.read(lesson).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# Lesson {int(lesson.name[:2])}:"), (
        f"{lesson.name}: the first cell should be markdown starting '# Lesson {int(lesson.name[:2])}:' "
        f"(the `# %% [markdown]` cell with the lesson's introduction)")
    sections = [(index, cell) for index, cell in enumerate(cells) if "heading(" in cell.source]
    assert sections, f"{lesson.name} has no section (a `# %%` cell starting with heading(...))"
    for index, cell in sections:
        title = re.fullmatch(r'heading\("(.*)"\)', cell.source.splitlines()[0])
        assert title, f"{lesson.name}: heading(...) should open its cell, found in:\n{cell.source[:300]}"
        above = cells[index - 1]
        assert above.cell_type == "markdown" and above.source.splitlines()[0] == f"## {title[1]}", (
            f"{lesson.name}: section {title[1]!r} should follow a markdown cell headed '## {title[1]}'")


@pytest.fixture(scope="module")
def pages(tmp_path_factory, lesson_out):
    """Every lesson executed as a notebook once, by the documented command, into one folder."""
    out = tmp_path_factory.mktemp("pages")
    build = build_pages(LESSONS, out, lesson_out)
    return out, f"--- python -m lessons.build (end)\n{build.stdout[-2000:]}\n{build.stderr[-2000:]}"


@pytest.mark.parametrize("lesson", LESSONS, ids=LESSON_IDS)
def test_lesson_runs_as_a_notebook_and_its_page_shows_its_figures(lesson, pages):
    out, build_log = pages
    failure = notebook_failure(out / f"{lesson.stem}.ipynb")
    assert failure is None, f"{lesson.name} as a notebook: {failure}\n{build_log}"
    page = (out / f"{lesson.stem}.html").read_text(encoding="utf-8")
    source = lesson.read_text()
    figures = source.count("show_figure(") + source.count("show_picture(")  # at least one picture per call
    assert page.count('src="data:image/png;base64,') >= figures, (
        f"{lesson.stem}.html should show the lesson's {figures} figures inline")


def test_index_page_links_every_lesson(pages):
    out, build_log = pages
    index = (out / "index.html").read_text(encoding="utf-8")
    missing = [lesson.stem for lesson in LESSONS if f'href="{lesson.stem}.html"' not in index]
    assert not missing, f"index.html does not link {missing}\n{build_log}"


def test_a_failing_check_fails_the_lesson_as_a_script_and_as_a_notebook(tmp_path):
    """A lesson with one broken cell (a check that does not hold) after its first section fails both ways;
    the notebook stops at that cell, and the build says so with exit status 1."""
    source = (LESSONS_DIR / "02_affine.py").read_text()
    second_section = "\n# %% [markdown]\n# ## 2."
    assert second_section in source, "02_affine.py should have a markdown cell for section 2"
    broken_cell = '\n# %%\ncheck(1 + 1 == 3, "a deliberately broken cell")\n'
    lesson = tmp_path / "02_affine_broken.py"
    lesson.write_text(source.replace(second_section, broken_cell + second_section, 1))

    failure = script_failure(lesson, tmp_path)
    assert failure is not None and "LessonCheckFailed: a deliberately broken cell" in failure, failure

    build = build_pages([lesson], tmp_path / "pages", tmp_path)
    assert build.returncode == 1, f"the build should exit 1 for a failing lesson\n{build.stdout}\n{build.stderr}"
    failure = notebook_failure(tmp_path / "pages" / f"{lesson.stem}.ipynb")
    assert failure is not None and "LessonCheckFailed: a deliberately broken cell" in failure, failure
    executed = nbformat.read(tmp_path / "pages" / f"{lesson.stem}.ipynb", as_version=4)
    assert executed.cells[-1].execution_count is None, "the notebook should stop at the failing cell"
    assert "a deliberately broken cell" in (tmp_path / "pages" / f"{lesson.stem}.html").read_text(encoding="utf-8")
