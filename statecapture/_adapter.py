"""The only module that imports ``libvirt``.

Everything else in statecapture talks to libvirt through the typed wrappers here:

* :func:`translated` turns every ``libvirt.libvirtError`` into the statecapture hierarchy,
  in one place, by error code (``raise … from exc``);
* :class:`VirConnection` and :class:`VirDomain` wrap ``virConnect``/``virDomain`` with typed
  methods that take keyword arguments and enums, never raw flag integers;
* the event loop (:func:`ensure_event_loop`) is registered once per process and run in a
  daemon thread, before the first connection is opened;
* domain events are converted into :class:`~statecapture._events.Event` values.

Hazard notes (see docs/hazards): libvirt-python built against an older libvirt lacks newer
constants, so flags and codes introduced after libvirt 9.0 are literals or
``getattr(libvirt, NAME, value)``; its type hints for ``jobInfo``/``jobStats``/
``blockJobInfo``/``fsInfo`` claim ``str`` but return list/dict/dict/list.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

import libvirt

from . import errors
from ._events import Event, EventKind

__all__ = [
    "VirConnection",
    "VirDomain",
    "ensure_event_loop",
    "event_loop_running",
    "translated",
    "client_library_version",
]


def _const(name: str, value: int) -> int:
    """A libvirt constant, or its documented value when this binding predates it."""
    got = getattr(libvirt, name, value)
    return int(got)


# --------------------------------------------------------------------------- errors

_CONNECTION_ERRORS: Final = frozenset({5, 6, 39})


def translate_error(
    exc: libvirt.libvirtError, operation: str, *, domain_name: str | None = None
) -> errors.LibvirtError:
    """Map one ``libvirtError`` to a statecapture error (not raised)."""
    code = exc.get_error_code()
    code = int(code) if code is not None else None
    message = exc.get_error_message() or str(exc)
    cls = errors.lookup(code) if code is not None else errors.LibvirtError
    # "agent unresponsive", "guest agent is not configured/connected" are operation-invalid
    # (55) or argument-unsupported (74) on some paths: recognise them by text too.
    lowered = message.lower()
    if (
        cls is not errors.GuestAgentError
        and "agent" in lowered
        and (
            "not connected" in lowered
            or "not configured" in lowered
            or "not responding" in lowered
            or "unresponsive" in lowered
            or "agent is not" in lowered
        )
    ):
        cls = errors.GuestAgentError
    if code == 8 and "unsupported flag" in lowered:
        # Drivers reject flags they do not implement as INVALID_ARG: it is a capability gap.
        cls = errors.UnsupportedError
    where = f" on domain {domain_name!r}" if domain_name else ""
    return cls(
        f"{operation}{where} failed: {message}",
        code=code,
        operation=operation,
        domain_name=domain_name,
        libvirt_message=message,
    )


@contextlib.contextmanager
def translated(operation: str, *, domain_name: str | None = None) -> Iterator[None]:
    """Run the block, translating any ``libvirtError`` into the statecapture hierarchy."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_error(exc, operation, domain_name=domain_name) from exc


def client_library_version() -> int:
    """The version of the libvirt library loaded in this process (``major*1e6+minor*1e3+micro``)."""
    return int(libvirt.getVersion())


# --------------------------------------------------------------------------- event loop

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


# --------------------------------------------------------------------------- connection

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


