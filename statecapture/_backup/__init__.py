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
* what a job needs for that cleanup (its checkpoint, its files) is recorded in its run's
  crash record in the domain's metadata (``statecapture/_journal.py``), so
  :meth:`Domain.active_backup` in another process — after a crash or a kill — finds the
  leftover job and :meth:`BackupJob.end` cleans up after it;
* backup images are qcow2, owner-only (0600), and never replace an existing file.

The package reads top-down: ``start.py`` (begin_backup → BackupStart: the execution of a
plan from ``_backup_plan.py``; active_backup), ``job.py`` (the BackupJob handle and its end),
``push.py`` and ``download.py`` (what a push job left, what a pull job copies),
``record.py`` (the job's part of the run's crash record, and the cleanup of a dead run's
job), ``values.py`` (the result values).
"""

from .._backup_plan import backup_file_name
from .job import BackupJob, job_xml, require_local_nbd
from .record import delete_checkpoint, final_path, publish, recover_stale
from .start import (
    BackupStart,
    active_backup,
    begin_backup,
    settle_stale_record,
    start_backup,
    unfinished_record,
)
from .values import BackupExport, BackupProgress, BackupResult, DiskBackup, ProgressCallback

__all__ = [
    "BackupExport",
    "BackupJob",
    "BackupProgress",
    "BackupResult",
    "BackupStart",
    "DiskBackup",
    "ProgressCallback",
    "active_backup",
    "backup_file_name",
    "begin_backup",
    "start_backup",
    "delete_checkpoint",
    "final_path",
    "job_xml",
    "publish",
    "recover_stale",
    "require_local_nbd",
    "settle_stale_record",
    "unfinished_record",
]
