"""The two sequences of libvirt's *domain state capture* guide, as single calls.

The guide ends with two ways to capture the disks of a running guest and leave it running
on its original disk files:

1. **Backup via temporary snapshot** (:func:`backup_via_temporary_snapshot`)::

       freeze → disk-only external snapshot → thaw → copy the frozen images
       → active commit per disk → READY event → pivot per disk → remove the overlays

2. **Direct backup** (:func:`direct_backup`)::

       freeze → backup begin (with a new checkpoint) → thaw
       → wait (push) or download over NBD (pull) → end the job

and warns that an interruption of the first leaves the domain tied to a temporary overlay
that needs manual clean-up. Here each sequence cleans up after itself:

* everything that can be refused is refused before anything changes (domain not running,
  no guest agent for ``quiesce=True``, an unfinished earlier run, a file in the way ...);
* every undo is registered on a :class:`contextlib.ExitStack` as soon as there is something
  to undo; any exception — ``KeyboardInterrupt`` included — undoes in reverse order, and a
  failing undo never masks the error that caused it (it is attached as a note);
* each step is journalled in the domain's own metadata before it starts and after it ends
  (:mod:`statecapture._journal`), so after a ``SIGKILL``, a power cut or a lost connection
  :func:`statecapture.recover` — from any process — finds the run and undoes it.

The undo of the temporary snapshot is *state-driven* (:func:`merge_overlay`): it looks at
what the domain runs on now and finishes whatever is left (commit, READY, pivot, remove),
so the same code serves the in-process rollback and :func:`~statecapture.recover`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from numbers import Real
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
from lxml import etree

from . import _files, _journal
from ._advisor import Consistency
from ._blockjob import BlockJob, BlockJobKind
from ._events import Event, EventKind
from ._freeze import FreezeStatus, fs_frozen
from ._journal import JournalWriter, boundary, read_journal
from .errors import (
    CleanupError,
    FreezeExpiredError,
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    ThawError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from .xml import (
    Disk,
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
)
from .xml._base import parse, serialize

if TYPE_CHECKING:
    from ._backup import BackupJob, BackupProgress
    from ._domain import Domain

__all__ = [
    "SEQ_DIRECT",
    "SEQ_SNAPSHOT",
    "SequenceResult",
    "StepTiming",
    "backup_via_temporary_snapshot",
    "direct_backup",
    "discard_backup",
    "merge_overlay",
]

SEQ_SNAPSHOT: Final = "backup_via_temporary_snapshot"
SEQ_DIRECT: Final = "direct_backup"

QuiesceMode = bool | Literal["best-effort"]

#: Seconds an active commit may take to become READY (a guest writing fast into the overlay
#: can delay convergence, HAZARDS 8) before the sequence gives up and undoes.
_COMMIT_TIMEOUT: Final = 600.0
#: Seconds a pivot may take to be confirmed by its end event.
_PIVOT_TIMEOUT: Final = 60.0

#: ``<image>.sc-<12 hex>.overlay.qcow2``: a temporary overlay made by statecapture.
OVERLAY_RE: Final = re.compile(r"\.sc-([0-9a-f]{12})\.overlay\.qcow2$")


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

    ``frozen_for`` is the guest's frozen window as measured around the freeze (from the end
    of the freeze call to the end of the thaw call); ``None`` when nothing was frozen. Only
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
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UsageError(f"max_frozen must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"max_frozen must be a positive number of seconds, got {value!r}")
    return seconds


def _check_domain(dom: object, what: str) -> Domain:
    from ._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"{what}() needs a statecapture Domain, got {type(dom).__name__}")
    return dom


def _refuse_unfinished(dom: Domain, operation: str) -> None:
    try:
        journal = read_journal(dom)
    except XMLError as exc:
        raise InvalidStateError(
            f"domain {dom.name!r} carries a damaged statecapture journal ({exc}); run "
            "statecapture.recover(dom) first. Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        ) from exc
    if journal is not None:
        raise InvalidStateError(
            f"domain {dom.name!r} has an {journal.describe()}; run statecapture.recover(dom) "
            "to undo it first. Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


def _preflight(dom: Domain, quiesce: QuiesceMode, operation: str) -> tuple[bool, list[str]]:
    """Checks common to both sequences; (freeze or not, notes)."""
    if not dom.is_active:
        raise InvalidStateError(
            f"{operation} needs a running domain; {dom.name!r} is {dom.state.value}",
            operation=operation,
            domain_name=dom.name,
        )
    _refuse_unfinished(dom, operation)
    notes: list[str] = []
    if quiesce is False:
        return False, notes
    if dom.agent_connected:
        return True, notes
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
    return False, notes


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


# --------------------------------------------------------------------------- overlays


def _live_disk(dom: Domain, target: str) -> Disk | None:
    for disk in dom.definition.disks:
        if disk.target == target:
            return disk
    return None


def _inactive_disk(dom: Domain, target: str) -> Disk | None:
    for disk in dom.inactive_definition.disks:
        if disk.target == target:
            return disk
    return None


def _commit_job(dom: Domain, disk: str, job: BlockJob | None) -> BlockJob:
    """The active commit that merges ``disk``'s overlay: ours, one left running, or new."""
    if job is not None and not job.ended:
        return job
    if dom._vir.block_job_info(disk) is not None:
        for running in dom.block_jobs():
            if running.disk != disk:
                continue
            if running.kind is BlockJobKind.ACTIVE_COMMIT:
                return running
            # Some other job on our temporary overlay (a copy left behind): end it first.
            running.abort()
    return dom.block_commit(disk, shallow=True)


