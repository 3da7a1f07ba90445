"""``<domain>`` documents: the parts statecapture needs, everything else preserved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Self

import attrs
from lxml import etree

from ..errors import XMLError
from ._base import XMLInput, line_of, parse, serialize, set_child_text, text_of

__all__ = ["BackingSource", "Disk", "DomainXML"]

AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _exact_text(el: etree._Element | None) -> str | None:
    """Text of ``el`` exactly as written: ``None`` when absent, ``""`` when empty."""
    if el is None:
        return None
    return el.text or ""


@attrs.frozen
class BackingSource:
    """One layer below a disk's active image, as ``<backingStore>`` describes it."""

    source: str | None
    """Path (file/block) or name (network) of the layer; ``None`` when libvirt does not say."""
    format: str | None
    """Image format of the layer (``qcow2``, ``raw`` ...)."""
    index: int | None = None
    """libvirt's index for the layer (``vda[1]`` addresses index 1), when reported."""
    type: str = "file"
    """libvirt's source type: ``file``, ``block``, ``network`` ..."""


def _source_of(el: etree._Element, type_: str) -> str | None:
    src = el.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "name", "volume", "dir"):
        value = src.get(attr)
        if value:
            return value
    return None


def _backing_chain(disk: etree._Element) -> tuple[BackingSource, ...]:
    chain: list[BackingSource] = []
    node = disk.find("backingStore")
    while node is not None and node.get("type") is not None:
        fmt = node.find("format")
        index = node.get("index")
        chain.append(
            BackingSource(
                source=_source_of(node, node.get("type", "file")),
                format=fmt.get("type") if fmt is not None else None,
                index=int(index) if index is not None and index.isdigit() else None,
                type=node.get("type", "file"),
            )
        )
        node = node.find("backingStore")
    return tuple(chain)


@attrs.frozen
class Disk:
    """A guest disk (``<disk>`` in the domain XML)."""

    target: str
    """Guest-visible target name (``vda``, ``sdb``): the key libvirt APIs use."""
    device: str = "disk"
    """``disk``, ``cdrom``, ``floppy`` or ``lun``."""
    bus: str | None = None
    """``virtio``, ``scsi``, ``sata`` ..."""
    source: str | None = None
    """Path of the active image (file or block device), or the network/volume name."""
    format: str | None = None
    """Driver type of the active image: ``qcow2``, ``raw`` ..."""
    type: str = "file"
    """libvirt's source type: ``file``, ``block``, ``network``, ``volume`` ..."""
    backing: tuple[BackingSource, ...] = ()
    """The backing chain below the active image, top first (as reported by libvirt)."""
    readonly: bool = False
    """Whether the guest sees the disk read-only."""
    snapshot: str | None = None
    """The per-disk default snapshot mode (``<disk snapshot='…'>``), if set."""

    @property
    def chain(self) -> tuple[str | None, ...]:
        """All image paths from the active image down to the base."""
        return (self.source, *(b.source for b in self.backing))

    @classmethod
    def from_element(cls, el: etree._Element) -> Self:
        target = el.find("target")
        if target is None or not target.get("dev"):
            raise XMLError("<disk> without <target dev=…>", line=line_of(el))
        driver = el.find("driver")
        type_ = el.get("type", "file")
        return cls(
            target=target.get("dev", ""),
            device=el.get("device", "disk"),
            bus=target.get("bus"),
            source=_source_of(el, type_),
            format=driver.get("type") if driver is not None else None,
            type=type_,
            backing=_backing_chain(el),
            readonly=el.find("readonly") is not None,
            snapshot=el.get("snapshot"),
        )


