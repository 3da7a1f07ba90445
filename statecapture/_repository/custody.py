"""Who runs on a repository: the boot record a booted domain carries, and what it says.

:meth:`Repository.boot` writes nothing into the repository. So that a domain running on a
repository's chains can still be found after a crash (of the caller, of the host), the boot
puts a record in the new domain's own libvirt metadata (namespace :data:`BOOT_NS`, in the
XML it defines: no extra write): the repository's path and id, the point, the source domain,
``overlay_dir``, whether the repository is encrypted, and each disk's overlay.
:meth:`Repository.detach` removes the record once the domain no longer needs the repository.

:func:`booted` lists a connection's domains whose record names a repository and says, from
the overlays' qcow2 headers (the truth on disk, the same running or not), whether each still
rests on the repository (or on its decrypting ``qemu-nbd`` servers, :mod:`.nbdboot`) and
whether it can run again as it is (:meth:`Repository.start_booted` starts the servers of a
shut-off encrypted boot again). Nothing here changes a domain, an overlay or the repository.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import attrs
from lxml import etree

from ..errors import NotFoundError, XMLError
from .common import _safe

if TYPE_CHECKING:
    from .._connection import Connection
    from .._domain import Domain
    from .repository import Repository

__all__ = [
    "BOOT_KEY",
    "BOOT_NS",
    "BootRecord",
    "BootedDomain",
    "booted",
    "forget",
    "readers",
    "status",
]

BOOT_NS: Final = "urn:x-statecapture:boot:1"
"""The metadata namespace URI of the boot record in a booted domain's XML."""
BOOT_KEY: Final = "statecaptureboot"
"""The XML namespace prefix of the boot record element."""
_QCOW2_MAGIC: Final = b"QFI\xfb"
_ATTRS: Final = (
    "repository",
    "repository-id",
    "point",
    "source",
    "source-uuid",
    "overlay-dir",
    "encrypted",
)


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class BootRecord:
    """The record :meth:`Repository.boot` leaves in the new domain's metadata."""

    repository: str
    """The repository's path (absolute) at boot time."""
    repository_id: str
    """The repository's id (``repository.json``): a moved repository is still recognised."""
    point: str
    """The restore point booted."""
    source: str
    """The name of the domain the point was taken from."""
    source_uuid: str
    """Its UUID."""
    overlay_dir: str
    """The directory holding the overlays (and, encrypted, ``nbd/``)."""
    encrypted: bool
    """Whether the disks rest on decrypting ``qemu-nbd`` servers."""
    disks: Mapping[str, str] = attrs.field(converter=_frozen_map)
    """Disk target → overlay file."""

    def to_xml(self, *, prefixed: bool = False) -> str:
        """The record element; ``prefixed``: in :data:`BOOT_NS` with the prefix
        :data:`BOOT_KEY` (for a ``<metadata>`` in a definition; ``set_metadata`` adds it)."""
        tag = etree.QName(BOOT_NS, "boot") if prefixed else "boot"
        nsmap = {BOOT_KEY: BOOT_NS} if prefixed else None
        root = etree.Element(tag, nsmap=nsmap)
        root.set("repository", self.repository)
        root.set("repository-id", self.repository_id)
        root.set("point", self.point)
        root.set("source", self.source)
        root.set("source-uuid", self.source_uuid)
        root.set("overlay-dir", self.overlay_dir)
        root.set("encrypted", "yes" if self.encrypted else "no")
        for target, overlay in sorted(self.disks.items()):
            sub = etree.QName(BOOT_NS, "disk") if prefixed else "disk"
            etree.SubElement(root, sub, target=target, overlay=overlay)
        return etree.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> BootRecord:
        """Parse a record; :class:`XMLError` when it is not one."""
        try:
            root = etree.fromstring(text.encode())
            disks = {
                d.get("target", ""): d.get("overlay", "")
                for d in root
                if isinstance(d.tag, str) and etree.QName(d).localname == "disk"
            }
            a = {k: str(root.attrib[k]) for k in _ATTRS}
            rec = cls(
                repository=a["repository"],
                repository_id=a["repository-id"],
                point=a["point"],
                source=a["source"],
                source_uuid=a["source-uuid"],
                overlay_dir=a["overlay-dir"],
                encrypted=a["encrypted"] == "yes",
                disks=disks,
            )
        except (etree.XMLSyntaxError, KeyError) as exc:
            raise XMLError(f"not a statecapture boot record: {exc}") from None
        if etree.QName(root).localname != "boot" or not all(rec.disks) or "" in rec.disks.values():
            raise XMLError("not a statecapture boot record")
        return rec


