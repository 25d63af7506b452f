"""Every numbered lesson in lessons/ runs to its end: each one finishes by checking what it taught
(a gradient check passes, a loss goes down) and exits non-zero when that does not hold. A new
lesson file NN_name.py is picked up here without editing this file."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((REPO_ROOT / "lessons").glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 180  # each lesson aims at well under 20 s on 2 cores; this only stops a hung one


def test_lessons_are_found():
    assert LESSONS, f"no lesson files (NN_name.py) in {REPO_ROOT / 'lessons'}"


@pytest.fixture(scope="module")
def lesson_out(tmp_path_factory):
    """One output folder for the whole run, as for a reader: lesson 13 then reuses the weights lesson 11
    saved instead of training again (run alone, it trains them itself)."""
    return tmp_path_factory.mktemp("lesson_out")


@pytest.mark.parametrize("lesson", LESSONS, ids=[path.stem for path in LESSONS])
def test_lesson_runs_and_its_checks_pass(lesson, lesson_out):
    env = {**os.environ, "MINIMLP_LESSON_OUT": str(lesson_out), "MPLBACKEND": "Agg"}
    try:
        result = subprocess.run([sys.executable, str(lesson)], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{lesson.name} ran longer than {TIMEOUT_S} s")
    assert result.returncode == 0, (f"{lesson.name} exited with {result.returncode}\n--- stdout (end)\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}")
    for png in lesson_out.glob(f"{lesson.name[:2]}_*.png"):
        assert png.stat().st_size > 1000, f"{lesson.name} wrote a suspiciously small picture {png.name}"
