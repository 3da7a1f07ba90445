"""The advisor's guide is data (``statecapture/_advisor/guide.toml``), validated when the
advisor is imported: a malformed table stops the import instead of skewing a ranking."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from statecapture import _advisor
from statecapture._advisor import GUIDE, Facet, Fit, GuideError, Method, load_guide

_TEXT = resources.files("statecapture._advisor").joinpath("guide.toml").read_text()


def test_shipped_guide_is_complete() -> None:
    """Every method once, in Method's order, each with a statement and fit for every facet."""
    assert list(GUIDE) == list(Method)
    for row in GUIDE.values():
        assert list(row.facets) == list(Facet)
        assert all(isinstance(fit, Fit) and text for fit, text in row.facets.values())
    assert load_guide(_TEXT) == GUIDE


def _broken(old: str, new: str, count: int = 1) -> str:
    assert old in _TEXT
    return _TEXT.replace(old, new, count)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_broken('"network latency" = ', '"network lag" = '), "'network lag' is not one of"),
        (
            re.sub(r'\n"quantity of files" = [^\n]*', "", _TEXT, count=1),
            "no statement for quantity of files",
        ),
        (_broken('fit = "poor"', 'fit = "bad"'), "'bad' is not one of"),
        (_broken('requires = ["save"]', 'requires = ["sav"]'), "requires must list"),
        (_broken("memory = true", 'memory = "yes"'), "memory must be true or false"),
        (_broken('name = "save to file"', 'name = "managed save"'), "every method once"),
        (_broken('apis = "virDomainManagedSave"', 'apis = ""'), "non-empty string"),
        (_broken("quiesce_with_agent = false", "quiesce = false"), "keys must be"),
        (_TEXT + "\n[extra]\n", "only [[method]] tables"),
        (_broken('"duration" = {', '"duration" = {{'), "not valid TOML"),
    ],
)
def test_broken_guide_is_refused(text: str, message: str) -> None:
    """A missing facet, an unknown facet, fit or capability, a wrong type, a method missing or
    twice, an empty statement, an unknown key, stray tables or bad TOML raise GuideError."""
    with pytest.raises(GuideError, match=re.escape(message)):
        load_guide(text)


def test_modules_fit_in_a_head() -> None:
    """The advisor is split into small modules (none above ~800 lines)."""
    root = resources.files("statecapture._advisor")
    for name in ("__init__", "needs", "guide", "facts", "rules", "advice"):
        lines = root.joinpath(f"{name}.py").read_text().count("\n")
        assert lines < 800, name
    assert _advisor.GUIDE is GUIDE
