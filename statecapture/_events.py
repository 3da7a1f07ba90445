"""Domain events as values, and a small thread-safe bus that dispatches them.

libvirt delivers events on its event-loop thread (see ``_adapter.ensure_event_loop``). The
bus hands each event to every matching subscriber; a subscriber that raises is logged and
does not stop the others. :meth:`EventBus.expect` is how statecapture waits for "the READY
event of this block job" or "the JOB_COMPLETED of this domain" without races: subscribe
*before* starting the action, then wait.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import attrs

from .errors import OperationTimeoutError

__all__ = ["Event", "EventKind", "EventBus", "Subscription", "Expectation"]

_log = logging.getLogger("statecapture.events")


class EventKind(enum.Enum):
    """The domain events statecapture listens to."""

    LIFECYCLE = "lifecycle"
    """Started, stopped, suspended, resumed ... (``detail['event']`` names which)."""
    AGENT_LIFECYCLE = "agent-lifecycle"
    """The guest agent connected or disconnected (``detail['connected']``)."""
    BLOCK_JOB = "block-job"
    """A block job changed status.

    ``detail['disk']`` names the disk, ``detail['status']`` is ready/completed/failed/canceled.
    """
    JOB_COMPLETED = "job-completed"
    """A domain job (backup, save, migration) finished (``detail['stats']``)."""
    CONNECTION_CLOSED = "connection-closed"
    """The connection to libvirt closed underneath us."""


@attrs.frozen
class Event:
    """One event, as delivered to subscribers."""

    kind: EventKind
    domain_name: str | None
    domain_uuid: str | None
    detail: Mapping[str, Any] = attrs.field(factory=dict)
    timestamp: float = attrs.field(factory=time.monotonic)
    """``time.monotonic()`` when the event reached statecapture."""


Callback = Callable[[Event], None]
Predicate = Callable[[Event], bool]


@attrs.define(eq=False)
class Subscription:
    """A registered callback; :meth:`cancel` (or leaving the ``with`` block) removes it."""

    _bus: EventBus
    callback: Callback
    kind: EventKind | None
    domain_uuid: str | None

    def matches(self, event: Event) -> bool:
        if self.kind is not None and event.kind is not self.kind:
            return False
        return self.domain_uuid is None or event.domain_uuid == self.domain_uuid

    def cancel(self) -> None:
        """Stop receiving events; idempotent."""
        self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


@attrs.define(eq=False)
class Expectation:
    """Events matching a predicate, queued from the moment of creation.

    Use as a context manager around the action that will cause the event::

        with bus.expect(kind=EventKind.JOB_COMPLETED, domain_uuid=uuid) as exp:
            start_the_job()
            event = exp.wait(timeout=60)
    """

    _bus: EventBus
    predicate: Predicate
    _queue: queue.Queue[Event] = attrs.field(factory=queue.Queue)
    _sub: Subscription | None = None

    def _feed(self, event: Event) -> None:
        if self.predicate(event):
            self._queue.put(event)

    def wait(self, timeout: float | None, *, what: str = "event") -> Event:
        """The next matching event; :class:`OperationTimeoutError` after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise OperationTimeoutError(
                f"timed out after {timeout} s waiting for {what}", operation=f"wait for {what}"
            ) from None

    def poll(self) -> Event | None:
        """The next matching event if one has arrived, else ``None``."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    def __enter__(self) -> Expectation:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EventBus:
    """Thread-safe fan-out of :class:`Event` values to subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def subscribe(
        self,
        callback: Callback,
        *,
        kind: EventKind | None = None,
        domain_uuid: str | None = None,
    ) -> Subscription:
        """Call ``callback(event)`` for matching events (on libvirt's event thread)."""
        sub = Subscription(self, callback, kind, domain_uuid)
        with self._lock:
            self._subs.append(sub)
        return sub

    def expect(
        self,
        predicate: Predicate | None = None,
        *,
        kind: EventKind | None = None,
        domain_uuid: str | None = None,
    ) -> Expectation:
        """Start queueing events that match ``kind``/``domain_uuid`` and ``predicate``."""
        exp = Expectation(self, predicate or (lambda _e: True))
        exp._sub = self.subscribe(exp._feed, kind=kind, domain_uuid=domain_uuid)
        return exp

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every matching subscriber."""
        with self._lock:
            subs = [s for s in self._subs if s.matches(event)]
        for sub in subs:
            try:
                sub.callback(event)
            except Exception:  # a subscriber's bug must not kill libvirt's event thread
                _log.exception("event subscriber %r failed on %r", sub.callback, event)

    def __len__(self) -> int:
        with self._lock:
            return len(self._subs)
