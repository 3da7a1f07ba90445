"""Backup jobs: :meth:`Domain.backup`, :class:`BackupJob` and their result values.

A backup job copies the disks of a running domain as they were when the job started
(libvirt's ``virDomainBackupBegin``), in one of two modes:

* **push** — QEMU writes each disk into a qcow2 target file; :meth:`BackupJob.wait` waits for
  the ``JOB_COMPLETED`` event *and* for QEMU to release the files (HAZARDS 14);
* **pull** — QEMU serves each disk's point-in-time content over NBD;
  :meth:`BackupJob.download` copies it with a real NBD client (see ``_nbd.py``).

Either mode can be *incremental* from a checkpoint (only changed blocks are copied) and can
create a new checkpoint atomically with the job's start (``checkpoint=``). Disks that have no
bitmap in the ``incremental_from`` checkpoint (added after it) are backed up in full while the
others stay incremental.

Guarantees (HAZARDS 5, 6, 12, 14, 16):

* one backup job per domain: a second :meth:`Domain.backup` raises at once (libvirt would hang
  30 s on the state-change lock) and names the running job;
* there is no ``virDomainBackupEnd``: a job ends with ``abortJob()`` and the
  ``JOB_COMPLETED`` event, and statecapture waits for that event before it returns;
* a job that did not deliver every disk — cancelled, failed, interrupted, or a pull job
  ended before each disk was downloaded — removes the checkpoint it created and the files it
  wrote, so the next incremental never builds on a bad base;
* what a job needs for that cleanup (its checkpoint, its files) is recorded in the domain's
  metadata, so :meth:`Domain.active_backup` in another process — after a crash or a kill —
  finds the leftover job and :meth:`BackupJob.end` cleans up after it;
* backup images are qcow2, owner-only (0600), and never replace an existing file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs

from . import _bitmaps, _files, _locks, _nbd
from ._backup_plan import (
    BackupPlan,
    backup_file_name,
    check_writable,
    partial_name,
    plan_backup,
    refuse_running_job,
    unsupported,
)
from ._backup_record import RECORD_KEY as RECORD_KEY
from ._backup_record import RECORD_NS as RECORD_NS
from ._backup_record import Record as _Record
from ._backup_record import clear_record as _clear_record
from ._backup_record import delete_checkpoint as _delete_checkpoint
from ._backup_record import discard_stale_record as discard_stale_record
from ._backup_record import final_path as _final_path
from ._backup_record import publish as _publish
from ._backup_record import read_record as _read_record
from ._backup_record import recover_stale as _recover_stale
from ._backup_record import remove_file as _remove
from ._backup_record import write_record as _write_record
from ._events import EventKind, Expectation
from .errors import (
    CleanupError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    StateCaptureError,
    UnsupportedError,
    UsageError,
)
from .xml import (
    BackupMode,
    BackupXML,
    CheckpointXML,
    DiskBackupMode,
)

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "BackupExport",
    "BackupJob",
    "BackupProgress",
    "BackupResult",
    "DiskBackup",
    "active_backup",
    "begin_backup",
]

_END_TIMEOUT: Final = 60.0
"""Seconds to wait for ``JOB_COMPLETED`` after ``abortJob()``."""
_UNLOCK_TIMEOUT: Final = 15.0
"""Seconds to wait for QEMU to release a push target after the job completed."""


# --------------------------------------------------------------------------- values


@attrs.frozen
class BackupProgress:
    """How far a backup job (or one disk's download) has come, in bytes."""

    bytes_done: int
    """Bytes copied so far."""
    bytes_total: int
    """Bytes to copy in all (0 while unknown)."""
    elapsed: float
    """Seconds since the job (or the download) started."""
    disk: str | None = None
    """The disk a download progress is about; ``None`` for the whole job."""
    temp_used: int | None = None
    """Pull mode: bytes QEMU has put into the scratch files (old data the guest overwrote)."""
    temp_total: int | None = None
    """Pull mode: the scratch files' capacity."""

    @property
    def fraction(self) -> float:
        """``bytes_done / bytes_total`` (0.0 while the total is unknown)."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


@attrs.frozen
class BackupExport:
    """How to read one disk of a pull-mode job over NBD."""

    disk: str
    """The disk's target name (``vda``)."""
    socket: str
    """The NBD server's UNIX socket."""
    export_name: str
    """The NBD export name."""
    bitmap_context: str | None
    """``qemu:dirty-bitmap:…`` metadata context of the changed blocks (incremental only)."""
    mode: DiskBackupMode
    """Full or incremental."""
    incremental_from: str | None
    """The checkpoint the dirty bitmap counts from (incremental only)."""

    @property
    def uri(self) -> str:
        """The NBD URI, e.g. for ``nbdinfo``/``nbdcopy``/``qemu-img``: ``nbd+unix:///vda?socket=…``."""
        return f"nbd+unix:///{self.export_name}?socket={self.socket}"


@attrs.frozen
class DiskBackup:
    """One disk's backup image as a finished job left it."""

    disk: str
    """The disk's target name."""
    file: Path
    """The qcow2 backup image."""
    mode: DiskBackupMode
    """Full or incremental."""
    bytes_written: int
    """Data bytes written into :attr:`file` (an incremental's ≈ the disk's dirty bytes)."""
    duration: float
    """Seconds the copy took (push: the whole job's, the disks run in parallel)."""
    checkpoint: str | None
    """The checkpoint created with this backup (the next incremental starts there)."""
    incremental_from: str | None = None
    """The checkpoint an incremental starts from (``None`` for full)."""
    backing: Path | None = None
    """The previous image in the chain (recorded in :attr:`file`'s header), if known."""
    size: int = 0
    """The disk's virtual size (bytes)."""


@attrs.frozen
class BackupResult:
    """What a finished backup job produced."""

    domain: str
    """Name of the domain backed up."""
    mode: BackupMode
    """Push or pull."""
    checkpoint: str | None
    """The checkpoint created with the job (``None`` when none was asked for)."""
    incremental_from: str | None
    """The checkpoint the job's incrementals start from (``None``: full job)."""
    disks: tuple[DiskBackup, ...]
    """One entry per disk backed up."""
    duration: float
    """Seconds from the job's start to its end."""

    def disk(self, name: str) -> DiskBackup:
        """The entry for disk ``name``; :class:`NotFoundError` when the job did not copy it."""
        for d in self.disks:
            if d.disk == name:
                return d
        raise NotFoundError(f"the backup has no disk {name!r}", operation="backup result")

    @property
    def bytes_written(self) -> int:
        """Data bytes written over all disks."""
        return sum(d.bytes_written for d in self.disks)


ProgressCallback = Callable[[BackupProgress], None]


# --------------------------------------------------------------------------- helpers


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


def _rolled_back_note(dom: Domain, exc: BaseException, undone: list[str]) -> None:
    """Tell the caller, on the error itself, what the rollback undid (a Ctrl-C included)."""
    if undone:
        exc.add_note(
            f"statecapture: rolled back the backup of {dom.name!r} after "
            f"{type(exc).__name__}: {'; '.join(undone)}"
        )


def _job_xml(dom: Domain) -> str | None:
    """The running job's XML; ``None`` when there is none (also: the domain stopped)."""
    try:
        return dom.port.backup_xml_desc()
    except InvalidStateError:
        if not dom.is_active:  # a shutdown ended the job (HAZARDS 7)
            return None
        raise


def _wait_usable(path: Path, timeout: float) -> None:
    """Block until QEMU has released its lock on ``path`` (HAZARDS 14)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _nbd.qemu_img("info", "--output=json", str(path), timeout=30)
            return
        except StateCaptureError as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _data_bytes(path: Path) -> int:
    """Data bytes stored in the top layer of ``path`` (its backing file is not opened)."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    out = _nbd.qemu_img("map", "--output=json", "json:" + json.dumps(spec))
    return sum(int(e["length"]) for e in json.loads(out) if e.get("depth") == 0 and e.get("data"))


def _virtual_size(path: Path) -> int:
    return int(json.loads(_nbd.qemu_img("info", "--output=json", str(path)))["virtual-size"])


# --------------------------------------------------------------------------- the job


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
    _record: _Record = attrs.field(repr=False)
    _expect: Expectation | None = attrs.field(default=None, repr=False)
    _state: str = "running"
    _result: BackupResult | None = attrs.field(default=None, repr=False)
    _downloads: dict[str, DiskBackup] = attrs.field(factory=dict, repr=False)
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
        return self._record.label

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
        return {d.name: _final_path(Path(d.store)) for d in self.xml.backed_up if d.store}

    @property
    def result(self) -> BackupResult | None:
        """What the job produced, once :meth:`wait`/:meth:`download` finished."""
        return self._result

    # ------------------------------------------------------------------ progress
    def progress(self) -> BackupProgress:
        """The job's progress now (libvirt's job statistics; pull adds downloaded bytes)."""
        elapsed = time.time() - self._record.started
        if not self.running:
            done = self._result.bytes_written if self._result is not None else 0
            return BackupProgress(done, done, elapsed)
        stats = self.domain.port.backup_job_stats()
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
            if _job_xml(self.domain) is None:
                # Ended while we looked away (the event was emitted before libvirt forgot the
                # job, so it is queued unless we subscribed late): take the completed stats.
                event_now = exp.poll()
                if event_now is not None:
                    return dict(event_now.detail.get("stats", {}))
                try:
                    return self.domain.port.backup_job_stats(completed=True)
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
            result = self._push_result()
        except BaseException as exc:
            self._fail_cleanup(exc)
            raise
        self._state = "completed"
        self._result = result
        self._close_record()
        return result

    def _push_result(self) -> BackupResult:
        duration = time.time() - self._record.started
        disks: list[DiskBackup] = []
        staged: list[tuple[str, Path, Path, DiskBackupMode, str | None, Path | None]] = []
        for bd in self.xml.backed_up:
            target = Path(bd.store or "")
            final = _final_path(target)
            _wait_usable(target, _UNLOCK_TIMEOUT)  # HAZARDS 14: the event comes first
            _files.owner_only([target], what="backup target")
            mode = self.xml.disk_mode(bd.name)
            inc_from = self.xml.disk_checkpoint(bd.name)
            backing: Path | None = None
            if mode is DiskBackupMode.INCREMENTAL:
                # libvirt made the target's backing file the live disk; point it at the
                # previous backup by its file name (relative: the chain can move as one).
                # When that file is not beside it, the name still records what the layer
                # sits on, so restore_disk() can refuse a chain it does not fit.
                assert inc_from is not None
                prev = final.parent / backup_file_name(self.domain.name, bd.name, inc_from)
                if prev.is_file():
                    backing = prev
                _nbd.qemu_img("rebase", "-u", "-F", "qcow2", "-b", prev.name, str(target))
            staged.append((bd.name, target, final, mode, inc_from, backing))
        for _disk, target, final, *_rest in staged:
            if target == final:  # a job begun by an older statecapture: no staging
                continue
            self._add_files(final)  # recorded first: a crash cannot orphan it
            try:
                _publish(target, final)
            except BaseException:
                self._drop_files(final)  # not ours (it appeared meanwhile): left alone
                raise
        # Measured in place: a relative backing name resolves beside the final file.
        for disk, _target, final, mode, inc_from, backing in staged:
            disks.append(
                DiskBackup(
                    disk=disk,
                    file=final,
                    mode=mode,
                    bytes_written=_data_bytes(final),
                    duration=duration,
                    checkpoint=self.checkpoint,
                    incremental_from=inc_from,
                    backing=backing,
                    size=_virtual_size(final),
                )
            )
        return BackupResult(
            self.domain.name,
            self.mode,
            self.checkpoint,
            self.incremental_from,
            tuple(disks),
            duration,
        )

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
        with _files.Directory.open(dest_dir, what="dest_dir") as ddir:
            return self._download_into(ddir, progress, previous, client)

    def _download_into(
        self,
        ddir: _files.Directory,
        progress: ProgressCallback | None,
        previous: Mapping[str, str | os.PathLike[str]],
        client: str | None,
    ) -> BackupResult:
        dest = Path(ddir.path)
        plan: list[tuple[BackupExport, Path, Path | None]] = []
        for export in self.exports:
            name = backup_file_name(self.domain.name, export.disk, self.label)
            # One rule (a dangling symlink exists too), checked before anything changes.
            ddir.check_free(name, partial_name(name), what="backup file")
            target = dest / name
            backing: Path | None = None
            if export.mode is DiskBackupMode.INCREMENTAL:
                assert export.incremental_from is not None
                if export.disk in previous:
                    backing = Path(previous[export.disk])
                else:
                    backing = dest / backup_file_name(
                        self.domain.name, export.disk, export.incremental_from
                    )
                if not backing.is_file():
                    raise NotFoundError(
                        f"incremental backup of {export.disk!r} needs the previous backup "
                        f"{backing} (from checkpoint {export.incremental_from!r}); pass "
                        "previous={disk: path}",
                        operation="backup download",
                        domain_name=self.domain.name,
                    )
            plan.append((export, target, backing))
        for export, target, backing in plan:
            self._download_one(ddir, export, target, backing, progress, client)
        result = BackupResult(
            self.domain.name,
            self.mode,
            self.checkpoint,
            self.incremental_from,
            tuple(self._downloads[e.disk] for e, _t, _b in plan),
            time.time() - self._record.started,
        )
        self._record = attrs.evolve(self._record, delivered=True)
        _write_record(self.domain, self._record)
        self._result = result
        return result

    def _download_one(
        self,
        ddir: _files.Directory,
        export: BackupExport,
        target: Path,
        backing: Path | None,
        progress: ProgressCallback | None,
        client: str | None,
    ) -> None:
        pname = partial_name(target.name)
        partial = ddir.join(pname)
        self._add_files(partial)  # recorded before it exists: a crash cannot orphan it
        try:
            # O_EXCL | O_NOFOLLOW relative to the directory opened once; every tool gets
            # the descriptor path, so a name swapped meanwhile redirects nothing.
            fd = ddir.create(pname)
        except BaseException:
            self._drop_files(partial)  # not ours: never remove what is at that name
            raise
        started = time.monotonic()

        def report(done: int, total: int) -> None:
            self._transfer[export.disk] = (done, total)
            if progress is not None:
                progress(BackupProgress(done, total, time.monotonic() - started, disk=export.disk))

        try:
            backing_name = None
            if backing is not None:
                same_dir = backing.parent.resolve() == Path(ddir.path).resolve()
                backing_name = backing.name if same_dir else str(backing.absolute())
            stats = _nbd.copy_export(
                _nbd.ExportSource(export.socket, export.export_name, export.bitmap_context),
                Path(_files.fd_path(fd)),
                backing=backing,
                backing_name=backing_name,
                progress=report,
                client=client,
            )
            os.fchmod(fd, _files.FILE_MODE)
            os.fsync(fd)
            self._add_files(target)
            try:
                ddir.link_fd(fd, target.name)  # the file we wrote; never replaces a name
            except BaseException:
                self._drop_files(target)
                raise
            ddir.remove_if_same(pname, fd)
            self._drop_files(partial)
            ddir.fsync()
        except BaseException:
            ddir.remove_if_same(pname, fd)  # only our file; a swapped-in name stays
            self._drop_files(partial)
            raise
        finally:
            os.close(fd)
        self._downloads[export.disk] = DiskBackup(
            disk=export.disk,
            file=target,
            mode=export.mode,
            bytes_written=stats.bytes_written,
            duration=stats.duration,
            checkpoint=self.checkpoint,
            incremental_from=export.incremental_from,
            backing=backing,
            size=stats.size,
        )

    def _drop_files(self, *paths: Path) -> None:
        gone = {str(p) for p in paths}
        files = tuple(f for f in self._record.files if f not in gone)
        self._record = attrs.evolve(self._record, files=files)
        with contextlib.suppress(LibvirtError):
            _write_record(self.domain, self._record)

    def _add_files(self, *paths: Path) -> None:
        """Record ``paths`` as this job's files; a failed write raises (never suppressed)."""
        files = tuple(dict.fromkeys((*self._record.files, *(str(p) for p in paths))))
        record = attrs.evolve(self._record, files=files)
        _write_record(self.domain, record)
        self._record = record

    # ------------------------------------------------------------------ ending
    def end(self, *, timeout: float = _END_TIMEOUT) -> BackupResult | None:
        """End the job now; idempotent. Returns the result when the job delivered every disk.

        A running push job is cancelled; a pull job is ended (``abortJob()``). Either way
        statecapture waits for ``JOB_COMPLETED`` (HAZARDS 16) and removes scratch files. When
        the job did not deliver every disk, its checkpoint and files are removed too, and
        ``None`` is returned. A failing cleanup step raises :class:`CleanupError`.
        """
        return self._end(discard=False, timeout=timeout)

    def discard(self, *, timeout: float = _END_TIMEOUT) -> None:
        """End the job and remove everything it made: checkpoint, files, scratch.

        What leaving the ``with`` block by an exception does while the job still runs.
        """
        self._end(discard=True, timeout=timeout)

    def _end(self, *, discard: bool, timeout: float) -> BackupResult | None:
        if not self.running:
            return self._result
        if not discard and self.mode is BackupMode.PUSH and _job_xml(self.domain) is None:
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
        vir = self.domain.port
        exp = self._expectation()
        if _job_xml(self.domain) is None:
            return
        try:
            vir.backup_abort_job()
        except InvalidStateError:
            # "no job is active": it ended between our check and the abort.
            if _job_xml(self.domain) is not None:
                raise
            return
        self._undone.append(f"ended the running {self.mode.value} backup job (abortJob)")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OperationTimeoutError):
                exp.wait(0.25, what="JOB_COMPLETED")
                return
            if _job_xml(self.domain) is None:
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
                    _remove(Path(bd.store), errors)
        for d in self._record.dirs:
            try:
                shutil.rmtree(d)
            except FileNotFoundError:  # gone already (e.g. recover() removed it)
                pass
            except OSError as exc:
                errors.append(f"remove {d}: {exc}")
        if self._expect is not None:
            self._expect.close()
            self._expect = None
        return errors

    def _fail_cleanup(self, error: BaseException | None) -> None:
        """Remove what a job that did not deliver left: checkpoint, files, scratch."""
        self._state = "failed"
        errors = self._remove_scratch_and_dirs()
        removed = [f for f in self._record.files if _remove(Path(f), errors)]
        if self.mode is BackupMode.PUSH:
            for bd in self.xml.backed_up:
                if bd.store and bd.type == "file" and _remove(Path(bd.store), errors):
                    removed.append(bd.store)
        if (
            self.checkpoint is not None
            and self._record.created_checkpoint
            and _delete_checkpoint(self.domain, self.checkpoint, errors)
        ):
            self._undone.append(f"deleted the checkpoint {self.checkpoint!r} it created")
        if removed:
            self._undone.append(f"removed {', '.join(removed)}")
        _clear_record(self.domain, errors)
        if error is not None:
            _rolled_back_note(self.domain, error, self._undone)
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
        _clear_record(self.domain, errors)
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
                _rolled_back_note(self.domain, e, self._undone)
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


