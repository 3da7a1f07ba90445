"""Sphinx configuration for the statecapture documentation.

Built by ``nox -s docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``) and
by ``tests/test_docs_build.py``: every warning fails the build. External links are not
checked (no ``linkcheck``), so the build works offline.

The API reference (``api.md``) is generated from the package's docstrings: the marker
``<!-- api-reference -->`` in that page is replaced, when Sphinx reads it, by one section per
group of ``statecapture.__all__`` (the groups and their titles are the comment lines inside
``__all__`` in ``statecapture/__init__.py``), so a name exported there appears in the
reference without anyone editing ``api.md``.
"""

from __future__ import annotations

import enum
import fnmatch
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "statecapture"
author = "statecapture engineers"
copyright = "2026, statecapture engineers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
# tour.ipynb is offered as a download from the index (no notebook parser is needed to build).
exclude_patterns = ["_build", "**.ipynb_checkpoints", "*.ipynb"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
python_maximum_signature_line_length = 88  # longer signatures: one parameter per line
autodoc_default_options = {"members": True, "undoc-members": False}
nitpicky = False
suppress_warnings = ["myst.xref_missing"]
html_theme = "alabaster"
html_title = "statecapture"
intersphinx_mapping: dict[str, tuple[str, None]] = {}


# --------------------------------------------------------------------------- API reference

API_MARKER = "<!-- api-reference -->"
_GROUP_RE = re.compile(r"^\s*#\s*(--\s*)?(.*?)\s*$")
_NAME_RE = re.compile(r"""^\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*,?\s*(#.*)?$""")


_TITLES = {
    "snapshot": "Snapshots",
    "freeze": "Filesystem freeze",
    "block job": "Block jobs",
    "checkpoint and backup": "Checkpoints and backups",
    "checkpoints": "Checkpoints",
    "backup": "Backups",
    "sequence and recovery": "Sequences and recovery",
    "advisor": "Advisor",
}


def _title(comment: str) -> str:
    """A section title from an ``__all__`` comment (``-- snapshot names`` -> ``Snapshots``)."""
    text = re.sub(r"\s+names$", "", comment.strip())
    if text.lower() in _TITLES:
        return _TITLES[text.lower()]
    return text[:1].upper() + text[1:] if text else "Other"


def api_groups(init_source: str, exported: list[str]) -> list[tuple[int, str, list[str]]]:
    """``(level, title, names)`` for each comment group inside ``__all__ = [...]``.

    A comment ``# -- x names`` opens a level-2 group; a plain comment opens a level-2 group
    before the first ``-- `` comment and a level-3 group after it. Names of ``exported``
    that the source does not list (should not happen) end up in a final "Other" group.
    """
    lines = init_source.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("__all__"))
    except StopIteration:
        return [(2, "Everything", list(exported))]
    groups: list[tuple[int, str, list[str]]] = []
    seen_marked = False
    for line in lines[start + 1 :]:
        if line.startswith("]"):
            break
        name = _NAME_RE.match(line)
        if name:
            if not groups:
                groups.append((2, "Other", []))
            groups[-1][2].append(name.group(1))
            continue
        group = _GROUP_RE.match(line)
        if group and line.strip().startswith("#"):
            marked = bool(group.group(1))
            seen_marked = seen_marked or marked
            level = 2 if marked or not seen_marked else 3
            groups.append((level, _title(group.group(2)), []))
    listed = {n for _, _, names in groups for n in names}
    missing = [n for n in exported if n not in listed]
    if missing:
        groups.append((2, "Other", missing))
    # drop empty level-3 groups, and empty level-2 groups not followed by a non-empty level 3
    kept: list[tuple[int, str, list[str]]] = []
    for i, (level, title, names) in enumerate(groups):
        if names:
            kept.append((level, title, names))
            continue
        if level == 2:
            rest = groups[i + 1 :]
            children = []
            for lvl, _t, n in rest:
                if lvl == 2:
                    break
                children.append(n)
            if any(children):
                kept.append((level, title, names))
    return kept


def _directive(qualified: str, obj: object) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return f".. autoexception:: {qualified}\n   :members:\n   :show-inheritance:\n"
        if issubclass(obj, enum.Enum):
            return f".. autoclass:: {qualified}\n   :members:\n   :undoc-members:\n"
        return f".. autoclass:: {qualified}\n   :members:\n"
    if callable(obj):
        return f".. autofunction:: {qualified}\n"
    return f".. autodata:: {qualified}\n   :no-value:\n"


def api_reference_markdown() -> str:
    """The MyST text that replaces :data:`API_MARKER` in ``api.md``."""
    import statecapture

    exported = list(statecapture.__all__)
    source = (ROOT / "statecapture" / "__init__.py").read_text()
    out: list[str] = []
    for level, title, names in api_groups(source, exported):
        out.append(f"{'#' * level} {title}\n")
        if names:
            body = "\n".join(
                _directive(f"statecapture.{n}", getattr(statecapture, n)) for n in names
            )
            out.append("```{eval-rst}\n" + body + "```\n")
    return "\n".join(out)


def _expand_api(app: Any, docname: str, source: list[str]) -> None:
    if docname == "api" and API_MARKER in source[0]:
        source[0] = source[0].replace(API_MARKER, api_reference_markdown())


# --------------------------------------------------------------------------- index toctree

_GLOB_CHARS = re.compile(r"[*?\[]")


def drop_empty_globs(text: str, docnames: set[str]) -> str:
    """Remove the toctree glob patterns of ``text`` that would match no document.

    The index lists capability pages by pattern (``snapshot*``, ``backup*`` ...) so that
    pages still being written appear as soon as they exist. Sphinx warns about a pattern that
    matches nothing (and ``-W`` turns that into an error; some Sphinx versions give the
    warning no type, so ``suppress_warnings`` cannot silence it), so such lines are dropped
    before Sphinx parses the page. Matching follows Sphinx: in order, each document once.
    """
    out: list[str] = []
    remaining = set(docnames)
    in_toctree = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```{toctree}"):
            in_toctree = True
        elif in_toctree and stripped.startswith("```"):
            in_toctree = False
        elif in_toctree and stripped and not stripped.startswith(":"):
            if _GLOB_CHARS.search(stripped):
                matched = {d for d in remaining if fnmatch.fnmatchcase(d, stripped)}
                if not matched:
                    continue
                remaining -= matched
            else:
                remaining.discard(stripped)
        out.append(line)
    return "".join(out)


def _expand_index(app: Any, docname: str, source: list[str]) -> None:
    if docname == app.config.root_doc:
        docnames = set(app.env.found_docs) - {docname}
        source[0] = drop_empty_globs(source[0], docnames)


# ---------------------------------------------------------------- attribute docstrings

# napoleon reads a property's or attribute's first line "x: y" as "type: description"; our
# docstrings are prose ("The domain's snapshots: ``create()`` ..."), so for those the lines
# are taken before napoleon runs (priority 400 < 500) and put back after it (600).
_ATTRIBUTE_KINDS = frozenset({"attribute", "data", "property"})
_attribute_lines: dict[str, list[str]] = {}


def _stash_attribute_docstring(
    app: Any, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS:
        _attribute_lines[name] = list(lines)


def _restore_attribute_docstring(
    app: Any, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS and name in _attribute_lines:
        lines[:] = _attribute_lines.pop(name)


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _stash_attribute_docstring, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_docstring, priority=600)
    app.connect("source-read", _expand_api)
    app.connect("source-read", _expand_index)
    return {"parallel_read_safe": True}
