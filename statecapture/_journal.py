"""A durable journal of multi-step sequences, kept with the domain itself.

Each documented sequence (:func:`~statecapture.backup_via_temporary_snapshot`,
:func:`~statecapture.direct_backup`) writes its progress into the domain's libvirt metadata
under our own namespace (:data:`JOURNAL_NS`) — before each step starts and after it ends —
so any other process, even one on another machine connected to the same daemon, can see an
unfinished sequence and :func:`~statecapture.recover` can undo it after a crash.

The journal records *facts needed to undo* (original disk sources, planned overlay paths,
the checkpoint a backup creates, files it writes, whether a freeze may be in effect), never
secrets. Facts are written *before* the step that makes them true starts (a planned overlay
path is journalled before the snapshot that creates it), so a process killed at any instant
leaves enough behind for :func:`~statecapture.recover`.

Each write is one ``virDomainSetMetadata`` call (libvirt saves the domain XML: about 5-10 ms
on a local disk), so sequences never write the journal while the guest is frozen.

Fault injection: :data:`_fault_hook` (private, ``None`` in production) is called with the
name of every step boundary (``start:copy``, ``done:copy``, ``in:snapshot:frozen`` ...).
The kill-matrix tests set it in a child process to ``SIGKILL`` themselves at one boundary.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Self

import attrs
from lxml import etree

from .errors import InvalidStateError, XMLError
from .xml._base import XMLInput, parse, serialize

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "JOURNAL_NS",
    "JOURNAL_KEY",
    "Journal",
    "JournalStep",
    "JournalWriter",
    "clear_journal",
    "read_journal",
]

JOURNAL_NS = "urn:x-statecapture:journal:1"
"""The metadata namespace URI of the journal element in the domain XML."""
JOURNAL_KEY = "statecapture"
"""The XML namespace prefix libvirt uses for the journal element."""

_fault_hook: Callable[[str], None] | None = None
"""Tests only: called with each boundary name (``start:STEP``, ``done:STEP``, ``in:…``)."""


def boundary(name: str) -> None:
    """Mark a step boundary: calls the (test-only) fault hook when one is set."""
    hook = _fault_hook
    if hook is not None:
        hook(name)


@attrs.frozen
class JournalStep:
    """One step of a sequence as journalled."""

    name: str
    status: str
    """``started``, ``done`` or ``failed``."""
    started_at: float
    """Wall-clock time (``time.time()``) the step started."""
    ended_at: float | None = None
    error: str | None = None


@attrs.frozen
class Journal:
    """The journal of one sequence run, as stored in the domain's metadata."""

    sequence: str
    """Which sequence: ``backup_via_temporary_snapshot`` or ``direct_backup``."""
    run_id: str
    host: str
    """The host name of the process that ran the sequence."""
    pid: int
    """Its process id."""
    started_at: float
    steps: tuple[JournalStep, ...] = ()
    facts: Mapping[str, str] = attrs.field(factory=dict)
    """Undo facts: ``original:vda`` → original source, ``overlay:vda`` → overlay path,
    ``checkpoint`` → checkpoint name, ``file:vda`` → a file written, ``frozen`` → ``1``."""

    @property
    def current_step(self) -> JournalStep | None:
        """The last step recorded."""
        return self.steps[-1] if self.steps else None

    def step(self, name: str) -> JournalStep | None:
        """The journalled step ``name``, or ``None`` when it never started."""
        for step in self.steps:
            if step.name == name:
                return step
        return None

    def fact(self, key: str) -> str | None:
        """The fact ``key``, or ``None``."""
        return self.facts.get(key)

    def facts_with_prefix(self, prefix: str) -> dict[str, str]:
        """Facts ``prefix:NAME`` as ``{NAME: value}``."""
        return {
            k[len(prefix) + 1 :]: v for k, v in self.facts.items() if k.startswith(prefix + ":")
        }

    def describe(self) -> str:
        """One line for reports: which sequence, where it stopped, who ran it."""
        step = self.current_step
        where = f"step {step.name!r} {step.status}" if step is not None else "before its first step"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return (
            f"unfinished {self.sequence} (run {self.run_id[:12]}, started {when} by pid "
            f"{self.pid} on {self.host}), stopped at {where}"
        )

    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse the stored ``<journal>`` element; :class:`XMLError` when it is damaged."""
        root = parse(text)
        if etree.QName(root).localname != "journal":
            raise XMLError(f"expected a <journal> element, got <{root.tag}>")

        def attr(el: etree._Element, name: str) -> str:
            return el.get(name) or ""

        steps = []
        facts: dict[str, str] = {}
        try:
            for child in root:
                if not isinstance(child.tag, str):
                    continue
                local = etree.QName(child).localname
                if local == "step":
                    ended = child.get("ended")
                    steps.append(
                        JournalStep(
                            name=attr(child, "name"),
                            status=attr(child, "status"),
                            started_at=float(child.get("started") or 0),
                            ended_at=float(ended) if ended else None,
                            error=child.get("error"),
                        )
                    )
                elif local == "fact":
                    facts[attr(child, "key")] = attr(child, "value")
            return cls(
                sequence=attr(root, "sequence"),
                run_id=attr(root, "run"),
                host=attr(root, "host"),
                pid=int(root.get("pid") or 0),
                started_at=float(root.get("started") or 0),
                steps=tuple(steps),
                facts=facts,
            )
        except ValueError as exc:
            raise XMLError(f"damaged journal: {exc}") from exc

    def to_xml(self) -> str:
        """The ``<journal>`` element as stored."""
        root = etree.Element(
            "journal",
            sequence=self.sequence,
            run=self.run_id,
            host=self.host,
            pid=str(self.pid),
            started=f"{self.started_at:.6f}",
        )
        for key, value in self.facts.items():
            etree.SubElement(root, "fact", key=key, value=value)
        for step in self.steps:
            el = etree.SubElement(
                root, "step", name=step.name, status=step.status, started=f"{step.started_at:.6f}"
            )
            if step.ended_at is not None:
                el.set("ended", f"{step.ended_at:.6f}")
            if step.error is not None:
                el.set("error", step.error[:500])
        return serialize(root)


def read_journal(dom: Domain) -> Journal | None:
    """The unfinished sequence journalled on ``dom``, or ``None``.

    Raises :class:`XMLError` when the stored journal is damaged.
    """
    text = dom.port.get_metadata(JOURNAL_NS)
    if text is None:
        return None
    return Journal.from_xml(text)


def _now() -> float:
    """Wall-clock time as stored (microseconds), so a read-back journal compares equal."""
    return round(time.time(), 6)


def new_run_id() -> str:
    """A fresh run id (32 hex digits; its first 12 name the run's files)."""
    return uuidlib.uuid4().hex


@attrs.define(eq=False)
class JournalWriter:
    """Writes a sequence's journal into the domain metadata, step by step."""

    dom: Domain
    journal: Journal
    timings: list[tuple[str, float]] = attrs.field(factory=list)
    """``(step, seconds)`` of each step that ended, in order (monotonic clock)."""
    _staged: dict[str, str | None] = attrs.field(factory=dict)

    @classmethod
    def begin(
        cls,
        dom: Domain,
        sequence: str,
        *,
        run_id: str | None = None,
        facts: Mapping[str, str] | None = None,
    ) -> JournalWriter:
        """Write a new journal (with its first ``facts``) in one metadata write.

        Raises :class:`InvalidStateError` when another run wrote its journal at the same
        time (read back after the write: the last writer wins, the other one backs off).
        """
        journal = Journal(
            sequence=sequence,
            run_id=run_id or new_run_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=_now(),
            facts=dict(facts or {}),
        )
        writer = cls(dom, journal)
        writer._flush(check=False)
        writer._check_owner()
        return writer

    def _check_owner(self) -> None:
        text = self.dom.port.get_metadata(JOURNAL_NS)
        try:
            stored = Journal.from_xml(text) if text is not None else None
        except XMLError:
            stored = None
        if stored is None or stored.run_id != self.journal.run_id:
            raise InvalidStateError(
                f"another statecapture sequence on domain {self.dom.name!r} replaced this "
                "run's journal; two sequences cannot run on one domain at the same time",
                operation="write the sequence journal",
                domain_name=self.dom.name,
            )

    def _flush(self, *, check: bool = True) -> None:
        if check:
            self._check_owner()
        self.dom.port.set_metadata(JOURNAL_NS, JOURNAL_KEY, self.journal.to_xml())

    def _merge_staged(self) -> None:
        if not self._staged:
            return
        merged = dict(self.journal.facts)
        for key, value in self._staged.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        self._staged.clear()
        self.journal = attrs.evolve(self.journal, facts=merged)

    def stage(self, key: str, value: str | None) -> None:
        """Set (``None``: drop) a fact in memory; the next journal write stores it."""
        self._staged[key] = value

    def record(self, **facts: str) -> None:
        """Add undo facts (written through at once); ``a__b`` in a name means ``a:b``."""
        for key, value in facts.items():
            self.stage(key.replace("__", ":"), value)
        self._merge_staged()
        self._flush()

    def set_fact(self, key: str, value: str | None) -> None:
        """Set (``None``: drop) one fact whose key may contain ``:``, written through."""
        self.stage(key, value)
        self._merge_staged()
        self._flush()

    def _set_step(self, step: JournalStep) -> None:
        self._merge_staged()
        steps = [s for s in self.journal.steps if s.name != step.name]
        steps.append(step)
        self.journal = attrs.evolve(self.journal, steps=tuple(steps))
        self._flush()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Journal ``name`` as started before the body and as done (or failed) after.

        Staged facts go out with those writes. The fault hook sees ``start:NAME`` once the
        start is journalled and ``done:NAME`` once the end is.
        """
        started = JournalStep(name, "started", _now())
        self._set_step(started)
        boundary(f"start:{name}")
        clock = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.timings.append((name, time.monotonic() - clock))
            with contextlib.suppress(Exception):
                self._set_step(
                    attrs.evolve(started, status="failed", ended_at=_now(), error=repr(exc))
                )
            raise
        self.timings.append((name, time.monotonic() - clock))
        self._set_step(attrs.evolve(started, status="done", ended_at=_now()))
        boundary(f"done:{name}")

    def finish(self) -> None:
        """The sequence ended cleanly (or was fully undone): remove the journal."""
        self.dom.port.set_metadata(JOURNAL_NS, JOURNAL_KEY, None)


def clear_journal(dom: Domain) -> None:
    """Remove the journal element from ``dom`` (idempotent)."""
    if dom.port.get_metadata(JOURNAL_NS) is not None:
        dom.port.set_metadata(JOURNAL_NS, JOURNAL_KEY, None)
