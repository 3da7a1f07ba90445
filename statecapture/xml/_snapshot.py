"""``<domainsnapshot>`` documents: typed parts, everything else preserved.

A snapshot captures disk state (each disk ``internal``: inside its qcow2 image; ``external``:
the current image becomes read-only and a new overlay file takes the guest's writes; ``no``:
not captured) and, for a running domain, optionally memory state (``internal`` with the
disks, or ``external`` in a separate file). See :class:`SnapshotXML`.
"""

from __future__ import annotations

import collections
import datetime
import enum
import re
from collections.abc import Iterable
from typing import Self, TypeVar

import attrs
from lxml import etree

from ..errors import UsageError, XMLError
from ._base import XMLInput, line_of, parse, serialize
from ._domain import DomainXML

__all__ = [
    "SnapshotDisk",
    "SnapshotDiskMode",
    "SnapshotMemory",
    "SnapshotMemoryMode",
    "SnapshotXML",
]


class SnapshotMemoryMode(enum.Enum):
    """Where a snapshot keeps the domain's memory state (``<memory snapshot='…'>``)."""

    NO = "no"
    """No memory state: a disk-only snapshot, or a snapshot of a shut-off domain."""
    INTERNAL = "internal"
    """Inside the qcow2 images, together with internal disk snapshots (QEMU ``savevm``)."""
    EXTERNAL = "external"
    """In a separate file (:attr:`SnapshotMemory.file`), next to external disk overlays."""


class SnapshotDiskMode(enum.Enum):
    """How a snapshot captures one disk (``<disk snapshot='…'>``)."""

    NO = "no"
    """The disk is not captured (its later changes survive a revert)."""
    INTERNAL = "internal"
    """Inside the disk's own qcow2 image."""
    EXTERNAL = "external"
    """The current image is frozen; a new overlay file (:attr:`SnapshotDisk.source`) takes
    the guest's writes from then on."""
    MANUAL = "manual"
    """The caller captures the disk by other means while libvirt pauses the domain."""


_E = TypeVar("_E", bound=enum.Enum)


def _enum_value(cls: type[_E], value: str, el: etree._Element, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in cls)
        raise XMLError(f"unknown {what} {value!r} (expected {known})", line=line_of(el)) from None


def _drop_attr(el: etree._Element, name: str) -> None:
    if name in el.attrib:
        del el.attrib[name]


#: libvirt's ``absFilePath`` (basictypes.rng): ``/…`` or ``C:\…``, one line (a schema
#: pattern's ``.`` matches no line break).
_ABS_PATH = re.compile(r"(/|[a-zA-Z]:\\)[^\n\r]+\Z")


def _check_abs(what: str, value: str | None) -> None:
    if value is not None and not _ABS_PATH.match(value):
        raise UsageError(f"{what} must be an absolute path on one line, got {value!r}")


@attrs.frozen
class SnapshotMemory:
    """The memory part of a snapshot (``<memory>``)."""

    mode: SnapshotMemoryMode = attrs.field(converter=SnapshotMemoryMode)
    """Where memory state goes (or :attr:`SnapshotMemoryMode.NO`)."""
    file: str | None = attrs.field(default=None)
    """Absolute path of the memory state file; set exactly when the mode is external."""

    @file.validator
    def _check_file(self, _attr: attrs.Attribute[str | None], value: str | None) -> None:
        if self.mode is SnapshotMemoryMode.EXTERNAL:
            if not value:
                raise UsageError("an external memory snapshot needs the file to write memory to")
            _check_abs("the memory state file", value)
        elif value is not None:
            raise UsageError(
                f"a memory file is only allowed in external mode, not {self.mode.value!r}"
            )


_SOURCE_ATTR = {"file": "file", "block": "dev", "network": "name"}


def _disk_check(instance: SnapshotDisk, _attr: attrs.Attribute[str], value: str) -> None:
    mode = instance.mode
    if (
        mode is not None
        and mode is not SnapshotDiskMode.EXTERNAL
        and (instance.source is not None or instance.driver is not None)
    ):
        raise UsageError(
            f"disk {instance.name!r}: a source file or driver only makes sense for an "
            f"external snapshot, not {mode.value!r}"
        )
    if value not in _SOURCE_ATTR:
        raise UsageError(f"disk {instance.name!r}: unknown source type {value!r}")
    if value in ("file", "block"):
        _check_abs(f"disk {instance.name!r}: the overlay", instance.source)


