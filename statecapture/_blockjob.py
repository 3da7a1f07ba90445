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
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
from lxml import etree

from . import _files
from ._enums import DomainState
from ._events import Event, EventKind, Expectation
from ._host import writes_host_files
from .errors import (
    CleanupError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from .xml._base import parse, serialize

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "BlockJob",
    "BlockJobKind",
    "BlockJobProgress",
    "BlockJobStatus",
    "ConsistentCopy",
    "consistent_copy",
]

#: How long a job may be missing from ``blockJobInfo`` before its end event arrives, before
#: statecapture concludes the event will never come (a destroyed domain, a lost connection).
_GONE_GRACE: Final = 2.0
#: How often wait loops look at the job when no event arrives.
_POLL: Final = 0.5

_COPY_FORMATS: Final = ("qcow2", "raw")


class BlockJobKind(enum.Enum):
    """What a block job does (libvirt's ``virDomainBlockJobType``)."""

    COPY = "copy"
    """``virDomainBlockCopy``: mirror a disk to a new image; ends with pivot or abort."""
    COMMIT = "commit"
    """``virDomainBlockCommit`` below the active layer: ends by itself."""
    ACTIVE_COMMIT = "active-commit"
    """``virDomainBlockCommit`` of the active layer: a mirror; ends with pivot or abort."""
    PULL = "pull"
    """``virDomainBlockPull``: fill the top image from its backing chain; ends by itself."""
    BACKUP = "backup"
    """The per-disk part of a backup job (end it through the backup, not here)."""
    UNKNOWN = "unknown"
    """A job type this libvirt-python does not name."""

    @property
    def is_mirror(self) -> bool:
        """Whether the job mirrors writes and waits in READY for :meth:`BlockJob.pivot`."""
        return self in (BlockJobKind.COPY, BlockJobKind.ACTIVE_COMMIT)


class BlockJobStatus(enum.Enum):
    """Where a :class:`BlockJob` is in its life, as far as this handle knows."""

    RUNNING = "running"
    READY = "ready"
    """A mirror in sync: it may :meth:`~BlockJob.pivot` now."""
    COMPLETED = "completed"
    """Finished: a commit/pull ran to the end, or a mirror pivoted."""
    CANCELED = "canceled"
    """Aborted. For a mirror aborted while READY, the destination is a complete copy."""
    FAILED = "failed"
    GONE = "gone"
    """The job disappeared without an end event (domain stopped, connection lost)."""

    @property
    def ended(self) -> bool:
        """Whether the job is over (no libvirt job runs for it any more)."""
        return self not in (BlockJobStatus.RUNNING, BlockJobStatus.READY)


_EVENT_STATUS: Final = {
    "ready": BlockJobStatus.READY,
    "completed": BlockJobStatus.COMPLETED,
    "canceled": BlockJobStatus.CANCELED,
    "failed": BlockJobStatus.FAILED,
}


@attrs.frozen
class BlockJobProgress:
    """How far a block job has got, as libvirt's ``blockJobInfo`` reports it.

    The counters are QEMU's own units of work, not bytes of the disk, and ``end`` grows
    while the guest writes. ``cur == end`` does **not** mean a mirror may pivot: use
    :attr:`BlockJob.ready`.
    """

    cur: int
    """Work done."""
    end: int
    """Work known so far (grows while the guest writes during a mirror)."""
    bandwidth: int
    """Bandwidth limit in bytes per second; ``0`` means unlimited."""

    @property
    def fraction(self) -> float:
        """``cur / end`` in ``[0, 1]`` (``0.0`` while ``end`` is 0): for display only."""
        if self.end <= 0:
            return 0.0
        return min(1.0, max(0.0, self.cur / self.end))


