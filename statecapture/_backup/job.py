"""The handle of a running (or finished) backup job: :class:`BackupJob`.

Its state, its progress, the wait for a push job, the download of a pull job (the work is in
``push.py`` and ``download.py``), and its end: ``abortJob()`` + ``JOB_COMPLETED``, and the
removal of whatever a job that did not deliver every disk left behind.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs

from .. import _files, _locks
from .._backup_plan import check_writable
from .._events import EventKind, Expectation
from ..errors import (
    CleanupError,
    InvalidStateError,
    LibvirtError,
    OperationTimeoutError,
    UnsupportedError,
    UsageError,
)
from ..xml import BackupMode, BackupXML, DiskBackupMode
from .download import download_into
from .push import push_result
from .record import JobLog, delete_checkpoint, final_path, remove_dirs, remove_file
from .values import BackupExport, BackupProgress, BackupResult, ProgressCallback

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import BackupPort

__all__ = ["END_TIMEOUT", "BackupJob", "job_xml", "require_local_nbd", "rolled_back_note"]

END_TIMEOUT: Final = 60.0
"""Seconds to wait for ``JOB_COMPLETED`` after ``abortJob()``."""


def require_local_nbd(dom: Domain, operation: str) -> None:
    """Refuse a pull-mode read over a remote connection (its NBD socket is on that host)."""
    if dom.connection.is_remote:
        raise UnsupportedError(
            f"{operation} of {dom.name!r} over the remote URI {dom.connection.uri} refused: "
            "a pull backup's NBD export is a UNIX socket on the domain's own host, which "
            "this process cannot reach. Run it on that host (e.g. by the host's "
            "statecapture.fleet Dask worker), or use mode='push' (QEMU writes the images on "
            "that host). Nothing was changed.",
            operation=operation,
            domain_name=dom.name,
        )


def rolled_back_note(dom: Domain, exc: BaseException, undone: list[str]) -> None:
    """Tell the caller, on the error itself, what the rollback undid (a Ctrl-C included)."""
    if undone:
        exc.add_note(
            f"statecapture: rolled back the backup of {dom.name!r} after "
            f"{type(exc).__name__}: {'; '.join(undone)}"
        )


def job_xml(dom: Domain) -> str | None:
    """The running job's XML; ``None`` when there is none (also: the domain stopped)."""
    try:
        return _port(dom).backup_xml_desc()
    except InvalidStateError:
        if not dom.is_active:  # a shutdown ended the job (HAZARDS 7)
            return None
        raise


