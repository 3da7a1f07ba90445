"""The :class:`BlockJob` handle (state, waiting, pivot/abort, events) and its values."""

from __future__ import annotations

import contextlib
import enum
import time
import warnings
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._events import Event, Expectation
from ..errors import (
    CleanupError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    UnsupportedError,
    UsageError,
)
from .common import _check_bandwidth, _deadline, _mirror_ready, _port, _remaining

if TYPE_CHECKING:
    from .._domain import Domain


#: How long a job may be missing from ``blockJobInfo`` before its end event arrives, before
#: statecapture concludes the event will never come (a destroyed domain, a lost connection).
_GONE_GRACE: Final = 2.0
#: How often wait loops look at the job when no event arrives.
_POLL: Final = 0.5


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
        info = _port(self.domain).block_job_info(self.disk)
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
        _port(self.domain).block_job_set_speed(self.disk, bytes_per_second)

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
            _port(self.domain).block_job_abort(self.disk, pivot=pivot, asynchronous=asynchronous)
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
            return _port(self.domain).block_job_info(self.disk) is None
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
