"""The values a backup job reports: progress, NBD exports, per-disk images, the result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

from ..errors import NotFoundError
from ..xml import BackupMode, DiskBackupMode

__all__ = ["BackupExport", "BackupProgress", "BackupResult", "DiskBackup", "ProgressCallback"]


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
