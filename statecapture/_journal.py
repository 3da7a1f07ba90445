"""THE crash record of a run, kept with the domain itself (one record type for all runs).

Every run that changes a domain in several steps — each documented sequence
(:func:`~statecapture.backup_via_temporary_snapshot`, :func:`~statecapture.direct_backup`)
and every plain backup job (:meth:`Domain.backup <statecapture.Domain.backup>`) — keeps one
:class:`Journal` in the domain's libvirt metadata under our own namespace
(:data:`JOURNAL_NS`), written before each step starts and after it ends, so any other
process, even one on another machine connected to the same daemon, can see an unfinished
run, :meth:`Domain.active_backup` can adopt its job, and :func:`~statecapture.recover` can
undo it after a crash. A direct backup's job writes into its sequence's record (its
:class:`JobRecord` section), so one record describes one run.

The record holds *facts needed to undo* (original disk sources, planned overlay paths,
the checkpoint a backup creates, files it writes, private directories, whether a freeze may
be in effect, the writer's host and pid), never secrets. Facts are written *before* the
step that makes them true starts (a planned overlay path is recorded before the snapshot
that creates it), so a process killed at any instant leaves enough behind for
:func:`~statecapture.recover`.

Each write is one ``virDomainSetMetadata`` call (libvirt saves the domain XML: about 5-10 ms
on a local disk), so the record is written before the freeze and after the thaw, never
while the guest is frozen.

Records written by statecapture before the one record type (the sequences' journal in
``urn:x-statecapture:journal:1`` and the backup job's record in
``urn:x-statecapture:backup:1``) are read by :mod:`statecapture._journal_legacy`:
:func:`read_journal` returns them as one :class:`Journal` (``legacy=True``), and the first
write of a writer that adopts one stores it in the current format and removes the old ones.

Fault injection: :data:`_fault_hook` (private, ``None`` in production) is called with the
name of every step boundary (``start:copy``, ``done:copy``, ``in:snapshot:frozen`` ...).
The kill-matrix tests set it in a child process to ``SIGKILL`` themselves at one boundary.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
import socket
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, Self

import attrs
from lxml import etree

from .errors import InvalidStateError, XMLError
from .xml._base import XMLInput, parse, serialize

if TYPE_CHECKING:
    from ._domain import Domain
    from ._ports import MetadataPort

__all__ = [
    "JOURNAL_NS",
    "JOURNAL_KEY",
    "OP_BACKUP",
    "JobRecord",
    "Journal",
    "JournalStep",
    "JournalWriter",
    "clear_journal",
    "read_journal",
]

JOURNAL_NS: Final = "urn:x-statecapture:journal:2"
"""The metadata namespace URI of the record element in the domain XML."""
JOURNAL_KEY: Final = "statecapture"
"""The XML namespace prefix libvirt uses for the record element."""
OP_BACKUP: Final = "backup"
"""The :attr:`Journal.sequence` of a plain backup job (:meth:`Domain.backup`)."""

_fault_hook: Callable[[str], None] | None = None
"""Tests only: called with each boundary name (``start:STEP``, ``done:STEP``, ``in:…``)."""


def boundary(name: str) -> None:
    """Mark a step boundary: calls the (test-only) fault hook when one is set."""
    hook = _fault_hook
    if hook is not None:
        hook(name)


@attrs.frozen
class JournalStep:
    """One step of a run as recorded."""

    name: str
    status: str
    """``started``, ``done`` or ``failed``."""
    started_at: float
    """Wall-clock time (``time.time()``) the step started."""
    ended_at: float | None = None
    error: str | None = None


@attrs.frozen
class JobRecord:
    """What a backup job's cleanup needs: the job's section of its run's record."""

    mode: str
    """``push`` or ``pull``."""
    label: str
    """The label in the job's file names."""
    started: float
    """Wall-clock time the job was started."""
    checkpoint: str | None = None
    """The checkpoint made with the job (``None``: none)."""
    created_checkpoint: bool = False
    """Whether the job created :attr:`checkpoint` (so its cleanup deletes it)."""
    incremental_from: str | None = None
    files: tuple[str, ...] = ()
    """Files the job writes or wrote (push targets, downloads and their partial names)."""
    dirs: tuple[str, ...] = ()
    """The job's private directories (staging, scratch, NBD socket)."""
    delivered: bool = False
    """A pull job downloaded every disk (its files and checkpoint are kept)."""

    def to_element(self) -> etree._Element:
        """The ``<backup>`` element as stored (also the legacy record's form)."""
        el = etree.Element("backup")
        el.set("mode", self.mode)
        if self.delivered:
            el.set("delivered", "yes")
        el.set("label", self.label)
        el.set("started", repr(self.started))
        if self.checkpoint is not None:
            el.set("checkpoint", self.checkpoint)
            el.set("created", "yes" if self.created_checkpoint else "no")
        if self.incremental_from is not None:
            el.set("incremental", self.incremental_from)
        for f in self.files:
            etree.SubElement(el, "file").set("path", f)
        for d in self.dirs:
            etree.SubElement(el, "dir").set("path", d)
        return el

    @classmethod
    def from_element(cls, root: etree._Element) -> Self:
        """Parse a ``<backup>`` element; :class:`XMLError` when it is damaged."""
        try:
            return cls(
                mode=root.get("mode", "push"),
                checkpoint=root.get("checkpoint"),
                created_checkpoint=root.get("created") == "yes",
                incremental_from=root.get("incremental"),
                label=root.get("label", "backup"),
                started=float(root.get("started", "0")),
                files=tuple(e.get("path", "") for e in root.iterfind("file") if e.get("path")),
                dirs=tuple(e.get("path", "") for e in root.iterfind("dir") if e.get("path")),
                delivered=root.get("delivered") == "yes",
            )
        except ValueError as exc:
            raise XMLError(f"damaged backup job record: {exc}") from exc


