"""A restore point's captured configuration rewritten as a new domain (restore, boot)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from .custody import BootRecord, metadata_element, strip_own_metadata

if TYPE_CHECKING:
    from .nbdboot import NbdBacking

__all__ = ["_rewrite_domain"]


def _rewrite_domain(
    xml: bytes,
    *,
    name: str,
    files: Mapping[str, Path],
    fmt: str,
    nvram: Path | None,
    nbd: Mapping[str, NbdBacking] | None = None,
    record: BootRecord | None = None,
) -> str:
    """The point's configuration as a new domain ``name`` on ``files`` (disk → image);
    ``nbd``: those disks' images rest on an NBD export, named as an explicit chain;
    ``record``: the boot record to carry in ``<metadata>``. statecapture's own metadata of
    the source domain (a run's journal, labels, a boot record) is not carried over."""
    root = etree.fromstring(xml)
    strip_own_metadata(root)
    if record is not None:
        meta = root.find("metadata")
        if meta is None:
            meta = etree.SubElement(root, "metadata")
        meta.append(metadata_element(record))
    name_el = root.find("name")
    if name_el is None:
        name_el = etree.SubElement(root, "name")
    name_el.text = name
    uuid_el = root.find("uuid")
    if uuid_el is not None:
        root.remove(uuid_el)
    for mac in root.iterfind("devices/interface/mac"):
        mac.set("address", "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)))
    devices = root.find("devices")
    if devices is not None:
        for disk in list(devices.iterfind("disk")):
            target = disk.find("target")
            dev = target.get("dev") if target is not None else None
            if disk.get("device", "disk") != "disk":
                continue
            if dev is None or dev not in files:
                devices.remove(disk)
                continue
            disk.set("type", "file")
            for child in list(disk):
                if child.tag in ("source", "backingStore"):
                    disk.remove(child)
            driver = disk.find("driver")
            if driver is None:
                driver = etree.SubElement(disk, "driver", name="qemu")
            driver.set("type", fmt)
            src = etree.Element("source", file=str(files[dev]))
            disk.insert(list(disk).index(driver) + 1, src)
            if nbd is not None and dev in nbd:
                src.addnext(_nbd_backing(nbd[dev]))
    nv = root.find("os/nvram")
    if nv is not None:
        if nvram is not None:
            nv.text = str(nvram)
        else:
            nv.getparent().remove(nv)  # type: ignore[union-attr]
    return etree.tostring(root, encoding="unicode")


def _nbd_backing(b: NbdBacking) -> etree._Element:
    """``<backingStore>``: the raw export ``b`` on its UNIX socket, the end of the chain."""
    store = etree.Element("backingStore", type="network")
    etree.SubElement(store, "format", type="raw")
    src = etree.SubElement(store, "source", protocol="nbd", name=b.export)
    etree.SubElement(src, "host", transport="unix", socket=str(b.socket))
    etree.SubElement(store, "backingStore")
    return store