class VirConnection:
    """Typed wrapper around ``virConnect``; raises statecapture errors only."""

    def __init__(self, raw: Any, uri: str) -> None:
        self._raw = raw
        self.uri = uri
        self.closed = False
        self._event_ids: list[int] = []

    @classmethod
    def open(cls, uri: str, *, readonly: bool = False) -> VirConnection:
        ensure_event_loop()
        with translated(f"connect to {uri}"):
            raw = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
        if raw is None:  # pragma: no cover - old bindings returned None
            raise errors.ConnectionLostError(f"connect to {uri} failed", operation="connect")
        return cls(raw, uri)

    def check_open(self) -> None:
        if self.closed:
            raise errors.UsageError(f"the connection to {self.uri} is closed")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for cid in self._event_ids:
            with contextlib.suppress(libvirt.libvirtError):
                self._raw.domainEventDeregisterAny(cid)
        self._event_ids.clear()
        with contextlib.suppress(libvirt.libvirtError):
            self._raw.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._raw.close()

    def _call(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.check_open()
        with translated(operation):
            return fn(*args)

    # ---- identity and versions
    def driver_type(self) -> str:
        return str(self._call("get driver type", self._raw.getType))

    def canonical_uri(self) -> str:
        return str(self._call("get URI", self._raw.getURI))

    def hostname(self) -> str:
        return str(self._call("get hostname", self._raw.getHostname))

    def daemon_version(self) -> int:
        """libvirt version of the daemon (or of the in-process driver for embedded URIs)."""
        return int(self._call("get daemon version", self._raw.getLibVersion))

    def hypervisor_version(self) -> int:
        return int(self._call("get hypervisor version", self._raw.getVersion))

    def is_alive(self) -> bool:
        if self.closed:
            return False
        try:
            return bool(self._raw.isAlive())
        except libvirt.libvirtError:
            return False

    # ---- domains
    def lookup_domain(self, name_or_uuid: str) -> VirDomain:
        self.check_open()
        try:
            raw = self._raw.lookupByName(name_or_uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise translate_error(exc, "look up domain", domain_name=name_or_uuid) from exc
            try:
                raw = self._raw.lookupByUUIDString(name_or_uuid)
            except libvirt.libvirtError as exc2:
                if exc2.get_error_code() in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_INVALID_ARG,
                ):
                    raise errors.NotFoundError(
                        f"no domain with name or UUID {name_or_uuid!r}",
                        code=libvirt.VIR_ERR_NO_DOMAIN,
                        operation="look up domain",
                        domain_name=name_or_uuid,
                        libvirt_message=exc.get_error_message(),
                    ) from exc2
                raise translate_error(exc2, "look up domain", domain_name=name_or_uuid) from exc2
        return VirDomain(raw, self)

    def list_domains(self) -> list[VirDomain]:
        raws = self._call("list domains", self._raw.listAllDomains, 0)
        return [VirDomain(r, self) for r in raws]

    def define(self, xml: str, *, validate: bool = True) -> VirDomain:
        flags = _const("VIR_DOMAIN_DEFINE_VALIDATE", 1) if validate else 0
        raw = self._call("define domain", self._raw.defineXMLFlags, xml, flags)
        return VirDomain(raw, self)

    def create_transient(self, xml: str, *, paused: bool = False) -> VirDomain:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        raw = self._call("create transient domain", self._raw.createXML, xml, flags)
        return VirDomain(raw, self)

    # ---- connection-level memory state (restore, save images)

    # ---- connection-level capabilities

    # ---- events
    def register_events(self, sink: Callable[[Event], None]) -> None:
        """Subscribe ``sink`` to every domain event statecapture understands."""
        self.check_open()

        def _dom(d: Any) -> tuple[str, str]:
            return (d.name(), d.UUIDString())

        def lifecycle(_c: Any, d: Any, event: int, detail: int, _o: Any) -> None:
            name, uuid = _dom(d)
            sink(
                Event(
                    EventKind.LIFECYCLE,
                    name,
                    uuid,
                    {"event": _LIFECYCLE_EVENTS.get(event, str(event)), "detail": detail},
                )
            )

        def agent(_c: Any, d: Any, state: int, reason: int, _o: Any) -> None:
            name, uuid = _dom(d)
            connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
            sink(
                Event(
                    EventKind.AGENT_LIFECYCLE,
                    name,
                    uuid,
                    {"connected": connected, "reason": reason},
                )
            )

        def block_job(_c: Any, d: Any, disk: str, type_: int, status: int, _o: Any) -> None:
            name, uuid = _dom(d)
            sink(
                Event(
                    EventKind.BLOCK_JOB,
                    name,
                    uuid,
                    {
                        "disk": disk,
                        "type": type_,
                        "status": _BLOCK_JOB_STATUS.get(status, str(status)),
                    },
                )
            )

        def job_completed(_c: Any, d: Any, stats: dict[str, Any], _o: Any) -> None:
            name, uuid = _dom(d)
            sink(Event(EventKind.JOB_COMPLETED, name, uuid, {"stats": dict(stats)}))

        registrations: list[tuple[int, Callable[..., None]]] = [
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent),
            (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job),
            (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed),
        ]
        for event_id, cb in registrations:
            try:
                cid = self._raw.domainEventRegisterAny(None, event_id, cb, None)
            except libvirt.libvirtError as exc:
                # A driver that lacks one event type still delivers the others.
                if exc.get_error_code() in (
                    libvirt.VIR_ERR_NO_SUPPORT,
                    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                ):
                    continue
                raise translate_error(exc, "register domain events") from exc
            self._event_ids.append(int(cid))

        def closed(_c: Any, reason: int, _o: Any) -> None:
            sink(Event(EventKind.CONNECTION_CLOSED, None, None, {"reason": reason}))

        with contextlib.suppress(libvirt.libvirtError):
            self._raw.registerCloseCallback(closed, None)


