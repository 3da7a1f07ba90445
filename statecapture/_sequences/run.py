"""The run skeleton both sequences share, shaped like a database transaction.

A :class:`Run` holds what every sequence needs: the journal (written before each step and
after it, never while the guest is frozen), the undo stack (each undo registered right after
its step — or before it, when it is state-driven — and run in reverse on any exception,
``KeyboardInterrupt`` included, a failing undo never masking the error), the pause watch
(lifecycle events) and a :class:`RunStatus`. ``commit()`` drops the undos and clears the
journal; leaving the ``with`` block without a commit rolls back. The checks both sequences
make before anything changes, and the capture inside the freeze, live here too.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

import attrs

from .._advisor import Consistency
from .._events import Event, EventKind
from .._freeze import FreezeStatus, fs_frozen
from .._freeze.agent import check_seconds
from .._journal import Journal, JournalWriter, boundary
from ..errors import (
    FreezeExpiredError,
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    ThawError,
    UnsupportedError,
    UsageError,
)

if TYPE_CHECKING:
    from .._backup import BackupJob
    from .._domain import Domain
    from .._ports import ProbePort

__all__ = [
    "SEQ_DIRECT",
    "SEQ_SNAPSHOT",
    "QuiesceMode",
    "Run",
    "RunStatus",
    "SequenceResult",
    "StepTiming",
]

SEQ_SNAPSHOT: Final = "backup_via_temporary_snapshot"
SEQ_DIRECT: Final = "direct_backup"

QuiesceMode = bool | Literal["best-effort"]

# --------------------------------------------------------------------------- values


@attrs.frozen
class StepTiming:
    """How long one step of a sequence took."""

    name: str
    """The step: ``snapshot``, ``copy``, ``commit``, ``pivot``, ``remove`` (temporary
    snapshot) or ``begin``, ``transfer``, ``end`` (direct backup)."""
    seconds: float
    """Wall time of the step (monotonic clock), journal writes excluded."""


@attrs.frozen
class SequenceResult:
    """What a sequence did: its files, its frozen window, its steps.

    ``frozen_for`` is the guest's frozen window as measured around the freeze (from the start
    of the freeze call to the return of the thaw call); ``None`` when nothing was frozen. Only
    the capture call (snapshot or backup start) runs inside it: the journal is written
    before the freeze and after the thaw.
    """

    sequence: str
    """``backup_via_temporary_snapshot`` or ``direct_backup``."""
    files: Mapping[str, Path]
    """Per disk target: the backup image (direct backup), or for the temporary snapshot
    what ``copy`` returned when it returned a mapping, else the images it was given."""
    frozen_for: float | None
    """Seconds the guest's filesystems were frozen; ``None`` when not frozen."""
    quiesced: bool
    """Whether the capture was taken inside a freeze that held until the capture was made."""
    consistency: Consistency
    """``APPLICATION`` when quiesced, ``CRASH`` otherwise."""
    guest_pause: float | None
    """Seconds the guest's vCPUs were paused during the sequence (from lifecycle events);
    ``None`` when they never were (neither sequence pauses the guest by itself)."""
    steps: tuple[StepTiming, ...]
    """Each journalled step, in order."""
    checkpoint: str | None = None
    """The checkpoint created with a direct backup (the base of the next incremental)."""
    notes: tuple[str, ...] = ()
    """Things worth knowing: a best-effort quiesce that fell back to crash-consistent ..."""

    @property
    def duration(self) -> float:
        """Sum of the step times, in seconds."""
        return sum(s.seconds for s in self.steps)

    def step(self, name: str) -> StepTiming:
        """The timing of step ``name``; :class:`NotFoundError` when it did not run."""
        for s in self.steps:
            if s.name == name:
                return s
        raise NotFoundError(f"the {self.sequence} run has no step {name!r}", operation="result")

    def __str__(self) -> str:
        frozen = f"{self.frozen_for * 1000:.0f} ms" if self.frozen_for is not None else "no"
        lines = [
            f"{self.sequence}: {self.consistency.value}-consistent, frozen {frozen}, "
            f"{self.duration:.2f} s",
            *(f"  {s.name:<9} {s.seconds:8.3f} s" for s in self.steps),
            *(f"  {disk}: {path}" for disk, path in self.files.items()),
        ]
        if self.checkpoint:
            lines.append(f"  checkpoint: {self.checkpoint}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _check_quiesce(quiesce: object) -> QuiesceMode:
    if quiesce is True or quiesce is False or quiesce == "best-effort":
        return quiesce
    raise UsageError(f"quiesce must be True, False or 'best-effort', got {quiesce!r}")


def _check_max_frozen(value: object) -> float:
    seconds = check_seconds("max_frozen", value)
    assert seconds is not None  # (None is refused unless allowed)
    return seconds


def _check_domain(dom: object, what: str) -> Domain:
    from .._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"{what}() needs a statecapture Domain, got {type(dom).__name__}")
    return dom