@attrs.define(eq=False)
class BackupJob:
    """A running (or finished) backup job of one domain. Made by :meth:`Domain.backup`.

    Use it as a context manager: leaving the block ends the job in every case — it waits for
    a push job to finish, ends a pull job, waits for the ``JOB_COMPLETED`` event, and removes
    scratch files. A job that did not deliver every disk (failed, cancelled, a pull job not
    fully downloaded) also removes the checkpoint it created and the files it wrote; so does
    leaving the block by an exception while the job still runs (:meth:`discard`)::

        with dom.backup(mode="push", target_dir="/backups", checkpoint="cp1") as job:
            result = job.wait(progress=print)
    """

    domain: Domain
    """The domain being backed up."""
    mode: BackupMode
    """Push or pull."""
    checkpoint: str | None
    """The checkpoint created with the job (``None``: none, or unknown for a leftover job)."""
    incremental_from: str | None
    """The checkpoint incremental disks start from."""
    xml: BackupXML = attrs.field(repr=False)
    """The job's ``<domainbackup>`` as libvirt reports it."""
    _log: JobLog = attrs.field(repr=False)
    _expect: Expectation | None = attrs.field(default=None, repr=False)
    _state: str = "running"
    _result: BackupResult | None = attrs.field(default=None, repr=False)
    _transfer: dict[str, tuple[int, int]] = attrs.field(factory=dict, repr=False)
    _undone: list[str] = attrs.field(factory=list, init=False, repr=False)
    adopted: bool = False
    """Whether the job was found by :meth:`Domain.active_backup` rather than started here."""

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """``running``, ``completed`` (delivered every disk), ``failed`` or ``ended``."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the job still runs in libvirt."""
        return self._state == "running"

    @property
    def label(self) -> str:
        """The label in this job's file names (the checkpoint's name, or a time stamp)."""
        return self._log.job.label

    @property
    def disks(self) -> tuple[str, ...]:
        """The disks the job copies."""
        return tuple(d.name for d in self.xml.backed_up)

    def disk_mode(self, disk: str) -> DiskBackupMode:
        """Whether disk ``disk`` is copied in full or incrementally."""
        return self.xml.disk_mode(disk)

    @property
    def targets(self) -> dict[str, Path]:
        """Push mode: the file each disk's backup ends up in (in ``target_dir``).

        While the job runs QEMU writes it in a private staging directory inside
        ``target_dir``; :meth:`wait` moves it to this name when the job has completed.
        """
        return {d.name: final_path(Path(d.store)) for d in self.xml.backed_up if d.store}

    @property
    def result(self) -> BackupResult | None:
        """What the job produced, once :meth:`wait`/:meth:`download` finished."""
        return self._result

    # ------------------------------------------------------------------ progress
    def progress(self) -> BackupProgress:
        """The job's progress now (libvirt's job statistics; pull adds downloaded bytes)."""
        elapsed = time.time() - self._log.job.started
        if not self.running:
            done = self._result.bytes_written if self._result is not None else 0
            return BackupProgress(done, done, elapsed)
        stats = _port(self.domain).backup_job_stats()
        if self.mode is BackupMode.PUSH:
            return BackupProgress(
                int(stats.get("disk_processed", 0)), int(stats.get("disk_total", 0)), elapsed
            )
        return BackupProgress(
            sum(done for done, _t in self._transfer.values()),
            sum(total for _d, total in self._transfer.values()),
            elapsed,
            temp_used=int(stats.get("disk_temp_used", 0)),
            temp_total=int(stats.get("disk_temp_total", 0)),
        )

    # ------------------------------------------------------------------ push
    def wait(
        self, progress: ProgressCallback | None = None, *, timeout: float | None = None
    ) -> BackupResult:
        """Push mode: wait until every target file is written and usable; the result.

        ``progress(BackupProgress)`` is called about twice a second. A failed or cancelled
        job raises :class:`LibvirtError` after removing its checkpoint and target files;
        ``timeout`` raises :class:`OperationTimeoutError` and leaves the job running.
        """
        if self.mode is not BackupMode.PUSH:
            raise UsageError("wait() is for push-mode jobs; a pull job is read with download()")
        if self._result is not None:
            return self._result
        if not self.running:
            raise InvalidStateError(f"the backup job has {self._state}", operation="backup wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        stats = self._await_end(progress, deadline)
        return self._finish_push(stats)

    def _await_end(
        self, progress: ProgressCallback | None, deadline: float | None
    ) -> dict[str, Any]:
        """Wait for JOB_COMPLETED (or the job's disappearance); its stats."""
        exp = self._expectation()
        while True:
            remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if remaining <= 0:
                raise OperationTimeoutError(
                    f"backup job of {self.domain.name!r} still running",
                    operation="backup wait",
                    domain_name=self.domain.name,
                )
            with contextlib.suppress(OperationTimeoutError):
                event = exp.wait(remaining, what="JOB_COMPLETED")
                return dict(event.detail.get("stats", {}))
            if job_xml(self.domain) is None:
                # Ended while we looked away (the event was emitted before libvirt forgot the
                # job, so it is queued unless we subscribed late): take the completed stats.
                event_now = exp.poll()
                if event_now is not None:
                    return dict(event_now.detail.get("stats", {}))
                try:
                    return _port(self.domain).backup_job_stats(completed=True)
                except LibvirtError:
                    return {}
            if progress is not None:
                with contextlib.suppress(LibvirtError):
                    progress(self.progress())

    def _expectation(self) -> Expectation:
        if self._expect is None:
            self._expect = self.domain.connection.events.expect(
                kind=EventKind.JOB_COMPLETED, domain_uuid=self.domain.uuid
            )
        return self._expect

    def _finish_push(self, stats: Mapping[str, Any]) -> BackupResult:
        self._state = "ended"
        if "success" in stats:
            success = bool(stats["success"]) and not stats.get("errmsg")
        else:  # completed-job stats: type 3 is VIR_DOMAIN_JOB_COMPLETED
            success = stats.get("type") == 3
        if not success:
            why = stats.get("errmsg") or "the job was cancelled or failed"
            err = LibvirtError(
                f"push backup of {self.domain.name!r} failed: {why}",
                operation="backup",
                domain_name=self.domain.name,
            )
            self._fail_cleanup(err)
            raise err
        try:
            result = push_result(self)
        except BaseException as exc:
            self._fail_cleanup(exc)
            raise
        self._state = "completed"
        self._result = result
        self._close_record()
        return result

    # ------------------------------------------------------------------ pull
    @property
    def exports(self) -> tuple[BackupExport, ...]:
        """Pull mode: how to read each disk (socket, export name, dirty-bitmap context)."""
        if self.mode is not BackupMode.PULL:
            raise UsageError("exports exist only for pull-mode jobs")
        server = self.xml.server
        assert server is not None and server.socket is not None
        out = []
        for bd in self.xml.backed_up:
            mode = self.xml.disk_mode(bd.name)
            out.append(
                BackupExport(
                    disk=bd.name,
                    socket=server.socket,
                    export_name=bd.export_name or bd.name,
                    bitmap_context=bd.dirty_bitmap_context
                    if mode is DiskBackupMode.INCREMENTAL
                    else None,
                    mode=mode,
                    incremental_from=self.xml.disk_checkpoint(bd.name),
                )
            )
        return tuple(out)

    def download(
        self,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        previous: Mapping[str, str | os.PathLike[str]] | None = None,
        client: str | None = None,
    ) -> BackupResult:
        """Pull mode: copy every disk into ``dest_dir`` as qcow2 images; the result.

        A full disk becomes a standalone image with its allocated data (zeros and holes
        skipped). An incremental disk becomes a qcow2 layer holding only the dirty extents,
        whose backing file is the previous backup: by default the file statecapture named
        after ``incremental_from`` in ``dest_dir``; ``previous={"vda": path}`` overrides it.
        Files are named ``<domain>.<disk>.<label>.qcow2`` and never replace existing ones.
        ``progress(BackupProgress)`` gets per-disk byte counts. ``client`` forces
        ``"libnbd"`` or ``"qemu-img"`` (default: libnbd when its binding loads).
        """
        if self.mode is not BackupMode.PULL:
            raise UsageError("download() is for pull-mode jobs; a push job is awaited with wait()")
        require_local_nbd(self.domain, "pull download")
        if self._result is not None:
            return self._result
        if not self.running:
            raise InvalidStateError(
                f"the backup job has {self._state}; nothing left to download",
                operation="backup download",
            )
        if not Path(dest_dir).is_dir():
            raise UsageError(f"dest_dir {dest_dir} is not a directory")
        check_writable(Path(dest_dir), "dest_dir")
        previous = dict(previous or {})
        unknown = set(previous) - set(self.disks)
        if unknown:
            raise UsageError(f"previous= names disks the job does not copy: {sorted(unknown)}")
        return self._download(Path(dest_dir), progress, previous, client)

    def _download(
        self,
        dest_dir: Path,
        progress: ProgressCallback | None,
        previous: Mapping[str, str | os.PathLike[str]],
        client: str | None = None,
    ) -> BackupResult:
        """:meth:`download` once its arguments are checked (a sequence checked them)."""
        with _files.Directory.open(dest_dir, what="dest_dir") as ddir:
            disks = download_into(self, ddir, progress, previous, client)
        result = BackupResult(
            self.domain.name,
            self.mode,
            self.checkpoint,
            self.incremental_from,
            disks,
            time.time() - self._log.job.started,
        )
        self._log.mark_delivered()
        self._result = result
        return result

    def _add_files(self, *paths: Path) -> None:
        """Record ``paths`` as this job's files; a failed write raises (never suppressed)."""
        self._log.add_files(*paths)

    # ------------------------------------------------------------------ ending
    def end(self, *, timeout: float = END_TIMEOUT) -> BackupResult | None:
        """End the job now; idempotent. Returns the result when the job delivered every disk.

        A running push job is cancelled; a pull job is ended (``abortJob()``). Either way
        statecapture waits for ``JOB_COMPLETED`` (HAZARDS 16) and removes scratch files. When
        the job did not deliver every disk, its checkpoint and files are removed too, and
        ``None`` is returned. A failing cleanup step raises :class:`CleanupError`.
        """
        return self._end(discard=False, timeout=timeout)

    def discard(self, *, timeout: float = END_TIMEOUT) -> None:
        """End the job and remove everything it made: checkpoint, files, scratch.

        What leaving the ``with`` block by an exception does while the job still runs.
        """
        self._end(discard=True, timeout=timeout)

    def _end(self, *, discard: bool, timeout: float) -> BackupResult | None:
        if not self.running:
            return self._result
        if not discard and self.mode is BackupMode.PUSH and job_xml(self.domain) is None:
            # The push job finished by itself: take its outcome instead of discarding it.
            stats = self._await_end(None, time.monotonic() + timeout)
            try:
                return self._finish_push(stats)
            except LibvirtError:
                return None
        delivered = not discard and self.mode is BackupMode.PULL and self._result is not None
        self._abort_and_wait(timeout)
        self._state = "ended"
        if delivered:
            self._state = "completed"
            self._close_record()
            return self._result
        self._result = None
        self._fail_cleanup(None)
        return None

    def _abort_and_wait(self, timeout: float) -> None:
        # The end window (abortJob up to JOB_COMPLETED, when libvirt removes the job's
        # scratch nodes) holds the domain's lock (HAZARDS 21).
        with _locks.domain_lock(self.domain.uuid, "backup end"):
            self._abort_and_wait_locked(timeout)

    def _abort_and_wait_locked(self, timeout: float) -> None:
        vir = _port(self.domain)
        exp = self._expectation()
        if job_xml(self.domain) is None:
            return
        try:
            vir.backup_abort_job()
        except InvalidStateError:
            # "no job is active": it ended between our check and the abort.
            if job_xml(self.domain) is not None:
                raise
            return
        self._undone.append(f"ended the running {self.mode.value} backup job (abortJob)")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OperationTimeoutError):
                exp.wait(0.25, what="JOB_COMPLETED")
                return
            if job_xml(self.domain) is None:
                return
            if time.monotonic() >= deadline:
                raise CleanupError(
                    f"the backup job of {self.domain.name!r} did not end within {timeout} s "
                    "after abortJob(); end it with Domain.active_backup().end()"
                )

    def _remove_scratch_and_dirs(self) -> list[str]:
        errors: list[str] = []
        if self.mode is BackupMode.PULL:
            for bd in self.xml.backed_up:
                if bd.store and bd.type == "file":
                    remove_file(Path(bd.store), errors)
        remove_dirs(self._log.job.dirs, errors)
        if self._expect is not None:
            self._expect.close()
            self._expect = None
        return errors

    def _fail_cleanup(self, error: BaseException | None) -> None:
        """Remove what a job that did not deliver left: checkpoint, files, scratch."""
        self._state = "failed"
        errors = self._remove_scratch_and_dirs()
        removed = [f for f in self._log.job.files if remove_file(Path(f), errors)]
        if self.mode is BackupMode.PUSH:
            for bd in self.xml.backed_up:
                if bd.store and bd.type == "file" and remove_file(Path(bd.store), errors):
                    removed.append(bd.store)
        if (
            self.checkpoint is not None
            and self._log.job.created_checkpoint
            and delete_checkpoint(self.domain, self.checkpoint, errors)
        ):
            self._undone.append(f"deleted the checkpoint {self.checkpoint!r} it created")
        if removed:
            self._undone.append(f"removed {', '.join(removed)}")
        self._log.close(errors)
        if error is not None:
            rolled_back_note(self.domain, error, self._undone)
        if errors:
            cleanup = CleanupError(
                f"backup of {self.domain.name!r} ended without delivering every disk and "
                f"cleanup left something behind: {'; '.join(errors)}"
            )
            if error is not None:
                error.add_note(str(cleanup))
                return
            raise cleanup

    def _close_record(self) -> None:
        errors = self._remove_scratch_and_dirs()
        self._log.close(errors)
        if errors:
            raise CleanupError(f"backup of {self.domain.name!r}: {'; '.join(errors)}")

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> BackupJob:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.running:
            self._remove_scratch_and_dirs()
            return
        try:
            if e is not None:
                self.discard()
                rolled_back_note(self.domain, e, self._undone)
            elif self.mode is BackupMode.PUSH:
                self.wait()
            else:
                self.end()
        except BaseException as cleanup_exc:
            if e is None:
                raise
            e.add_note(f"ending the backup job failed too: {cleanup_exc!r}")

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "running" and not getattr(self, "adopted", True):
            warnings.warn(
                f"backup job of domain {self.domain.name!r} was never ended "
                "(Domain.active_backup() finds it)",
                ResourceWarning,
                stacklevel=2,
            )


def _port(dom: Domain) -> BackupPort:
    """The domain's port as this module uses it: ``BackupPort`` (mypy checks it)."""
    return dom.port
