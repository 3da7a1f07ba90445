"""The guide's second sequence: a direct backup, frozen only for the job's start.

::

    plan (one read of the domain) → journal → freeze → backup begin → thaw
    → wait (push) or download over NBD (pull) → end the job

The backup is planned (:func:`~statecapture._backup_plan.plan_backup`) before anything
changes; inside the freeze only ``virDomainBackupBegin`` runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from .. import _files, _journal
from .._backup import BackupJob, BackupProgress, BackupStart, require_local_nbd
from .._backup.record import remove_dirs
from .._backup_plan import (
    BackupPlan,
    backup_file_name,
    check_writable,
    parse_mode,
    partial_name,
    plan_backup,
)
from .._journal import Journal, boundary
from ..errors import (
    CleanupError,
    LibvirtError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from ..xml import BackupMode
from .run import (
    SEQ_DIRECT,
    QuiesceMode,
    Run,
    SequenceResult,
    _capture,
    _check_domain,
    _check_max_frozen,
    _check_quiesce,
    _preflight,
    _refuse_jobs,
    _running_backup,
)

if TYPE_CHECKING:
    from .._domain import Domain

__all__ = ["direct_backup", "discard_backup"]


# --------------------------------------------------------------------------- sequence 2


def discard_backup(
    dom: Domain,
    *,
    job: BackupJob | None,
    checkpoint: str | None,
    files: Mapping[str, str] | None = None,
    dirs: Sequence[str] = (),
    adopt_checkpoint: str | None = None,
) -> list[str]:
    """Undo a backup run: end its job, delete its checkpoint, remove its files and private
    directories.

    State-driven and idempotent. ``job`` is the run's handle (``None``: adopt the running
    job when its checkpoint is ``adopt_checkpoint``, or any running job when that is
    ``None``). ``checkpoint``, ``files`` and ``dirs`` must be the run's own (made by it).
    """
    actions: list[str] = []
    if job is None and dom.is_active:
        running = _running_backup(dom)
        if running is not None and (
            adopt_checkpoint is None or running.checkpoint in (None, adopt_checkpoint)
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
    actions += [f"removed {d} (private directory)" for d in remove_dirs(dirs, problems)]
    if problems:
        raise CleanupError(f"backup clean-up on {dom.name!r} failed: {'; '.join(problems)}")
    return actions


def _checkpoint_name(checkpoint: object, run_id: str) -> str | None:
    from ..xml._checkpoint import check_checkpoint_name

    if checkpoint is True:
        return f"sc-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{run_id[:6]}"
    if checkpoint is False or checkpoint is None:
        return None
    if isinstance(checkpoint, str):
        return check_checkpoint_name(checkpoint)
    raise UsageError(f"checkpoint must be True, False or a name, got {checkpoint!r}")


def _plan_files(plan: BackupPlan, target_dir: Path, *, pull: bool) -> dict[str, str]:
    """``file:vda`` / ``partial:vda`` → the paths this run will write (from the plan)."""
    planned: dict[str, str] = {}
    for disk in plan.disks:
        planned[f"file:{disk.disk}"] = str(target_dir / disk.file_name)
        if pull:
            planned[f"partial:{disk.disk}"] = str(target_dir / partial_name(disk.file_name))
    for path in planned.values():
        _files.check_free(path, "backup file")
    return planned


def _check_previous(dom: Domain, plan: BackupPlan, target_dir: Path) -> None:
    """Pull + incremental: the previous images must be in ``target_dir`` already."""
    for disk in plan.disks:
        if disk.incremental_from is None:
            continue
        previous = target_dir / backup_file_name(dom.name, disk.disk, disk.incremental_from)
        if not previous.is_file():
            raise NotFoundError(
                f"an incremental pull backup of {disk.disk} writes a layer on top of the "
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
    plan = _plan_direct(
        _check_domain(dom, SEQ_DIRECT),
        target_dir,
        mode=mode,
        incremental_from=incremental_from,
        checkpoint=checkpoint,
        quiesce=_check_quiesce(quiesce),
        max_frozen=_check_max_frozen(max_frozen),
        disks=disks,
    )
    return _execute(plan, progress)


@attrs.frozen
class _DirectPlan:
    """What a direct backup will do: checked and planned before anything changes."""

    dom: Domain
    backup: BackupPlan
    """The backup job's plan (one read of the domain)."""
    target_dir: Path
    run_id: str
    freeze: bool
    quiesce: QuiesceMode
    max_frozen: float
    files: Mapping[str, str]
    """``file:vda`` / ``partial:vda`` → the paths the run will write (recorded facts)."""
    notes: tuple[str, ...]
    record: Journal | None
    """A dead plain backup job's record the checks found (settled when the run starts)."""

    @property
    def pull(self) -> bool:
        return self.backup.mode is BackupMode.PULL

    @property
    def checkpoint(self) -> str | None:
        return self.backup.checkpoint

    def facts(self) -> dict[str, str]:
        """The run record's first facts."""
        facts = {
            "mode": self.backup.mode.value,
            "target_dir": str(self.target_dir),
            "label": self.backup.label,
            **self.files,
        }
        if self.checkpoint is not None:
            facts["checkpoint"] = self.checkpoint
        return facts


