"""A backup job's part of its run's crash record, and the cleanup it makes possible.

A running job records what its cleanup needs — its checkpoint, its files, its private
directories — in its run's record (:mod:`statecapture._journal`: a plain job's own record, or
the section of its direct backup sequence's record) before it starts, never while the guest
is frozen, so that after a crash or a kill :meth:`Domain.active_backup` and
:func:`statecapture.recover`, from any process, can end the job and remove what it never
delivered (:func:`recover_stale`). :class:`JobLog` is the job's writer of that section.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .. import _files, _qemuimg
from .._backup_plan import PUSH_STAGING, BackupPlan
from .._journal import OP_BACKUP, JobRecord, Journal, JournalWriter
from ..errors import CleanupError, LibvirtError, StateCaptureError, ToolError
from ..xml import BackupXML

if TYPE_CHECKING:
    from .._domain import Domain

__all__ = [
    "JobLog",
    "delete_checkpoint",
    "final_path",
    "publish",
    "recover_stale",
    "remove_dirs",
    "remove_file",
]


def remove_file(path: Path, errors: list[str]) -> bool:
    """Remove ``path``; ``True`` when a file was there and is gone now."""
    if not os.path.lexists(path):
        # Never created (on a read-only mount even unlinking a missing name fails: EROFS).
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        errors.append(f"remove {path}: {exc}")
        return False
    return True


def remove_dirs(dirs: Sequence[str], errors: list[str]) -> list[str]:
    """Remove the private directories ``dirs``; the ones that were there."""
    removed: list[str] = []
    for d in dirs:
        try:
            shutil.rmtree(d)
            removed.append(d)
        except FileNotFoundError:  # gone already (e.g. recover() removed it)
            pass
        except OSError as exc:
            errors.append(f"remove {d}: {exc}")
    return removed


def final_path(store: Path) -> Path:
    """Where the push target QEMU wrote at ``store`` goes: beside its staging directory."""
    if store.parent.name.startswith(PUSH_STAGING):
        return store.parent.parent / store.name
    return store


def publish(store: Path, final: Path) -> None:
    """Move a finished push target from its staging directory to its final name.

    Relative to both directories' descriptors, with ``RENAME_NOREPLACE``: a name that
    appeared meanwhile raises :class:`TargetExistsError` and is left untouched.
    """
    with (
        _files.Directory.open(final.parent, what="target_dir") as tdir,
        _files.Directory.open(store.parent, what="staging directory") as stage,
    ):
        tdir.rename_from(stage, store.name, final.name)
        tdir.fsync()


def _bitmap_missing(exc: ToolError) -> bool:
    """``qemu-img bitmap --remove`` failed because the image has no such bitmap."""
    return "not found" in exc.stderr.lower()


def delete_checkpoint(dom: Domain, name: str, errors: list[str]) -> bool:
    """Delete checkpoint ``name`` if it exists, bitmaps included; ``True`` when deleted.

    On a running domain libvirt deletes the bitmaps. When a shutdown ended the job (HAZARDS
    7) QEMU is gone and libvirt 9.0 cannot: the bitmaps (written into the qcow2 images at the
    clean close) are removed with ``qemu-img bitmap --remove``, then the metadata is dropped —
    never metadata alone, which would leave bitmaps behind (HAZARDS 3).
    """
    try:
        if name not in dom.checkpoints:
            return False
        cp = dom.checkpoints[name]
        if dom.is_active:
            cp.delete()
            return True
        definition = dom.definition
        for disk in cp.definition.tracked_disks:
            try:
                image = definition.disk(disk.name).source
            except KeyError:  # a hot-plugged disk that left with the live definition
                continue
            if image is None:
                continue
            try:
                _qemuimg.qemu_img("bitmap", "--remove", image, disk.bitmap or name)
            except ToolError as exc:
                if not _bitmap_missing(exc):
                    raise
        cp.delete(metadata_only=True)
    except StateCaptureError as exc:
        errors.append(f"delete checkpoint {name!r}: {exc}")
        return False
    return True


# --------------------------------------------------------------------------- the job's log


@attrs.define(eq=False)
class JobLog:
    """Writes a job's :class:`JobRecord` into its run's record.

    A plain job owns its record (``owns``: ending the job removes it); a direct backup's job
    writes the section of its sequence's record (ending it drops the section; the sequence
    clears its record when it commits). A job nobody recorded (started by another tool)
    writes nothing.
    """

    writer: JournalWriter | None
    job: JobRecord
    owns: bool

    @classmethod
    def start(cls, dom: Domain, plan: BackupPlan, writer: JournalWriter | None) -> JobLog:
        """Record the planned job before it starts (one metadata write)."""
        job = JobRecord(
            mode=plan.mode.value,
            label=plan.label,
            started=time.time(),
            checkpoint=plan.checkpoint,
            created_checkpoint=plan.checkpoint is not None,
            incremental_from=plan.incremental_from,
            files=tuple(str(d.store) for d in plan.disks) if plan.target_dir else (),
            dirs=tuple(str(p) for p in plan.private_dirs),
        )
        if writer is None:
            return cls(JournalWriter.begin(dom, OP_BACKUP, job=job), job, owns=True)
        writer.set_job(job)
        return cls(writer, job, owns=False)

    @classmethod
    def adopt(cls, dom: Domain, journal: Journal | None, xml: BackupXML) -> JobLog:
        """The log of a running job found on ``dom``: its recorded section when the record
        describes a job of the same mode, else an unrecorded ``leftover``."""
        if journal is not None and journal.job is not None and journal.job.mode == xml.mode.value:
            writer = JournalWriter.adopt(dom, journal)
            return cls(writer, journal.job, owns=journal.is_backup_job)
        job = JobRecord(
            mode=xml.mode.value,
            label="leftover",
            started=time.time(),
            incremental_from=xml.incremental,
        )
        return cls(None, job, owns=False)

    def _write(self, job: JobRecord) -> None:
        """An update of the running job's section (checked writes start and end it)."""
        if self.writer is not None:
            self.writer.set_job(job, check=False)
        self.job = job

    def add_files(self, *paths: Path) -> None:
        """Record ``paths`` as the job's files; a failed write raises (never suppressed)."""
        files = tuple(dict.fromkeys((*self.job.files, *(str(p) for p in paths))))
        self._write(attrs.evolve(self.job, files=files))

    def drop_files(self, *paths: Path) -> None:
        """Forget ``paths`` (not the job's after all); a failed write is ignored."""
        gone = {str(p) for p in paths}
        job = attrs.evolve(self.job, files=tuple(f for f in self.job.files if f not in gone))
        self.job = job
        with contextlib.suppress(LibvirtError):
            self._write(job)

    def mark_delivered(self) -> None:
        """Every disk is downloaded: the job's files and checkpoint are kept after a crash."""
        self._write(attrs.evolve(self.job, delivered=True))

    def close(self, errors: list[str]) -> None:
        """The job ended: remove its record (or its section); failures go to ``errors``."""
        if self.writer is None:
            return
        try:
            if self.owns:
                self.writer.finish()
            else:
                self.writer.set_job(None)
        except LibvirtError as exc:
            errors.append(f"clear the backup job's record: {exc}")


