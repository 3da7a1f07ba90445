"""libvirt's event loop (one per process) and domain events as :class:`Event` values."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Final, NoReturn

import libvirt

from .. import errors
from .._events import Event, EventKind
from .translate import translated

__all__ = [
    "ensure_event_loop",
    "event_loop_registrations",
    "event_loop_running",
    "register_events",
]

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None
_loop_registrations = 0


def _run_loop() -> NoReturn:
    while True:
        libvirt.virEventRunDefaultImpl()


def _silence(_ctx: object, _err: object) -> None:
    return None


def ensure_event_loop() -> bool:
    """Register libvirt's default event loop and start its thread, once per process.

    Must run before the first connection is opened (the embedded QEMU driver needs it).
    Returns ``True`` when this call started the loop, ``False`` when it was running already.
    """
    global _loop_thread, _loop_registrations
    with _loop_lock:
        if _loop_thread is not None:
            return False
        # libvirt prints every error to stderr unless a handler is set; ours are raised.
        libvirt.registerErrorHandler(_silence, None)
        with translated("event loop registration"):
            libvirt.virEventRegisterDefaultImpl()
        _loop_registrations += 1
        thread = threading.Thread(target=_run_loop, name="statecapture-libvirt-events", daemon=True)
        thread.start()
        _loop_thread = thread
        return True


def event_loop_running() -> bool:
    """Whether the event loop thread is running in this process."""
    return _loop_thread is not None and _loop_thread.is_alive()


def event_loop_registrations() -> int:
    """How often the default implementation was registered (at most once; for tests)."""
    return _loop_registrations


_LIFECYCLE_EVENTS: Final = {
    0: "defined",
    1: "undefined",
    2: "started",
    3: "suspended",
    4: "resumed",
    5: "stopped",
    6: "shutdown",
    7: "pmsuspended",
    8: "crashed",
}

_BLOCK_JOB_STATUS: Final = {0: "completed", 1: "failed", 2: "canceled", 3: "ready"}


def _names(d: Any) -> tuple[str, str]:
    return (d.name(), d.UUIDString())


def register_events(
    raw: Any, sink: Callable[[Event], None], alive: Callable[[], bool]
) -> list[int]:
    """Subscribe ``sink`` to every domain event statecapture understands on the raw
    connection ``raw``; the callback ids (the close callback is registered too)."""

    def lifecycle(_c: Any, d: Any, event: int, detail: int, _o: Any) -> None:
        name, uuid = _names(d)
        what = _LIFECYCLE_EVENTS.get(event, str(event))
        sink(Event(EventKind.LIFECYCLE, name, uuid, {"event": what, "detail": detail}))

    def agent(_c: Any, d: Any, state: int, reason: int, _o: Any) -> None:
        name, uuid = _names(d)
        connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
        detail = {"connected": connected, "reason": reason}
        sink(Event(EventKind.AGENT_LIFECYCLE, name, uuid, detail))

    def block_job(_c: Any, d: Any, disk: str, type_: int, status: int, _o: Any) -> None:
        name, uuid = _names(d)
        detail = {
            "disk": disk,
            "type": type_,
            "status": _BLOCK_JOB_STATUS.get(status, str(status)),
        }
        sink(Event(EventKind.BLOCK_JOB, name, uuid, detail))

    def job_completed(_c: Any, d: Any, stats: dict[str, Any], _o: Any) -> None:
        name, uuid = _names(d)
        sink(Event(EventKind.JOB_COMPLETED, name, uuid, {"stats": dict(stats)}))

    registrations: list[tuple[int, Callable[..., None]]] = [
        (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
        (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent),
        (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job),
        (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed),
    ]
    ids: list[int] = []
    for event_id, cb in registrations:
        try:
            with translated("register domain events", alive=alive):
                ids.append(int(raw.domainEventRegisterAny(None, event_id, cb, None)))
        except errors.UnsupportedError:
            continue  # a driver that lacks one event type still delivers the others

    def closed(_c: Any, reason: int, _o: Any) -> None:
        sink(Event(EventKind.CONNECTION_CLOSED, None, None, {"reason": reason}))

    with contextlib.suppress(libvirt.libvirtError):
        raw.registerCloseCallback(closed, None)
    return ids


def deregister_events(raw: Any, ids: list[int]) -> None:
    """Undo :func:`register_events` (best effort: the connection may be gone)."""
    for cid in ids:
        with contextlib.suppress(libvirt.libvirtError):
            raw.domainEventDeregisterAny(cid)
    with contextlib.suppress(libvirt.libvirtError):
        raw.unregisterCloseCallback()