# --------------------------------------------------------------------------- factories


def active_backup(dom: Domain) -> BackupJob | None:
    """The domain's running backup job, or ``None``; works after a reconnect or a crash."""
    try:
        text = _job_xml(dom)
    except UnsupportedError as exc:
        raise unsupported(dom, exc, "backup") from exc
    if text is None:
        return None
    xml = BackupXML.from_xml(text)
    record = _read_record(dom)
    if record is None or record.mode != xml.mode.value:
        record = _Record(
            mode=xml.mode.value,
            checkpoint=None,
            created_checkpoint=False,
            incremental_from=xml.incremental,
            label="leftover",
            started=time.time(),
        )
    job = BackupJob(
        domain=dom,
        mode=xml.mode,
        checkpoint=record.checkpoint,
        incremental_from=record.incremental_from,
        xml=xml,
        record=record,
        adopted=True,
    )
    job._expectation()
    return job


def begin_backup(
    dom: Domain,
    *,
    plan: BackupPlan | None = None,
    mode: BackupMode | str = BackupMode.PUSH,
    disks: Iterable[str] | None = None,
    incremental_from: str | None = None,
    checkpoint: str | CheckpointXML | None = None,
    target_dir: str | os.PathLike[str] | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    socket: str | os.PathLike[str] | None = None,
) -> BackupJob:
    """Start a backup job; see :meth:`Domain.backup`: plan it (unless ``plan`` is given),
    then execute the plan."""
    if plan is None:
        plan = plan_backup(
            dom,
            mode=mode,
            disks=disks,
            incremental_from=incremental_from,
            checkpoint=checkpoint,
            target_dir=target_dir,
            scratch_dir=scratch_dir,
            socket=socket,
        )
    elif not isinstance(plan, BackupPlan):
        raise UsageError(f"plan= takes a BackupPlan (dom.backup_plan(...)), not {plan!r}")
    elif mode not in (BackupMode.PUSH, "push") or any(
        a is not None
        for a in (disks, incremental_from, checkpoint, target_dir, scratch_dir, socket)
    ):
        raise UsageError("pass either plan= or the backup's arguments, not both")
    with BackupStart(dom, plan) as start:
        start.begin()
    return start.job


