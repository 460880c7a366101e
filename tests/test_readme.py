"""The README's Python examples run as pasted (issue 12, item 14): each ```python block runs in a fresh
namespace, in a temporary folder (files they write land there).

Blocks right after a ``<!-- readme-test: slow -->`` line build full-size models (hundreds of millions of
parameters, tens of seconds on 2 CPU cores); they run when ``TOKENFLOW_EXT_SLOW_TESTS=1`` (the CI's extra
step) and are skipped otherwise.
"""

import os
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SLOW_MARK = "<!-- readme-test: slow -->"


def python_blocks():
    lines = README.read_text().splitlines()
    blocks, inside, slow, start, body = [], False, False, 0, []
    for number, line in enumerate(lines, 1):
        if not inside and line.strip() == "```python":
            inside, start, body = True, number, []
            slow = any(SLOW_MARK in previous for previous in lines[max(0, number - 3):number - 1])
        elif inside and line.strip() == "```":
            inside = False
            blocks.append(pytest.param("\n".join(body), id=f"README.md:{start}",
                                       marks=[pytest.mark.slow] if slow else []))
        elif inside:
            body.append(line)
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_example_runs_as_pasted(code, request, tmp_path, monkeypatch):
    if request.node.get_closest_marker("slow") and os.environ.get("TOKENFLOW_EXT_SLOW_TESTS") != "1":
        pytest.skip("full-size models: set TOKENFLOW_EXT_SLOW_TESTS=1 (the CI's extra step)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102


def test_readme_points_at_files_in_the_repository():
    text = README.read_text()
    assert not re.search(r"\bPERF(\.md)?\b|\bSPEC(\.md)?\b", text), "the README cites files users do not have"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target