def metadata_element(record: BootRecord) -> etree._Element:
    """The ``<metadata>`` child (prefixed) that :func:`_rewrite_domain` puts in the XML."""
    return etree.fromstring(record.to_xml(prefixed=True).encode())


def strip_own_metadata(root: etree._Element) -> None:
    """Drop statecapture's crash and boot records (a run's journal, an older boot record)
    from a captured definition: they describe the source domain, not a new one made from
    it (recover() on the new domain would act on them). Other metadata stays."""
    from .._journal import JOURNAL_NS
    from .._journal_legacy import LEGACY_NAMESPACES

    records = {BOOT_NS, JOURNAL_NS, *LEGACY_NAMESPACES}
    meta = root.find("metadata")
    if meta is None:
        return
    for el in list(meta):
        if isinstance(el.tag, str) and etree.QName(el).namespace in records:
            meta.remove(el)


@attrs.frozen
class BootedDomain:
    """A domain made by :meth:`Repository.boot` (from :meth:`Repository.booted`)."""

    name: str
    """The booted domain's name."""
    uuid: str
    """Its UUID."""
    point: str
    """The restore point it was booted from."""
    source: str
    """The name of the domain that point was taken from."""
    overlay_dir: Path
    """The directory with its overlays."""
    encrypted: bool
    """Whether it was booted from an encrypted repository (through ``qemu-nbd`` servers)."""
    running: bool
    """Whether the domain is running."""
    depends: bool
    """Whether any disk still rests on the repository (or on a decrypting server):
    :meth:`Repository.detach` ends that."""
    servers_alive: bool | None
    """Encrypted and still depending: whether every decrypting ``qemu-nbd`` still runs;
    ``None`` otherwise."""
    problem: str | None = None
    """Why the domain cannot run (again) as it is, and what to do; ``None`` when it can."""

    def __str__(self) -> str:
        state = "running" if self.running else "shut off"
        dep = "depends on the repository" if self.depends else "independent of the repository"
        line = (
            f"booted domain {self.name!r} ({state}) from point {self.point} of "
            f"{self.source!r}, overlays in {self.overlay_dir}: {dep}"
        )
        return line + (f"; PROBLEM: {self.problem}" if self.problem else "")


def booted(repo: Repository, conn: Connection) -> tuple[BootedDomain, ...]:
    """Implementation of :meth:`Repository.booted`."""
    out = []
    for dom in conn.domains():
        with contextlib.suppress(NotFoundError, XMLError):  # gone meanwhile; not our record
            rec = record_of(dom)
            if rec is not None and rec.repository_id == repo.info.id:
                out.append(status(dom, rec))
    return tuple(sorted(out, key=lambda b: b.name))


def record_of(dom: Domain) -> BootRecord | None:
    """The boot record ``dom`` carries, or ``None``; :class:`XMLError` when damaged."""
    text = dom.metadata(BOOT_NS)
    return None if text is None else BootRecord.from_xml(text)


def forget(dom: Domain) -> None:
    """Remove ``dom``'s boot record (after a detach: it no longer needs the repository)."""
    if dom.metadata(BOOT_NS) is not None:
        dom.set_metadata(BOOT_NS, BOOT_KEY, None)


