"""The connection: ``virConnect`` behind :class:`VirConnection` (a
:class:`~statecapture._ports.ConnectionPort`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from .. import errors
from .._events import Event
from .._ports import DomainPort, ProbeAnswer
from . import events, probe
from .domain import VirDomain, params_call, save_flags
from .translate import _const, call, translate_error, translated

__all__ = ["VirConnection"]

T = TypeVar("T")


class VirConnection:
    """Typed wrapper around ``virConnect``; raises statecapture errors only."""

    def __init__(self, raw: Any, uri: str) -> None:
        self._raw = raw
        self._uri = uri
        self._closed = False
        self._event_ids: list[int] = []

    @classmethod
    def open(cls, uri: str, *, readonly: bool = False) -> VirConnection:
        events.ensure_event_loop()
        with translated(f"connect to {uri}"):
            raw = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
        if raw is None:  # pragma: no cover - old bindings returned None
            raise errors.ConnectionLostError(f"connect to {uri} failed", operation="connect")
        return cls(raw, uri)

    @property
    def uri(self) -> str:
        """The URI this connection was opened with."""
        return self._uri

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise errors.UsageError(f"the connection to {self._uri} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        events.deregister_events(self._raw, self._event_ids)
        self._event_ids.clear()
        with contextlib.suppress(libvirt.libvirtError):
            self._raw.close()

    def _call(self, operation: str, fn: Callable[..., T], *args: object) -> T:
        self.check_open()
        return call(operation, fn, *args, alive=self.is_alive)

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
        if self._closed:
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

    def list_domains(self) -> list[DomainPort]:
        raws: Any = self._call("list domains", self._raw.listAllDomains, 0)
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
        flags = save_flags(running=running, bypass_cache=bypass_cache)
        if use_params and params_call(
            self._call, "restore", self._raw.restoreParams, path, dxml, flags
        ):
            return "virDomainRestoreParams"
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
        flags = save_flags(running=running)
        self._call("redefine save image", self._raw.saveImageDefineXML, path, dxml, flags)

    # ---- capabilities
    def probe_api(self, feature: str) -> ProbeAnswer:
        """Whether the driver implements the connection-level API behind ``feature``
        (``restore``, ``restore_params``); ``None`` for a domain-level feature (probe it
        with :meth:`VirDomain.probe_api`). Raises only when the connection is gone."""
        self.check_open()
        calls = probe.connection_calls(self._raw)
        if feature not in calls:
            return ProbeAnswer(None, f"{feature} can only be probed on a domain")
        api, fn = calls[feature]
        return probe.probe(api, fn, self.is_alive)

    def domain_capabilities_xml(self) -> str | None:
        """``virConnectGetDomainCapabilities`` for the default emulator, or ``None`` when the
        driver has none (the test driver)."""
        try:
            return str(
                self._call(
                    "get domain capabilities",
                    self._raw.getDomainCapabilities,
                    None,
                    None,
                    None,
                    None,
                    0,
                )
            )
        except errors.ConnectionLostError:
            raise
        except errors.LibvirtError as exc:
            if not self.is_alive():
                raise
            # Unsupported, or refused/failed inside a driver that has no capabilities to
            # report (DENIED, INTERNAL_ERROR, INVALID_ARG): no answer, not a failure.
            if isinstance(exc, errors.UnsupportedError) or exc.code in (
                libvirt.VIR_ERR_OPERATION_DENIED,
                libvirt.VIR_ERR_INTERNAL_ERROR,
                libvirt.VIR_ERR_INVALID_ARG,
            ):
                return None
            raise

    # ---- events
    def register_events(self, sink: Callable[[Event], None]) -> None:
        """Subscribe ``sink`` to every domain event statecapture understands."""
        self.check_open()
        self._event_ids.extend(events.register_events(self._raw, sink, self.is_alive))
