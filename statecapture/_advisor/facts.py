"""The facts the advisor judges by: :func:`gather_facts` reads them from a domain in one
read-only pass (driver, state, definition, disks and their formats, guest-agent state,
snapshots, checkpoints, dirty bitmaps in QEMU and in local images, the sequence journal,
running jobs) into a :class:`DomainFacts` value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs
from lxml import etree

from .._agent import agent_state_of
from .._enums import DomainState
from .._host import is_local_uri
from .._journal import read_journal
from ..errors import StateCaptureError, XMLError
from ..xml import Disk
from ..xml._base import parse

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import ProbePort

__all__ = ["DomainFacts", "gather_facts"]


@attrs.frozen
class DomainFacts:
    """What :func:`advise` found on the live domain (all read-only queries)."""

    name: str
    driver: str
    state: DomainState
    persistent: bool
    memory_mib: int | None
    """The domain's current memory size (for downtime estimates)."""
    agent: str
    """``connected``, ``disconnected``, ``no channel`` or ``unknown`` (the driver does not
    report the channel state)."""
    disks: tuple[Disk, ...]
    """Writable disks (cdroms, floppies and read-only disks left out)."""
    checkpoints: tuple[str, ...]
    snapshots: tuple[str, ...]
    bitmaps: Mapping[str, tuple[str, ...]]
    """Dirty bitmaps by disk target: those inside the qcow2 images, and for a running QEMU
    domain those QEMU holds (a bitmap on no known disk appears under ``node <name>``)."""
    journal: str | None
    """The unfinished sequence's name when a journal is present, else ``None``."""
    backup_job: bool
    """A backup job is running."""
    block_jobs: tuple[str, ...]
    """Disks with a running block job."""
    managed_save_image: bool | None
    notes: tuple[str, ...] = ()
    """What could not be found out, and why."""

    @property
    def active(self) -> bool:
        """Whether the domain is running or paused."""
        return self.state not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)

    @property
    def non_qcow2(self) -> tuple[Disk, ...]:
        """Writable disks whose active image is not qcow2."""
        return tuple(d for d in self.disks if d.format != "qcow2")


def _memory_mib(root: etree._Element) -> int | None:
    for tag in ("currentMemory", "memory"):
        el = root.find(tag)
        if el is None or not (el.text or "").strip().isdigit():
            continue
        value = int((el.text or "0").strip())
        unit = (el.get("unit") or "KiB").lower()
        scale = {
            "b": 1 / 2**20,
            "bytes": 1 / 2**20,
            "kib": 1 / 1024,
            "k": 1 / 1024,
            "mib": 1,
            "m": 1,
            "gib": 1024,
            "g": 1024,
            "tib": 2**20,
            "t": 2**20,
        }.get(unit)
        if scale is None:
            return None
        return int(value * scale)
    return None


def _find_bitmaps(
    dom: Domain, disks: tuple[Disk, ...], driver: str
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    bitmaps: dict[str, tuple[str, ...]] = {}
    notes: list[str] = []
    if driver != "QEMU":
        return bitmaps, notes
    from .. import _bitmaps, _qemuimg

    # QEMU's own view of a running domain: bitmaps that live only in QEMU (HAZARDS 19) are
    # neither in the image files yet nor, when orphaned, in libvirt's checkpoint list.
    try:
        live = _bitmaps.query_or_none(dom) or {}
    except StateCaptureError as exc:
        live = {}
        notes.append(f"QEMU's live dirty bitmaps could not be read: {exc}")
    for target, found_live in live.items():
        bitmaps[target] = tuple(dict.fromkeys(bm.name for bm in found_live))
    if not is_local_uri(dom.connection.uri):
        notes.append("images not inspected for dirty bitmaps: the host is remote")
        return bitmaps, notes
    for disk in disks:
        if disk.format != "qcow2" or disk.type != "file" or not disk.source:
            continue
        if not os.path.exists(disk.source):
            notes.append(f"{disk.target}: image {disk.source} not found on this host")
            continue
        try:
            found = _qemuimg.persistent_bitmaps(disk.source, timeout=15)
        except StateCaptureError as exc:
            notes.append(f"{disk.target}: could not inspect the image for bitmaps: {exc}")
            continue
        if found:
            bitmaps[disk.target] = tuple(dict.fromkeys((*bitmaps.get(disk.target, ()), *found)))
    return bitmaps, notes


def _journal_sequence(dom: Domain) -> str | None:
    """The unfinished sequence's name from the domain's crash record (an older
    statecapture's too); ``None`` without one, or when it is a plain backup job's."""
    try:
        journal = read_journal(dom)
    except XMLError:
        return "unknown sequence"
    if journal is None or journal.is_backup_job:
        return None
    return journal.sequence or "unknown sequence"


def gather_facts(dom: Domain) -> DomainFacts:
    """Read everything the advisor needs from ``dom`` (read-only)."""
    port: ProbePort = dom.port
    driver = dom.connection.versions.driver
    definition = dom.definition
    root = parse(definition.raw)
    state = dom.state
    disks = tuple(d for d in definition.disks if d.device == "disk" and not d.readonly)
    notes: list[str] = []
    snapshots = port.probe_listing("snapshot")
    checkpoints = port.probe_listing("checkpoint")
    backup_supported, job = port.probe_backup_job()
    block_jobs: list[str] = []
    active = state not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)
    if active:
        for disk in disks:
            if port.probe_block_job(disk.target):
                block_jobs.append(disk.target)
    agent = agent_state_of(root, active=active).value
    bitmaps, bitmap_notes = _find_bitmaps(dom, disks, driver)
    notes.extend(bitmap_notes)
    return DomainFacts(
        name=dom.name,
        driver=driver,
        state=state,
        persistent=dom.is_persistent,
        memory_mib=_memory_mib(root),
        agent=agent,
        disks=disks,
        checkpoints=tuple(checkpoints or ()),
        snapshots=tuple(snapshots or ()),
        bitmaps=MappingProxyType(bitmaps),
        journal=_journal_sequence(dom),
        backup_job=backup_supported and job is not None,
        block_jobs=tuple(block_jobs),
        managed_save_image=port.probe_managed_save_image(),
        notes=tuple(notes),
    )
