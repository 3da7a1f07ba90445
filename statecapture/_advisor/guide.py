"""libvirt's guide as data: the vocabulary (:class:`Method`, :class:`Facet`, :class:`Fit`) and
:data:`GUIDE`, one row per method with one statement per facet.

The table itself is ``guide.toml`` next to this module (with the corrections from the guide's
review); :func:`load_guide` reads and validates it when the advisor is imported, so a row
without a facet, an unknown fit or capability, or a method missing or listed twice stops the
import with :class:`GuideError` instead of surfacing as a wrong ranking later.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any, Final

import attrs

from .._capabilities import Capabilities

__all__ = ["GUIDE", "Facet", "Fit", "GuideError", "Method", "load_guide"]


class Method(enum.Enum):
    """Every state-capture method the guide lists, plus its two sequences."""

    MANAGED_SAVE = "managed save"
    SAVE = "save to file"
    INTERNAL_SNAPSHOT = "internal snapshot with memory"
    INTERNAL_DISK_SNAPSHOT = "internal disk-only snapshot"
    EXTERNAL_SNAPSHOT = "external snapshot with memory"
    EXTERNAL_DISK_SNAPSHOT = "external disk-only snapshot"
    FREEZE_THAW = "freeze/thaw"
    BLOCK_COPY = "block copy"
    CHECKPOINT = "checkpoint"
    BACKUP_PUSH = "backup, push mode"
    BACKUP_PULL = "backup, pull mode"
    TEMPORARY_SNAPSHOT_BACKUP = "backup via temporary external snapshot"
    """Sequence 1: freeze, disk-only external snapshot, thaw, copy the frozen base files,
    active block commit, pivot (:func:`statecapture.backup_via_temporary_snapshot`)."""
    DIRECT_BACKUP = "direct backup"
    """Sequence 2: freeze, backup job with a new checkpoint, thaw, push or pull, end the job
    (:func:`statecapture.direct_backup`)."""


class Facet(enum.Enum):
    """The guide's trade-off facets."""

    DURATION = "duration"
    AMOUNT_OF_STATE = "amount of state"
    QUIESCING = "quiescing of data"
    QUANTITY_OF_FILES = "quantity of files"
    DEFINITION_IMPACT = "impact to guest definition"
    THIRD_PARTY = "third-party integration"
    INCREMENTAL = "full vs. incremental"
    LOCALITY = "local vs. remote"
    NETWORK_LATENCY = "network latency"


class Fit(enum.Enum):
    """How one method does on one facet, measured against the caller's needs."""

    GOOD = "good"
    """Meets the need."""
    PARTIAL = "partial"
    """Meets it with a caveat (see the statement)."""
    POOR = "poor"
    """Does not meet the need."""
    NEUTRAL = "n/a"
    """Not among the caller's needs (the statement still informs)."""


# --------------------------------------------------------------------------- the guide as data


class GuideError(ValueError):
    """The guide's table is malformed (a packaging or editing mistake, found at import)."""


@attrs.frozen
class _Row:
    """One method in the guide: what it captures and one statement per facet.

    ``facets[f] = (fit when the caller asks for f, statement)``; the DURATION fit is
    computed from the downtime estimate, the AMOUNT_OF_STATE fit from ``memory``/``disks``.
    """

    apis: str
    summary: str
    memory: bool
    disks: bool
    running: bool
    """Needs a running domain."""
    quiesce_with_agent: bool
    """Application consistency of disk state comes from freezing through the agent."""
    requires: tuple[str, ...]
    """Capabilities that must be present."""
    facets: Mapping[Facet, tuple[Fit, str]]
    discouraged: str | None = None
    """Why the guide (or its review) advises against this method, if it does."""