@attrs.frozen
class DomainXML:
    """A parsed ``<domain>`` definition.

    Modelled fields are typed; everything else in the document survives a
    :meth:`from_xml` → :meth:`to_xml` round trip unchanged. Change a definition with
    :func:`attrs.evolve`; :meth:`to_xml` writes the modelled fields back (name, uuid,
    description, and each disk's ``source`` and ``format`` matched by ``target``).
    Equality compares the modelled fields only.
    """

    name: str
    uuid: str | None = None
    type: str = "qemu"
    """The hypervisor type attribute (``kvm``, ``qemu``, ``test`` ...)."""
    description: str | None = None
    """Free-form description, kept exactly (leading and trailing whitespace included)."""
    disks: tuple[Disk, ...] = ()
    has_agent_channel: bool = False
    """Whether a ``virtio`` channel named ``org.qemu.guest_agent.0`` is defined."""
    raw: str = attrs.field(default="", repr=False, eq=False)
    """The document as parsed; :meth:`to_xml` starts from it."""

    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse a ``<domain>`` document; raises :class:`~statecapture.XMLError`."""
        root = parse(text, expected_root="domain")
        return cls.from_element(root)

    @classmethod
    def from_element(cls, root: etree._Element) -> Self:
        """Build from an already parsed ``<domain>`` element (e.g. inside a snapshot)."""
        name = text_of(root.find("name"))
        if name is None:
            raise XMLError("<domain> without <name>", line=line_of(root))
        devices = root.find("devices")
        disks: list[Disk] = []
        agent = False
        if devices is not None:
            disks = [Disk.from_element(d) for d in devices.iterfind("disk")]
            for ch in devices.iterfind("channel"):
                tgt = ch.find("target")
                if tgt is not None and tgt.get("name") == AGENT_CHANNEL:
                    agent = True
        return cls(
            name=name,
            uuid=text_of(root.find("uuid")),
            type=root.get("type", "qemu"),
            description=_exact_text(root.find("description")),
            disks=tuple(disks),
            has_agent_channel=agent,
            raw=etree.tostring(root, encoding="unicode"),
        )

    def disk(self, target: str) -> Disk:
        """The disk with guest target ``target``; raises ``KeyError`` when there is none."""
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    def iter_disks(self, *, device: str | None = "disk") -> Iterator[Disk]:
        """Disks of one device kind (``None`` for all, cdroms included)."""
        return (d for d in self.disks if device is None or d.device == device)

    def to_element(self) -> etree._Element:
        """The document as an lxml element, modelled fields applied."""
        if self.raw:
            root = parse(self.raw)
        else:
            root = etree.Element("domain", type=self.type)
        root.set("type", self.type)
        set_child_text(root, "name", self.name)
        if self.uuid is not None:
            set_child_text(root, "uuid", self.uuid)
        set_child_text(root, "description", self.description)
        devices = root.find("devices")
        if devices is None:
            devices = etree.SubElement(root, "devices")
        existing = {
            (t.get("dev") if (t := d.find("target")) is not None else None): d
            for d in devices.iterfind("disk")
        }
        for disk in self.disks:
            el = existing.get(disk.target)
            if el is None:
                el = etree.SubElement(devices, "disk", type=disk.type, device=disk.device)
                tgt = etree.SubElement(el, "target", dev=disk.target)
                if disk.bus:
                    tgt.set("bus", disk.bus)
            _apply_disk(el, disk)
        return root

    def to_xml(self) -> str:
        """Serialise, keeping every element and attribute statecapture does not model."""
        return serialize(self.to_element())


_SOURCE_ATTR = {"file": "file", "block": "dev", "network": "name", "volume": "volume", "dir": "dir"}


def _apply_disk(el: etree._Element, disk: Disk) -> None:
    attr = _SOURCE_ATTR.get(disk.type, "file")
    if disk.source is not None:
        src = el.find("source")
        if src is None:
            src = etree.Element("source")
            target = el.find("target")
            if target is not None:
                target.addprevious(src)
            else:
                el.append(src)
        if src.get(attr) != disk.source:
            src.set(attr, disk.source)
    if disk.format is not None:
        driver = el.find("driver")
        if driver is None:
            driver = etree.Element("driver", name="qemu")
            el.insert(0, driver)
        driver.set("type", disk.format)
