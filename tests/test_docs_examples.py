"""Every ```python example in docs/*.md runs against test:///default and prints what it says.

Blocks of one page run in order in one fresh interpreter (so test:///default starts from its
pristine state and blocks may build on each other). Examples that need a real hypervisor are
written as ```{code-block} python blocks, which Sphinx shows and this test does not run.

Documented output (the convention the pages follow)
    A comment at the end of a line holding a ``print(...)`` call is that call's expected
    output, compared with what the call really printed::

        print(len(dom.checkpoints))  # 2
        print(exc)  # domain 'test' has no disk 'vdz' (disks: vda)
        print(f"saved in {result.duration:.3f} s")  # saved in ... s

    * ``...`` matches any text (also across lines, and the spaces around it): use it for what
      legitimately varies
      (timings, paths, pids, libvirt's wording around the part that matters);
    * runs of whitespace compare equal to one space; the rest must match exactly;
    * the call must run at least once (a ``print(exc)  # ...`` in an ``except`` block fails
      the test when nothing was raised), and every time it runs its output must match;
    * a comment that explains rather than shows output goes on its own line, above.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
PAGES = sorted(p for p in DOCS.glob("*.md") if FENCE.search(p.read_text()))

# Runs the padded page script with print() recorded per source line (page line numbers).
RUNNER = r"""
import builtins, io, json, sys
script, filename, out = sys.argv[1:4]
real_print = builtins.print
records = []

def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
    if file is None or file is sys.stdout:
        frame = sys._getframe(1)
        if frame.f_code.co_filename == filename:
            buf = io.StringIO()
            real_print(*args, sep=sep, end=end, file=buf)
            records.append((frame.f_lineno, buf.getvalue()))
    real_print(*args, sep=sep, end=end, file=file, flush=flush)

builtins.print = recording_print
try:
    code = compile(open(script).read(), filename, "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
finally:
    with open(out, "w") as f:
        json.dump(records, f)
"""


def page_script(page: Path) -> str:
    """The page's runnable blocks, padded with empty lines so line numbers are the page's."""
    text = page.read_text()
    lines = [""] * (text.count("\n") + 1)
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start(1))
        for i, line in enumerate(m.group(1).splitlines()):
            lines[first + i] = line
    return "\n".join(lines) + "\n"


def expected_outputs(script: str) -> dict[int, tuple[int, str]]:
    """``{line of the print call: (line of the comment, expected text)}``."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(script).readline):
        if tok.type == tokenize.COMMENT and tok.line[: tok.start[1]].strip():
            comments[tok.start[0]] = tok.string[1:].strip()
    found: dict[int, tuple[int, str]] = {}
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            for line in (node.lineno, node.end_lineno or node.lineno):
                if line in comments:
                    found[node.lineno] = (line, comments[line])
    return found


def _pattern(expected: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"\s*\.\.\.\s*", " ".join(expected.split()))]
    return re.compile(".*?".join(parts), re.S)


def matches(expected: str, printed: str) -> bool:
    """``printed`` shows ``expected`` under the convention of this module."""
    return _pattern(expected).fullmatch(" ".join(printed.split())) is not None


def run_page(page: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list]:
    script = tmp_path / "page.py"
    script.write_text(page_script(page))
    out = tmp_path / "prints.json"
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DOCS.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script), f"docs/{page.name}", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    records = json.loads(out.read_text()) if out.exists() else []
    return done, records


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_examples_run_and_print_what_they_say(page: Path, tmp_path: Path) -> None:
    """The page's python examples run without error on the embedded default driver, and
    every ``print(...)  # output`` prints that output (every time it runs, at least once)."""
    done, records = run_page(page, tmp_path)
    assert done.returncode == 0, f"{page.name} examples failed:\n{done.stdout}\n{done.stderr}"
    printed: dict[int, list[str]] = {}
    for line, text in records:
        printed.setdefault(line, []).append(text)
    wrong = []
    for call_line, (line, expected) in sorted(expected_outputs(page_script(page)).items()):
        got = printed.get(call_line, [])
        if not got:
            wrong.append(f"{page.name}:{line}: never printed (expected {expected!r})")
        wrong.extend(
            f"{page.name}:{line}: printed {text.rstrip()!r}, the page says {expected!r}"
            for text in got
            if not matches(expected, text)
        )
    assert wrong == [], "\n".join(wrong)


def test_some_pages_have_examples() -> None:
    """The collection above is not empty (a silently skipped docs test proves nothing)."""
    assert PAGES


def test_pages_document_outputs() -> None:
    """The pages do show outputs this test compares (a convention nobody follows would make
    the comparison above vacuous)."""
    total = sum(len(expected_outputs(page_script(p))) for p in PAGES)
    assert total >= 50, total


def test_output_convention() -> None:
    """``...`` matches any text, whitespace runs are equal, everything else must match."""
    assert matches("2", "2\n")
    assert not matches("2", "3\n")
    assert not matches("2", "22\n")
    assert matches("saved in ... s", "saved in 0.012 s\n")
    assert matches("{'vda': 65536}", "{'vda':   65536}\n")
    assert matches("... no backup ... changed.", "x\nno backup here\nnothing changed.\n")
    assert not matches("False", "True\n")
