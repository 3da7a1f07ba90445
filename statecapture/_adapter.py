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
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

import attrs
import libvirt

from . import errors
from ._events import Event, EventKind

__all__ = [
    "NodeBitmap",
    "VirConnection",
    "VirDomain",
    "ensure_event_loop",
    "event_loop_running",
    "translated",
    "client_library_version",
]


def _flags(*choices: tuple[object, int]) -> int:
    """OR together the flags whose condition is true: ``_flags((paused, START_PAUSED), ...)``."""
    flags = 0
    for wanted, flag in choices:
        if wanted:
            flags |= flag
    return flags


def _const(name: str, value: int) -> int:
    """A libvirt constant, or its documented value when this binding predates it."""
    got = getattr(libvirt, name, value)
    return int(got)


# --------------------------------------------------------------------------- errors

# Connection loss (HAZARDS 22). libvirt reports a daemon that went away mostly as a generic
# error of the RPC layer: "client socket is closed" is VIR_ERR_INTERNAL_ERROR (1) and "End of
# file while reading data" VIR_ERR_SYSTEM_ERROR (38), both from VIR_FROM_RPC; only some paths
# use VIR_ERR_INVALID_CONN (6) or VIR_ERR_RPC (39). VIR_ERR_NO_CONNECT (5) is *not* a loss:
# it is what an unknown URI scheme ("no connection driver available") reports, and a failed
# connect ("Failed to connect socket", 38) is not a loss either — nothing was connected.
_FROM_RPC: Final = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_LOSS_CODES_FROM_RPC: Final = frozenset({1, 38})  # INTERNAL_ERROR, SYSTEM_ERROR
_LOSS_MESSAGES: Final = (
    "client socket is closed",
    "connection closed",
    "end of file while reading data",
    "cannot recv data",
    "cannot write data",
)