def _redefine_disk(dom: Domain, target: str, source: str, fmt: str | None) -> None:
    """Point the persistent definition's ``target`` at ``source`` (dropping its chain)."""
    root = parse(dom._vir.xml_desc(inactive=True, secure=True), expected_root="domain")
    for el in root.iterfind("devices/disk"):
        tgt = el.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        src = el.find("source")
        if src is None:
            src = etree.SubElement(el, "source")
        for attr in ("file", "dev", "name", "volume"):
            if attr in src.attrib:
                del src.attrib[attr]
        src.set("file", source)
        el.set("type", "file")
        backing = el.find("backingStore")
        if backing is not None:
            el.remove(backing)
        if fmt:
            driver = el.find("driver")
            if driver is None:
                driver = etree.Element("driver", name="qemu")
                el.insert(0, driver)
            driver.set("type", fmt)
        break
    dom.connection._vir.define(serialize(root))


def _offline_merge(dom: Domain, disk: str, original: str, overlay: str, fmt: str | None) -> str:
    """Commit ``overlay`` into ``original`` with qemu-img while the domain is shut off."""
    from . import _nbd, _qemuimg

    info = _qemuimg.image_info(overlay)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing is not None and os.path.abspath(str(backing)) != os.path.abspath(original):
        raise CleanupError(
            f"the overlay {overlay} of disk {disk} is backed by {backing}, not {original}; "
            "not merging it"
        )
    _nbd.qemu_img("commit", "-q", "-f", "qcow2", overlay)
    _redefine_disk(dom, disk, original, fmt)
    return (
        f"{disk}: the domain is shut off: merged {overlay} into {original} with qemu-img "
        "commit and pointed the definition back at it"
    )


