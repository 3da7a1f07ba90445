"""A pull job's download: every disk copied over NBD into a qcow2 image in ``dest_dir``.

Names are checked before anything is written; each image is written under its partial name
(recorded in the job's record before it exists), then linked to its final name without
replacing anything, so a crash at any point leaves only files the record names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .. import _files, _nbd
from .._backup_plan import backup_file_name, partial_name
from ..errors import NotFoundError
from ..xml import DiskBackupMode
from .values import BackupExport, BackupProgress, DiskBackup, ProgressCallback

if TYPE_CHECKING:
    from .job import BackupJob

__all__ = ["download_into"]


@attrs.frozen
class _Download:
    export: BackupExport
    target: Path
    backing: Path | None


def _plan(
    job: BackupJob, ddir: _files.Directory, previous: Mapping[str, str | os.PathLike[str]]
) -> list[_Download]:
    """Every disk's target and backing file, checked before anything changes."""
    dest = Path(ddir.path)
    plan: list[_Download] = []
    for export in job.exports:
        name = backup_file_name(job.domain.name, export.disk, job.label)
        # One rule (a dangling symlink exists too), checked before anything changes.
        ddir.check_free(name, partial_name(name), what="backup file")
        backing: Path | None = None
        if export.mode is DiskBackupMode.INCREMENTAL:
            assert export.incremental_from is not None
            if export.disk in previous:
                backing = Path(previous[export.disk])
            else:
                backing = dest / backup_file_name(
                    job.domain.name, export.disk, export.incremental_from
                )
            if not backing.is_file():
                raise NotFoundError(
                    f"incremental backup of {export.disk!r} needs the previous backup "
                    f"{backing} (from checkpoint {export.incremental_from!r}); pass "
                    "previous={disk: path}",
                    operation="backup download",
                    domain_name=job.domain.name,
                )
        plan.append(_Download(export, dest / name, backing))
    return plan


def download_into(
    job: BackupJob,
    ddir: _files.Directory,
    progress: ProgressCallback | None,
    previous: Mapping[str, str | os.PathLike[str]],
    client: str | None,
) -> tuple[DiskBackup, ...]:
    """Download every disk of ``job`` into the opened ``ddir``; the images, in disk order."""
    plan = _plan(job, ddir, previous)
    return tuple(_download_one(job, ddir, d, progress, client) for d in plan)


def _download_one(
    job: BackupJob,
    ddir: _files.Directory,
    planned: _Download,
    progress: ProgressCallback | None,
    client: str | None,
) -> DiskBackup:
    export, target, backing = planned.export, planned.target, planned.backing
    log = job._log
    pname = partial_name(target.name)
    partial = ddir.join(pname)
    log.add_files(partial)  # recorded before it exists: a crash cannot orphan it
    try:
        # O_EXCL | O_NOFOLLOW relative to the directory opened once; every tool gets the
        # descriptor path, so a name swapped meanwhile redirects nothing.
        fd = ddir.create(pname)
    except BaseException:
        log.drop_files(partial)  # not ours: never remove what is at that name
        raise
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        job._transfer[export.disk] = (done, total)
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
        log.add_files(target)
        try:
            ddir.link_fd(fd, target.name)  # the file we wrote; never replaces a name
        except BaseException:
            log.drop_files(target)
            raise
        ddir.remove_if_same(pname, fd)
        log.drop_files(partial)
        ddir.fsync()
    except BaseException:
        ddir.remove_if_same(pname, fd)  # only our file; a swapped-in name stays
        log.drop_files(partial)
        raise
    finally:
        os.close(fd)
    return DiskBackup(
        disk=export.disk,
        file=target,
        mode=export.mode,
        bytes_written=stats.bytes_written,
        duration=stats.duration,
        checkpoint=job.checkpoint,
        incremental_from=export.incremental_from,
        backing=backing,
        size=stats.size,
    )
