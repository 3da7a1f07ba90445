"""Block jobs: commit, copy and the multi-disk consistent copy.

A :class:`BlockJob` is a live handle on one libvirt block job (``virDomainBlockCommit``,
``virDomainBlockCopy``, or a job found running by :meth:`Domain.block_jobs`). Its life::

    RUNNING ──READY event──▶ READY ──pivot()──▶ COMPLETED     (copy, active commit)
       │                       └──abort()──▶ CANCELED         (copy kept / overlay kept)
       ├──finishes by itself──▶ COMPLETED                     (commit below the top, pull)
       └──abort()/error──▶ CANCELED / FAILED

Readiness comes only from libvirt's ``BLOCK_JOB_2`` READY event (or, for a job adopted
after a reconnect, the live XML's ``<mirror ready='yes'>``) — never from ``cur == end``,
which QEMU reports before the job can pivot (HAZARDS 8; a non-active commit was seen at
``cur = end - 1`` right after it started).

What libvirt 9.0 / QEMU 7.2 send (verified on the embedded driver): a copy or active commit
sends READY (status 3) once source and destination are in sync; ``pivot()`` ends it with
COMPLETED (0); ``abort()`` of a ready or not yet ready mirror ends it with CANCELED (2); a
commit below the active layer ends by itself with COMPLETED. Event and job go together:
by the time the end event arrives, ``blockJobInfo`` reports no job on the disk.

The handle subscribes to the domain's block-job events *before* it starts the job and keeps
that subscription until it sees the job end, so no event is lost between "start" and
"wait". As a context manager it guarantees that no job outlives its owner: leaving the
``with`` block while the job still runs aborts it.

Modules: ``job.py`` (the :class:`BlockJob` handle and its values), ``common.py`` (argument
checks, the event subscription, the live ``<disk>`` elements), ``start.py`` (commit, pull,
copy, listing), ``consistent.py`` (:func:`consistent_copy`).
"""

from __future__ import annotations

from .consistent import ConsistentCopy, consistent_copy
from .job import BlockJob, BlockJobKind, BlockJobProgress, BlockJobStatus
from .start import destination_xml, running_jobs, start_commit, start_copy, start_pull

__all__ = [
    "BlockJob",
    "BlockJobKind",
    "BlockJobProgress",
    "BlockJobStatus",
    "ConsistentCopy",
    "consistent_copy",
    "destination_xml",
    "running_jobs",
    "start_commit",
    "start_copy",
    "start_pull",
]