def merge_overlay(
    dom: Domain,
    disk: str,
    *,
    original: str,
    overlay: str,
    fmt: str | None = None,
    job: BlockJob | None = None,
    timeout: float = _COMMIT_TIMEOUT,
) -> list[str]:
    """Bring ``disk`` back onto ``original``: merge ``overlay`` into it and remove it.

    State-driven and idempotent: on a running domain that runs on the overlay, an active
    commit (``job``, one left running by a killed process, or a new one) is awaited to
    READY and pivoted; on a shut-off domain the overlay is committed with ``qemu-img`` and
    the definition repaired. The overlay file is removed once nothing uses it. Returns what
    was done; raises
    :class:`CleanupError` when the disk runs on something else.
    """
    actions: list[str] = []
    if dom.is_active:
        live = _live_disk(dom, disk)
        if live is None:
            raise CleanupError(f"domain {dom.name!r} has no disk {disk!r} any more")
        if live.source == overlay:
            below = live.backing[0].source if live.backing else None
            if below is not None and below != original:
                raise CleanupError(
                    f"disk {disk} runs on the overlay {overlay}, but its backing file is "
                    f"{below}, not {original}; not merging it"
                )
            commit = _commit_job(dom, disk, job)
            commit.wait_ready(timeout)
            commit.pivot(_PIVOT_TIMEOUT)
            actions.append(
                f"{disk}: merged {overlay} back into {original} (active commit, READY, pivot)"
            )
        elif overlay in live.chain:
            raise CleanupError(
                f"disk {disk} has {overlay} below its active image {live.source}; something "
                "layered on top of the temporary overlay: merge by hand"
            )
        elif live.source != original:
            raise CleanupError(
                f"disk {disk} runs on {live.source}, neither the original {original} nor the "
                f"overlay {overlay}; leaving it alone"
            )
        if dom.is_persistent:
            cfg = _inactive_disk(dom, disk)
            if cfg is not None and cfg.source == overlay:
                _redefine_disk(dom, disk, original, fmt)
                actions.append(f"{disk}: pointed the persistent definition back at {original}")
    else:
        cfg = _inactive_disk(dom, disk)
        if cfg is not None and cfg.source == overlay:
            actions.append(_offline_merge(dom, disk, original, overlay, fmt))
        elif cfg is not None and cfg.source != original:
            raise CleanupError(
                f"disk {disk} of the shut-off domain uses {cfg.source}, neither {original} nor "
                f"{overlay}; leaving it alone"
            )
    if os.path.lexists(overlay):
        try:
            os.unlink(overlay)
        except OSError as exc:
            raise CleanupError(f"could not remove the overlay {overlay}: {exc}") from exc
        actions.append(f"{disk}: removed {overlay}")
    return actions


@attrs.frozen
class _Overlay:
    disk: str
    original: str
    format: str | None
    overlay: str


