"""A durable journal of multi-step sequences, kept with the domain itself.

Each documented sequence (:func:`~statecapture.backup_via_temporary_snapshot`,
:func:`~statecapture.direct_backup`) writes its progress into the domain's libvirt metadata
under our own namespace (:data:`JOURNAL_NS`) — before each step starts and after it ends —
so any other process, even one on another machine connected to the same daemon, can see an
unfinished sequence and :func:`~statecapture.recover` can undo it after a crash.

The journal records *facts needed to undo* (original disk sources, overlay paths, the
checkpoint a backup created, files written), never secrets.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid as uuidlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
from lxml import etree
from typing_extensions import Self

from .xml._base import XMLInput, parse, serialize

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = ["JOURNAL_NS", "JOURNAL_KEY", "Journal", "JournalStep", "JournalWriter", "read_journal"]

JOURNAL_NS = "urn:x-statecapture:journal:1"
"""The metadata namespace URI of the journal element in the domain XML."""
JOURNAL_KEY = "statecapture"
"""The XML namespace prefix libvirt uses for the journal element."""


@attrs.frozen
class JournalStep:
    """One step of a sequence as journalled."""

    name: str
    status: str
    """``started``, ``done``, ``failed`` or ``undone``."""
    started_at: float
    ended_at: float | None = None
    error: str | None = None


@attrs.frozen
class Journal:
    """The journal of one sequence run, as stored in the domain's metadata."""

    sequence: str
    """Which sequence: ``backup_via_temporary_snapshot`` or ``direct_backup``."""
    run_id: str
    host: str
    pid: int
    started_at: float
    steps: tuple[JournalStep, ...] = ()
    facts: Mapping[str, str] = attrs.field(factory=dict)
    """Undo facts: ``original:vda`` → original source, ``overlay:vda`` → overlay path,
    ``checkpoint`` → checkpoint name, ``file:vda`` → a file written, ``frozen`` → ``1``."""

    @property
    def current_step(self) -> JournalStep | None:
        """The last step recorded."""
        return self.steps[-1] if self.steps else None

    def fact(self, key: str) -> str | None:
        return self.facts.get(key)

    def facts_with_prefix(self, prefix: str) -> dict[str, str]:
        """Facts ``prefix:NAME`` as ``{NAME: value}``."""
        return {
            k[len(prefix) + 1 :]: v for k, v in self.facts.items() if k.startswith(prefix + ":")
        }

    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        root = parse(text)
        if etree.QName(root).localname != "journal":
            from .errors import XMLError

            raise XMLError(f"expected a <journal> element, got <{root.tag}>")

        def attr(el: etree._Element, name: str) -> str:
            return el.get(name) or ""

        steps = []
        facts: dict[str, str] = {}
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

    def to_xml(self) -> str:
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
    """The unfinished sequence journalled on ``dom``, or ``None``."""
    text = dom._vir.get_metadata(JOURNAL_NS)
    if text is None:
        return None
    return Journal.from_xml(text)


@attrs.define(eq=False)
class JournalWriter:
    """Writes a sequence's journal into the domain metadata, step by step."""

    dom: Domain
    journal: Journal

    @classmethod
    def begin(cls, dom: Domain, sequence: str) -> JournalWriter:
        journal = Journal(
            sequence=sequence,
            run_id=uuidlib.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )
        writer = cls(dom, journal)
        writer._flush()
        return writer

    def _flush(self) -> None:
        self.dom._vir.set_metadata(JOURNAL_NS, JOURNAL_KEY, self.journal.to_xml())

    def record(self, **facts: str) -> None:
        """Add undo facts (written through at once)."""
        merged = dict(self.journal.facts)
        merged.update({k.replace("__", ":"): v for k, v in facts.items()})
        self.journal = attrs.evolve(self.journal, facts=merged)
        self._flush()

    def set_fact(self, key: str, value: str | None) -> None:
        """Set (``None``: drop) one fact whose key may contain ``:``."""
        merged = dict(self.journal.facts)
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
        self.journal = attrs.evolve(self.journal, facts=merged)
        self._flush()

    def _set_step(self, step: JournalStep) -> None:
        steps = [s for s in self.journal.steps if s.name != step.name]
        steps.append(step)
        self.journal = attrs.evolve(self.journal, steps=tuple(steps))
        self._flush()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Journal ``name`` as started before the body and as done (or failed) after."""
        started = JournalStep(name, "started", time.time())
        self._set_step(started)
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._set_step(
                    attrs.evolve(started, status="failed", ended_at=time.time(), error=repr(exc))
                )
            raise
        self._set_step(attrs.evolve(started, status="done", ended_at=time.time()))

    def finish(self) -> None:
        """The sequence ended cleanly (or was fully undone): remove the journal."""
        self.dom._vir.set_metadata(JOURNAL_NS, JOURNAL_KEY, None)


def clear_journal(dom: Domain) -> None:
    """Remove the journal element from ``dom`` (idempotent)."""
    if dom._vir.get_metadata(JOURNAL_NS) is not None:
        dom._vir.set_metadata(JOURNAL_NS, JOURNAL_KEY, None)