class Preflight(NamedTuple):
    """What the checks common to both sequences found."""

    freeze: bool
    notes: list[str]
    record: Journal | None
    """A dead plain backup job's record (the run settles it when it starts), or ``None``."""


def _preflight(dom: Domain, quiesce: QuiesceMode, operation: str) -> Preflight:
    """Checks common to both sequences, the domain's record read once among them."""
    from .._backup import unfinished_record

    dom._require_active(operation)
    record = unfinished_record(dom, operation)
    notes: list[str] = []
    if quiesce is False:
        return Preflight(False, notes, record)
    if dom.agent_connected:
        return Preflight(True, notes, record)
    if quiesce is True:
        raise GuestAgentError(
            f"refusing {operation} of domain {dom.name!r} with quiesce=True: its guest agent "
            "is not connected (no org.qemu.guest_agent.0 channel, or qemu-ga not answering "
            "yet; after a boot, wait with Domain.wait_for_agent()). Nothing was changed. Use "
            "quiesce='best-effort' or quiesce=False for a crash-consistent capture.",
            operation=operation,
            domain_name=dom.name,
        )
    notes.append(
        "quiesce='best-effort': the guest agent is not connected, so the capture is "
        "crash-consistent (taken without freezing the guest's filesystems)"
    )
    return Preflight(False, notes, record)


class _PauseWatch:
    """Sums the seconds the domain's vCPUs are paused, from lifecycle events."""

    def __init__(self) -> None:
        self.total = 0.0
        self.paused_at: float | None = None
        self.seen = False

    def __call__(self, event: Event) -> None:
        what = event.detail.get("event")
        if what == "suspended":
            self.seen = True
            if self.paused_at is None:
                self.paused_at = event.timestamp
        elif what in ("resumed", "stopped", "started") and self.paused_at is not None:
            self.total += max(0.0, event.timestamp - self.paused_at)
            self.paused_at = None

    def result(self) -> float | None:
        if not self.seen:
            return None
        extra = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        return self.total + extra