@attrs.define(eq=False, repr=False)
class BlockJob:
    """A live handle on one block job. Built by :meth:`Domain.block_commit`,
    :meth:`Domain.block_copy` and :meth:`Domain.block_jobs`.

    Use it as a context manager: leaving the block while the job still runs (no
    :meth:`pivot`, no natural end) aborts it, so no job outlives its owner::

        with dom.block_copy("vda", "/srv/copy.qcow2") as job:
            job.wait_ready(timeout=600)
            job.pivot()            # or leave without pivot: the job is aborted
    """

    domain: Domain
    """The domain the job runs on."""
    disk: str
    """The disk's target name (``vda``)."""
    kind: BlockJobKind
    """What the job does."""
    destination: Path | None = None
    """The destination image of a copy job (``None`` for other kinds)."""
    _exp: Expectation | None = attrs.field(default=None, alias="exp")
    _owned: bool = attrs.field(default=True, alias="owned")
    _created: Path | None = attrs.field(default=None, alias="created")
    _status: BlockJobStatus = attrs.field(default=BlockJobStatus.RUNNING, alias="status")
    _ready_at_end: bool = attrs.field(default=False, init=False)
    _end_requested: bool = attrs.field(default=False, init=False)
    _finalizer: weakref.finalize[Any, Any] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self._exp is not None:
            # Drop the subscription when the handle is collected (no I/O: a list removal).
            self._finalizer = weakref.finalize(self, self._exp.close)

    # ------------------------------------------------------------------ state
    @property
    def status(self) -> BlockJobStatus:
        """The job's status, updated from the events received so far."""
        self._drain()
        return self._status

    @property
    def ready(self) -> bool:
        """Whether the mirror is in sync and may :meth:`pivot` (from the READY event).

        A handle adopted by :meth:`Domain.block_jobs` (e.g. after a reconnect, when the
        READY event went to another connection) also reads the live XML's
        ``<mirror ready='yes'>``. Never derived from :meth:`progress`.
        """
        self._drain()
        if (
            self._status is BlockJobStatus.RUNNING
            and not self._owned
            and self.kind.is_mirror
            and _mirror_ready(self.domain, self.disk)
        ):
            self._status = BlockJobStatus.READY
        return self._status is BlockJobStatus.READY

    @property
    def ended(self) -> bool:
        """Whether the job is over (pivoted, completed, aborted, failed or gone)."""
        return self.status.ended

    def progress(self) -> BlockJobProgress:
        """The job's counters now (``blockJobInfo``); :class:`NotFoundError` once it ended."""
        info = self.domain.port.block_job_info(self.disk)
        if info is None:
            raise NotFoundError(
                f"no block job runs on disk {self.disk!r} of {self.domain.name!r} any more",
                operation="block job progress",
                domain_name=self.domain.name,
            )
        _kind, cur, end, bandwidth = info
        return BlockJobProgress(cur=cur, end=end, bandwidth=bandwidth)

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Change the job's bandwidth limit (bytes per second; ``0`` removes the limit)."""
        _check_bandwidth(bytes_per_second, allow_none=False)
        self._require_running("set bandwidth")
        self.domain.port.block_job_set_speed(self.disk, bytes_per_second)

    # ------------------------------------------------------------------ waiting
    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the mirror is ready to :meth:`pivot` (the READY event).

        Only copy and active-commit jobs become ready (others raise :class:`UsageError`).
        Raises :class:`OperationTimeoutError` after ``timeout`` seconds (the job keeps
        running), :class:`InvalidStateError` when the job ended before it became ready, and
        :class:`LibvirtError` when it failed.
        """
        if not self.kind.is_mirror:
            raise UsageError(
                f"a {self.kind.value} job never becomes ready; use wait() for it to finish"
            )
        deadline = _deadline(timeout)
        gone_since: float | None = None
        while True:
            if self.ready:
                return
            if self._status.ended:
                self._after_end()
                self._raise_ended_before("became ready")
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise OperationTimeoutError(
                    f"{self.kind.value} job on {self.disk!r} of {self.domain.name!r} "
                    f"not ready after {timeout} s",
                    operation="wait for block job ready",
                    domain_name=self.domain.name,
                )
            gone_since = self._wait_slice(remaining, gone_since)

    def wait(self, timeout: float | None = None) -> BlockJobStatus:
        """Block until a job that ends by itself (commit below the top, pull) has ended.

        Returns the final status (:attr:`BlockJobStatus.COMPLETED`, or ``CANCELED`` when
        someone aborted it). Raises :class:`LibvirtError` when the job failed,
        :class:`OperationTimeoutError` after ``timeout`` seconds, and :class:`UsageError` for
        a running copy or active commit, which never ends by itself: call
        :meth:`wait_ready` and then :meth:`pivot` or :meth:`abort`.
        """
        if self.kind.is_mirror and not self.ended:
            raise UsageError(
                f"a {self.kind.value} job never ends by itself; "
                "use wait_ready() and then pivot() or abort()"
            )
        status = self._await_end(timeout, what="block job end")
        if status is BlockJobStatus.FAILED:
            raise self._failed_error("block job")
        return status

    # ------------------------------------------------------------------ ending
    def pivot(self, timeout: float | None = 60.0) -> None:
        """Switch the guest to the mirror's destination and end the job.

        A copy then runs on :attr:`destination`; an active commit on the base image. The
        job must be :attr:`ready` (:class:`InvalidStateError` otherwise, before libvirt is
        asked). Waits for the job's end event (status COMPLETED).
        """
        self._request_end(pivot=True)
        status = self._await_end(timeout, what="block job pivot")
        if status is BlockJobStatus.FAILED:
            raise self._failed_error("block job pivot")
        if status is BlockJobStatus.CANCELED:
            raise InvalidStateError(
                f"the {self.kind.value} job on {self.disk!r} was canceled instead of pivoted",
                operation="block job pivot",
                domain_name=self.domain.name,
            )

    def abort(self, timeout: float | None = 60.0) -> BlockJobStatus:
        """End the job without pivoting; idempotent. Returns the final status.

        A copy aborted while ready leaves a complete copy (consistent to the moment of the
        abort) at :attr:`destination` and the guest on its original image; a copy aborted
        before it was ready leaves nothing: a destination statecapture created is removed.
        An active commit aborted leaves the guest on the overlay. Waits for the end event.
        """
        if self.ended:
            return self._status
        if not self._end_requested:  # an asynchronous pivot/abort already asked: just wait
            self._request_end(pivot=False)
        status = self._await_end(timeout, what="block job abort")
        if status is BlockJobStatus.FAILED:
            raise self._failed_error("block job abort")
        return status

    def _request_end(self, *, pivot: bool, asynchronous: bool = False) -> None:
        """Ask libvirt to pivot or abort; the end event is awaited by :meth:`_await_end`."""
        operation = "block job pivot" if pivot else "block job abort"
        if self.kind is BlockJobKind.BACKUP:
            raise UsageError("a backup's disk job ends with the backup (abortJob), not here")
        if pivot:
            if not self.kind.is_mirror:
                raise UsageError(f"only copy and active-commit jobs pivot, not {self.kind.value}")
            self._require_running(operation)
            if not self.ready:
                raise InvalidStateError(
                    f"the {self.kind.value} job on {self.disk!r} of {self.domain.name!r} is "
                    "not ready for pivot yet; wait_ready() first",
                    operation=operation,
                    domain_name=self.domain.name,
                )
        else:
            self._drain()
            if self._status.ended:
                return
        self._ready_at_end = self._status is BlockJobStatus.READY
        try:
            self.domain.port.block_job_abort(self.disk, pivot=pivot, asynchronous=asynchronous)
        except LibvirtError:
            # Raced with the job's own end (a commit finishing): that is not an error for
            # abort. Anything else is.
            if pivot or not self._settle_gone():
                raise
        self._end_requested = True

    def _await_end(self, timeout: float | None, *, what: str) -> BlockJobStatus:
        deadline = _deadline(timeout)
        gone_since: float | None = None
        while True:
            self._drain()
            if self._status.ended:
                self._after_end()
                return self._status
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise OperationTimeoutError(
                    f"timed out after {timeout} s waiting for the {self.kind.value} job on "
                    f"{self.disk!r} of {self.domain.name!r} to end",
                    operation=f"wait for {what}",
                    domain_name=self.domain.name,
                )
            gone_since = self._wait_slice(remaining, gone_since)

    def _after_end(self) -> None:
        # A copy that never became ready left a partial image: remove it if we made it.
        if (
            self._created is not None
            and self._status in (BlockJobStatus.CANCELED, BlockJobStatus.FAILED)
            and not self._ready_at_end
        ):
            path, self._created = self._created, None
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise CleanupError(f"could not remove the partial copy {path}: {exc}") from exc

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> BlockJob:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ended:
            return
        try:
            self.abort()
        except Exception as cleanup:  # KeyboardInterrupt and friends propagate unchanged
            if e is None:
                raise CleanupError(
                    f"could not abort the {self.kind.value} job on {self.disk!r} of "
                    f"{self.domain.name!r}: {cleanup}"
                ) from cleanup
            e.add_note(f"statecapture: aborting the block job on {self.disk!r} failed: {cleanup}")

    # ------------------------------------------------------------------ events
    def _apply(self, event: Event) -> None:
        status = _EVENT_STATUS.get(str(event.detail.get("status")))
        if status is None or self._status.ended:
            return
        if status is BlockJobStatus.READY:
            self._status = BlockJobStatus.READY
            return
        self._finish(status)

    def _finish(self, status: BlockJobStatus) -> None:
        if not self._status.ended:
            self._ready_at_end = self._ready_at_end or self._status is BlockJobStatus.READY
        self._status = status
        if self._finalizer is not None:
            self._finalizer()  # closes the expectation, once
        self._exp = None

    def _drain(self) -> None:
        while self._exp is not None:
            event = self._exp.poll()
            if event is None:
                return
            self._apply(event)

    def _wait_slice(self, remaining: float | None, gone_since: float | None) -> float | None:
        """Wait up to one poll interval for an event; notice a job that vanished silently."""
        slice_ = _POLL if remaining is None else max(0.0, min(_POLL, remaining))
        if self._exp is not None:
            with contextlib.suppress(OperationTimeoutError):
                self._apply(self._exp.wait(slice_))
                return gone_since
        else:
            time.sleep(slice_)
        if self._status.ended or not self._job_gone():
            return None
        now = time.monotonic()
        if gone_since is None:
            return now
        if now - gone_since >= _GONE_GRACE:
            self._drain()
            self._finish(BlockJobStatus.GONE)
        return gone_since

    def _job_gone(self) -> bool:
        try:
            return self.domain.port.block_job_info(self.disk) is None
        except InvalidStateError:  # the domain stopped
            return True
        except UnsupportedError:  # this driver cannot tell: rely on the events alone
            return False

    def _settle_gone(self) -> bool:
        """After a refused abort: whether the job has in fact ended (event or no job)."""
        deadline = time.monotonic() + _GONE_GRACE
        while True:
            self._drain()
            if self._status.ended:
                return True
            if not self._job_gone():
                return False
            if time.monotonic() >= deadline:
                self._finish(BlockJobStatus.GONE)
                return True
            if self._exp is not None:
                with contextlib.suppress(OperationTimeoutError):
                    self._apply(self._exp.wait(0.1))
            else:
                time.sleep(0.1)

    # ------------------------------------------------------------------ helpers
    def _require_running(self, operation: str) -> None:
        if self.ended:
            raise InvalidStateError(
                f"the {self.kind.value} job on {self.disk!r} of {self.domain.name!r} has "
                f"ended ({self._status.value})",
                operation=operation,
                domain_name=self.domain.name,
            )

    def _raise_ended_before(self, what: str) -> None:
        if self._status is BlockJobStatus.FAILED:
            raise self._failed_error("wait for block job ready")
        raise InvalidStateError(
            f"the {self.kind.value} job on {self.disk!r} of {self.domain.name!r} ended "
            f"({self._status.value}) before it {what}",
            operation="wait for block job ready",
            domain_name=self.domain.name,
        )

    def _failed_error(self, operation: str) -> LibvirtError:
        return LibvirtError(
            f"the {self.kind.value} job on {self.disk!r} of {self.domain.name!r} failed "
            "(see the domain's QEMU log for the reason)",
            operation=operation,
            domain_name=self.domain.name,
        )

    def __repr__(self) -> str:
        dest = f" -> {self.destination}" if self.destination is not None else ""
        return (
            f"<BlockJob {self.kind.value} {self.disk}{dest} of {self.domain.name!r}: "
            f"{self._status.value}>"
        )

    def __del__(self) -> None:
        if not getattr(self, "_owned", False):
            return
        exp = getattr(self, "_exp", None)
        status = getattr(self, "_status", BlockJobStatus.GONE)
        if exp is None or status.ended:
            return
        warnings.warn(
            f"block job {self.kind.value} on {self.disk!r} was left running by its owner "
            "(use the job as a context manager, or pivot()/abort() it)",
            ResourceWarning,
            stacklevel=2,
        )


# ----------------------------------------------------------------------------- helpers


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise UsageError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _check_bandwidth(value: int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"bandwidth must be a non-negative int (bytes per second), got {value!r}")


def _expect(dom: Domain, target: str) -> Expectation:
    """Subscribe to this disk's block-job events (before the job starts)."""
    return dom.connection.events.expect(
        lambda ev: ev.detail.get("disk") == target,
        kind=EventKind.BLOCK_JOB,
        domain_uuid=dom.uuid,
    )


