"""A finished push job's images: wait until QEMU let go of them, point incrementals at the
previous image, move them out of the private staging directory, measure them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from .. import _files, _qemuimg
from .._backup_plan import backup_file_name
from ..errors import ToolError
from ..xml import DiskBackupMode
from .record import final_path, publish
from .values import BackupResult, DiskBackup

if TYPE_CHECKING:
    from .job import BackupJob

__all__ = ["push_result"]

_UNLOCK_TIMEOUT: Final = 15.0
"""Seconds to wait for QEMU to release a push target after the job completed."""


def _locked(exc: ToolError) -> bool:
    """qemu-img could not take the image's lock (QEMU still holds it)."""
    return "lock" in exc.stderr.lower()


def _wait_usable(path: Path, timeout: float) -> None:
    """Block until QEMU has released its lock on ``path`` (HAZARDS 14)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _qemuimg.qemu_img("info", "--output=json", str(path), timeout=30)
            return
        except ToolError as exc:
            if not _locked(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _data_bytes(path: Path) -> int:
    """Data bytes stored in the top layer of ``path`` (its backing file is not opened)."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    out = _qemuimg.qemu_img("map", "--output=json", "json:" + json.dumps(spec))
    return sum(int(e["length"]) for e in json.loads(out) if e.get("depth") == 0 and e.get("data"))


def _virtual_size(path: Path) -> int:
    return int(json.loads(_qemuimg.qemu_img("info", "--output=json", str(path)))["virtual-size"])


@attrs.frozen
class _Staged:
    disk: str
    target: Path
    """Where QEMU wrote it (in the staging directory)."""
    final: Path
    mode: DiskBackupMode
    incremental_from: str | None
    backing: Path | None


def _settle(job: BackupJob, disk: str, store: str | None) -> _Staged:
    """One target: usable, owner-only, an incremental rebased onto the previous image."""
    target = Path(store or "")
    final = final_path(target)
    _wait_usable(target, _UNLOCK_TIMEOUT)  # HAZARDS 14: the event comes first
    _files.owner_only([target], what="backup target")
    mode = job.xml.disk_mode(disk)
    inc_from = job.xml.disk_checkpoint(disk)
    backing: Path | None = None
    if mode is DiskBackupMode.INCREMENTAL:
        # libvirt made the target's backing file the live disk; point it at the previous
        # backup by its file name (relative: the chain can move as one). When that file is
        # not beside it, the name still records what the layer sits on, so restore_disk()
        # can refuse a chain it does not fit.
        assert inc_from is not None
        prev = final.parent / backup_file_name(job.domain.name, disk, inc_from)
        if prev.is_file():
            backing = prev
        _qemuimg.qemu_img("rebase", "-u", "-F", "qcow2", "-b", prev.name, str(target))
    return _Staged(disk, target, final, mode, inc_from, backing)


def push_result(job: BackupJob) -> BackupResult:
    """The images of ``job``'s completed push, moved to their final names; its result."""
    log = job._log
    duration = time.time() - log.job.started
    staged = [_settle(job, bd.name, bd.store) for bd in job.xml.backed_up]
    for s in staged:
        if s.target == s.final:  # a job begun by an older statecapture: no staging
            continue
        log.add_files(s.final)  # recorded first: a crash cannot orphan it
        try:
            publish(s.target, s.final)
        except BaseException:
            log.drop_files(s.final)  # not ours (it appeared meanwhile): left alone
            raise
    # Measured in place: a relative backing name resolves beside the final file.
    disks = tuple(
        DiskBackup(
            disk=s.disk,
            file=s.final,
            mode=s.mode,
            bytes_written=_data_bytes(s.final),
            duration=duration,
            checkpoint=job.checkpoint,
            incremental_from=s.incremental_from,
            backing=s.backing,
            size=_virtual_size(s.final),
        )
        for s in staged
    )
    return BackupResult(
        job.domain.name, job.mode, job.checkpoint, job.incremental_from, disks, duration
    )