_BLOCK_JOB_STATUS: Final = {0: "completed", 1: "failed", 2: "canceled", 3: "ready"}


# --------------------------------------------------------------------------- domain

_STATE_NAMES: Final = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


class VirDomain:
    """Typed wrapper around ``virDomain``; raises statecapture errors only."""

    def __init__(self, raw: Any, conn: VirConnection) -> None:
        self._raw = raw
        self.conn = conn
        self._name: str = str(raw.name())

    @property
    def name(self) -> str:
        return self._name

    def _call(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.conn.check_open()
        with translated(operation, domain_name=self._name):
            return fn(*args)

    def uuid(self) -> str:
        return str(self._call("get UUID", self._raw.UUIDString))

    def state(self) -> tuple[str, int]:
        """(state name, reason code)."""
        state, reason = self._call("get state", self._raw.state, 0)
        return _STATE_NAMES.get(int(state), "nostate"), int(reason)

    def is_active(self) -> bool:
        return bool(self._call("get active", self._raw.isActive))

    def is_persistent(self) -> bool:
        return bool(self._call("get persistent", self._raw.isPersistent))

    def xml_desc(self, *, inactive: bool = False, secure: bool = False) -> str:
        flags = 0
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        if secure:
            flags |= libvirt.VIR_DOMAIN_XML_SECURE
        return str(self._call("get XML", self._raw.XMLDesc, flags))

    # ---- lifecycle
    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None:
        flags = 0
        if paused:
            flags |= libvirt.VIR_DOMAIN_START_PAUSED
        if bypass_cache:
            flags |= libvirt.VIR_DOMAIN_START_BYPASS_CACHE
        if force_boot:
            flags |= libvirt.VIR_DOMAIN_START_FORCE_BOOT
        self._call("start", self._raw.createWithFlags, flags)

    def shutdown(self, *, agent: bool | None = None) -> None:
        if agent is None:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_DEFAULT
        elif agent:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
        else:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        self._call("shutdown", self._raw.shutdownFlags, flags)

    def destroy(self, *, graceful: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0
        self._call("destroy", self._raw.destroyFlags, flags)

    def suspend(self) -> None:
        self._call("suspend", self._raw.suspend)

    def resume(self) -> None:
        self._call("resume", self._raw.resume)

    def undefine(
        self,
        *,
        managed_save: bool = False,
        snapshots_metadata: bool = False,
        checkpoints_metadata: bool = False,
        nvram: bool = False,
    ) -> None:
        flags = 0
        if managed_save:
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        if snapshots_metadata:
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        if checkpoints_metadata:
            flags |= _const("VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 128)
        if nvram:
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        self._call("undefine", self._raw.undefineFlags, flags)

    # ---- memory state (managed save, save/restore)

    # ---- snapshots

    # ---- guest agent, freeze

    # ---- block jobs

    # ---- checkpoints, backup, domain jobs


# --------------------------------------------------------------------------- snapshot handles

# --------------------------------------------------------------------------- checkpoint handles