def _live_disks(dom: Domain) -> list[etree._Element]:
    root = parse(dom.port.xml_desc(), expected_root="domain")
    return list(root.iterfind("devices/disk"))


def _disk_target(el: etree._Element) -> str | None:
    tgt = el.find("target")
    return tgt.get("dev") if tgt is not None else None


def _disk_source(el: etree._Element) -> str | None:
    src = el.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "name", "volume"):
        value = src.get(attr)
        if value:
            return value
    return None


def _resolve_disk(dom: Domain, disk: str) -> etree._Element:
    """The live ``<disk>`` named by target (``vda``) or by its active image's path."""
    if not isinstance(disk, str) or not disk:
        raise UsageError(f"a disk target name (e.g. 'vda') is required, got {disk!r}")
    elements = _live_disks(dom)
    for el in elements:
        if _disk_target(el) == disk:
            return el
    for el in elements:
        if _disk_source(el) == disk:
            return el
    known = ", ".join(filter(None, (_disk_target(el) for el in elements))) or "none"
    raise NotFoundError(
        f"domain {dom.name!r} has no disk {disk!r} (disks: {known})",
        operation="look up disk",
        domain_name=dom.name,
    )


def _mirror_ready(dom: Domain, target: str) -> bool:
    for el in _live_disks(dom):
        if _disk_target(el) == target:
            mirror = el.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