@attrs.frozen
class Journal:
    """The record of one run, as stored in the domain's metadata."""

    sequence: str
    """Which run: ``backup_via_temporary_snapshot``, ``direct_backup``, or ``backup``
    (:data:`OP_BACKUP`: a plain backup job)."""
    run_id: str
    host: str
    """The host name of the process that ran it (empty: unknown, a legacy job record)."""
    pid: int
    """Its process id (0: unknown)."""
    started_at: float
    steps: tuple[JournalStep, ...] = ()
    facts: Mapping[str, str] = attrs.field(factory=dict)
    """Undo facts: ``original:vda`` → original source, ``overlay:vda`` → overlay path,
    ``checkpoint`` → checkpoint name, ``file:vda`` → a file written, ``frozen`` → ``1``."""
    job: JobRecord | None = None
    """The run's backup job, while one runs (a plain job's record always has one)."""
    legacy: bool = attrs.field(default=False, eq=False)
    """Read from an older statecapture's metadata (see :mod:`statecapture._journal_legacy`)."""

    @property
    def current_step(self) -> JournalStep | None:
        """The last step recorded."""
        return self.steps[-1] if self.steps else None

    @property
    def is_backup_job(self) -> bool:
        """Whether this is a plain backup job's record (not a sequence's)."""
        return self.sequence == OP_BACKUP

    def step(self, name: str) -> JournalStep | None:
        """The recorded step ``name``, or ``None`` when it never started."""
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
        """One line for reports: which run, where it stopped, who ran it."""
        step = self.current_step
        where = f"step {step.name!r} {step.status}" if step is not None else "before its first step"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        who = f"pid {self.pid} on {self.host}" if self.pid else "an unknown process"
        what = self.sequence
        if self.job is not None and self.is_backup_job:
            what = f"{self.job.mode} backup {self.job.label!r}"
        old = ", recorded by an older statecapture" if self.legacy else ""
        return (
            f"unfinished {what} (run {self.run_id[:12]}, started {when} by {who}{old}), "
            f"stopped at {where}"
        )

    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse the stored ``<journal>`` element; :class:`XMLError` when it is damaged."""
        return cls.from_element(parse(text))

    @classmethod
    def from_element(cls, root: etree._Element) -> Self:
        """Parse a ``<journal>`` element (also the legacy journal's form)."""
        if etree.QName(root).localname != "journal":
            raise XMLError(f"expected a <journal> element, got <{root.tag}>")

        def attr(el: etree._Element, name: str) -> str:
            return el.get(name) or ""

        steps = []
        facts: dict[str, str] = {}
        job: JobRecord | None = None
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
                elif local == "backup":
                    job = JobRecord.from_element(child)
            return cls(
                sequence=attr(root, "sequence"),
                run_id=attr(root, "run"),
                host=attr(root, "host"),
                pid=int(root.get("pid") or 0),
                started_at=float(root.get("started") or 0),
                steps=tuple(steps),
                facts=facts,
                job=job,
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
        if self.job is not None:
            root.append(self.job.to_element())
        return serialize(root)


def record_elements(dom: Domain, namespaces: Iterable[str]) -> dict[str, etree._Element]:
    """Our elements under ``namespaces`` in ``dom``'s metadata, by namespace, as
    ``virDomainGetMetadata`` returns them: ONE read (the domain's XML, live when it runs).

    Raises :class:`XMLError` when the domain's XML cannot be parsed."""
    wanted = set(namespaces)
    found: dict[str, etree._Element] = {}
    metadata = parse(_port(dom).xml_desc()).find("metadata")
    for el in metadata if metadata is not None else ():
        if isinstance(el.tag, str):
            namespace = etree.QName(el).namespace
            if namespace in wanted and namespace not in found:
                found[namespace] = _unqualified(el)
    return found


def _unqualified(el: etree._Element) -> etree._Element:
    """``el`` as ``virDomainGetMetadata`` returns it: the domain's XML puts our namespace on
    every descendant; the stored element has it on none."""
    copy = copy_module.deepcopy(el)
    for node in copy.iter():
        if isinstance(node.tag, str):
            node.tag = etree.QName(node).localname
    etree.cleanup_namespaces(copy)
    return copy


def _read_current(dom: Domain) -> Journal | None:
    """The record in the current format only (raises :class:`XMLError` when damaged)."""
    text = _port(dom).get_metadata(JOURNAL_NS)
    if text is None:
        return None
    return Journal.from_xml(text)


def read_journal(dom: Domain) -> Journal | None:
    """The unfinished run recorded on ``dom`` (a sequence or a plain backup job), or ``None``.

    A record left by an older statecapture is returned too (``legacy=True``). One libvirt
    call reads all three namespaces. Raises :class:`XMLError` when the stored record is
    damaged.
    """
    from ._journal_legacy import LEGACY_NAMESPACES, legacy_journal

    stored = record_elements(dom, (JOURNAL_NS, *LEGACY_NAMESPACES))
    current = stored.get(JOURNAL_NS)
    if current is not None:
        return Journal.from_element(current)
    return legacy_journal(stored)


def _now() -> float:
    """Wall-clock time as stored (microseconds), so a read-back journal compares equal."""
    return round(time.time(), 6)


def new_run_id() -> str:
    """A fresh run id (32 hex digits; its first 12 name the run's files)."""
    return uuidlib.uuid4().hex


@attrs.define(eq=False)
class JournalWriter:
    """Writes a run's record into the domain metadata, step by step.

    Ownership is checked by the run id, one read of the current namespace each time: after
    the first write (read back), before every later write — except a running backup job's
    own updates (:meth:`set_job` with ``check=False``) — and before the record is removed,
    so a writer never removes, and does not overwrite, another run's record.
    """

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
        job: JobRecord | None = None,
    ) -> JournalWriter:
        """Write a new record (with its first ``facts`` and ``job``) in one metadata write.

        Raises :class:`InvalidStateError` when another run wrote its record at the same
        time (read back after the write: the last writer wins, the other one backs off).
        """
        journal = Journal(
            sequence=sequence,
            run_id=run_id or new_run_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=_now(),
            facts=dict(facts or {}),
            job=job,
        )
        writer = cls(dom, journal)
        writer._flush(check=False)
        writer._check_owner()
        return writer

    @classmethod
    def adopt(cls, dom: Domain, journal: Journal) -> JournalWriter:
        """Continue writing ``journal`` as read from ``dom`` (a leftover job's run). Nothing
        is written now; the first write of a legacy record stores it in the current format."""
        return cls(dom, journal)

    def _owns_record(self) -> bool:
        """Whether the stored record is this run's (one read)."""
        try:
            stored = _read_current(self.dom)
        except XMLError:
            return False
        return stored is not None and stored.run_id == self.journal.run_id

    def _check_owner(self) -> None:
        if not self._owns_record():
            raise InvalidStateError(
                f"another statecapture run on domain {self.dom.name!r} replaced this "
                "run's journal; two runs cannot change one domain at the same time",
                operation="write the run's record",
                domain_name=self.dom.name,
            )

    def _flush(self, *, check: bool = True) -> None:
        if self.journal.legacy:
            # An older statecapture's record, adopted: store it as ours, then drop the old
            # elements it was read from (known from the read: no re-read).
            from ._journal_legacy import clear_legacy, legacy_namespaces

            old = legacy_namespaces(self.journal)
            self.journal = attrs.evolve(self.journal, legacy=False)
            _port(self.dom).set_metadata(JOURNAL_NS, JOURNAL_KEY, self.journal.to_xml())
            clear_legacy(self.dom, old)
            return
        if check:
            self._check_owner()
        _port(self.dom).set_metadata(JOURNAL_NS, JOURNAL_KEY, self.journal.to_xml())

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

    def set_job(self, job: JobRecord | None, *, check: bool = True) -> None:
        """Store (``None``: drop) the run's backup job section, written through.

        ``check=False`` skips the owner check: for the updates of a job that runs (its
        files, its delivery), between the checked writes that start and end its section —
        libvirt runs one backup job per domain, so no other backup run can have begun a
        record meanwhile."""
        self._merge_staged()
        self.journal = attrs.evolve(self.journal, job=job)
        self._flush(check=check)

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
        """The run ended cleanly (or was fully undone): remove its record.

        A record another run has written since is left alone.
        """
        if self.journal.legacy:
            from ._journal_legacy import clear_legacy, legacy_namespaces

            clear_legacy(self.dom, legacy_namespaces(self.journal))
            return
        if self._owns_record():
            _port(self.dom).set_metadata(JOURNAL_NS, JOURNAL_KEY, None)


def clear_journal(dom: Domain) -> bool:
    """Remove the record element from ``dom``, an older statecapture's too (idempotent);
    whether there was one. One read finds the elements there are."""
    from ._journal_legacy import LEGACY_NAMESPACES, clear_legacy

    stored = record_elements(dom, (JOURNAL_NS, *LEGACY_NAMESPACES))
    if JOURNAL_NS in stored:
        _port(dom).set_metadata(JOURNAL_NS, JOURNAL_KEY, None)
    clear_legacy(dom, [ns for ns in LEGACY_NAMESPACES if ns in stored])
    return bool(stored)


def _port(dom: Domain) -> MetadataPort:
    """The domain's port as this module uses it: ``MetadataPort`` (mypy checks it)."""
    return dom.port