def status(dom: Domain, rec: BootRecord) -> BootedDomain:
    """What ``rec`` on ``dom`` means now (reads the overlays' headers and /proc only)."""
    from .nbdboot import SOCKET_DIR, NbdBacking, _read_pid, _serves

    running = dom.is_active
    ov_dir = Path(rec.overlay_dir)
    missing = [f for f in rec.disks.values() if not os.path.isfile(f)]
    backings = {d: _backing_of(Path(f)) for d, f in rec.disks.items() if f not in missing}
    depends = bool(missing) or any(b is not None for b in backings.values())
    alive: bool | None = None
    problem: str | None = None
    if missing:
        problem = (
            f"overlay file(s) missing: {', '.join(sorted(missing))}; undefine the domain and "
            f"remove {ov_dir}"
        )
    elif rec.encrypted and depends:
        servers = [
            NbdBacking(d, _safe(d), ov_dir / SOCKET_DIR / f"{_safe(d)}.sock")
            for d, b in sorted(backings.items())
            if b is not None
        ]
        alive = all(
            (pid := _read_pid(s.pid_file)) is not None and _serves(pid, s.socket) for s in servers
        )
        if not alive:
            what = "a plain start fails" if not running else "reads from the repository fail"
            stop = "" if not running else "destroy it, then "
            problem = (
                f"its decrypting qemu-nbd servers are not running (they end with the domain),"
                f" so {what}: {stop}start it "
                f"with repo.start_booted(dom), or undefine it and remove {ov_dir}"
            )
    elif depends:
        gone = sorted(
            f"{d}: {b}" for d, b in backings.items() if b is not None and not os.path.exists(b)
        )
        if gone:
            problem = (
                f"backing file(s) gone from the repository ({', '.join(gone)}): it cannot run "
                f"again; boot another point or undefine it and remove {ov_dir}"
            )
    return BootedDomain(
        name=dom.name,
        uuid=dom.uuid,
        point=rec.point,
        source=rec.source,
        overlay_dir=ov_dir,
        encrypted=rec.encrypted,
        running=running,
        depends=depends,
        servers_alive=alive,
        problem=problem,
    )


def _backing_of(path: Path) -> str | None:
    """The backing file name in the qcow2 header of ``path`` (``None``: none, or not a qcow2).

    QEMU rewrites the header when a block pull ends, so this is what the next start uses."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != _QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if offset == 0 or size == 0:
                return None
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None


def finding(dom: Domain) -> str | None:
    """``recover()``'s line about ``dom``'s boot record (``None``: it has none); reads only."""
    try:
        rec = record_of(dom)
    except XMLError as exc:
        return f"a damaged boot record ({exc}); Domain.set_metadata({BOOT_NS!r}, ...) removes it"
    if rec is None:
        return None
    st = status(dom, rec)
    where = f"point {rec.point} of the repository {rec.repository} (id {rec.repository_id})"
    if st.problem is not None:
        return f"booted from {where}: {st.problem}"
    if st.depends:
        return (
            f"booted from {where}: it still depends on it (overlays in {rec.overlay_dir}); "
            "Repository.detach() makes it independent, or undefine it and remove the overlays"
        )
    return f"booted from {where}: independent of it now (its boot record is left over)"


def readers(repo: Repository, conn: Connection, source_uuid: str) -> dict[str, tuple[str, ...]]:
    """Point id → names of the domains on ``conn`` booted from that point (of this
    repository, taken from domain ``source_uuid``) that still depend on the repository,
    running or shut off (:meth:`Repository.prune` keeps those points). Reads only."""
    out: dict[str, list[str]] = {}
    for dom in conn.domains():
        with contextlib.suppress(NotFoundError, XMLError):  # gone meanwhile; not our record
            rec = record_of(dom)
            if rec is None or rec.repository_id != repo.info.id:
                continue
            if rec.source_uuid == source_uuid and status(dom, rec).depends:
                out.setdefault(rec.point, []).append(dom.name)
    return {p: tuple(sorted(names)) for p, names in out.items()}


def check_lines(repo: Repository, conn: Connection) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``check(conn=...)``: one line per booted domain, and the problem lines among them."""
    found = booted(repo, conn)
    lines = tuple(str(b) for b in found)
    problems = tuple(f"booted domain {b.name!r}: {b.problem}" for b in found if b.problem)
    return lines, problems
