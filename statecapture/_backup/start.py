"""Starting a backup job, and finding one that runs: the execution of a :class:`BackupPlan`.

:func:`begin_backup` (what :meth:`Domain.backup` calls) plans the job unless it is given a
plan, then executes it with :class:`BackupStart`: everything that must come before the
capture — the job's record, the private directories, the event subscription, the domain's
lock — on entering, only ``virDomainBackupBegin`` in :meth:`BackupStart.begin` (inside a
freeze, only that runs), and the read-back on leaving. :func:`active_backup` adopts the
running job of any process from the domain's record.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from .. import _bitmaps, _files, _locks
from .._backup_plan import (
    BackupOptions,
    BackupPlan,
    plan_backup,
    refuse_running_job,
    unsupported,
)
from .._events import EventKind, Expectation
from .._journal import Journal, JournalWriter, read_journal
from ..errors import (
    CleanupError,
    InvalidStateError,
    LibvirtError,
    OperationTimeoutError,
    StateCaptureError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from ..xml import BackupMode, BackupXML
from .job import END_TIMEOUT, BackupJob, job_xml, rolled_back_note
from .record import JobLog, delete_checkpoint, recover_stale, remove_file

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import BackupPort

__all__ = [
    "BackupStart",
    "active_backup",
    "begin_backup",
    "start_backup",
    "settle_stale_record",
    "unfinished_record",
]


def active_backup(dom: Domain) -> BackupJob | None:
    """The domain's running backup job, or ``None``; works after a reconnect or a crash.

    The job's checkpoint, label, files and private directories come from the domain's
    record (a plain job's own, or its direct backup's), so ending the handle cleans up as
    the run that started it would have.
    """
    try:
        text = job_xml(dom)
    except UnsupportedError as exc:
        raise unsupported(dom, exc, "backup") from exc
    if text is None:
        return None
    xml = BackupXML.from_xml(text)
    journal: Journal | None
    try:
        journal = read_journal(dom)
    except XMLError:  # a damaged record must not hide the running job
        journal = None
    log = JobLog.adopt(dom, journal, xml)
    job = BackupJob(
        domain=dom,
        mode=xml.mode,
        checkpoint=log.job.checkpoint,
        incremental_from=log.job.incremental_from,
        xml=xml,
        log=log,
        adopted=True,
    )
    job._expectation()
    return job


def unfinished_record(dom: Domain, operation: str) -> Journal | None:
    """The domain's record as a new run finds it (one read): ``None``, or a plain backup
    job's record, which :func:`settle_stale_record` settles before the run writes its own.

    Refuses (:class:`InvalidStateError`, nothing changed) a sequence's unfinished record or
    a damaged one: :func:`statecapture.recover` must undo that first.
    """
    try:
        journal = read_journal(dom)
    except XMLError as exc:
        raise InvalidStateError(
            f"domain {dom.name!r} carries a damaged statecapture record ({exc}); run "
            "statecapture.recover(dom) first. Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        ) from exc
    if journal is not None and not journal.is_backup_job:
        raise InvalidStateError(
            f"domain {dom.name!r} has an {journal.describe()}; run statecapture.recover(dom) "
            "to undo it first. Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )
    return journal


def settle_stale_record(
    dom: Domain, operation: str, journal: Journal | EllipsisType | None = ...
) -> list[str]:
    """Before a new run writes its record (no backup job runs now): clean up after a plain
    job whose run died (:func:`~.record.recover_stale`); what it did.

    ``journal`` is what :func:`unfinished_record` returned moments ago (the run's planning
    read it); by default it is read now, with the same refusals.
    """
    if journal is ...:
        journal = unfinished_record(dom, operation)
    if journal is None:
        return []
    refuse_running_job(dom, job_xml(dom))  # its job runs: not stale (started meanwhile)
    return recover_stale(dom, journal)


def start_backup(
    dom: Domain, *, plan: BackupPlan | None = None, **options: Unpack[BackupOptions]
) -> BackupStart:
    """The :class:`BackupStart` of a job (see :meth:`Domain.backup_start`): planned from
    ``options`` (the arguments of :func:`plan_backup`) unless ``plan`` is given."""
    fresh = plan is None
    if plan is None:
        plan = plan_backup(dom, **options)
    elif not isinstance(plan, BackupPlan):
        raise UsageError(f"plan= takes a BackupPlan (dom.backup_plan(...)), not {plan!r}")
    elif any(
        value is not None and not (key == "mode" and value in (BackupMode.PUSH, "push"))
        for key, value in options.items()
    ):
        raise UsageError("pass either plan= or the backup's arguments, not both")
    return BackupStart(dom, plan, recheck=not fresh)


def begin_backup(
    dom: Domain, *, plan: BackupPlan | None = None, **options: Unpack[BackupOptions]
) -> BackupJob:
    """Start a backup job; see :meth:`Domain.backup`: plan it from ``options`` (the
    arguments of :func:`plan_backup`) unless ``plan`` is given, then execute the plan."""
    with start_backup(dom, plan=plan, **options) as start:
        start.begin()
    return start.job


class BackupStart:
    """The start of a planned backup job, as a context manager around the capture call.

    Made by :meth:`Domain.backup_start`. Entering does everything that must come *before*
    the capture — re-checks a plan made earlier (no job runs, the checkpoint is new),
    settles a dead run's record, makes the private directories, subscribes to
    ``JOB_COMPLETED``, takes the domain's lock, notes QEMU's bitmaps and writes the job's
    record — so that :meth:`begin` is ``virDomainBackupBegin`` and nothing else: put only
    :meth:`begin` inside your :func:`~statecapture.fs_frozen` block. Leaving reads the job
    back and releases the lock; then :attr:`job` is the running :class:`BackupJob`.
    Leaving by an exception, or without a successful :meth:`begin`, undoes everything
    (the record, the directories, a checkpoint or half-started job) and :attr:`job` stays
    unset; :attr:`undone` lists what was undone.

    .. code-block:: python

        plan = dom.backup_plan(mode="pull", checkpoint="nightly-1")
        with dom.backup_start(plan) as start:   # record, directories, lock: not frozen
            with fs_frozen(dom):
                start.begin()                   # only virDomainBackupBegin is frozen
        with start.job as job:
            job.download(target)
    """

    def __init__(
        self,
        dom: Domain,
        plan: BackupPlan,
        *,
        note: bool = True,
        writer: JournalWriter | None = None,
        recheck: bool = True,
    ) -> None:
        self.dom = dom
        self.plan = plan
        self.note = note
        self.writer = writer
        self.recheck = recheck
        self.undone: list[str] = []
        """What a rollback undid (noted on the error unless ``note=False``)."""
        self._job: BackupJob | None = None
        self._stack = contextlib.ExitStack()
        self._made: list[Path] = []
        self._exp: Expectation | None = None
        self._before: dict[str, Any] | None = None
        self._log: JobLog | None = None
        self._entered = False
        self._begun = False

    def __repr__(self) -> str:
        state = "started" if self._job is not None else "begun" if self._begun else "prepared"
        return f"<BackupStart {self.plan.mode.value} of {self.dom.name!r}: {state}>"

    @property
    def job(self) -> BackupJob:
        """The started job (after a successful exit)."""
        if self._job is None:
            raise InvalidStateError("the backup job has not started", operation="backup")
        return self._job

    def _check(self) -> None:
        """The plan still fits the domain; a dead plain job's record is settled."""
        dom, plan = self.dom, self.plan
        if plan.domain_uuid != dom.uuid:
            raise UsageError(f"this plan is for domain {plan.domain!r}, not {dom.name!r}")
        if self.recheck:
            refuse_running_job(dom)
            if plan.checkpoint is not None and plan.checkpoint in dom.checkpoints:
                raise InvalidStateError(
                    f"domain {dom.name!r} already has a checkpoint {plan.checkpoint!r}",
                    operation="backup",
                    domain_name=dom.name,
                )
        if self.writer is None:
            settle_stale_record(dom, "backup")

    def __enter__(self) -> BackupStart:
        dom, plan = self.dom, self.plan
        self._check()
        try:
            for d in plan.private_dirs:
                with _files.Directory.open(d.parent, what="directory") as parent:
                    parent.private(d.name).close()
                self._made.append(d)
            self._exp = dom.connection.events.expect(
                kind=EventKind.JOB_COMPLETED, domain_uuid=dom.uuid
            )
            # The start window holds the domain's lock: checkpoint operations and block-node
            # queries must not overlap it (HAZARDS 21).
            self._stack.enter_context(_locks.domain_lock(dom.uuid, "backup begin"))
            # A checkpoint made with the job must leave no bitmap if the start fails
            # (HAZARDS 19): note QEMU's bitmaps first (one QMP query, a few ms).
            if plan.checkpoint_xml is not None:
                self._before = _bitmaps.query_or_none(dom)
            # Record first, so a crash right after the start can be cleaned up.
            self._log = JobLog.start(dom, plan, self.writer)
        except BaseException as exc:
            self._rollback(exc)
            raise
        self._entered = True
        return self

    def begin(self) -> None:
        """``virDomainBackupBegin`` with the plan's XML: the capture call, nothing else.

        Call it once, inside the ``with`` block (:class:`UsageError` otherwise, before any
        libvirt call).
        """
        if not self._entered or self._job is not None:
            raise UsageError("BackupStart.begin() runs inside its with block")
        if self._begun:
            raise UsageError("BackupStart.begin() runs once: this job has started")
        try:
            _port(self.dom).backup_begin(self.plan.backup_xml, self.plan.checkpoint_xml)
        except UnsupportedError as exc:
            raise unsupported(self.dom, exc, "backup") from exc
        self._begun = True

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        if exc is not None:
            self._rollback(exc)
            return
        if not self._begun:
            self._rollback(None)
            return
        dom, plan = self.dom, self.plan
        try:
            text = job_xml(dom)
            if plan.target_dir is not None:
                _files.owner_only([d.store for d in plan.disks], what="backup target")
        except BaseException as error:
            self._rollback(error)
            raise
        self._stack.close()
        assert self._log is not None
        self._job = BackupJob(
            domain=dom,
            mode=plan.mode,
            checkpoint=plan.checkpoint,
            incremental_from=plan.incremental_from,
            # A push job of tiny disks can end before we ask; the event is queued.
            xml=BackupXML.from_xml(text if text is not None else plan.backup_xml),
            log=self._log,
            expect=self._exp,
        )

    def _end_half_started(self, undone: list[str], errors: list[str]) -> None:
        """End a job the failed start may have left running."""
        assert self._exp is not None
        dom = self.dom
        try:
            if job_xml(dom) is not None:
                try:
                    _port(dom).backup_abort_job()
                except LibvirtError:
                    # a push job of tiny disks can complete between the two calls ("no job
                    # is active"): only a job still there is a failure to end it
                    if job_xml(dom) is not None:
                        raise
                    undone.append("ended the half-started backup job (it completed first)")
                else:
                    undone.append("ended the half-started backup job (abortJob)")
                    with contextlib.suppress(OperationTimeoutError):
                        self._exp.wait(END_TIMEOUT, what="JOB_COMPLETED")
        except LibvirtError as e:
            errors.append(f"end the half-started job: {e}")
        self._exp.close()

    def _rollback(self, exc: BaseException | None) -> None:
        """Undo a failed start: any job, the checkpoint if it was made, files, the record,
        the private directories. What was undone is noted on ``exc`` (Ctrl-C too); with no
        ``exc`` (left without :meth:`begin`) a cleanup failure raises :class:`CleanupError`."""
        dom, plan = self.dom, self.plan
        errors: list[str] = []
        undone: list[str] = []
        try:
            if self._exp is not None:
                self._end_half_started(undone, errors)
            if self._log is not None:
                cp = plan.checkpoint
                if cp is not None and delete_checkpoint(dom, cp, errors):
                    undone.append(f"deleted the checkpoint {cp!r} made with it")
                removed = [str(d.store) for d in plan.disks if remove_file(d.store, errors)]
                if removed:
                    undone.append(f"removed {', '.join(removed)}")
                self._log.close(errors)
                if self._before is not None:
                    from .._checkpoint import remove_orphan_bitmaps

                    sink = exc if exc is not None else StateCaptureError("unstarted backup")
                    remove_orphan_bitmaps(dom, self._before, sink)
                    if exc is None:
                        errors.extend(getattr(sink, "__notes__", ()))
            for d in self._made:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            self._stack.close()
        self.undone = undone
        if exc is None:
            if errors:
                raise CleanupError(
                    f"undoing the unstarted backup of {dom.name!r} left something behind: "
                    + "; ".join(errors)
                )
            return
        if self.note:
            rolled_back_note(dom, exc, undone)
        if errors:
            exc.add_note(
                f"cleanup after the failed start left something behind: {'; '.join(errors)}"
            )


def _port(dom: Domain) -> BackupPort:
    """The domain's port as this module uses it: ``BackupPort`` (mypy checks it)."""
    return dom.port