def _require_no_job(dom: Domain, target: str, operation: str) -> None:
    info = dom.port.block_job_info(target)
    if info is not None:
        raise InvalidStateError(
            f"disk {target!r} of {dom.name!r} already has a {info[0]} block job running; "
            "end it first (Domain.block_jobs() lists it)",
            operation=operation,
            domain_name=dom.name,
        )


def _start(
    dom: Domain,
    target: str,
    kind: BlockJobKind,
    action: Any,
    *,
    destination: Path | None = None,
    created: Path | None = None,
) -> BlockJob:
    exp = _expect(dom, target)  # BEFORE the job starts: no event can be missed
    try:
        action()
    except BaseException:
        exp.close()
        raise
    return BlockJob(dom, target, kind, destination, exp=exp, owned=True, created=created)


# ----------------------------------------------------------------------------- commit


def start_commit(
    dom: Domain,
    disk: str,
    *,
    top: str | None = None,
    base: str | None = None,
    active: bool | None = None,
    shallow: bool = False,
    delete: bool = False,
    bandwidth: int | None = None,
) -> BlockJob:
    """Implementation of :meth:`Domain.block_commit`."""
    operation = "block commit"
    _check_bandwidth(bandwidth)
    for name, value in (("top", top), ("base", base)):
        if value is not None and (not isinstance(value, str) or not value):
            raise UsageError(f"{name} must be an image path or 'vda[N]', got {value!r}")
    if active is not None and not isinstance(active, bool):
        raise UsageError(f"active must be True, False or None, got {active!r}")
    dom._require_active(operation)
    el = _resolve_disk(dom, disk)
    target = _disk_target(el) or disk
    backing = el.find("backingStore")
    if backing is None or backing.get("type") is None:
        raise InvalidStateError(
            f"disk {target!r} of {dom.name!r} has no backing image: there is nothing to commit",
            operation=operation,
            domain_name=dom.name,
        )
    src = el.find("source")
    active_index = src.get("index") if src is not None else None
    top_is_active = (
        top is None
        or top == _disk_source(el)
        or (active_index is not None and top == f"{target}[{active_index}]")
    )
    if active is None:
        active = top_is_active
    elif active != top_is_active:
        raise UsageError(
            f"active={active} but top {top!r} is {'' if top_is_active else 'not '}the active "
            f"layer of {target!r}; leave active=None to choose automatically"
        )
    _require_no_job(dom, target, operation)
    kind = BlockJobKind.ACTIVE_COMMIT if active else BlockJobKind.COMMIT
    return _start(
        dom,
        target,
        kind,
        lambda: dom.port.block_commit(
            target,
            base=base,
            top=top,
            bandwidth=bandwidth,
            active=active,
            shallow=shallow,
            delete=delete,
        ),
    )