def _optional_disk_mode(value: SnapshotDiskMode | str | None) -> SnapshotDiskMode | None:
    return None if value is None else SnapshotDiskMode(value)


@attrs.frozen
class SnapshotDisk:
    """How a snapshot captures one disk (``<disks><disk …>``)."""

    name: str = attrs.field()
    """The disk's target (``vda``), or the path of its active image."""
    mode: SnapshotDiskMode | None = attrs.field(default=None, converter=_optional_disk_mode)
    """How the disk is captured; ``None`` leaves the choice to libvirt (external when a
    :attr:`source` is given)."""
    source: str | None = None
    """External mode: the new overlay's path (``file``/``block``) or name (``network``)."""
    driver: str | None = None
    """External mode: the overlay's image format (``qcow2``)."""
    type: str = attrs.field(default="file", validator=_disk_check)
    """External mode: the overlay's storage type, ``file``, ``block`` or ``network``."""

    @name.validator
    def _check_name(self, _attr: attrs.Attribute[str], value: str) -> None:
        if not value:
            raise UsageError("a snapshot disk needs a name (its target, e.g. 'vda')")

    @property
    def effective_mode(self) -> SnapshotDiskMode | None:
        """:attr:`mode`, or external when it is unset but an overlay is described."""
        if self.mode is None and (
            self.source is not None or self.driver is not None or self.type != "file"
        ):
            return SnapshotDiskMode.EXTERNAL
        return self.mode

    @classmethod
    def from_element(cls, el: etree._Element) -> Self:
        """Build from one parsed ``<disk>`` of a ``<disks>`` list."""
        name = el.get("name")
        if not name:
            raise XMLError("snapshot <disk> without name=…", line=line_of(el))
        snap = el.get("snapshot")
        mode = (
            None if snap is None else _enum_value(SnapshotDiskMode, snap, el, "disk snapshot mode")
        )
        type_ = el.get("type", "file")
        src = el.find("source")
        source: str | None = None
        if src is not None:
            source = src.get(_SOURCE_ATTR.get(type_, "file"))
        drv = el.find("driver")
        driver = drv.get("type") if drv is not None else None
        try:
            return cls(name=name, mode=mode, source=source, driver=driver, type=type_)
        except UsageError as exc:
            raise XMLError(str(exc), line=line_of(el)) from None

    def _apply(self, el: etree._Element) -> None:
        old_type = el.get("type", "file")
        src = el.find("source")
        # A <source> without any path/name (a nameless NBD export, only a <seclabel>) is
        # kept as it is; one that names a file the model no longer has, or that belongs to
        # another storage type, described the old overlay and goes.
        stale = src is not None and (
            old_type != self.type or any(src.get(a) is not None for a in _SOURCE_ATTR.values())
        )
        el.set("name", self.name)
        if self.mode is None:
            _drop_attr(el, "snapshot")
        else:
            el.set("snapshot", self.mode.value)
        if self.effective_mode is not SnapshotDiskMode.EXTERNAL:
            if self.mode is None:
                # libvirt's choice: the schema still allows a pathless <source> and a
                # <driver> without type here; keep those (seclabels ...).
                if old_type != "file":
                    _drop_attr(el, "type")
                if src is not None and stale:
                    el.remove(src)
                drv = el.find("driver")
                if drv is not None:
                    _drop_attr(drv, "type")
                    if not len(drv) and not drv.attrib:
                        el.remove(drv)
                return
            _drop_attr(el, "type")
            for child in el.findall("source") + el.findall("driver"):
                el.remove(child)
            return
        # An unset type means 'file' (libvirt's default): keep such a document as it was.
        if self.mode is not None or self.type != "file" or "type" in el.attrib:
            el.set("type", self.type)
        attr = _SOURCE_ATTR[self.type]
        if self.source is not None:
            if src is None:
                src = etree.SubElement(el, "source")
            for other in _SOURCE_ATTR.values():
                if other != attr:
                    _drop_attr(src, other)
            src.set(attr, self.source)
        elif src is not None and stale:
            # No source any more: its children (seclabel ...) described the old file, and a
            # leftover file= under a type='block' disk would not validate.
            el.remove(src)
        drv = el.find("driver")
        if self.driver is not None:
            if drv is None:
                drv = etree.SubElement(el, "driver")
            drv.set("type", self.driver)
        elif drv is not None:
            _drop_attr(drv, "type")
            if not len(drv) and not drv.attrib:
                el.remove(drv)


