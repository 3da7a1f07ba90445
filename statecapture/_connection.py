"""Connections to libvirt: :func:`connect` and :class:`Connection`."""

from __future__ import annotations

import os
import warnings
from types import TracebackType
from typing import TYPE_CHECKING

import attrs

from . import _adapter
from ._events import Callback, Event, EventBus, EventKind, Subscription
from ._hints import add_names_hint
from ._ports import ConnectionPort
from ._version import Version, Versions
from .errors import NotFoundError, UnsupportedError, UsageError
from .xml import DomainXML

if TYPE_CHECKING:
    from ._capabilities import Capabilities  # advisor
    from ._domain import Domain
    from ._memory import SaveImage

__all__ = ["DEFAULT_URI", "Connection", "connect", "is_remote_uri", "resolve_uri"]

#: libvirt's VIR_ERR_NO_CONNECT: "no connection driver available for <uri>".
_NO_CONNECT = 5

DEFAULT_URI = "test:///default"
"""The URI used when neither an argument nor ``$LIBVIRT_DEFAULT_URI`` names one."""


def resolve_uri(uri: str | None = None) -> str:
    """The URI :func:`connect` opens: ``uri``, else ``$LIBVIRT_DEFAULT_URI``, else test:///default."""
    if uri is not None:
        if not isinstance(uri, str) or not uri.strip():
            raise UsageError(f"uri must be a non-empty string, got {uri!r}")
        return uri
    env = os.environ.get("LIBVIRT_DEFAULT_URI", "").strip()
    return env or DEFAULT_URI


_REMOTE_TRANSPORTS = frozenset({"ssh", "libssh", "libssh2", "tls", "tcp", "ext"})