# ----------------------------------------------------------------------------- pull


def start_pull(dom: Domain, disk: str, *, bandwidth: int | None = None) -> BlockJob:
    """Implementation of :meth:`Domain.block_pull`."""
    operation = "block pull"
    _check_bandwidth(bandwidth)
    dom._require_active(operation)
    el = _resolve_disk(dom, disk)
    target = _disk_target(el) or disk
    backing = el.find("backingStore")
    if backing is None or backing.get("type") is None:
        raise InvalidStateError(
            f"disk {target!r} of {dom.name!r} has no backing image: there is nothing to pull",
            operation=operation,
            domain_name=dom.name,
        )
    _require_no_job(dom, target, operation)
    return _start(
        dom,
        target,
        BlockJobKind.PULL,
        lambda: dom.port.block_pull(target, bandwidth=bandwidth),
    )


# ----------------------------------------------------------------------------- copy


@attrs.frozen
class _CopyPlan:
    target: str
    destination: Path
    format: str
    block: bool
    reuse_external: bool

    def xml(self) -> str:
        return destination_xml(self.destination, fmt=self.format, block=self.block)


def destination_xml(path: Path, *, fmt: str, block: bool = False) -> str:
    """The ``<disk>`` document naming a copy destination (for ``virDomainBlockCopy``)."""
    disk = etree.Element("disk", type="block" if block else "file")
    etree.SubElement(disk, "source", {"dev" if block else "file": str(path)})
    etree.SubElement(disk, "driver", type=fmt)
    return serialize(disk)