def _disk_tuple(disks: Iterable[SnapshotDisk]) -> tuple[SnapshotDisk, ...]:
    return tuple(disks)


def _text(el: etree._Element | None) -> str | None:
    """Exact text of ``el``: ``None`` when absent, ``""`` when empty (no stripping)."""
    if el is None:
        return None
    return el.text or ""


def _set_text(root: etree._Element, tag: str, value: str | None) -> None:
    child = root.find(tag)
    if value is None:
        if child is not None:
            root.remove(child)
        return
    if child is None:
        child = etree.SubElement(root, tag)
    for sub in list(child):
        child.remove(sub)
    child.text = value


@attrs.frozen
class SnapshotXML:
    """A parsed ``<domainsnapshot>`` document.

    Modelled fields are typed; everything else (``<cookie>``, ``<inactiveDomain>``, seclabels
    of overlays, ...) survives a :meth:`from_xml` → :meth:`to_xml` round trip. Change one with
    :func:`attrs.evolve`. Equality compares the modelled fields only.

    A document for :meth:`SnapshotCollection.create` usually sets only :attr:`name`,
    :attr:`description`, :attr:`memory` and :attr:`disks`; libvirt fills in the rest
    (:attr:`state`, :attr:`creation_time`, :attr:`parent`, :attr:`domain`).
    """

    name: str | None = None
    """The snapshot's name (libvirt picks the creation time in seconds when absent)."""
    description: str | None = None
    """Free-form text kept with the snapshot."""
    state: str | None = None
    """The domain's state when the snapshot was taken: ``running``, ``paused``, ``shutoff``
    ... or ``disk-snapshot`` for a disk-only snapshot of a running domain."""
    creation_time: int | None = None
    """Creation time, in seconds since the epoch."""
    parent: str | None = None
    """Name of the parent snapshot (``None`` for a root)."""
    memory: SnapshotMemory | None = None
    """The memory part; ``None`` leaves it to libvirt."""
    disks: tuple[SnapshotDisk, ...] = attrs.field(default=(), converter=_disk_tuple)
    """Per-disk parts; disks not listed follow libvirt's default."""
    domain: DomainXML | None = None
    """The domain definition captured with the snapshot (reported by libvirt)."""
    raw: str = attrs.field(default="", repr=False, eq=False)
    """The document as parsed; :meth:`to_xml` starts from it."""

    # ------------------------------------------------------------------ derived facts
    @property
    def created(self) -> datetime.datetime | None:
        """:attr:`creation_time` as an aware UTC datetime."""
        if self.creation_time is None:
            return None
        return datetime.datetime.fromtimestamp(self.creation_time, tz=datetime.UTC)

    @property
    def is_external(self) -> bool:
        """Whether any part (a disk overlay or the memory file) lives outside the images."""
        if self.memory is not None and self.memory.mode is SnapshotMemoryMode.EXTERNAL:
            return True
        return any(d.effective_mode is SnapshotDiskMode.EXTERNAL for d in self.disks)

    @property
    def has_memory(self) -> bool:
        """Whether the snapshot holds memory state (reverting resumes the guest where it was)."""
        if self.memory is not None:
            return self.memory.mode is not SnapshotMemoryMode.NO
        return self.state not in (None, "disk-snapshot", "shutoff", "shutdown", "crashed")

    def disk(self, name: str) -> SnapshotDisk:
        """The disk part named ``name``; raises ``KeyError`` when there is none."""
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse a ``<domainsnapshot>`` document; raises :class:`~statecapture.XMLError`."""
        return cls.from_element(parse(text, expected_root="domainsnapshot"))

    @classmethod
    def from_element(cls, root: etree._Element) -> Self:
        """Build from an already parsed ``<domainsnapshot>`` element."""
        created = _text(root.find("creationTime"))
        creation_time: int | None = None
        if created is not None:
            try:
                creation_time = int(created.strip())
            except ValueError:
                raise XMLError(
                    f"creationTime is not a number of seconds: {created!r}",
                    line=line_of(root.find("creationTime")),  # type: ignore[arg-type]
                ) from None
        parent_el = root.find("parent")
        parent = _text(parent_el.find("name")) if parent_el is not None else None
        memory: SnapshotMemory | None = None
        mem = root.find("memory")
        if mem is not None:
            snap = mem.get("snapshot")
            file = mem.get("file")
            if snap is None and file is None:
                raise XMLError("<memory> needs snapshot=… or file=…", line=line_of(mem))
            mode = (
                SnapshotMemoryMode.EXTERNAL
                if snap is None
                else _enum_value(SnapshotMemoryMode, snap, mem, "memory snapshot mode")
            )
            try:
                memory = SnapshotMemory(mode, file)
            except UsageError as exc:
                raise XMLError(str(exc), line=line_of(mem)) from None
        disks_el = root.find("disks")
        disks = (
            tuple(SnapshotDisk.from_element(d) for d in disks_el.iterfind("disk"))
            if disks_el is not None
            else ()
        )
        dom_el = root.find("domain")
        domain = (
            DomainXML.from_element(dom_el)
            if dom_el is not None and dom_el.find("name") is not None
            else None
        )
        return cls(
            name=_text(root.find("name")),
            description=_text(root.find("description")),
            state=_text(root.find("state")),
            creation_time=creation_time,
            parent=parent,
            memory=memory,
            disks=disks,
            domain=domain,
            raw=etree.tostring(root, encoding="unicode"),
        )

    # ------------------------------------------------------------------ serialising
    def to_element(self) -> etree._Element:
        """The document as an lxml element, modelled fields applied."""
        root = parse(self.raw) if self.raw else etree.Element("domainsnapshot")
        _set_text(root, "name", self.name)
        _set_text(root, "description", self.description)
        _set_text(root, "state", self.state)
        _set_text(
            root, "creationTime", None if self.creation_time is None else str(self.creation_time)
        )
        parent_el = root.find("parent")
        if self.parent is None:
            if parent_el is not None:
                root.remove(parent_el)
        else:
            if parent_el is None:
                parent_el = etree.SubElement(root, "parent")
            _set_text(parent_el, "name", self.parent)
        self._apply_memory(root)
        self._apply_disks(root)
        self._apply_domain(root)
        return root

    def _apply_memory(self, root: etree._Element) -> None:
        mem = root.find("memory")
        if self.memory is None:
            if mem is not None:
                root.remove(mem)
            return
        if mem is None:
            mem = etree.SubElement(root, "memory")
        _drop_attr(mem, "file")
        mem.set("snapshot", self.memory.mode.value)
        if self.memory.file is not None:
            mem.set("file", self.memory.file)

    def _apply_disks(self, root: etree._Element) -> None:
        disks_el = root.find("disks")
        if not self.disks:
            if disks_el is not None:
                root.remove(disks_el)
            return
        if disks_el is None:
            disks_el = etree.SubElement(root, "disks")
        # Matched by name in document order, so a second disk of the same name keeps its
        # own element (seclabels, unknown attributes) too.
        existing: dict[str, collections.deque[etree._Element]] = {}
        for el in disks_el.findall("disk"):
            existing.setdefault(el.get("name", ""), collections.deque()).append(el)
            disks_el.remove(el)
        for disk in self.disks:
            same = existing.get(disk.name)
            el = same.popleft() if same else etree.Element("disk")
            disk._apply(el)
            disks_el.append(el)

    def _apply_domain(self, root: etree._Element) -> None:
        old = root.find("domain")
        if self.domain is None:
            # Remove a definition the model dropped; keep a <domain><uuid/></domain> stub that
            # was never modelled.
            if old is not None and old.find("name") is not None:
                root.remove(old)
            return
        new = self.domain.to_element()
        if old is None:
            root.append(new)
        else:
            old.addnext(new)
            root.remove(old)

    def to_xml(self) -> str:
        """Serialise, keeping every element and attribute statecapture does not model."""
        return serialize(self.to_element())
