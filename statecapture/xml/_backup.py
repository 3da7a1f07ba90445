"""``<domainbackup>`` documents: what a backup job copies, where, and how it is served.

libvirt describes a backup job with one document (``formatbackup``): the job's mode
(*push*: QEMU writes target files itself; *pull*: QEMU serves point-in-time views of the
disks over NBD and a client reads them), an optional ``<incremental>`` checkpoint, the NBD
``<server>`` of a pull job, and per ``<disk>`` whether it is backed up, full or incremental,
and its target file (push) or scratch file (pull). :class:`BackupXML` models that document;
XML it does not model (seclabels, encryption, libvirt's ``index``) survives a round trip.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Self

import attrs
from lxml import etree

from ..errors import UsageError, XMLError
from ._base import XMLInput, line_of, parse, serialize

__all__ = ["BackupDiskXML", "BackupMode", "BackupXML", "DiskBackupMode", "NBDServer"]


class BackupMode(enum.Enum):
    """How a backup job delivers the data."""

    PUSH = "push"
    """QEMU writes each disk's backup into a target file (libvirt creates it)."""
    PULL = "pull"
    """QEMU serves each disk's point-in-time content over NBD; a client copies it."""


class DiskBackupMode(enum.Enum):
    """Whether one disk is copied whole or only what changed since a checkpoint."""

    FULL = "full"
    """Every allocated block of the disk."""
    INCREMENTAL = "incremental"
    """Only the blocks the checkpoint's dirty bitmap marks as changed."""


_STORE_ATTR = {"file": "file", "block": "dev"}


def _drop(el: etree._Element, *names: str) -> None:
    for name in names:
        if name in el.attrib:
            del el.attrib[name]


def _disk_tuple(value: object) -> tuple[BackupDiskXML, ...]:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise UsageError(f"disks must be a sequence of BackupDiskXML, got {value!r}")
    return tuple(value)


def _nonempty(what: str) -> Callable[[object, object, str | None], None]:
    def check(_inst: object, _attr: object, value: str | None) -> None:
        if value is not None and (not isinstance(value, str) or not value):
            raise UsageError(f"{what} must be a non-empty string or None, got {value!r}")

    return check


@attrs.frozen
class NBDServer:
    """Where a pull-mode backup job's NBD server listens (``<server>``).

    Use :meth:`unix` for a UNIX socket (what statecapture uses: no port to allocate, access
    limited by file permissions) or :meth:`tcp`.
    """

    transport: str = attrs.field(default="unix")
    """``unix`` or ``tcp``."""
    socket: str | None = None
    """Absolute path of the UNIX socket (``transport='unix'``)."""
    name: str | None = None
    """Host name or address to listen on (``transport='tcp'``)."""
    port: int | None = None
    """TCP port (libvirt 9.0 requires one for TCP)."""
    tls: bool | None = None
    """Whether the server requires TLS (``None``: libvirt's default)."""

    def __attrs_post_init__(self) -> None:
        if self.transport == "unix":
            if not self.socket or not self.socket.startswith("/"):
                raise UsageError(
                    f"a UNIX NBD server needs an absolute socket path, not {self.socket!r}"
                )
            if self.name is not None or self.port is not None:
                raise UsageError("a UNIX NBD server takes no host name or port")
        elif self.transport == "tcp":
            if not self.name:
                raise UsageError("a TCP NBD server needs a host name")
            if self.socket is not None:
                raise UsageError("a TCP NBD server takes no socket path")
            if self.port is not None and not 0 < self.port < 65536:
                raise UsageError(f"TCP port out of range: {self.port}")
        else:
            raise UsageError(f"NBD transport must be 'unix' or 'tcp', not {self.transport!r}")

    @classmethod
    def unix(cls, socket: str, *, tls: bool | None = None) -> Self:
        """A server on the UNIX socket at ``socket`` (an absolute path)."""
        return cls("unix", socket=socket, tls=tls)

    @classmethod
    def tcp(cls, name: str, port: int, *, tls: bool | None = None) -> Self:
        """A server on TCP ``name:port``."""
        return cls("tcp", name=name, port=port, tls=tls)

    @property
    def uri(self) -> str:
        """The NBD URI of the server without export name (``nbd+unix:///?socket=…``).

        A server with ``tls=True`` has an ``nbds`` URI (``nbds://host:port/``,
        ``nbds+unix:///?socket=…``), as the NBD URI specification names TLS; with
        ``tls=None`` the daemon's configuration decides and the URI says ``nbd``.
        """
        scheme = "nbds" if self.tls else "nbd"
        if self.transport == "unix":
            return f"{scheme}+unix:///?socket={self.socket}"
        host = f"[{self.name}]" if self.name and ":" in self.name else self.name
        return f"{scheme}://{host}:{self.port or 10809}/"

    def _to_element(self, el: etree._Element) -> None:
        _drop(el, "transport", "socket", "name", "port", "tls")
        el.set("transport", self.transport)
        if self.tls is not None:
            el.set("tls", "yes" if self.tls else "no")
        if self.transport == "unix":
            assert self.socket is not None
            el.set("socket", self.socket)
        else:
            assert self.name is not None
            el.set("name", self.name)
            if self.port is not None:
                el.set("port", str(self.port))

    @classmethod
    def _from_element(cls, el: etree._Element) -> Self:
        port = el.get("port")
        tls = el.get("tls")
        try:
            return cls(
                el.get("transport", "tcp"),
                socket=el.get("socket"),
                name=el.get("name"),
                port=int(port) if port is not None else None,
                tls=None if tls is None else tls == "yes",
            )
        except (UsageError, ValueError) as exc:
            raise XMLError(f"bad <server>: {exc}", line=line_of(el)) from exc