def is_remote_uri(uri: str) -> bool:
    """Whether ``uri`` reaches a libvirt daemon on another host (through a network transport).

    ``qemu+ssh://…``, ``qemu+tls://…``, ``qemu+tcp://…`` (and ``qemu://HOST/…``, which is
    TLS) are remote; ``qemu:///system``, ``qemu+unix:///…``, ``qemu:///embed?root=…`` and
    ``test:///…`` are local. Data a remote daemon's QEMU writes (images, NBD sockets) lives
    on *that* host, not on the one running this process.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return False
    _driver, plus, transport = scheme.partition("+")
    if plus:
        return transport.lower() in _REMOTE_TRANSPORTS
    host = rest.split("/", 1)[0].rpartition("@")[2].split(":", 1)[0]
    return host not in ("", "localhost")


def connect(uri: str | None = None, *, readonly: bool = False) -> Connection:
    """Open a connection to libvirt.

    ``uri`` may be any libvirt URI: ``test:///default`` (in-process test driver),
    ``qemu:///system``, ``qemu+ssh://host/system``, ``qemu:///embed?root=/path`` (embedded
    QEMU driver, no daemon). ``None`` means ``$LIBVIRT_DEFAULT_URI``, else ``test:///default``.

    Raises :class:`UnsupportedError` when no libvirt driver handles the URI (an unknown
    scheme, or a driver not installed here): no connection existed, so it is not a
    :class:`ConnectionLostError`.

    libvirt's event loop is registered and started (once per process, in a daemon thread)
    before the connection is opened, so events such as block-job readiness and job
    completion are delivered. Use the connection as a context manager, or call
    :meth:`Connection.close`::

        with statecapture.connect() as conn:
            for dom in conn.domains():
                print(dom.name, dom.state)
    """
    resolved = resolve_uri(uri)
    try:
        port: ConnectionPort = _adapter.VirConnection.open(resolved, readonly=readonly)
    except UnsupportedError as exc:
        if exc.code != _NO_CONNECT:
            raise
        raise UnsupportedError(
            f"no libvirt driver handles {resolved!r}: its scheme is unknown, or the driver "
            "for it is not installed on this host (check the spelling, e.g. qemu:///system, "
            f"test:///default); libvirt said: {exc.libvirt_message}",
            code=exc.code,
            operation=exc.operation,
            libvirt_message=exc.libvirt_message,
        ) from exc
    conn = Connection(port)
    try:
        port.register_events(conn.events.publish)
    except BaseException:
        port.close()
        raise
    return conn


@attrs.define(eq=False)
class Connection:
    """A live connection to a libvirt driver. Built by :func:`connect`.

    Thread safety: a connection may be shared by any number of threads, and so may the
    :class:`Domain`, :class:`Checkpoint` and :class:`Snapshot` handles made from it (they
    keep only their identity and query libvirt on every access). Operations that QEMU or
    libvirt cannot run side by side on one domain — checkpoint create/delete/listing and
    dirty-size queries, a backup job's start and end, QEMU block-node queries — are
    serialized per domain, within the process and across processes (``docs/hazards.md``,
    hazard 21). Objects that track one operation (:class:`BackupJob`, :class:`BlockJob`, an
    ``fs_frozen`` scope) belong to one thread at a time. :meth:`close` ends the connection
    for every thread; event callbacks run on libvirt's event thread.
    """

    _port: ConnectionPort = attrs.field(repr=False)
    events: EventBus = attrs.field(factory=EventBus, repr=False)
    """Domain events of this connection (see :meth:`subscribe`)."""
    _versions: Versions | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self.events.subscribe(self._on_close, kind=EventKind.CONNECTION_CLOSED)

    @property
    def port(self) -> ConnectionPort:
        """The typed libvirt port this connection talks through (advanced use).

        One method per libvirt call, keyword arguments in, typed values out, statecapture's
        errors only (the protocol is ``statecapture._ports.ConnectionPort``; its methods may
        change between releases). :mod:`statecapture.testing.faults` puts a pass-through in
        front of it to inject failures and record calls.
        """
        return self._port

    def _on_close(self, _event: Event) -> None:
        # The daemon went away; later calls raise UsageError/ConnectionLostError.
        pass

    # ---- identity
    @property
    def uri(self) -> str:
        """The URI this connection was opened with."""
        return self._port.uri

    @property
    def is_remote(self) -> bool:
        """Whether the daemon runs on another host (see :func:`is_remote_uri`): its domains'
        NBD exports and files are on that host, not here."""
        return is_remote_uri(self._port.uri)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._port.closed

    @property
    def driver(self) -> str:
        """The driver's name as libvirt reports it (``QEMU``, ``Test`` ...)."""
        return self._port.driver_type()

    @property
    def hostname(self) -> str:
        return self._port.hostname()

    @property
    def versions(self) -> Versions:
        """Library (client), daemon and hypervisor versions; gate features on ``daemon``."""
        if self._versions is None:
            hyper: Version | None
            try:
                hv = self._port.hypervisor_version()
                hyper = Version.from_int(hv) if hv > 0 else None
            except Exception:  # some drivers do not report one
                hyper = None
            self._versions = Versions(
                library=Version.from_int(_adapter.client_library_version()),
                daemon=Version.from_int(self._port.daemon_version()),
                hypervisor=hyper,
                driver=self._port.driver_type(),
            )
        return self._versions

    @property
    def is_alive(self) -> bool:
        """Whether the connection is open and the other end answers."""
        return self._port.is_alive()

    # ---- domains
    def domain(self, name_or_uuid: str) -> Domain:
        """The domain with this name or UUID.

        :class:`NotFoundError` when there is none; its message lists the domains that exist
        (or, among many, the closest names).
        """
        from ._domain import Domain

        if not isinstance(name_or_uuid, str) or not name_or_uuid:
            raise UsageError(f"a domain name or UUID string is required, got {name_or_uuid!r}")
        try:
            port = self._port.lookup_domain(name_or_uuid)
        except NotFoundError as exc:
            add_names_hint(
                exc, name_or_uuid, lambda: (v.name for v in self._port.list_domains()), "domain"
            )
            raise
        return Domain._from_port(self, port)

    def domains(self) -> tuple[Domain, ...]:
        """Every domain the driver knows, active and inactive, sorted by name."""
        from ._domain import Domain

        doms = [Domain._from_port(self, v) for v in self._port.list_domains()]
        return tuple(sorted(doms, key=lambda d: d.name))

    def define(self, xml: str | DomainXML, *, validate: bool = True) -> Domain:
        """Define (or redefine) a persistent domain from XML or a :class:`DomainXML`.

        ``validate`` asks libvirt to check the document against its schema first.
        """
        from ._domain import Domain

        text = xml.to_xml() if isinstance(xml, DomainXML) else xml
        if not isinstance(text, str):
            raise UsageError(f"define() takes XML text or a DomainXML, got {type(xml).__name__}")
        DomainXML.from_xml(text)  # XMLError with the line before libvirt sees it
        return Domain._from_port(self, self._port.define(text, validate=validate))

    def create(self, xml: str | DomainXML, *, paused: bool = False) -> Domain:
        """Create and start a transient domain (gone when it stops)."""
        from ._domain import Domain

        text = xml.to_xml() if isinstance(xml, DomainXML) else xml
        DomainXML.from_xml(text)
        return Domain._from_port(self, self._port.create_transient(text, paused=paused))

    # ---- memory state (_memory.py)
    def restore(
        self,
        path: str | os.PathLike[str],
        *,
        running: bool | None = None,
        definition: DomainXML | str | None = None,
        bypass_cache: bool = False,
    ) -> Domain:
        """Start a domain from a save image written by :meth:`Domain.save`; returns it.

        ``running``: ``True`` running, ``False`` paused, ``None`` the state stored in the
        image. ``definition`` replaces the stored definition for this restore (same domain,
        ABI-compatible). The file stays. For the measured downtime use
        ``conn.save_image(path).restore(...)``, which returns a :class:`RestoreResult`.

        Raises :class:`NotFoundError` for a missing file, :class:`SaveImageError` for a
        file that is not a usable image, :class:`InvalidStateError` when the image's domain
        is already running; none of them changes anything. Uses
        ``virDomainRestoreParams`` on libvirt >= 8.4.
        """
        from . import _memory

        return _memory.restore(
            self, path, running=running, definition=definition, bypass_cache=bypass_cache
        )

    def save_image(self, path: str | os.PathLike[str]) -> SaveImage:
        """A handle on the save image at ``path`` (read its definition, redefine, restore).

        Raises :class:`NotFoundError` when the file does not exist and
        :class:`SaveImageError` when it is not a usable save image.
        """
        from . import _memory

        return _memory.open_image(self, path)

    # ---- capabilities (_capabilities.py)
    def capabilities(self) -> Capabilities:
        """What this driver and daemon version can do, probed (nothing is changed).

        Without a domain only some answers are knowable (restore, backup from the domain
        capabilities, version gates); :meth:`Domain.capabilities` probes everything.
        """
        from ._capabilities import probe_connection

        self._port.check_open()
        return probe_connection(self)

    # ---- events
    def subscribe(
        self,
        callback: Callback,
        *,
        kind: EventKind | None = None,
        domain: Domain | None = None,
    ) -> Subscription:
        """Call ``callback(event)`` for each matching domain event.

        Callbacks run on libvirt's event thread: keep them short and never call back into
        libvirt from them. Returns a :class:`Subscription`; cancel it (or use it as a context
        manager) to stop.
        """
        self._port.check_open()
        return self.events.subscribe(
            callback, kind=kind, domain_uuid=domain.uuid if domain is not None else None
        )

    # ---- lifetime
    def close(self) -> None:
        """Close the connection; idempotent. Handles made from it become unusable."""
        self._port.close()

    def __enter__(self) -> Connection:
        self._port.check_open()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        port = getattr(self, "_port", None)
        if port is not None and not port.closed:
            warnings.warn(
                f"statecapture connection to {port.uri} was never closed",
                ResourceWarning,
                stacklevel=2,
            )

    def _repr_html_(self) -> str:
        from ._html import connection_html

        return connection_html(self)