def _plan_overlays(dom: Domain, overlay_dir: Path | None, run_id: str) -> tuple[_Overlay, ...]:
    plans: list[_Overlay] = []
    definition = dom.definition
    for disk in definition.disks:
        if disk.device != "disk" or disk.readonly or disk.snapshot == "no":
            continue
        if disk.type != "file" or not disk.source:
            raise UnsupportedError(
                f"disk {disk.target} of {dom.name!r} is not a local file ({disk.type}); "
                "backup_via_temporary_snapshot() makes file overlays only: use direct_backup()",
                operation=SEQ_SNAPSHOT,
                domain_name=dom.name,
            )
        if OVERLAY_RE.search(disk.source):
            raise InvalidStateError(
                f"disk {disk.target} of {dom.name!r} runs on a statecapture overlay "
                f"({disk.source}) left by an interrupted run; run statecapture.recover(dom)",
                operation=SEQ_SNAPSHOT,
                domain_name=dom.name,
            )
        source = Path(disk.source)
        directory = overlay_dir if overlay_dir is not None else source.parent
        overlay = directory / f"{source.name}.sc-{run_id[:12]}.overlay.qcow2"
        plans.append(_Overlay(disk.target, disk.source, disk.format, str(overlay)))
    if not plans:
        raise UsageError(f"domain {dom.name!r} has no writable disk to back up")
    for plan in plans:
        path = Path(plan.overlay)
        _files.check_free(path, "overlay")
        if not path.parent.is_dir():
            raise UsageError(f"the overlay directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"the overlay directory {path.parent} is not writable")
        # libvirtd/QEMU create the overlay by this path (HAZARDS 20)
        _files.require_trusted(path.parent, staged=False, what=f"overlay {path}")
    return tuple(plans)


def _refuse_jobs(dom: Domain, operation: str) -> None:
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
    try:
        running = dom.active_backup()
    except UnsupportedError:
        running = None
    if running is not None:
        raise InvalidStateError(
            f"domain {dom.name!r} runs a {running.mode.value} backup job; end it first "
            "(Domain.active_backup().end()). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


def _require_api(dom: Domain, feature: str, api: str, operation: str) -> None:
    supported, evidence = dom.connection._vir.probe_api(feature, dom._vir)
    if supported is False:
        raise UnsupportedError(
            f"{operation} on domain {dom.name!r}: the {dom.connection.driver} driver lacks "
            f"{api} ({evidence}). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


# --------------------------------------------------------------------------- sequence 1


def backup_via_temporary_snapshot(
    dom: Domain,
    copy: Callable[[Mapping[str, Path]], object],
    *,
    quiesce: QuiesceMode = True,
    overlay_dir: str | os.PathLike[str] | None = None,
    max_frozen: float = 10.0,
) -> SequenceResult:
    """Back up a running domain's disks through a temporary external snapshot.

    The guide's first sequence, in one call::

        freeze → disk-only external snapshot of every disk → thaw
        → copy(mapping of disk → frozen image)
        → active commit per disk → READY event → pivot per disk → remove the overlays

    ``copy`` receives a read-only mapping ``{"vda": Path(original image), ...}``: those
    images do not change while ``copy`` runs (the guest writes into temporary overlays), so
    copy them with any tool (``cp``, ``qemu-img convert -U``, rsync ...). When ``copy``
    returns a mapping of disk → backup file, it becomes :attr:`SequenceResult.files`.

    Afterwards the domain runs on its original files again, with everything it wrote
    meanwhile merged in, and the overlays are gone. On any error — an exception from
    ``copy``, ``KeyboardInterrupt``, a failed commit — the same happens before the error
    propagates. If the process dies instead, the journal left in the domain's metadata lets
    :func:`statecapture.recover` finish the job from any process.

    Overlays are ``<overlay_dir or the image's directory>/<image name>.sc-<run>.overlay.qcow2``,
    created by libvirt (one atomic snapshot, no snapshot metadata, never reusing a file).

    Refused before anything changes: a domain that is not running or is not on local
    file disks, ``quiesce=True`` without a connected guest agent (:class:`GuestAgentError`),
    an unfinished earlier run (:class:`InvalidStateError`: run :func:`~statecapture.recover`),
    a block or backup job in progress, an existing overlay file (:class:`TargetExistsError`),
    a driver without block commit (:class:`UnsupportedError`).

    Args:
        dom: a running domain.
        copy: called once with the frozen images; its exceptions roll everything back.
        quiesce: ``True`` freezes the guest's filesystems around the snapshot
            (application-consistent); ``"best-effort"`` does when the agent answers and
            falls back to crash-consistent, saying so in :attr:`SequenceResult.notes`;
            ``False`` never freezes.
        overlay_dir: where the temporary overlays go (default: next to each image).
        max_frozen: the freeze budget in seconds (see :func:`statecapture.fs_frozen`).
    """
    dom = _check_domain(dom, SEQ_SNAPSHOT)
    mode = _check_quiesce(quiesce)
    budget = _check_max_frozen(max_frozen)
    if not callable(copy):
        raise UsageError(f"copy must be a callable taking the mapping of images, got {copy!r}")
    odir: Path | None = None
    if overlay_dir is not None:
        odir = Path(overlay_dir).absolute()
        if not odir.is_dir():
            raise UsageError(f"overlay_dir {odir} is not a directory")
    freeze, notes = _preflight(dom, mode, SEQ_SNAPSHOT)
    _require_api(dom, "block_commit", "virDomainBlockCommit", SEQ_SNAPSHOT)
    _refuse_jobs(dom, SEQ_SNAPSHOT)
    run_id = _journal.new_run_id()
    plans = _plan_overlays(dom, odir, run_id)
    by_disk = {p.disk: p for p in plans}
    excluded = [d.target for d in dom.definition.disks if d.target not in by_disk]
    snapshot_xml = SnapshotXML(
        name=f"sc-{run_id[:12]}",
        description="statecapture temporary overlay (backup_via_temporary_snapshot)",
        memory=SnapshotMemory(SnapshotMemoryMode.NO),
        disks=tuple(
            SnapshotDisk(p.disk, SnapshotDiskMode.EXTERNAL, p.overlay, "qcow2") for p in plans
        )
        + tuple(SnapshotDisk(t, SnapshotDiskMode.NO) for t in excluded),
    ).to_xml()
    facts: dict[str, str] = {}
    for p in plans:
        facts[f"original:{p.disk}"] = p.original
        facts[f"overlay:{p.disk}"] = p.overlay
        if p.format:
            facts[f"format:{p.disk}"] = p.format

    watch = _PauseWatch()
    failures: list[str] = []
    jobs: dict[str, BlockJob] = {}
    with (
        dom.connection.events.subscribe(watch, kind=EventKind.LIFECYCLE, domain_uuid=dom.uuid),
        ExitStack() as undo,
    ):
        writer = JournalWriter.begin(dom, SEQ_SNAPSHOT, run_id=run_id, facts=facts)
        undo.push(_journal_exit(writer, failures))

        def merge_back() -> list[str]:
            # State-driven (see merge_overlay), so it is registered before the snapshot:
            # an interrupt between "snapshot made" and "undo registered" cannot leak it.
            problems: list[str] = []
            done: list[str] = []
            for p in reversed(plans):
                try:
                    # The planned overlay did not exist before the run (checked), so a file
                    # there now is the run's own, even when the snapshot call failed.
                    done += merge_overlay(
                        dom,
                        p.disk,
                        original=p.original,
                        overlay=p.overlay,
                        fmt=p.format,
                        job=jobs.get(p.disk),
                    )
                except Exception as exc:
                    problems.append(f"{p.disk}: {exc}")
            if problems:
                raise CleanupError(
                    f"merging the temporary overlays of {dom.name!r} back failed: "
                    + "; ".join(problems)
                )
            return done

        _push_undo(undo, "merge the temporary overlays back", merge_back, failures)

        def take_snapshot() -> None:
            dom._vir.snapshot_create(snapshot_xml, disk_only=True, atomic=True, no_metadata=True)

        if freeze:
            writer.stage("frozen", "1")
        with writer.step("snapshot"):
            frozen_for, quiesced = _capture(
                dom,
                "snapshot",
                take_snapshot,
                freeze=freeze,
                quiesce=mode,
                max_frozen=budget,
                notes=notes,
            )
            writer.stage("frozen", None)
            _owner_only(p.overlay for p in plans)

        bases = MappingProxyType({p.disk: Path(p.original) for p in plans})
        with writer.step("copy"):
            returned = copy(bases)

        with writer.step("commit"):
            for p in plans:
                jobs[p.disk] = dom.block_commit(p.disk, shallow=True)
                boundary(f"in:commit:{p.disk}")
            for p in plans:
                jobs[p.disk].wait_ready(_COMMIT_TIMEOUT)

        with writer.step("pivot"):
            for p in plans:
                jobs[p.disk].pivot(_PIVOT_TIMEOUT)
                boundary(f"in:pivot:{p.disk}")

        with writer.step("remove"):
            for p in plans:
                merge_overlay(dom, p.disk, original=p.original, overlay=p.overlay, fmt=p.format)

        undo.pop_all()
        writer.finish()

    files = _as_files(returned, bases)
    return SequenceResult(
        sequence=SEQ_SNAPSHOT,
        files=files,
        frozen_for=frozen_for,
        quiesced=quiesced,
        consistency=Consistency.APPLICATION if quiesced else Consistency.CRASH,
        guest_pause=watch.result(),
        steps=tuple(StepTiming(name, seconds) for name, seconds in writer.timings),
        checkpoint=None,
        notes=tuple(notes),
    )


def _owner_only(paths: Any) -> None:
    """Make the overlays owner-only; a failure raises :class:`CleanupError` (never ignored)."""
    _files.owner_only(paths, what="snapshot overlays")


def _as_files(returned: object, bases: Mapping[str, Path]) -> Mapping[str, Path]:
    if isinstance(returned, Mapping):
        try:
            return MappingProxyType({str(k): Path(v) for k, v in returned.items()})
        except TypeError:
            pass
    return bases


# --------------------------------------------------------------------------- sequence 2


def discard_backup(
    dom: Domain,
    *,
    job: BackupJob | None,
    checkpoint: str | None,
    files: Mapping[str, str] | None = None,
    adopt_checkpoint: str | None = None,
) -> list[str]:
    """Undo a backup run: end its job, delete its checkpoint, remove its files.

    State-driven and idempotent. ``job`` is the run's handle (``None``: adopt the running
    job when its checkpoint is ``adopt_checkpoint``, or any running job when that is
    ``None``). ``checkpoint`` and ``files`` must be the run's own (made by it).
    """
    from ._backup import RECORD_NS

    actions: list[str] = []
    if job is None and dom.is_active:
        try:
            running = dom.active_backup()
        except UnsupportedError:
            running = None
        if running is not None and (
            adopt_checkpoint is None
            or running.checkpoint
            in (
                None,
                adopt_checkpoint,
            )
        ):
            job = running
    if job is not None and job.running:
        job.discard()
        # What the job's own discard did (job ended, its checkpoint deleted, files removed).
        actions.extend(
            job._undone or [f"ended the {job.mode.value} backup job (abortJob, JOB_COMPLETED)"]
        )
    if checkpoint is not None:
        try:
            exists = checkpoint in dom.checkpoints
        except UnsupportedError:
            exists = False
        if exists:
            dom.checkpoints[checkpoint].delete()
            actions.append(f"deleted the checkpoint {checkpoint!r} the run created")
    problems: list[str] = []
    for what, path in sorted((files or {}).items()):
        if os.path.lexists(path):
            try:
                os.unlink(path)
                actions.append(f"removed {path} ({what})")
            except OSError as exc:
                problems.append(f"remove {path}: {exc}")
    if dom._vir.get_metadata(RECORD_NS) is not None:
        still: BackupJob | None = None
        if dom.is_active:
            with contextlib.suppress(UnsupportedError):
                still = dom.active_backup()
        if still is None:
            from ._backup import discard_stale_record

            for problem in discard_stale_record(dom):
                problems.append(problem)
            actions.append("cleared the stale backup record (and removed its private directories)")
    if problems:
        raise CleanupError(f"backup clean-up on {dom.name!r} failed: {'; '.join(problems)}")
    return actions


def _checkpoint_name(checkpoint: object, run_id: str) -> str | None:
    from .xml._checkpoint import check_checkpoint_name

    if checkpoint is True:
        return f"sc-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{run_id[:6]}"
    if checkpoint is False or checkpoint is None:
        return None
    if isinstance(checkpoint, str):
        return check_checkpoint_name(checkpoint)
    raise UsageError(f"checkpoint must be True, False or a name, got {checkpoint!r}")


def _plan_backup_files(
    dom: Domain,
    target_dir: Path,
    label: str | None,
    *,
    pull: bool,
    disks: Sequence[str] | None = None,
) -> dict[str, str]:
    """``file:vda`` / ``partial:vda`` → the paths this run will write (known label only)."""
    from ._backup import backup_file_name

    if label is None:
        return {}
    planned: dict[str, str] = {}
    for disk in dom.definition.disks:
        if disk.device != "disk" or disk.readonly or disk.source is None:
            continue
        if disks is not None and disk.target not in disks:
            continue
        name = backup_file_name(dom.name, disk.target, label)
        planned[f"file:{disk.target}"] = str(target_dir / name)
        if pull:
            planned[f"partial:{disk.target}"] = str(target_dir / f".{name}.partial")
    for path in planned.values():
        _files.check_free(path, "backup file")
    return planned


def _job_files(job: BackupJob, target_dir: Path, *, pull: bool) -> dict[str, str]:
    """``file:vda`` / ``partial:vda`` → the paths the started ``job`` writes."""
    from ._backup import backup_file_name

    files: dict[str, str] = {}
    for disk in job.disks:
        name = backup_file_name(job.domain.name, disk, job.label)
        files[f"file:{disk}"] = str(target_dir / name)
        if pull:
            files[f"partial:{disk}"] = str(target_dir / f".{name}.partial")
    return files


def _run_files(
    writer: JournalWriter, job: BackupJob | None, target_dir: Path, *, pull: bool
) -> dict[str, str]:
    """Every file the run planned or wrote (journalled, staged, or known from the job)."""
    files = {k: v for k, v in writer.journal.facts.items() if k.split(":")[0] in _FILE_KEYS}
    if job is not None:
        files.update(_job_files(job, target_dir, pull=pull))
    return files


_FILE_KEYS: Final = ("file", "partial")


def _check_previous(dom: Domain, target_dir: Path, incremental_from: str) -> None:
    """Pull + incremental: the previous images must be in ``target_dir`` already."""
    from ._backup import backup_file_name

    tracked = {d.name for d in dom.checkpoints[incremental_from].definition.tracked_disks}
    for disk in dom.definition.disks:
        if disk.target not in tracked:
            continue
        previous = target_dir / backup_file_name(dom.name, disk.target, incremental_from)
        if not previous.is_file():
            raise NotFoundError(
                f"an incremental pull backup of {disk.target} writes a layer on top of the "
                f"previous backup {previous}, which is missing. Nothing was changed.",
                operation=SEQ_DIRECT,
                domain_name=dom.name,
            )


def direct_backup(
    dom: Domain,
    target_dir: str | os.PathLike[str],
    *,
    mode: str = "push",
    incremental_from: str | None = None,
    checkpoint: bool | str = True,
    quiesce: QuiesceMode = True,
    max_frozen: float = 10.0,
    disks: Sequence[str] | None = None,
    progress: Callable[[BackupProgress], None] | None = None,
) -> SequenceResult:
    """Back up a running domain's disks with a backup job, frozen only for its start.

    The guide's second sequence, in one call::

        freeze → backup begin (with the new checkpoint) → thaw
        → wait for the push job, or download every disk over NBD (pull) → end the job

    Images land in ``target_dir`` as ``<domain>.<disk>.<checkpoint>.qcow2`` (owner-only,
    never replacing a file). ``checkpoint=True`` creates a checkpoint named
    ``sc-<UTC time>-<run>`` atomically with the job's start (a name: that name; ``False``:
    none); the next run passes it as ``incremental_from`` to copy only what changed.

    The domain definition never changes. On any error or ``KeyboardInterrupt`` the job is
    ended and its checkpoint and files removed before the error propagates, so the next
    incremental never builds on a bad base; after a crash :func:`statecapture.recover`
    does the same from the journal.

    Refused before anything changes: a domain that is not running, ``quiesce=True`` without
    a connected guest agent (:class:`GuestAgentError`), an unfinished earlier run, a
    running backup job or block job (:class:`InvalidStateError`), a driver without backup jobs
    (:class:`UnsupportedError`), an unknown ``incremental_from`` (:class:`NotFoundError`),
    an existing checkpoint name or image file (:class:`InvalidStateError`,
    :class:`TargetExistsError`), a ``target_dir`` nothing can be created in — a read-only
    mount, for example (:class:`UsageError`).

    Args:
        dom: a running domain.
        target_dir: an existing directory for the images.
        mode: ``"push"`` (QEMU writes the images) or ``"pull"`` (statecapture reads the
            disks over NBD while the job serves them).
        incremental_from: copy only blocks changed since this checkpoint.
        checkpoint: ``True`` (a generated name), a name, or ``False``.
        quiesce: as for :func:`backup_via_temporary_snapshot`.
        max_frozen: the freeze budget in seconds.
        disks: the disk targets to copy (default: every writable disk with an image).
        progress: called with :class:`BackupProgress` while the disks are copied.
    """
    from .xml import BackupMode

    dom = _check_domain(dom, SEQ_DIRECT)
    qmode = _check_quiesce(quiesce)
    budget = _check_max_frozen(max_frozen)
    try:
        bmode = BackupMode(mode)
    except ValueError:
        raise UsageError(f"mode must be 'push' or 'pull', not {mode!r}") from None
    pull = bmode is BackupMode.PULL
    tdir = Path(target_dir).absolute()
    if not tdir.is_dir():
        raise UsageError(f"target_dir {tdir} is not a directory")
    from ._backup import check_writable

    check_writable(tdir, "target_dir")  # pull and push: before any freeze, job or journal
    _checkpoint_name(checkpoint, "0" * 32)  # validates the argument
    if incremental_from is not None and not isinstance(incremental_from, str):
        raise UsageError(f"incremental_from must be a checkpoint name, got {incremental_from!r}")
    freeze, notes = _preflight(dom, qmode, SEQ_DIRECT)
    try:
        running = dom.active_backup()  # also the support probe (the test driver has none)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{exc}. Nothing was changed.", operation=SEQ_DIRECT) from exc
    if running is not None:
        raise InvalidStateError(
            f"domain {dom.name!r} already runs a {running.mode.value} backup job; end it "
            "first (Domain.active_backup().end()). Nothing was changed.",
            operation=SEQ_DIRECT,
            domain_name=dom.name,
        )
    _refuse_jobs(dom, SEQ_DIRECT)  # a block job: libvirt would refuse only after the freeze
    if incremental_from is not None:
        if incremental_from not in dom.checkpoints:
            raise NotFoundError(
                f"domain {dom.name!r} has no checkpoint {incremental_from!r} to back up from",
                operation=SEQ_DIRECT,
                domain_name=dom.name,
            )
        if pull:
            _check_previous(dom, tdir, incremental_from)
    run_id = _journal.new_run_id()
    cp_name = _checkpoint_name(checkpoint, run_id)
    if cp_name is not None and cp_name in dom.checkpoints:
        raise InvalidStateError(
            f"domain {dom.name!r} already has a checkpoint {cp_name!r}",
            operation=SEQ_DIRECT,
            domain_name=dom.name,
        )
    planned = _plan_backup_files(dom, tdir, cp_name, pull=pull, disks=disks)
    facts = {"mode": bmode.value, "target_dir": str(tdir), **planned}
    if cp_name is not None:
        facts["checkpoint"] = cp_name
    # Domain.backup() first cleans up after a plain backup run that died (its record); do it
    # now, so that clean-up never runs while the guest is frozen.
    from ._backup import _recover_stale

    _recover_stale(dom)

    watch = _PauseWatch()
    failures: list[str] = []
    holder: list[BackupJob] = []
    with (
        dom.connection.events.subscribe(watch, kind=EventKind.LIFECYCLE, domain_uuid=dom.uuid),
        ExitStack() as undo,
    ):
        writer = JournalWriter.begin(dom, SEQ_DIRECT, run_id=run_id, facts=facts)
        undo.push(_journal_exit(writer, failures))

        def discard() -> list[str]:
            files = _run_files(writer, holder[0] if holder else None, tdir, pull=pull)
            return discard_backup(
                dom,
                job=holder[0] if holder else None,
                checkpoint=cp_name,
                files=files,
                adopt_checkpoint=cp_name,
            )

        # Registered before the start (state-driven): a job that started just before an
        # interrupt is found and ended too.
        _push_undo(
            undo, "end the backup job and remove its checkpoint and files", discard, failures
        )

        def begin() -> None:
            holder.append(
                dom.backup(
                    mode=bmode,
                    incremental_from=incremental_from,
                    checkpoint=cp_name,
                    target_dir=None if pull else tdir,
                    disks=disks,
                )
            )

        if freeze:
            writer.stage("frozen", "1")
        with writer.step("begin"):
            frozen_for, quiesced = _capture(
                dom, "begin", begin, freeze=freeze, quiesce=qmode, max_frozen=budget, notes=notes
            )
            job = holder[0]
            writer.stage("frozen", None)
            writer.stage("label", job.label)
            for key, path in _job_files(job, tdir, pull=pull).items():
                writer.stage(key, path)

        reported: list[bool] = []

        def report(p: BackupProgress) -> None:
            if not reported:
                reported.append(True)
                boundary("mid:transfer")
            if progress is not None:
                progress(p)

        with writer.step("transfer"):
            if pull:
                job.download(tdir, progress=report)
            else:
                job.wait(progress=report)

        with writer.step("end"):
            result = job.end()
            if result is None:
                raise LibvirtError(
                    f"the backup job of {dom.name!r} ended without delivering every disk",
                    operation=SEQ_DIRECT,
                    domain_name=dom.name,
                )

        undo.pop_all()
        writer.finish()

    return SequenceResult(
        sequence=SEQ_DIRECT,
        files=MappingProxyType({d.disk: d.file for d in result.disks}),
        frozen_for=frozen_for,
        quiesced=quiesced,
        consistency=Consistency.APPLICATION if quiesced else Consistency.CRASH,
        guest_pause=watch.result(),
        steps=tuple(StepTiming(name, seconds) for name, seconds in writer.timings),
        checkpoint=cp_name,
        notes=tuple(notes),
    )