def _plan_copy(
    dom: Domain,
    disk: str,
    destination: str | os.PathLike[str],
    *,
    format: str,
    reuse_external: bool,
) -> _CopyPlan:
    """Check one copy request completely before anything changes."""
    if not isinstance(destination, str | os.PathLike) or not os.fspath(destination):
        raise UsageError(f"destination must be a path, got {destination!r}")
    if format not in _COPY_FORMATS:
        raise UsageError(f"format must be one of {', '.join(_COPY_FORMATS)}, got {format!r}")
    el = _resolve_disk(dom, disk)
    target = _disk_target(el) or disk
    dest = Path(os.path.abspath(os.fspath(destination)))
    current = _disk_source(el)
    if current is not None and os.path.abspath(current) == str(dest):
        raise UsageError(f"destination {dest} is the image disk {target!r} runs on")
    exists = _files.lexists(dest)
    if exists and not reuse_external:
        raise TargetExistsError(
            f"copy destination {dest} exists; pass reuse_external=True to copy into it",
            path=str(dest),
        )
    if not exists and reuse_external:
        raise NotFoundError(
            f"reuse_external=True but the destination {dest} does not exist",
            operation="block copy",
            domain_name=dom.name,
        )
    if not dest.parent.is_dir():
        raise NotFoundError(
            f"the directory of the copy destination {dest} does not exist",
            operation="block copy",
            domain_name=dom.name,
        )
    block = exists and stat.S_ISBLK(os.stat(dest).st_mode)
    if not block and writes_host_files(dom.connection):
        # libvirtd/QEMU open (and without reuse_external create) the destination by this
        # path, and the disk keeps it: no one else may plant or swap a name on the way.
        _files.require_trusted(dest.parent, staged=False, what=f"copy destination {dest}")
    return _CopyPlan(target, dest, format, block, reuse_external)