class BackupStart:
    """The start of a planned backup job, as a context manager around the capture call.

    Entering does everything that must come *before* the capture — re-checks that no job
    runs and the checkpoint is new, settles a dead run's record, makes the private
    directories, subscribes to ``JOB_COMPLETED``, takes the domain's lock, notes QEMU's
    bitmaps and writes the job's record — so that :meth:`begin` is ``virDomainBackupBegin``
    and nothing else (inside a freeze, only that runs). Leaving reads the job back and
    releases the lock; leaving by an exception undoes everything (:attr:`job` stays unset).
    """

    def __init__(self, dom: Domain, plan: BackupPlan, *, note: bool = True) -> None:
        self.dom = dom
        self.plan = plan
        self.note = note
        self.undone: list[str] = []
        """What a rollback undid (noted on the error unless ``note=False``)."""
        self._job: BackupJob | None = None
        self._stack = contextlib.ExitStack()
        self._made: list[Path] = []
        self._exp: Expectation | None = None
        self._before: dict[str, Any] | None = None
        self._record: _Record | None = None

    @property
    def job(self) -> BackupJob:
        """The started job (after a successful exit)."""
        if self._job is None:
            raise InvalidStateError("the backup job has not started", operation="backup")
        return self._job

    def __enter__(self) -> BackupStart:
        dom, plan = self.dom, self.plan
        if plan.domain_uuid != dom.uuid:
            raise UsageError(f"this plan is for domain {plan.domain!r}, not {dom.name!r}")
        refuse_running_job(dom)
        if plan.checkpoint is not None and plan.checkpoint in dom.checkpoints:
            raise InvalidStateError(
                f"domain {dom.name!r} already has a checkpoint {plan.checkpoint!r}",
                operation="backup",
                domain_name=dom.name,
            )
        _recover_stale(dom)
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
            self._record = _Record(
                mode=plan.mode.value,
                checkpoint=plan.checkpoint,
                created_checkpoint=plan.checkpoint is not None,
                incremental_from=plan.incremental_from,
                label=plan.label,
                started=time.time(),
                files=tuple(str(d.store) for d in plan.disks) if plan.target_dir else (),
                dirs=tuple(str(p) for p in plan.private_dirs),
            )
            # Record first, so a crash right after the start can be cleaned up.
            _write_record(dom, self._record)
        except BaseException as exc:
            self._rollback(exc)
            raise
        return self

    def begin(self) -> None:
        """``virDomainBackupBegin`` with the plan's XML: the capture call, nothing else."""
        try:
            self.dom.port.backup_begin(self.plan.backup_xml, self.plan.checkpoint_xml)
        except UnsupportedError as exc:
            raise unsupported(self.dom, exc, "backup") from exc

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._rollback(exc)
            return
        dom, plan = self.dom, self.plan
        try:
            text = _job_xml(dom)
            if plan.target_dir is not None:
                _files.owner_only([d.store for d in plan.disks], what="backup target")
        except BaseException as error:
            self._rollback(error)
            raise
        self._stack.close()
        assert self._record is not None
        self._job = BackupJob(
            domain=dom,
            mode=plan.mode,
            checkpoint=plan.checkpoint,
            incremental_from=plan.incremental_from,
            # A push job of tiny disks can end before we ask; the event is queued.
            xml=BackupXML.from_xml(text if text is not None else plan.backup_xml),
            record=self._record,
            expect=self._exp,
        )

    def _rollback(self, exc: BaseException) -> None:
        """Undo a failed start: any job, the checkpoint if it was made, files, the record,
        the private directories. What was undone is noted on ``exc`` (Ctrl-C too)."""
        dom, plan = self.dom, self.plan
        errors: list[str] = []
        undone: list[str] = []
        try:
            if self._exp is not None:
                try:
                    if _job_xml(dom) is not None:
                        dom.port.backup_abort_job()
                        undone.append("ended the half-started backup job (abortJob)")
                        with contextlib.suppress(OperationTimeoutError):
                            self._exp.wait(_END_TIMEOUT, what="JOB_COMPLETED")
                except LibvirtError as e:
                    errors.append(f"end the half-started job: {e}")
                self._exp.close()
            if self._record is not None:
                cp = plan.checkpoint
                if cp is not None and _delete_checkpoint(dom, cp, errors):
                    undone.append(f"deleted the checkpoint {cp!r} made with it")
                removed = [str(d.store) for d in plan.disks if _remove(d.store, errors)]
                if removed:
                    undone.append(f"removed {', '.join(removed)}")
                _clear_record(dom, errors)
                if self._before is not None:
                    from ._checkpoint import remove_orphan_bitmaps

                    remove_orphan_bitmaps(dom, self._before, exc)
            for d in self._made:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            self._stack.close()
        self.undone = undone
        if self.note:
            _rolled_back_note(dom, exc, undone)
        if errors:
            exc.add_note(
                f"cleanup after the failed start left something behind: {'; '.join(errors)}"
            )