# --------------------------------------------------------------------------- stale records


def _push_delivered(files: Sequence[str]) -> bool:
    """Whether a dead run's push job left every target: each staged target is still in its
    staging directory, or was already moved to its final name. A final name counts only
    when it is recorded (the run records it before the move), so a file someone else put
    there never makes a job look delivered. Targets without staging (a job begun by an
    older statecapture) must all exist themselves."""
    recorded = set(files)
    staged = [Path(f) for f in files if final_path(Path(f)) != Path(f)]
    if not staged:
        return bool(files) and all(map(os.path.isfile, files))
    return all(
        p.is_file() or (str(final_path(p)) in recorded and final_path(p).is_file()) for p in staged
    )


def _publish_staged(files: Sequence[str], actions: list[str], errors: list[str]) -> None:
    """Move completed push targets still in their staging directory to their final names."""
    for f in files:
        final = final_path(Path(f))
        if final != Path(f) and os.path.isfile(f):
            try:
                publish(Path(f), final)
                actions.append(f"moved {f} to {final}")
            except (OSError, StateCaptureError) as exc:
                errors.append(f"move {f} to {final}: {exc}")


def recover_stale(dom: Domain, journal: Journal) -> list[str]:
    """Clean up after a plain job whose run died and whose job has ended since (no job runs
    now); ``journal`` is its record (:attr:`Journal.is_backup_job`).

    A push job that completed left every target (libvirt deletes the targets of a failed
    push job); a pull run marked its record delivered after its last download. Anything
    else never delivered: its checkpoint and files go, so no incremental builds on it.
    Returns what it did. The record is removed last, only when everything succeeded.
    """
    record = journal.job
    actions: list[str] = []
    errors: list[str] = []
    if record is not None:
        delivered = record.delivered or (record.mode == "push" and _push_delivered(record.files))
        if delivered:
            actions.append(
                f"the interrupted {record.mode} backup {record.label!r} had delivered every "
                "disk; kept its files and checkpoint"
            )
            if record.mode == "push":
                _publish_staged(record.files, actions, errors)
        else:
            cp = record.checkpoint
            if cp is not None and record.created_checkpoint and cp in dom.checkpoints:
                delete_checkpoint(dom, cp, errors)
                actions.append(f"deleted the checkpoint {cp!r} it created")
            for f in record.files:
                if os.path.lexists(f):
                    remove_file(Path(f), errors)
                    actions.append(f"removed {f}")
        actions += [f"removed {d}" for d in remove_dirs(record.dirs, errors)]
    if errors:
        raise CleanupError(
            f"cleaning up after an interrupted backup of {dom.name!r} failed (the record is "
            f"kept for a retry): {'; '.join(errors)}"
        )
    JournalWriter.adopt(dom, journal).finish()
    what = f"{record.mode} backup {record.label!r}" if record is not None else "backup"
    actions.append(f"cleared the stale record of the {what}")
    return actions