def _start_copy(
    dom: Domain,
    plan: _CopyPlan,
    *,
    shallow: bool,
    synchronous_writes: bool,
    bandwidth: int | None,
) -> BlockJob:
    # libvirt 9.0 refuses a copy on a persistent domain ("domain is not transient") unless
    # the job is transient: it is then not recovered after a daemon or domain restart.
    transient_job = dom.is_persistent
    job = _start(
        dom,
        plan.target,
        BlockJobKind.COPY,
        lambda: dom.port.block_copy(
            plan.target,
            plan.xml(),
            bandwidth=bandwidth,
            shallow=shallow,
            reuse_external=plan.reuse_external,
            transient_job=transient_job,
            synchronous_writes=synchronous_writes,
        ),
        destination=plan.destination,
        created=None if plan.reuse_external else plan.destination,
    )
    if not plan.reuse_external:
        try:
            # libvirt created it; statecapture files are 0600 (raises when it cannot)
            _files.owner_only([plan.destination], what="copy destination")
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                job.abort()
            raise CleanupError(
                f"could not make the copy destination {plan.destination} owner-only: {exc}; "
                "the copy job was aborted"
            ) from exc
    return job


def start_copy(
    dom: Domain,
    disk: str,
    destination: str | os.PathLike[str],
    *,
    format: str = "qcow2",
    shallow: bool = False,
    reuse_external: bool = False,
    synchronous_writes: bool = False,
    bandwidth: int | None = None,
) -> BlockJob:
    """Implementation of :meth:`Domain.block_copy`."""
    operation = "block copy"
    _check_bandwidth(bandwidth)
    dom._require_active(operation)
    plan = _plan_copy(dom, disk, destination, format=format, reuse_external=reuse_external)
    _require_no_job(dom, plan.target, operation)
    return _start_copy(
        dom, plan, shallow=shallow, synchronous_writes=synchronous_writes, bandwidth=bandwidth
    )


# ----------------------------------------------------------------------------- listing


def running_jobs(dom: Domain) -> tuple[BlockJob, ...]:
    """Implementation of :meth:`Domain.block_jobs`."""
    if not dom.is_active:
        return ()
    jobs: list[BlockJob] = []
    for el in _live_disks(dom):
        target = _disk_target(el)
        if target is None or _disk_source(el) is None:
            continue
        exp = _expect(dom, target)  # before the query: a READY/end in between is kept
        try:
            info = dom.port.block_job_info(target)
        except BaseException:
            exp.close()
            raise
        if info is None:
            exp.close()
            continue
        kind = BlockJobKind(info[0])
        destination: Path | None = None
        mirror = el.find("mirror")
        if kind is BlockJobKind.COPY and mirror is not None:
            mfile = mirror.get("file") or _disk_source(mirror)
            destination = Path(mfile) if mfile else None
        jobs.append(BlockJob(dom, target, kind, destination, exp=exp, owned=False))
    return tuple(jobs)


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