_ROW_KEYS: Final = frozenset(
    {
        "name",
        "apis",
        "summary",
        "memory",
        "disks",
        "running",
        "quiesce_with_agent",
        "requires",
        "facets",
    }
)
_OPTIONAL_KEYS: Final = frozenset({"discouraged"})
_FLAGS: Final = ("memory", "disks", "running", "quiesce_with_agent")
_CAPABILITIES: Final = frozenset(attrs.fields_dict(Capabilities))


def _text(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GuideError(f"{where}: a non-empty string is required, got {value!r}")
    return value


def _member(where: str, cls: type[enum.Enum], value: object) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise GuideError(f"{where}: {value!r} is not one of {allowed}") from None


def _facets(where: str, table: object) -> Mapping[Facet, tuple[Fit, str]]:
    if not isinstance(table, dict):
        raise GuideError(f"{where}: [method.facets] is missing")
    facets: dict[Facet, tuple[Fit, str]] = {}
    for key, entry in table.items():
        facet = _member(where, Facet, key)
        if not isinstance(entry, dict) or set(entry) != {"fit", "says"}:
            raise GuideError(f"{where}, {key}: needs exactly fit and says, got {entry!r}")
        facets[facet] = (_member(f"{where}, {key}", Fit, entry["fit"]), _text(where, entry["says"]))
    missing = [f.value for f in Facet if f not in facets]
    if missing:
        raise GuideError(f"{where}: no statement for {', '.join(missing)}")
    return MappingProxyType({f: facets[f] for f in Facet})


def _row(index: int, entry: object) -> tuple[Method, _Row]:
    where = f"method #{index + 1}"
    if not isinstance(entry, dict):
        raise GuideError(f"{where}: a table is required")
    keys = set(entry)
    if not keys >= _ROW_KEYS or not keys <= _ROW_KEYS | _OPTIONAL_KEYS:
        raise GuideError(
            f"{where}: keys must be {sorted(_ROW_KEYS)} (+ {sorted(_OPTIONAL_KEYS)}), "
            f"got {sorted(keys)}"
        )
    method = _member(where, Method, entry["name"])
    where = f"{where} ({method.value})"
    for flag in _FLAGS:
        if not isinstance(entry[flag], bool):
            raise GuideError(f"{where}: {flag} must be true or false")
    requires = entry["requires"]
    if not isinstance(requires, list) or not all(r in _CAPABILITIES for r in requires):
        raise GuideError(f"{where}: requires must list Capabilities fields, got {requires!r}")
    discouraged = entry.get("discouraged")
    row = _Row(
        apis=_text(where, entry["apis"]),
        summary=_text(where, entry["summary"]),
        memory=entry["memory"],
        disks=entry["disks"],
        running=entry["running"],
        quiesce_with_agent=entry["quiesce_with_agent"],
        requires=tuple(requires),
        facets=_facets(where, entry["facets"]),
        discouraged=None if discouraged is None else _text(where, discouraged),
    )
    return method, row


def load_guide(text: str) -> Mapping[Method, _Row]:
    """Parse and validate the guide's TOML table; :class:`GuideError` when it is malformed.

    Every :class:`Method` appears once, in the enum's order (the ranking's last tie-break);
    every row has every :class:`Facet` once, with a known :class:`Fit` and a statement.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GuideError(f"the guide is not valid TOML: {exc}") from exc
    entries = data.get("method")
    if set(data) != {"method"} or not isinstance(entries, list):
        raise GuideError("the guide must hold only [[method]] tables")
    rows = [_row(i, entry) for i, entry in enumerate(entries)]
    order = [method for method, _row_ in rows]
    if order != list(Method):
        raise GuideError(
            "the guide must list every method once, in statecapture.Method's order; got "
            + ", ".join(m.value for m in order)
        )
    return MappingProxyType(dict(rows))


GUIDE: Final[Mapping[Method, _Row]] = load_guide(
    resources.files("statecapture._advisor").joinpath("guide.toml").read_text(encoding="utf-8")
)
"""The guide as a table: method → what it captures and one statement per facet."""