@attrs.frozen
class BackupDiskXML:
    """One ``<disk>`` of a backup document.

    ``store`` is the *target* file (push mode: the backup itself) or the *scratch* file
    (pull mode: where QEMU keeps the old content of blocks the guest overwrites while the
    job runs). ``export_name`` and ``export_bitmap`` (pull mode) are filled in by libvirt.
    """

    name: str
    """The disk's target name (``vda``)."""
    backup: bool = True
    """Whether the disk is part of the job (``backup='no'`` excludes it)."""
    mode: DiskBackupMode | None = None
    """Full or incremental (``None``: incremental when a checkpoint is named, else full)."""
    incremental: str | None = attrs.field(default=None, validator=_nonempty("incremental"))
    """Checkpoint this disk's incremental backup starts from (overrides the document's)."""
    type: str = "file"
    """``file`` or ``block``: what ``store`` is."""
    store: str | None = None
    """Target file/device (push) or scratch file/device (pull); ``None``: libvirt's choice."""
    format: str | None = None
    """Image format of ``store`` (``qcow2``; pull mode accepts only qcow2)."""
    export_name: str | None = None
    """NBD export name of the disk (pull mode)."""
    export_bitmap: str | None = None
    """Name of the dirty bitmap exported with the disk (pull mode, incremental)."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"a backup disk needs a target name, got {self.name!r}")
        if self.mode is not None and not isinstance(self.mode, DiskBackupMode):
            raise UsageError(f"mode must be a DiskBackupMode, got {self.mode!r}")
        if self.type not in _STORE_ATTR:
            raise UsageError(f"backup disk type must be 'file' or 'block', not {self.type!r}")
        if self.mode is DiskBackupMode.FULL and self.incremental is not None:
            raise UsageError(f"disk {self.name!r}: a full backup names no incremental checkpoint")
        if self.store is not None and not self.store.startswith("/"):
            raise UsageError(f"disk {self.name!r}: target/scratch must be absolute: {self.store!r}")
        if not self.backup and (
            self.mode is not None
            or self.incremental is not None
            or self.store is not None
            or self.format is not None
            or self.export_name is not None
            or self.export_bitmap is not None
        ):
            raise UsageError(f"disk {self.name!r} is excluded (backup=False) but has settings")

    @property
    def dirty_bitmap_context(self) -> str | None:
        """The NBD metadata context of the exported dirty bitmap (``qemu:dirty-bitmap:…``)."""
        if self.export_bitmap is None:
            return None
        return f"qemu:dirty-bitmap:{self.export_bitmap}"


@attrs.frozen
class BackupXML:
    """A parsed or built ``<domainbackup>`` document.

    Build one with keyword arguments (``BackupXML(mode=BackupMode.PULL, server=…, disks=…)``)
    or parse libvirt's with :meth:`from_xml`; :meth:`to_xml` writes a document that
    validates against libvirt's ``domainbackup.rng``. Equality compares modelled fields.
    """

    mode: BackupMode = BackupMode.PUSH
    """Push (QEMU writes target files) or pull (NBD export)."""
    incremental: str | None = attrs.field(default=None, validator=_nonempty("incremental"))
    """Checkpoint the job's incremental backups start from (per-disk values override it)."""
    server: NBDServer | None = None
    """The NBD server of a pull job (``None`` in push mode)."""
    disks: tuple[BackupDiskXML, ...] = attrs.field(default=(), converter=_disk_tuple)
    """The disks, in document order (empty: libvirt backs up every writable disk)."""
    raw: str = attrs.field(default="", repr=False, eq=False)
    """The document as parsed; :meth:`to_xml` starts from it."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.mode, BackupMode):
            raise UsageError(f"mode must be a BackupMode, got {self.mode!r}")
        if self.mode is BackupMode.PUSH and self.server is not None:
            raise UsageError("an NBD <server> needs a pull-mode backup")
        if self.mode is BackupMode.PULL and self.server is None:
            raise UsageError("a pull-mode backup needs an NBD server (NBDServer.unix(path))")
        seen: set[str] = set()
        for d in self.disks:
            if not isinstance(d, BackupDiskXML):
                raise UsageError(f"disks must be BackupDiskXML values, got {type(d).__name__}")
            if d.name in seen:
                raise UsageError(f"disk {d.name!r} is listed twice")
            seen.add(d.name)
            if (
                d.mode is DiskBackupMode.INCREMENTAL
                and d.incremental is None
                and self.incremental is None
            ):
                raise UsageError(
                    f"disk {d.name!r} is incremental but no checkpoint is named "
                    "(set incremental= on the disk or the document)"
                )
            if self.mode is BackupMode.PUSH and (d.export_name or d.export_bitmap):
                raise UsageError(f"disk {d.name!r}: export names exist only in pull mode")
            if self.mode is BackupMode.PULL:
                if d.format not in (None, "qcow2"):
                    raise UsageError(f"disk {d.name!r}: a pull-mode scratch file must be qcow2")
                if d.backup and d.type == "block" and d.store is None:
                    raise UsageError(f"disk {d.name!r}: a block scratch needs a device path")
                if d.format is not None and d.store is None:
                    raise UsageError(
                        f"disk {d.name!r}: a pull-mode driver type goes with a scratch file"
                    )

    @property
    def is_push(self) -> bool:
        """Whether this is a push-mode job."""
        return self.mode is BackupMode.PUSH

    def disk(self, name: str) -> BackupDiskXML:
        """The disk entry named ``name``; ``KeyError`` when there is none."""
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    def disk_mode(self, name: str) -> DiskBackupMode:
        """The effective mode of disk ``name`` (libvirt's rule when the entry sets none)."""
        d = self.disk(name)
        if d.mode is not None:
            return d.mode
        if d.incremental is not None or self.incremental is not None:
            return DiskBackupMode.INCREMENTAL
        return DiskBackupMode.FULL

    def disk_checkpoint(self, name: str) -> str | None:
        """The checkpoint disk ``name``'s incremental backup starts from (``None``: full)."""
        if self.disk_mode(name) is DiskBackupMode.FULL:
            return None
        return self.disk(name).incremental or self.incremental

    @property
    def backed_up(self) -> tuple[BackupDiskXML, ...]:
        """The disks that are part of the job."""
        return tuple(d for d in self.disks if d.backup)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse a ``<domainbackup>`` document; raises :class:`~statecapture.XMLError`."""
        root = parse(text, expected_root="domainbackup")
        mode_text = root.get("mode", "push")
        try:
            mode = BackupMode(mode_text)
        except ValueError:
            raise XMLError(f"unknown backup mode {mode_text!r}", line=line_of(root)) from None
        inc_el = root.find("incremental")
        incremental = None
        if inc_el is not None:
            incremental = (inc_el.text or "").strip() or None
        server_el = root.find("server")
        server = NBDServer._from_element(server_el) if server_el is not None else None
        disks: list[BackupDiskXML] = []
        disks_el = root.find("disks")
        if disks_el is not None:
            for el in disks_el.iterfind("disk"):
                disks.append(_disk_from_element(el, push=mode is BackupMode.PUSH))
        try:
            return cls(
                mode=mode,
                incremental=incremental,
                server=server,
                disks=tuple(disks),
                raw=etree.tostring(root, encoding="unicode"),
            )
        except UsageError as exc:
            raise XMLError(f"inconsistent <domainbackup>: {exc}", line=line_of(root)) from exc

    # ------------------------------------------------------------------ writing
    def to_element(self) -> etree._Element:
        """The document as an lxml element, modelled fields applied to :attr:`raw`."""
        root = parse(self.raw) if self.raw else etree.Element("domainbackup")
        root.set("mode", self.mode.value)
        inc_el = root.find("incremental")
        if self.incremental is None:
            if inc_el is not None:
                root.remove(inc_el)
        else:
            if inc_el is None:
                inc_el = etree.Element("incremental")
                root.insert(0, inc_el)
            inc_el.text = self.incremental
        server_el = root.find("server")
        if self.server is None:
            if server_el is not None:
                root.remove(server_el)
        else:
            if server_el is None:
                server_el = etree.SubElement(root, "server")
            self.server._to_element(server_el)
        disks_el = root.find("disks")
        old: dict[str | None, etree._Element] = {}
        if disks_el is not None:
            old = {el.get("name"): el for el in disks_el.iterfind("disk")}
            root.remove(disks_el)
        if self.disks:
            disks_el = etree.SubElement(root, "disks")
            for d in self.disks:
                el = old.get(d.name)
                if el is None:
                    el = etree.Element("disk")
                _disk_to_element(el, d, push=self.is_push)
                disks_el.append(el)
        return root

    def to_xml(self) -> str:
        """Serialise; XML statecapture does not model is kept."""
        return serialize(self.to_element())


def _disk_from_element(el: etree._Element, *, push: bool) -> BackupDiskXML:
    name = el.get("name")
    if not name:
        raise XMLError("backup <disk> without name", line=line_of(el))
    backup = el.get("backup", "yes") != "no"
    if not backup:
        return BackupDiskXML(name, backup=False)
    mode_text = el.get("backupmode")
    try:
        mode = DiskBackupMode(mode_text) if mode_text else None
    except ValueError:
        raise XMLError(f"unknown backupmode {mode_text!r}", line=line_of(el)) from None
    type_ = el.get("type", "file")
    store_el = el.find("target" if push else "scratch")
    store = None
    if store_el is not None:
        store = store_el.get(_STORE_ATTR.get(type_, "file"))
    driver = el.find("driver")
    try:
        return BackupDiskXML(
            name,
            mode=mode,
            incremental=el.get("incremental") or None,
            type=type_,
            store=store,
            format=driver.get("type") if driver is not None else None,
            export_name=None if push else el.get("exportname"),
            export_bitmap=None if push else el.get("exportbitmap"),
        )
    except UsageError as exc:
        raise XMLError(f"bad backup <disk>: {exc}", line=line_of(el)) from exc


def _disk_to_element(el: etree._Element, d: BackupDiskXML, *, push: bool) -> None:
    _drop(el, "name", "backup", "backupmode", "incremental", "type", "exportname", "exportbitmap")
    el.set("name", d.name)
    el.set("backup", "yes" if d.backup else "no")
    store_tag, other_tag = ("target", "scratch") if push else ("scratch", "target")
    for stale in el.findall(other_tag):
        el.remove(stale)
    if not d.backup:
        for child in list(el):
            el.remove(child)
        return
    el.set("type", d.type)
    if d.mode is not None:
        el.set("backupmode", d.mode.value)
    if d.incremental is not None:
        el.set("incremental", d.incremental)
    if not push:
        if d.export_name is not None:
            el.set("exportname", d.export_name)
        if d.export_bitmap is not None:
            el.set("exportbitmap", d.export_bitmap)
    driver = el.find("driver")
    if d.format is None:
        if driver is not None:
            el.remove(driver)
    else:
        if driver is None:
            driver = etree.Element("driver")
            el.insert(0, driver)
        driver.set("type", d.format)
    store_el = el.find(store_tag)
    if d.store is None:
        if store_el is not None:
            el.remove(store_el)
    else:
        if store_el is None:
            store_el = etree.SubElement(el, store_tag)
        _drop(store_el, *_STORE_ATTR.values())
        store_el.set(_STORE_ATTR[d.type], d.store)