def _push_undo(
    stack: ExitStack, what: str, undo: Callable[[], object], failures: list[str]
) -> None:
    """Register ``undo`` so that its failure never masks the error being unwound.

    When ``undo`` returns a list of what it did, that list is noted on the error being
    unwound (``KeyboardInterrupt`` included), so the caller learns what was rolled back.
    """

    def _exit(
        et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            done = undo()
            if exc is not None and isinstance(done, list) and done:
                exc.add_note(
                    f"statecapture: rolled back after {type(exc).__name__} — {what}: "
                    + "; ".join(str(d) for d in done)
                )
        except BaseException as cleanup:
            # Recorded first, so the journal is kept for recover() whatever happens next.
            failures.append(f"{what}: {cleanup!r}")
            if exc is None or not isinstance(cleanup, Exception):
                raise  # nothing to attach to, or a second Ctrl-C: it wins
            exc.add_note(f"statecapture: undo failed — {what}: {cleanup}")
        return False

    stack.push(_exit)


def _journal_exit(
    writer: JournalWriter, failures: list[str]
) -> Callable[[type[BaseException] | None, BaseException | None, TracebackType | None], bool]:
    """The last undo to run: clear the journal when everything was undone, else keep it."""

    def _exit(
        et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, ThawError):
            # The guest may still be frozen: keep the journal (it says so) for recover().
            exc.add_note(
                f"statecapture: the journal of {writer.journal.sequence} stays in the domain's "
                "metadata; once the guest agent answers, statecapture.recover(dom) thaws"
            )
            return False
        if failures:
            if exc is not None:
                exc.add_note(
                    f"statecapture: the rollback of {writer.journal.sequence} on "
                    f"{writer.dom.name!r} is incomplete; the journal stays in the domain's "
                    "metadata: run statecapture.recover(dom) to finish it"
                )
            return False
        try:
            writer.finish()
        except Exception as cleanup:
            if exc is None:
                raise
            exc.add_note(
                f"statecapture: everything was undone but clearing the journal failed "
                f"({cleanup}); statecapture.recover(dom) clears it"
            )
        return False

    return _exit


def _capture(
    dom: Domain,
    step: str,
    action: Callable[[], None],
    *,
    freeze: bool,
    quiesce: QuiesceMode,
    max_frozen: float,
    notes: list[str],
) -> tuple[float | None, bool]:
    """Run the capture ``action`` inside a freeze when asked; (frozen_for, quiesced).

    Only ``action`` runs while the guest is frozen. ``quiesce='best-effort'`` falls back to a
    capture without freeze when the freeze is refused, and to crash-consistent when the
    freeze expired before the capture was made.
    """
    if not freeze:
        action()
        boundary(f"in:{step}:captured")
        return None, False
    scope = fs_frozen(dom, max_frozen=max_frozen)
    entered = False
    try:
        with scope:
            entered = True
            boundary(f"in:{step}:frozen")
            action()
            boundary(f"in:{step}:captured")
    except FreezeExpiredError as exc:
        if quiesce is True:
            raise
        notes.append(
            f"quiesce='best-effort': the freeze ended before the capture was confirmed "
            f"({exc}); treat the capture as crash-consistent"
        )
        return scope.frozen_for, False
    except LibvirtError as exc:
        if entered or quiesce is True or scope.status is FreezeStatus.THAW_FAILED:
            raise
        notes.append(
            f"quiesce='best-effort': freezing the guest's filesystems failed ({exc}); the "
            "capture is crash-consistent"
        )
        action()
        boundary(f"in:{step}:captured")
        return None, False
    return scope.frozen_for, True


def _running_backup(dom: Domain) -> BackupJob | None:
    """The domain's running backup job; ``None`` also where the driver has no backups."""
    from .._backup import active_backup

    try:
        return active_backup(dom)
    except UnsupportedError:
        return None


def _refuse_jobs(dom: Domain, operation: str, *, backup: bool = True) -> None:
    try:
        jobs = dom.block_jobs()
    except UnsupportedError:  # a driver without block jobs has none running
        jobs = ()
    for job in jobs:
        raise InvalidStateError(
            f"disk {job.disk!r} of {dom.name!r} has a {job.kind.value} block job running; "
            "end it first (Domain.block_jobs() lists it). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )
    if not backup:
        return
    running = _running_backup(dom)
    if running is not None:
        raise InvalidStateError(
            f"domain {dom.name!r} runs a {running.mode.value} backup job; end it first "
            "(Domain.active_backup().end()). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


def _require_api(dom: Domain, feature: str, api: str, operation: str) -> None:
    supported, evidence = _port(dom).probe_api(feature)
    if supported is False:
        raise UnsupportedError(
            f"{operation} on domain {dom.name!r}: the {dom.connection.driver} driver lacks "
            f"{api} ({evidence}). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


# --------------------------------------------------------------------------- the run


class RunStatus(enum.Enum):
    """Where a :class:`Run` is."""

    NEW = "new"
    RUNNING = "running"
    COMMITTED = "committed"
    """Every step succeeded; the journal is cleared."""
    ROLLED_BACK = "rolled back"
    """An error undid everything; the journal is cleared."""
    INCOMPLETE = "incomplete"
    """An undo failed (or the thaw did): the journal stays for ``recover()``."""


class Run:
    """One run of a sequence: journal, undo stack, pause watch and status.

    ::

        with Run(dom, SEQ_DIRECT, run_id=run_id, facts=facts) as run:
            run.on_undo("end the job", discard)      # state-driven: before the step
            with run.step("begin"):
                ...
            run.commit()
        result = run.result(files=..., frozen_for=..., quiesced=...)
    """

    def __init__(
        self,
        dom: Domain,
        sequence: str,
        *,
        run_id: str,
        facts: Mapping[str, str],
        record: Journal | EllipsisType | None = ...,
    ) -> None:
        self.dom = dom
        self.record = record
        """The record the preflight found (``...``: read it when the run starts)."""
        self.sequence = sequence
        self.run_id = run_id
        self.facts = dict(facts)
        self.status = RunStatus.NEW
        self.watch = _PauseWatch()
        self.failures: list[str] = []
        self._undo = ExitStack()
        self._events = ExitStack()
        self._writer: JournalWriter | None = None

    @property
    def writer(self) -> JournalWriter:
        """The run's journal writer (while the run is open)."""
        assert self._writer is not None, "the run has not started"
        return self._writer

    def __enter__(self) -> Run:
        from .._backup import settle_stale_record

        dom = self.dom
        self._events.enter_context(
            dom.connection.events.subscribe(
                self.watch, kind=EventKind.LIFECYCLE, domain_uuid=dom.uuid
            )
        )
        try:
            # A dead plain backup job's record is cleaned up first (there is one record).
            settle_stale_record(dom, self.sequence, self.record)
            self._writer = JournalWriter.begin(
                dom, self.sequence, run_id=self.run_id, facts=self.facts
            )
        except BaseException:
            self._events.close()
            raise
        self._undo.push(_journal_exit(self._writer, self.failures))
        self.status = RunStatus.RUNNING
        return self

    def on_undo(self, what: str, undo: Callable[[], object]) -> None:
        """Register ``undo`` (described as ``what``) to run if the run does not commit."""
        _push_undo(self._undo, what, undo, self.failures)

    def step(self, name: str) -> AbstractContextManager[None]:
        """Journal step ``name``: started before the block, done after it."""
        return self.writer.step(name)

    def stage(self, key: str, value: str | None) -> None:
        """Journal a fact now (``None`` removes it)."""
        self.writer.stage(key, value)

    def commit(self) -> None:
        """Every step succeeded: drop the undos and clear the journal."""
        self._undo.pop_all()
        self.writer.finish()
        self.status = RunStatus.COMMITTED

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._undo.__exit__(et, exc, tb)
        finally:
            self._events.close()
            if self.status is RunStatus.RUNNING:
                self.status = RunStatus.INCOMPLETE if self.failures else RunStatus.ROLLED_BACK

    def timings(self) -> Iterator[StepTiming]:
        """The journalled steps' wall times, in order."""
        for name, seconds in self.writer.timings:
            yield StepTiming(name, seconds)

    def result(
        self,
        *,
        files: Mapping[str, Path],
        frozen_for: float | None,
        quiesced: bool,
        checkpoint: str | None,
        notes: list[str],
    ) -> SequenceResult:
        """The :class:`SequenceResult` of a committed run."""
        return SequenceResult(
            sequence=self.sequence,
            files=files,
            frozen_for=frozen_for,
            quiesced=quiesced,
            consistency=Consistency.APPLICATION if quiesced else Consistency.CRASH,
            guest_pause=self.watch.result(),
            steps=tuple(self.timings()),
            checkpoint=checkpoint,
            notes=tuple(notes),
        )


def _port(dom: Domain) -> ProbePort:
    """The domain's port as this module uses it: ``ProbePort`` (mypy checks it)."""
    return dom.port
