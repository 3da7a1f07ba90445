"""QEMU's live view of a running domain's dirty bitmaps, by disk (HAZARDS 3, 19).

A persistent dirty bitmap created while the domain runs lives only inside QEMU until QEMU
closes the image: ``qemu-img info -U`` does not show it, and libvirt lists no checkpoint
for it when the checkpoint's metadata was deleted (or never saved, as when a checkpoint
create fails after QEMU made the bitmap). Reverting an internal snapshot on a node with
any dirty bitmap makes QEMU 7.2 exit ("Device has active dirty bitmaps"). Only QEMU knows
for sure, so statecapture asks it (``query-named-block-nodes`` through libvirt's
``qemuMonitorCommand``) where a wrong answer loses the running domain:

* before an internal snapshot create or revert of a running domain (``_snapshot/``);
* in the advisor's bitmap blocker for a running domain (``_advisor/facts.py``);
* around a checkpoint create on a running domain, to remove a bitmap that a failed
  create left behind (:func:`remove_new_orphans`).

libvirt marks a domain that received a monitor command as *tainted* (``custom-monitor``:
a warning in its log, listed by ``virDomainGetMessages``, cleared when QEMU restarts). The
command is a read-only query (or the removal of a bitmap no checkpoint uses); nothing
else about the domain changes. libvirt 9.0 exposes no other way to see these bitmaps
(domain stats, block info and the domain XML do not list them). See docs/hazards.md.

Node names: libvirt 9.0 (``-blockdev``) names the nodes of a disk layer with index ``N``
``libvirt-N-format`` and ``libvirt-N-storage`` (``<source index='N'>`` and
``<backingStore index='N'>`` in the live XML); nodes named otherwise are matched by file
name. A bitmap on a node that maps to no disk is reported under ``node <name>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from lxml import etree

from . import _locks
from ._ports import NodeBitmap
from .errors import LibvirtError, NotFoundError, UnsupportedError
from .xml import parse

if TYPE_CHECKING:
    from ._domain import Domain
    from ._ports import BitmapPort

__all__ = ["describe", "live_bitmaps", "query_or_none", "remove_new_orphans"]

_NODE: Final = re.compile(r"^libvirt-(?P<index>\d+)-(?:format|storage)$")


def _disk_layers(xml: str) -> tuple[dict[int, str], dict[str, str]]:
    """(layer index -> disk target, image path -> disk target) from the live XML."""
    by_index: dict[int, str] = {}
    by_path: dict[str, str] = {}
    root = parse(xml)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            continue
        layer: etree._Element | None = disk
        while layer is not None:
            source = layer.find("source")
            if source is not None:
                index = source.get("index") or layer.get("index")
                if index is not None and index.isdigit():
                    by_index[int(index)] = dev
                path = source.get("file") or source.get("dev")
                if path:
                    by_path.setdefault(path, dev)
            layer = layer.find("backingStore")
    return by_index, by_path


def _group(dom: Domain, bitmaps: Iterable[NodeBitmap]) -> dict[str, tuple[NodeBitmap, ...]]:
    by_index, by_path = _disk_layers(_port(dom).xml_desc())
    out: dict[str, list[NodeBitmap]] = {}
    for bm in bitmaps:
        m = _NODE.match(bm.node)
        disk = by_index.get(int(m["index"])) if m else None
        if disk is None and bm.filename:
            disk = by_path.get(bm.filename)
        out.setdefault(disk or f"node {bm.node}", []).append(bm)
    return {k: tuple(v) for k, v in out.items()}


def live_bitmaps(dom: Domain) -> dict[str, tuple[NodeBitmap, ...]]:
    """Every dirty bitmap QEMU holds for the running domain, by disk target.

    Holds the domain's lock (HAZARDS 21: block-node queries must not overlap a backup's
    start or end). Raises :class:`InvalidStateError` for a domain that is not running,
    :class:`UnsupportedError` for a driver without a QEMU monitor.
    """
    with _locks.domain_lock(dom.uuid, "query dirty bitmaps"):
        found = _port(dom).block_dirty_bitmaps()
    return _group(dom, found)


def query_or_none(dom: Domain) -> dict[str, tuple[NodeBitmap, ...]] | None:
    """:func:`live_bitmaps`, or ``None`` when the domain is not running or the driver has
    no QEMU monitor (nothing lives only in QEMU then)."""
    if not dom.is_active:
        return None
    try:
        return live_bitmaps(dom)
    except UnsupportedError:
        return None
    except LibvirtError:
        if not dom.is_active:  # it stopped meanwhile
            return None
        raise


def describe(found: Mapping[str, tuple[NodeBitmap, ...]]) -> list[str]:
    """One phrase per disk: ``disk vda holds dirty bitmaps c1 (persistent), ...``."""
    phrases = []
    for disk, bms in sorted(found.items()):
        names = ", ".join(
            f"{bm.name!r} ({'persistent' if bm.persistent else 'not persistent'}"
            f"{', in use by a job' if bm.busy else ''})"
            for bm in bms
        )
        where = disk if disk.startswith("node ") else f"disk {disk}"
        phrases.append(f"{where} holds dirty bitmap(s) {names} in QEMU")
    return phrases


def remove_new_orphans(
    dom: Domain,
    before: Mapping[str, tuple[NodeBitmap, ...]],
    known: Iterable[str],
    exc: BaseException,
) -> None:
    """After a failed checkpoint create: remove bitmaps QEMU holds now but did not hold
    ``before`` the call, unless libvirt knows them (``known``: bitmap names of existing
    checkpoints). Caller holds the domain's lock, so nothing else made them. Failures
    are attached to ``exc`` as notes, never raised.
    """
    try:
        now = query_or_none(dom)
    except Exception as err:  # never mask the create's own error
        exc.add_note(f"statecapture could not check for a dirty bitmap left behind: {err}")
        return
    if now is None:
        return
    old = {(bm.node, bm.name) for bms in before.values() for bm in bms}
    keep = set(known)
    for disk, bms in now.items():
        for bm in bms:
            if (bm.node, bm.name) in old or bm.name in keep or bm.busy:
                continue  # there before, libvirt's, or a job's own
            try:
                _port(dom).remove_block_dirty_bitmap(bm.node, bm.name)
            except NotFoundError:
                continue
            except Exception as err:
                exc.add_note(
                    f"the failed checkpoint create left dirty bitmap {bm.name!r} on {disk} "
                    f"(node {bm.node}) and statecapture could not remove it: {err}"
                )
            else:
                exc.add_note(
                    f"statecapture removed dirty bitmap {bm.name!r} that the failed "
                    f"checkpoint create had left on {disk} (node {bm.node})"
                )


def _port(dom: Domain) -> BitmapPort:
    """The domain's port as this module uses it: ``BitmapPort`` (mypy checks it)."""
    return dom.port