def _plan_direct(
    dom: Domain,
    target_dir: str | os.PathLike[str],
    *,
    mode: str,
    incremental_from: str | None,
    checkpoint: bool | str,
    quiesce: QuiesceMode,
    max_frozen: float,
    disks: Sequence[str] | None,
) -> _DirectPlan:
    """Every check :func:`direct_backup` makes, then its plan; nothing changes."""
    bmode = parse_mode(mode)
    pull = bmode is BackupMode.PULL
    if pull:  # the NBD export is a UNIX socket on the domain's host
        require_local_nbd(dom, SEQ_DIRECT)
    tdir = Path(target_dir).absolute()
    if not tdir.is_dir():
        raise UsageError(f"target_dir {tdir} is not a directory")
    if pull:  # (the plan checks a push target_dir)
        check_writable(tdir, "target_dir")  # before any freeze, job or journal
    _checkpoint_name(checkpoint, "0" * 32)  # validates the argument
    if incremental_from is not None and not isinstance(incremental_from, str):
        raise UsageError(f"incremental_from must be a checkpoint name, got {incremental_from!r}")
    freeze, notes, record = _preflight(dom, quiesce, SEQ_DIRECT)
    run_id = _journal.new_run_id()
    # One plan from one read of the domain: disks, file names, checkpoint and backup XML.
    try:
        plan = plan_backup(
            dom,
            mode=bmode,
            disks=disks,
            incremental_from=incremental_from,
            checkpoint=_checkpoint_name(checkpoint, run_id),
            target_dir=None if pull else tdir,
            active_checked=True,  # (the preflight refused a domain that is not running)
        )
    except UnsupportedError as exc:
        raise UnsupportedError(f"{exc}. Nothing was changed.", operation=SEQ_DIRECT) from exc
    # A block job: libvirt would refuse only after the freeze (the plan refused a backup job).
    _refuse_jobs(dom, SEQ_DIRECT, backup=False)
    if pull and incremental_from is not None:
        _check_previous(dom, plan, tdir)
    return _DirectPlan(
        dom=dom,
        backup=plan,
        target_dir=tdir,
        run_id=run_id,
        freeze=freeze,
        quiesce=quiesce,
        max_frozen=max_frozen,
        files=_plan_files(plan, tdir, pull=pull),
        notes=tuple(notes),
        record=record,
    )


def _execute(
    plan: _DirectPlan, progress: Callable[[BackupProgress], None] | None
) -> SequenceResult:
    """Carry out a direct backup's plan: record → freeze → backup begin → thaw → transfer
    → end, every step recorded before and after, any failure undone."""
    dom, cp_name, notes = plan.dom, plan.checkpoint, list(plan.notes)
    holder: list[BackupJob] = []
    with Run(dom, SEQ_DIRECT, run_id=plan.run_id, facts=plan.facts(), record=plan.record) as run:
        # The job records itself in the run's record; the plan was made just now (no
        # re-check). Its rollback (a failed or interrupted start) is reported by the
        # run's undo below.
        start = BackupStart(dom, plan.backup, note=False, writer=run.writer, recheck=False)

        def discard() -> list[str]:
            return start.undone + discard_backup(
                dom,
                job=holder[0] if holder else None,
                checkpoint=cp_name,
                files=plan.files,
                adopt_checkpoint=cp_name,
            )

        # Registered before the start (state-driven): a job that started just before an
        # interrupt is found and ended too. (The job's private directories are its own
        # to remove: BackupStart's rollback or the job's discard.)
        run.on_undo("end the backup job and remove its checkpoint and files", discard)

        if plan.freeze:
            run.stage("frozen", "1")
        with run.step("begin"):
            # Entering writes the job's section of the record and takes the lock; only the
            # capture call (virDomainBackupBegin) runs inside the freeze; leaving reads the
            # job back.
            with start:
                frozen_for, quiesced = _capture(
                    dom,
                    "begin",
                    start.begin,
                    freeze=plan.freeze,
                    quiesce=plan.quiesce,
                    max_frozen=plan.max_frozen,
                    notes=notes,
                )
            job = start.job
            holder.append(job)
            run.stage("frozen", None)

        reported: list[bool] = []

        def report(p: BackupProgress) -> None:
            if not reported:
                reported.append(True)
                boundary("mid:transfer")
            if progress is not None:
                progress(p)

        with run.step("transfer"):
            if plan.pull:  # (target_dir and the NBD socket's locality were checked)
                job._download(plan.target_dir, report, {})
            else:
                job.wait(progress=report)

        with run.step("end"):
            result = job.end()
            if result is None:
                raise LibvirtError(
                    f"the backup job of {dom.name!r} ended without delivering every disk",
                    operation=SEQ_DIRECT,
                    domain_name=dom.name,
                )

        run.commit()

    return run.result(
        files=MappingProxyType({d.disk: d.file for d in result.disks}),
        frozen_for=frozen_for,
        quiesced=quiesced,
        checkpoint=cp_name,
        notes=notes,
    )