def is_connection_loss(
    code: int | None,
    error_domain: int | None,
    message: str,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Whether a libvirt error means the connection to libvirt is gone.

    The one place that decides it: the connection codes (``VIR_ERR_INVALID_CONN``,
    ``VIR_ERR_RPC``); a generic error of the RPC layer whose message is one of the known
    ones ("client socket is closed", "connection closed", "End of file while reading
    data", "Cannot recv/write data"); or any generic error (internal, system) while
    ``alive()`` — ``virConnectIsAlive`` of the connection it came from — says the
    connection is dead.
    """
    if code in errors.ConnectionLostError.codes:
        return True
    if code not in _LOSS_CODES_FROM_RPC:
        return False
    lowered = message.lower()
    if "failed to connect" in lowered or "no connection driver" in lowered:
        return False  # never connected: not a loss
    if error_domain in _FROM_RPC and any(m in lowered for m in _LOSS_MESSAGES):
        return True
    if alive is not None:
        try:
            return not alive()
        except Exception:
            return False
    return False


def translate_error(
    exc: libvirt.libvirtError,
    operation: str,
    *,
    domain_name: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> errors.LibvirtError:
    """Map one ``libvirtError`` to a statecapture error (not raised).

    ``alive`` (the connection's ``isAlive``) lets a generic error be recognised as a lost
    connection (:func:`is_connection_loss`).
    """
    code = exc.get_error_code()
    code = int(code) if code is not None else None
    err_domain = exc.get_error_domain()
    err_domain = int(err_domain) if err_domain is not None else None
    message = exc.get_error_message() or str(exc)
    cls = errors.lookup(code) if code is not None else errors.LibvirtError
    if is_connection_loss(code, err_domain, message, alive):
        cls = errors.ConnectionLostError
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
def translated(
    operation: str,
    *,
    domain_name: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Run the block, translating any ``libvirtError`` into the statecapture hierarchy."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_error(exc, operation, domain_name=domain_name, alive=alive) from exc


def client_library_version() -> int:
    """The version of the libvirt library loaded in this process (``major*1e6+minor*1e3+micro``)."""
    return int(libvirt.getVersion())


_LISTING_TRIES: Final = 10


def _listing(
    operation: str,
    fn: Callable[..., Any],
    *args: Any,
    domain_name: str | None,
    alive: Callable[[], bool] | None = None,
) -> Any:
    """Call a libvirt listing API, retrying libvirt 9.0's spurious answer to a listing that
    raced a concurrent delete ("name in virGetDomainCheckpoint must not be NULL", HAZARDS
    21): the list is taken again after a short pause. statecapture's own checkpoint
    changes hold the domain's lock, as do its listings; this covers other clients."""
    for attempt in range(_LISTING_TRIES):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            message = exc.get_error_message() or ""
            if (
                attempt < _LISTING_TRIES - 1
                and exc.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
                and "must not be NULL" in message
            ):
                time.sleep(0.01 * (attempt + 1))
                continue
            raise translate_error(exc, operation, domain_name=domain_name, alive=alive) from exc
    raise AssertionError("unreachable")  # pragma: no cover


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
        with translated(operation, alive=self.is_alive):
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
                raise translate_error(
                    exc, "look up domain", domain_name=name_or_uuid, alive=self.is_alive
                ) from exc
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
                raise translate_error(
                    exc2, "look up domain", domain_name=name_or_uuid, alive=self.is_alive
                ) from exc2
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
    def restore(
        self,
        path: str,
        *,
        dxml: str | None = None,
        running: bool | None = None,
        bypass_cache: bool = False,
        use_params: bool = True,
    ) -> str:
        """Restore a domain from a save image; returns the libvirt API that did it.

        ``use_params`` tries ``virDomainRestoreParams`` (libvirt >= 8.4) first and falls
        back to ``virDomainRestoreFlags`` when the driver lacks it (nothing happened then).
        """
        flags = VirDomain._save_flags(running=running, bypass_cache=bypass_cache)
        if use_params:
            params: dict[str, str] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: path}
            if dxml is not None:
                params[libvirt.VIR_DOMAIN_SAVE_PARAM_DXML] = dxml
            try:
                with VirDomain._flags_unsupported("restore"):
                    self._call("restore", self._raw.restoreParams, params, flags)
                return "virDomainRestoreParams"
            except errors.UnsupportedError as exc:
                if exc.code != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
        with VirDomain._flags_unsupported("restore"):
            self._call("restore", self._raw.restoreFlags, path, dxml, flags)
        return "virDomainRestoreFlags"

    def save_image_xml(self, path: str, *, secure: bool = False) -> str:
        """The domain definition stored in a save image's header."""
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE if secure else 0
        return str(self._call("read save image", self._raw.saveImageGetXMLDesc, path, flags))

    def save_image_define(self, path: str, dxml: str, *, running: bool | None = None) -> None:
        """Replace the definition (and optionally the run state) stored in a save image."""
        if not isinstance(dxml, str):  # the binding crashes on None
            raise errors.UsageError("save_image_define() needs the XML text")
        flags = VirDomain._save_flags(running=running)
        with VirDomain._flags_unsupported("redefine save image"):
            self._call("redefine save image", self._raw.saveImageDefineXML, path, dxml, flags)

    # ---- connection-level capabilities
    # Probes never change anything. An API that has no read-only counterpart is called with
    # a flag bit no libvirt API defines (_PROBE_FLAG): every driver entry point validates its
    # flags first (virCheckFlags) and answers INVALID_ARG "unsupported flags", while a driver
    # that lacks the API answers NO_SUPPORT before reaching any driver code.
    _PROBE_FLAG: Final = 1 << 30
    _PROBE_PATH: Final = "/nonexistent/statecapture-capability-probe"

    def _probe_calls(self, dom: VirDomain | None) -> dict[str, tuple[str, Callable[[], Any]]]:
        bad = VirConnection._PROBE_FLAG
        path = VirConnection._PROBE_PATH
        calls: dict[str, tuple[str, Callable[[], Any]]] = {
            "restore": ("virDomainRestoreFlags", lambda: self._raw.restoreFlags(path, None, bad)),
            "restore_params": (
                "virDomainRestoreParams",
                lambda: self._raw.restoreParams({}, bad),
            ),
        }
        if dom is not None:
            d = dom._raw
            disk_xml = f"<disk type='file'><source file='{path}'/></disk>"
            calls.update(
                {
                    "managed_save": ("virDomainManagedSave", lambda: d.managedSave(bad)),
                    "save": ("virDomainSaveFlags", lambda: d.saveFlags(path, None, bad)),
                    "save_params": ("virDomainSaveParams", lambda: d.saveParams({}, bad)),
                    "snapshot": (
                        "virDomainSnapshotCreateXML",
                        lambda: d.snapshotCreateXML("<domainsnapshot/>", bad),
                    ),
                    "fs_freeze": ("virDomainFSFreeze", lambda: d.fsFreeze(None, bad)),
                    "block_copy": (
                        "virDomainBlockCopy",
                        lambda: d.blockCopy("vda", disk_xml, None, bad),
                    ),
                    "block_commit": (
                        "virDomainBlockCommit",
                        lambda: d.blockCommit("vda", None, None, 0, bad),
                    ),
                    "checkpoint": (
                        "virDomainCheckpointCreateXML",
                        lambda: d.checkpointCreateXML("<domaincheckpoint/>", bad),
                    ),
                    "backup": (
                        "virDomainBackupBegin",
                        lambda: d.backupBegin("<domainbackup/>", None, bad),
                    ),
                }
            )
        return calls

    def probe_api(self, feature: str, dom: VirDomain | None = None) -> tuple[bool | None, str]:
        """Whether the driver implements the API behind ``feature``: (answer, evidence).

        ``None`` means the probe could not tell (read-only connection, no domain to probe
        on). Never raises for a missing API; raises only when the connection is gone.
        """
        self.check_open()
        calls = self._probe_calls(dom)
        if feature not in calls:
            return None, f"{feature} can only be probed on a domain"
        api, call = calls[feature]
        try:
            call()
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            message = exc.get_error_message() or str(exc)
            if code == libvirt.VIR_ERR_NO_SUPPORT:
                return False, f"{api} not supported"
            if code == libvirt.VIR_ERR_OPERATION_DENIED:
                return None, f"{api} not probed: {message}"
            if code == libvirt.VIR_ERR_RPC and "unknown procedure" in message.lower():
                return False, f"the daemon does not know {api}"
            if is_connection_loss(code, exc.get_error_domain(), message, self.is_alive):
                raise translate_error(exc, "capability probe", alive=self.is_alive) from exc
            # INVALID_ARG ("unsupported flags"), or any answer from inside the driver.
            if "unsupported flags" in message and "in function " in message:
                function = message.rpartition("in function ")[2].strip()
                return True, f"{api} implemented ({function} rejected the probe flag)"
            return True, f"{api} implemented (the driver answered: {message})"
        # Never seen: a driver that ignored an undefined flag and did the work.
        return True, f"{api} implemented (the probe call succeeded)"

    def domain_capabilities_xml(self) -> str | None:
        """``virConnectGetDomainCapabilities`` for the default emulator, or ``None`` when the
        driver has none (the test driver)."""
        self.check_open()
        try:
            return str(self._raw.getDomainCapabilities(None, None, None, None, 0))
        except libvirt.libvirtError as exc:
            if not self.is_alive():
                raise translate_error(exc, "get domain capabilities", alive=self.is_alive) from exc
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                libvirt.VIR_ERR_OPERATION_DENIED,
                libvirt.VIR_ERR_INTERNAL_ERROR,
                libvirt.VIR_ERR_INVALID_ARG,
            ):
                return None
            raise translate_error(exc, "get domain capabilities", alive=self.is_alive) from exc

    def probe_backup_job(self, dom: VirDomain) -> tuple[bool, str | None]:
        """(backup API implemented, the running backup job's XML or ``None`` when idle).

        ``virDomainBackupGetXMLDesc`` answers NO_DOMAIN_BACKUP (104) when the driver supports
        backups but none runs, NO_SUPPORT when it has no backup support.
        """
        self.check_open()
        try:
            return True, str(dom._raw.backupGetXMLDesc(0))
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == _const("VIR_ERR_NO_DOMAIN_BACKUP", 104):
                return True, None
            if code in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                return False, None
            raise translate_error(
                exc, "backup get XML", domain_name=dom.name, alive=self.is_alive
            ) from exc

    def probe_listing(self, dom: VirDomain, kind: str) -> list[str] | None:
        """Names of the domain's ``snapshot``/``checkpoint`` objects; ``None``: unsupported."""
        self.check_open()
        fn = dom._raw.listAllSnapshots if kind == "snapshot" else dom._raw.listAllCheckpoints
        try:
            return [
                str(o.getName())
                for o in _listing(f"list {kind}s", fn, 0, domain_name=dom.name, alive=self.is_alive)
            ]
        except errors.UnsupportedError as exc:
            if exc.code in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                return None
            raise

    def probe_managed_save_image(self, dom: VirDomain) -> bool | None:
        """Whether a managed-save image exists; ``None`` when the driver cannot say."""
        self.check_open()
        try:
            return bool(dom._raw.hasManagedSaveImage(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                return None
            raise translate_error(
                exc, "has managed save", domain_name=dom.name, alive=self.is_alive
            ) from exc

    def probe_block_job(self, dom: VirDomain, disk: str) -> bool | None:
        """Whether a block job runs on ``disk``; ``None`` when the driver cannot say (no
        block-job support, domain not running)."""
        self.check_open()
        try:
            # The binding's hint says str; it returns a dict, empty when idle (HAZARDS 18).
            return bool(dom._raw.blockJobInfo(disk, 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                libvirt.VIR_ERR_OPERATION_INVALID,
                libvirt.VIR_ERR_INVALID_ARG,
            ):
                return None
            raise translate_error(
                exc, "get block job info", domain_name=dom.name, alive=self.is_alive
            ) from exc

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
                raise translate_error(exc, "register domain events", alive=self.is_alive) from exc
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
        with translated(operation, domain_name=self._name, alive=self.conn.is_alive):
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
        flags = _flags(
            (inactive, libvirt.VIR_DOMAIN_XML_INACTIVE),
            (secure, libvirt.VIR_DOMAIN_XML_SECURE),
        )
        return str(self._call("get XML", self._raw.XMLDesc, flags))

    # ---- lifecycle
    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None:
        flags = _flags(
            (paused, libvirt.VIR_DOMAIN_START_PAUSED),
            (bypass_cache, libvirt.VIR_DOMAIN_START_BYPASS_CACHE),
            (force_boot, libvirt.VIR_DOMAIN_START_FORCE_BOOT),
        )
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
        flags = _flags(
            (managed_save, libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE),
            (snapshots_metadata, libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA),
            (checkpoints_metadata, _const("VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 16)),
            (nvram, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM),
        )
        self._call("undefine", self._raw.undefineFlags, flags)

    # ---- memory state (managed save, save/restore)
    @staticmethod
    def _save_flags(*, running: bool | None, bypass_cache: bool = False) -> int:
        """``VIR_DOMAIN_SAVE_*`` flags: ``running`` None keeps the saved state."""
        flags = 0
        if running is True:
            flags |= libvirt.VIR_DOMAIN_SAVE_RUNNING
        elif running is False:
            flags |= libvirt.VIR_DOMAIN_SAVE_PAUSED
        if bypass_cache:
            flags |= libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
        return flags

    @staticmethod
    @contextlib.contextmanager
    def _flags_unsupported(operation: str, domain_name: str | None = None) -> Iterator[None]:
        """Drivers reject flags they lack with INVALID_ARG "unsupported flags": that is
        an :class:`~statecapture.UnsupportedError`, not a generic failure."""
        try:
            yield
        except errors.LibvirtError as exc:
            message = exc.libvirt_message or ""
            if exc.code == libvirt.VIR_ERR_INVALID_ARG and "unsupported flags" in message:
                raise errors.UnsupportedError(
                    f"{operation} failed: this driver does not support the option asked for"
                    f" ({message})",
                    code=exc.code,
                    operation=operation,
                    domain_name=domain_name,
                    libvirt_message=message,
                ) from exc
            raise

    def save(
        self,
        path: str,
        *,
        dxml: str | None = None,
        running: bool | None = None,
        bypass_cache: bool = False,
        use_params: bool = True,
    ) -> str:
        """Save memory to ``path`` and stop the domain; returns the libvirt API that did it.

        ``use_params`` tries ``virDomainSaveParams`` (libvirt >= 8.4) first and falls back
        to ``virDomainSaveFlags`` when the driver lacks it (nothing happened then).
        """
        flags = VirDomain._save_flags(running=running, bypass_cache=bypass_cache)
        if use_params:
            params: dict[str, str] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: path}
            if dxml is not None:
                params[libvirt.VIR_DOMAIN_SAVE_PARAM_DXML] = dxml
            try:
                with VirDomain._flags_unsupported("save", self._name):
                    self._call("save", self._raw.saveParams, params, flags)
                return "virDomainSaveParams"
            except errors.UnsupportedError as exc:
                if exc.code != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
        with VirDomain._flags_unsupported("save", self._name):
            self._call("save", self._raw.saveFlags, path, dxml, flags)
        return "virDomainSaveFlags"

    def managed_save(self, *, running: bool | None = None, bypass_cache: bool = False) -> None:
        flags = VirDomain._save_flags(running=running, bypass_cache=bypass_cache)
        with VirDomain._flags_unsupported("managed save", self._name):
            self._call("managed save", self._raw.managedSave, flags)

    def has_managed_save(self) -> bool:
        return bool(self._call("check managed save", self._raw.hasManagedSaveImage, 0))

    def managed_save_remove(self) -> None:
        self._call("remove managed save", self._raw.managedSaveRemove, 0)

    def managed_save_xml(self, *, secure: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE if secure else 0
        return str(self._call("read managed save image", self._raw.managedSaveGetXMLDesc, flags))

    def managed_save_define(self, dxml: str, *, running: bool | None = None) -> None:
        if not isinstance(dxml, str):  # the binding crashes on None
            raise errors.UsageError("managed_save_define() needs the XML text")
        flags = VirDomain._save_flags(running=running)
        with VirDomain._flags_unsupported("redefine managed save image", self._name):
            self._call("redefine managed save image", self._raw.managedSaveDefineXML, dxml, flags)

    def shut_off_by_save(self) -> bool:
        """Whether the domain is shut off because its memory was saved (reason SAVED)."""
        state, reason = self._call("get state", self._raw.state, 0)
        return bool(
            state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_SAVED
        )

    # ---- snapshots
    def snapshot_create(
        self,
        xml: str,
        *,
        disk_only: bool = False,
        quiesce: bool = False,
        atomic: bool = False,
        live: bool = False,
        no_metadata: bool = False,
        redefine: bool = False,
        current: bool = False,
        validate: bool = False,
    ) -> VirSnapshot:
        """``virDomainSnapshotCreateXML`` with flags built from keywords."""
        flags = _flags(
            (disk_only, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY),
            (quiesce, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE),
            (atomic, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC),
            (live, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE),
            (no_metadata, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA),
            (redefine, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE),
            (current, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT),
            (validate, _const("VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE", 512)),
        )
        operation = "snapshot redefine" if redefine else "snapshot create"
        with VirDomain._flags_unsupported(operation, self._name):
            raw = self._call(operation, self._raw.snapshotCreateXML, xml, flags)
        return VirSnapshot(raw, self)

    def snapshot_lookup(self, name: str) -> VirSnapshot:
        raw = self._call("look up snapshot", self._raw.snapshotLookupByName, name, 0)
        return VirSnapshot(raw, self)

    def snapshot_list(
        self,
        *,
        roots: bool = False,
        leaves: bool | None = None,
        external: bool | None = None,
        disk_only: bool | None = None,
        topological: bool = False,
    ) -> list[VirSnapshot]:
        """``virDomainListAllSnapshots``; ``None`` filters do not filter."""
        flags = 0
        if roots:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS
        if leaves is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES
        elif leaves is False:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_NO_LEAVES
        if external is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL
        elif external is False:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_INTERNAL
        if disk_only is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DISK_ONLY
        elif disk_only is False:
            flags |= (
                libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ACTIVE | libvirt.VIR_DOMAIN_SNAPSHOT_LIST_INACTIVE
            )
        if topological:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
        raws = self._call("list snapshots", self._raw.listAllSnapshots, flags)
        return [VirSnapshot(r, self) for r in raws]

    def snapshot_count(self) -> int:
        return int(self._call("count snapshots", self._raw.snapshotNum, 0))

    def snapshot_current(self) -> VirSnapshot | None:
        """The current snapshot, or ``None`` when there is none."""
        if not self._call("has current snapshot", self._raw.hasCurrentSnapshot, 0):
            return None
        self.conn.check_open()
        try:
            raw = self._raw.snapshotCurrent(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None  # deleted between the two calls
            raise translate_error(
                exc, "get current snapshot", domain_name=self._name, alive=self.conn.is_alive
            ) from exc
        return VirSnapshot(raw, self)

    def snapshot_preflight_checkpoint_names(self) -> list[str]:
        """Names of the domain's checkpoints (each one means dirty bitmaps in its disks)."""
        self.conn.check_open()
        try:
            raws = _listing(
                "list checkpoints",
                self._raw.listAllCheckpoints,
                0,
                domain_name=self._name,
                alive=self.conn.is_alive,
            )
        except errors.UnsupportedError as exc:
            if exc.code in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                return []  # a driver without checkpoints has no bitmaps to fear
            raise
        return [str(r.getName()) for r in raws]

    # ---- guest agent, freeze
    def fs_freeze(self, mountpoints: list[str] | None = None) -> int:
        """Freeze guest filesystems through the agent (all when ``mountpoints`` is None).

        Returns how many filesystems froze. libvirt before 11.2 reports an agent *timeout*
        as "agent unresponsive" (code 86) although the freeze may still happen in the guest.
        """
        mps = list(mountpoints) if mountpoints is not None else None
        return int(self._call("filesystem freeze", self._raw.fsFreeze, mps, 0))

    def fs_thaw(self) -> int:
        """Thaw every frozen guest filesystem; how many thawed (0 when none was frozen).

        Always thaws all: the QEMU driver refuses a mountpoint list for thaw.
        """
        return int(self._call("filesystem thaw", self._raw.fsThaw, None, 0))

    def fs_info(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(mountpoint, guest device name, fs type, disk targets) per guest filesystem.

        The binding's type hint claims ``str``; it returns a list of 4-tuples.
        """
        rows = self._call("get filesystem info", self._raw.fsInfo, 0)
        return [
            (str(mp), str(name), str(fstype), tuple(str(a) for a in (aliases or ())))
            for mp, name, fstype, aliases in rows
        ]

    def set_agent_timeout(self, seconds: int | None) -> None:
        """Set the domain's agent response timeout; ``None`` restores libvirt's default."""
        if seconds is None:
            value = _const("VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT", -1)
        else:
            value = int(seconds)
        self._call("set agent response timeout", self._raw.agentSetResponseTimeout, value, 0)

    # ---- block jobs
    # libvirt's virDomainBlockJobType, named; the integer never leaves this module.
    _BLOCK_JOB_KINDS: Final = {
        0: "unknown",
        1: "pull",
        2: "copy",
        3: "commit",
        4: "active-commit",
        5: "backup",
    }

    @staticmethod
    def block_job_kind_name(type_code: int) -> str:
        """The ``BlockJobKind`` value for libvirt's job type (events carry the integer)."""
        return VirDomain._BLOCK_JOB_KINDS.get(int(type_code), "unknown")

    def block_job_info(self, disk: str) -> tuple[str, int, int, int] | None:
        """``(kind name, cur, end, bandwidth in bytes/s)`` of the job on ``disk``, or None."""
        info = self._call(
            "get block job info",
            self._raw.blockJobInfo,
            disk,
            libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES,
        )
        # The binding's hint says str; it returns a dict, empty when no job runs (HAZARDS 18).
        if not info:
            return None
        return (
            self.block_job_kind_name(int(info.get("type", 0))),
            int(info.get("cur", 0)),
            int(info.get("end", 0)),
            int(info.get("bandwidth", 0)),
        )

    def block_commit(
        self,
        disk: str,
        *,
        base: str | None,
        top: str | None,
        bandwidth: int | None,
        active: bool,
        shallow: bool,
        delete: bool,
    ) -> None:
        """``virDomainBlockCommit``; ``bandwidth`` in bytes per second (None: unlimited)."""
        flags = _flags(
            (active, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE),
            (shallow, libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW),
            (delete, libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE),
            (bandwidth, libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES),
        )
        self._call("block commit", self._raw.blockCommit, disk, base, top, bandwidth or 0, flags)

    def block_copy(
        self,
        disk: str,
        destination_xml: str,
        *,
        bandwidth: int | None,
        shallow: bool,
        reuse_external: bool,
        transient_job: bool,
        synchronous_writes: bool,
    ) -> None:
        """``virDomainBlockCopy`` to the ``<disk>`` in ``destination_xml``."""
        flags = _flags(
            (shallow, libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW),
            (reuse_external, libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT),
            (transient_job, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB),
            (synchronous_writes, _const("VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES", 8)),
        )
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
        self._call("block copy", self._raw.blockCopy, disk, destination_xml, params, flags)

    def block_pull(self, disk: str, *, bandwidth: int | None) -> None:
        """``virDomainBlockPull``: copy the whole backing chain into the top image of ``disk``."""
        flags = _flags((bandwidth, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES))
        self._call("block pull", self._raw.blockPull, disk, bandwidth or 0, flags)

    def block_job_abort(
        self, disk: str, *, pivot: bool = False, asynchronous: bool = False
    ) -> None:
        """``virDomainBlockJobAbort``: end the job on ``disk``, pivoting a ready mirror."""
        flags = _flags(
            (pivot, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            (asynchronous, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC),
        )
        operation = "block job pivot" if pivot else "block job abort"
        self._call(operation, self._raw.blockJobAbort, disk, flags)

    def block_job_set_speed(self, disk: str, bandwidth: int) -> None:
        """``virDomainBlockJobSetSpeed`` in bytes per second (0: unlimited)."""
        self._call(
            "set block job speed",
            self._raw.blockJobSetSpeed,
            disk,
            bandwidth,
            libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES,
        )

    # ---- checkpoints, backup, domain jobs
    # checkpoints: create/redefine, look up, list (handles: VirCheckpoint at the end)
    def checkpoint_create(
        self, xml: str, *, redefine: bool = False, validate: bool = False
    ) -> VirCheckpoint:  # checkpoints
        """``virDomainCheckpointCreateXML``; ``validate`` (with ``redefine``) checks bitmaps."""
        flags = _flags(
            (redefine, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE),
            (validate, _const("VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE", 4)),
        )
        if validate:
            operation = "checkpoint validate"
        else:
            operation = "checkpoint redefine" if redefine else "checkpoint create"
        with VirDomain._flags_unsupported(operation, self._name):
            raw = self._call(operation, self._raw.checkpointCreateXML, xml, flags)
        return VirCheckpoint(raw, self)

    def checkpoint_lookup(self, name: str) -> VirCheckpoint:  # checkpoints
        raw = self._call("look up checkpoint", self._raw.checkpointLookupByName, name, 0)
        return VirCheckpoint(raw, self)

    def list_checkpoints(
        self, *, roots: bool = False, topological: bool = False
    ) -> list[VirCheckpoint]:  # checkpoints
        flags = _flags(
            (roots, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS),
            (topological, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL),
        )
        self.conn.check_open()
        raws = _listing(
            "list checkpoints",
            self._raw.listAllCheckpoints,
            flags,
            domain_name=self._name,
            alive=self.conn.is_alive,
        )
        return [VirCheckpoint(r, self) for r in raws]

    # backup: begin / describe / end a backup job (libvirt has no BackupEnd: abortJob ends it)
    def backup_begin(
        self, backup_xml: str, checkpoint_xml: str | None, *, reuse_external: bool = False
    ) -> None:  # backup
        flags = _const("VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL", 1) if reuse_external else 0
        self._call("backup begin", self._raw.backupBegin, backup_xml, checkpoint_xml, flags)

    def backup_xml_desc(self) -> str | None:  # backup
        """The running backup job's ``<domainbackup>``, or ``None`` when no job runs."""
        self.conn.check_open()
        try:
            return str(self._raw.backupGetXMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _const("VIR_ERR_NO_DOMAIN_BACKUP", 104):
                return None
            raise translate_error(
                exc, "backup get XML", domain_name=self._name, alive=self.conn.is_alive
            ) from exc

    def backup_abort_job(self) -> None:  # backup
        """``virDomainAbortJob``: ends a pull backup, cancels a push backup."""
        self._call("abort job", self._raw.abortJob)

    def backup_job_stats(self, *, completed: bool = False) -> dict[str, Any]:  # backup
        """``virDomainGetJobStats`` (the binding's hint says str; it returns a dict)."""
        flags = _const("VIR_DOMAIN_JOB_STATS_COMPLETED", 1) if completed else 0
        return dict(self._call("get job stats", self._raw.jobStats, flags))

    # ---- metadata (sequence journal)
    def get_metadata(self, namespace_uri: str, *, config: bool = False) -> str | None:
        """Our XML element stored under ``namespace_uri``, or ``None`` when there is none."""
        self.conn.check_open()
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else libvirt.VIR_DOMAIN_AFFECT_CURRENT
        try:
            return str(
                self._raw.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace_uri, flags)
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise translate_error(
                exc, "read metadata", domain_name=self._name, alive=self.conn.is_alive
            ) from exc

    def set_metadata(self, namespace_uri: str, key: str, xml: str | None) -> None:
        """Store (``None``: remove) our element in the live and persistent definitions."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CURRENT
        if self.is_active() and self.is_persistent():
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self._call(
            "write metadata",
            self._raw.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            xml,
            key if xml is not None else None,
            namespace_uri,
            flags,
        )

    # ---- sequences, recovery
    def fs_freeze_status(self, *, timeout: int = 5) -> str:
        """The guest agent's ``guest-fsfreeze-status``: ``"frozen"`` or ``"thawed"``.

        libvirt has no API for it; the command goes through ``qemuAgentCommand`` (libvirt
        marks the domain tainted with ``custom-ga-command``, harmless). Raises
        :class:`~statecapture.GuestAgentError` when the agent is missing or does not answer.
        """
        import json

        import libvirt_qemu

        command = json.dumps({"execute": "guest-fsfreeze-status"})
        reply = self._call(
            "guest agent freeze status",
            libvirt_qemu.qemuAgentCommand,
            self._raw,
            command,
            max(1, int(timeout)),
            0,
        )
        try:
            status = json.loads(str(reply))["return"]
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.GuestAgentError(
                f"guest agent freeze status on domain {self._name!r}: unexpected reply {reply!r}",
                operation="guest agent freeze status",
                domain_name=self._name,
            ) from exc
        return str(status)

    # ---- statecapture.testing: agent and monitor passthrough
    def agent_command(self, command: dict[str, Any], *, timeout: int = 10) -> Any:
        """Send one guest-agent command (a QMP-style dict) and return its ``"return"`` member.

        Goes through ``qemuAgentCommand`` (libvirt marks the domain tainted with
        ``custom-ga-command``, harmless for test guests). Every failure — agent not
        configured or connected, no answer within ``timeout`` seconds, or the agent's own
        error reply — raises :class:`~statecapture.GuestAgentError` with libvirt's message.
        """
        import json

        import libvirt_qemu

        operation = f"guest agent command {command.get('execute')!r}"
        self.conn.check_open()
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self._raw, json.dumps(command), max(1, int(timeout)), 0
            )
        except libvirt.libvirtError as exc:
            base = translate_error(exc, operation, domain_name=self._name)
            raise errors.GuestAgentError(
                str(base),
                code=base.code,
                operation=operation,
                domain_name=self._name,
                libvirt_message=base.libvirt_message,
            ) from exc
        try:
            return json.loads(str(reply)).get("return")
        except (ValueError, AttributeError) as exc:
            raise errors.GuestAgentError(
                f"{operation} on domain {self._name!r}: unexpected reply {reply!r}",
                operation=operation,
                domain_name=self._name,
            ) from exc

    def hmp_command(self, command: str) -> str:
        """Run one QEMU human-monitor (HMP) command through ``qemuMonitorCommand``.

        For test support only (e.g. ``qemu-io -d <alias> "flush"`` to write QEMU's cached
        qcow2 metadata back before an outside process reads the image); libvirt marks the
        domain tainted with ``custom-monitor``.
        """
        import libvirt_qemu

        hmp = int(getattr(libvirt_qemu, "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP", 1))
        return str(
            self._call(
                "QEMU monitor command", libvirt_qemu.qemuMonitorCommand, self._raw, command, hmp
            )
        )

    # ---- dirty bitmaps: QEMU's live view (monitor commands; see docs/hazards.md)
    def _qmp(self, operation: str, command: str, arguments: dict[str, Any] | None) -> Any:
        """Run one QMP command through ``qemuMonitorCommand``; its ``return`` value.

        libvirt marks the domain tainted (``custom-monitor``: one log line, listed by
        ``virDomainGetMessages``); nothing else changes. QMP's own errors become
        :class:`~statecapture.NotFoundError` (a node or bitmap that is not there) or
        :class:`~statecapture.LibvirtError`.
        """
        import json

        import libvirt_qemu

        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with VirDomain._flags_unsupported(operation, self._name):
            reply = self._call(
                operation, libvirt_qemu.qemuMonitorCommand, self._raw, json.dumps(request), 0
            )
        try:
            decoded = json.loads(str(reply))
        except ValueError as exc:
            raise errors.LibvirtError(
                f"{operation} on domain {self._name!r}: QEMU answered no JSON ({reply!r})",
                operation=operation,
                domain_name=self._name,
            ) from exc
        if isinstance(decoded, dict) and "error" in decoded:
            err = decoded["error"] if isinstance(decoded["error"], dict) else {}
            desc = str(err.get("desc", decoded["error"]))
            lowered = desc.lower()
            cls: type[errors.LibvirtError] = errors.LibvirtError
            if "not found" in lowered or "cannot find" in lowered:
                cls = errors.NotFoundError
            raise cls(
                f"{operation} on domain {self._name!r} failed: QEMU said: {desc}",
                operation=operation,
                domain_name=self._name,
                libvirt_message=desc,
            )
        if not isinstance(decoded, dict) or "return" not in decoded:
            raise errors.LibvirtError(
                f"{operation} on domain {self._name!r}: unexpected QEMU reply {reply!r}",
                operation=operation,
                domain_name=self._name,
            )
        return decoded["return"]

    def block_dirty_bitmaps(self) -> list[NodeBitmap]:
        """Every dirty bitmap QEMU holds, on every block node (QMP
        ``query-named-block-nodes``, ``flat``), persistent or not, written to an image yet
        or not. The domain must run (:class:`~statecapture.InvalidStateError` otherwise);
        drivers without a QEMU monitor raise :class:`~statecapture.UnsupportedError`.
        """
        nodes = self._qmp("query dirty bitmaps", "query-named-block-nodes", {"flat": True})
        out: list[NodeBitmap] = []
        for node in nodes if isinstance(nodes, list) else ():
            if not isinstance(node, dict):
                continue
            name = str(node.get("node-name") or "")
            filename = node.get("file")
            for bm in node.get("dirty-bitmaps") or ():
                if not isinstance(bm, dict) or "name" not in bm:
                    continue
                out.append(
                    NodeBitmap(
                        node=name,
                        driver=str(node.get("drv") or ""),
                        filename=str(filename) if filename else None,
                        name=str(bm["name"]),
                        persistent=bool(bm.get("persistent", False)),
                        recording=bool(bm.get("recording", True)),
                        busy=bool(bm.get("busy", False)),
                        granularity=int(bm.get("granularity", 0)),
                        count=int(bm.get("count", 0)),
                    )
                )
        return out

    def remove_block_dirty_bitmap(self, node: str, name: str) -> None:
        """Remove one dirty bitmap from a block node (QMP ``block-dirty-bitmap-remove``).

        A persistent bitmap is removed from the image as well. Only for bitmaps libvirt
        does not know (no checkpoint names them): libvirt's own go through checkpoint
        delete. :class:`~statecapture.NotFoundError` when the node or bitmap is not there.
        """
        self._qmp("remove dirty bitmap", "block-dirty-bitmap-remove", {"node": node, "name": name})


# --------------------------------------------------------------------------- dirty bitmaps


@attrs.frozen
class NodeBitmap:
    """One dirty bitmap as QEMU sees it (``query-named-block-nodes``)."""

    node: str
    """The block node holding it (libvirt 9.0 names them ``libvirt-<index>-format``)."""
    driver: str
    """The node's driver (``qcow2``, ``file`` ...)."""
    filename: str | None
    """The image the node opened, when QEMU reports it."""
    name: str
    persistent: bool
    """Whether QEMU writes it into the qcow2 image when it closes the image."""
    recording: bool
    busy: bool
    """In use by a job (a backup): it cannot be removed or changed now."""
    granularity: int
    count: int
    """Dirty bytes counted so far."""


# --------------------------------------------------------------------------- snapshot handles


class VirSnapshot:
    """Typed wrapper around ``virDomainSnapshot``; raises statecapture errors only."""

    def __init__(self, raw: Any, domain: VirDomain) -> None:
        self._raw = raw
        self.domain = domain
        self.name: str = str(raw.getName())

    def _call(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self.domain._call(operation, fn, *args)

    def xml_desc(self, *, secure: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE if secure else 0
        return str(self._call("get snapshot XML", self._raw.getXMLDesc, flags))

    def children(self, *, descendants: bool = False) -> list[VirSnapshot]:
        """Direct children, or (``descendants``) the whole subtree below, parents first."""
        flags = 0
        if descendants:
            flags |= (
                libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS
                | libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
            )
        raws = self._call("list snapshot children", self._raw.listAllChildren, flags)
        return [VirSnapshot(r, self.domain) for r in raws]

    def is_current(self) -> bool:
        return bool(self._call("snapshot is current", self._raw.isCurrent, 0))

    def has_metadata(self) -> bool:
        return bool(self._call("snapshot has metadata", self._raw.hasMetadata, 0))

    def revert(self, *, running: bool = False, paused: bool = False, force: bool = False) -> None:
        """``virDomainRevertToSnapshot``."""
        flags = _flags(
            (running, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING),
            (paused, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED),
            (force, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE),
        )
        with VirDomain._flags_unsupported("snapshot revert", self.domain.name):
            self._call("snapshot revert", self.domain._raw.revertToSnapshot, self._raw, flags)

    def delete(
        self, *, children: bool = False, children_only: bool = False, metadata_only: bool = False
    ) -> None:
        """``virDomainSnapshotDelete``."""
        flags = _flags(
            (children, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN),
            (children_only, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY),
            (metadata_only, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY),
        )
        with VirDomain._flags_unsupported("snapshot delete", self.domain.name):
            self._call("snapshot delete", self._raw.delete, flags)


# --------------------------------------------------------------------------- checkpoint handles


class VirCheckpoint:  # checkpoints
    """Typed wrapper around ``virDomainCheckpoint``; raises statecapture errors only."""

    def __init__(self, raw: Any, domain: VirDomain) -> None:
        self._raw = raw
        self.domain = domain
        self.name: str = str(raw.getName())

    def _call(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self.domain._call(operation, fn, *args)

    def xml_desc(self, *, size: bool = False, no_domain: bool = False) -> str:
        """The checkpoint's XML; ``size`` adds dirty byte counts (running domains only)."""
        flags = _flags(
            (size, libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE),
            (no_domain, libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN),
        )
        return str(self._call("get checkpoint XML", self._raw.getXMLDesc, flags))

    def children(self) -> list[VirCheckpoint]:
        """Direct children."""
        self.domain.conn.check_open()
        raws = _listing(
            "list checkpoint children",
            self._raw.listAllChildren,
            0,
            domain_name=self.domain.name,
            alive=self.domain.conn.is_alive,
        )
        return [VirCheckpoint(r, self.domain) for r in raws]

    def delete(self, *, children: bool = False, metadata_only: bool = False) -> None:
        """``virDomainCheckpointDelete`` (bitmaps too, unless ``metadata_only``)."""
        flags = _flags(
            (children, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN),
            (metadata_only, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY),
        )
        self._call("checkpoint delete", self._raw.delete, flags)
