"""Error-message hints: what exists instead of the name that was asked for."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Final

from .errors import NotFoundError, StateCaptureError

__all__ = ["add_names_hint", "names_hint"]

#: Up to this many names are listed in full; beyond it, only the closest ones.
_LIST_ALL: Final = 10


def names_hint(wanted: str, existing: Iterable[str], what: str) -> str:
    """One sentence naming what exists: all of it when few, else the closest names."""
    names = sorted(set(existing))
    plural = f"{what}s"
    if not names:
        return f"there are no {plural}"
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
    guess = f"did you mean {' or '.join(repr(n) for n in close)}? " if close else ""
    if len(names) <= _LIST_ALL:
        return f"{guess}existing {plural}: {', '.join(names)}"
    if close:
        return f"{guess}({len(names)} {plural} exist)"
    return f"none of the {len(names)} {plural} has a similar name"


def add_names_hint(
    exc: NotFoundError, wanted: str, list_names: Callable[[], Iterable[str]], what: str
) -> None:
    """Append :func:`names_hint` to ``exc``'s message (in place, so ``__cause__`` stays).

    Listing is best effort: when it fails, the message stays as it was.
    """
    try:
        hint = names_hint(wanted, list_names(), what)
    except StateCaptureError:
        return
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}; {hint}", *exc.args[1:])
