""":func:`consistent_copy`: several disks copied so that all copies show the same instant."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from .._enums import DomainState
from ..errors import (
    InvalidStateError,
    UsageError,
)
from .common import _check_bandwidth, _deadline, _remaining, _require_no_job
from .job import BlockJob, BlockJobStatus
from .start import _CopyPlan, _plan_copy, _start_copy

if TYPE_CHECKING:
    from .._domain import Domain


# ----------------------------------------------------------------------------- consistent copy


def _frozen_mapping(value: Mapping[str, Path]) -> Mapping[str, Path]:
    return MappingProxyType(dict(value))


@attrs.frozen
class ConsistentCopy:
    """What :func:`consistent_copy` made: one image per disk, all from the same instant."""

    copies: Mapping[str, Path] = attrs.field(converter=_frozen_mapping, hash=False)
    """Disk target → the image holding that disk as it was at the pause."""
    pivoted: bool
    """Whether the guest now runs on the copies (``True``) or on its original images."""
    pause_seconds: float
    """How long consistent_copy kept the guest paused (``0.0`` if it was paused already)."""
    sync_seconds: float
    """Time from starting the copies until every one was ready (the guest kept running)."""


def consistent_copy(
    dom: Domain,
    destinations: Mapping[str, str | os.PathLike[str]],
    *,
    pivot: bool = False,
    format: str = "qcow2",
    ready_timeout: float | None = None,
    end_timeout: float = 60.0,
    bandwidth: int | None = None,
) -> ConsistentCopy:
    """Copy several disks of a running domain so that all copies show the same instant.

    The recipe of libvirt's *domain state capture* guide: start one block-copy job per disk,
    in parallel, while the guest runs; wait until every job is ready (in sync); pause the
    guest; end every job — pivoting to the copies (``pivot=True``) or keeping the guest on
    its originals (``pivot=False``: the copies are then the capture); resume. The guest is
    paused only for the ending step, and :attr:`ConsistentCopy.pause_seconds` reports how
    long. The copies are crash-consistent (like a power cut at the pause), not quiesced.

    Prefer a backup job (``virDomainBackupBegin``) for backups: libvirt's reviewers do not
    recommend block copy as a backup path. Use this when you need mirror semantics, e.g.
    moving storage with a consistent cut-over.

    Bad input (unknown disk, existing destination, the same destination twice, a disk with
    a job running) is refused before any job starts. If anything fails on the way, the guest
    is resumed at once, every job still running is aborted, and the copies statecapture
    created are removed; with ``pivot=True``, disks that had already pivoted stay on their
    copies (the error's notes name them).
    """
    operation = "consistent copy"
    if not isinstance(destinations, Mapping) or not destinations:
        raise UsageError("consistent_copy() needs a non-empty {disk: destination} mapping")
    _check_bandwidth(bandwidth)
    _deadline(end_timeout)
    _deadline(ready_timeout)
    dom._require_active(operation)
    plans = _plan_copies(dom, destinations, format=format, operation=operation)
    jobs: list[BlockJob] = []
    paused_by_us = False
    paused_at = 0.0
    pause = 0.0
    try:
        started = time.monotonic()
        for plan in plans:
            jobs.append(
                _start_copy(dom, plan, shallow=False, synchronous_writes=False, bandwidth=bandwidth)
            )
        deadline = _deadline(ready_timeout)
        for job in jobs:
            remaining = _remaining(deadline)
            job.wait_ready(None if remaining is None else max(0.0, remaining))
        synced = time.monotonic() - started
        if dom.state is not DomainState.PAUSED:
            dom.suspend()
            paused_by_us = True
            paused_at = time.monotonic()
        # Ask every job to end at once (asynchronously), then collect the end events: the
        # pause lasts one round of QEMU work, not one per disk.
        for job in jobs:
            job._request_end(pivot=pivot, asynchronous=True)
        end_deadline = _deadline(end_timeout)
        for job in jobs:
            remaining = _remaining(end_deadline)
            status = job._await_end(max(0.0, remaining or 0.0), what="consistent copy end")
            if status is BlockJobStatus.FAILED:
                raise job._failed_error(operation)
            if pivot and status is not BlockJobStatus.COMPLETED:
                raise InvalidStateError(
                    f"the copy of {job.disk!r} ended {status.value} instead of pivoting",
                    operation=operation,
                    domain_name=dom.name,
                )
        if paused_by_us:
            dom.resume()
            pause = time.monotonic() - paused_at
            paused_by_us = False
    except BaseException as exc:
        _undo_consistent_copy(dom, exc, jobs, paused_by_us)
        raise
    return ConsistentCopy(
        copies={p.target: p.destination for p in plans},
        pivoted=pivot,
        pause_seconds=pause,
        sync_seconds=synced,
    )


def _plan_copies(
    dom: Domain,
    destinations: Mapping[str, str | os.PathLike[str]],
    *,
    format: str,
    operation: str,
) -> list[_CopyPlan]:
    """Plan every copy of :func:`consistent_copy` and check them together, before any starts."""
    plans: list[_CopyPlan] = []
    for disk, destination in destinations.items():
        plans.append(_plan_copy(dom, disk, destination, format=format, reuse_external=False))
    targets = [p.target for p in plans]
    if len(set(targets)) != len(targets):
        raise UsageError(f"a disk is named twice in {list(destinations)}")
    dests = [p.destination for p in plans]
    if len(set(dests)) != len(dests):
        raise UsageError("two disks cannot be copied to the same destination")
    for plan in plans:
        _require_no_job(dom, plan.target, operation)
    return plans


def _undo_consistent_copy(
    dom: Domain, exc: BaseException, jobs: list[BlockJob], paused_by_us: bool
) -> None:
    """Resume first (the guest must not stay paused), then abort the rest, then tidy up."""
    if paused_by_us:
        try:
            dom.resume()
        except BaseException as err:
            exc.add_note(f"statecapture: resuming {dom.name!r} failed: {err}")
    for job in jobs:
        try:
            job.abort()
        except BaseException as err:
            exc.add_note(f"statecapture: aborting the copy of {job.disk!r} failed: {err}")
    pivoted: list[str] = []
    for job in jobs:
        status = job.status
        if status is BlockJobStatus.COMPLETED:  # a copy completes only by pivoting
            pivoted.append(job.disk)
            continue
        if not status.ended or job.destination is None or job._created is None:
            continue  # still running (abort failed), or not ours to remove
        try:
            job.destination.unlink(missing_ok=True)
        except OSError as err:
            exc.add_note(f"statecapture: removing {job.destination} failed: {err}")
    if pivoted:
        exc.add_note(
            "statecapture: these disks had already pivoted and now run on their copies: "
            + ", ".join(pivoted)
        )
