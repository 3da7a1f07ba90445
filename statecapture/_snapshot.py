"""Snapshots of a domain: :class:`SnapshotCollection` (``Domain.snapshots``) and :class:`Snapshot`.

Which snapshot to take (from libvirt's *domain state capture* guide and its review):

* **External, disk-only** (``create(disk_only=True)``): quick. Each disk's current image is
  frozen and a new qcow2 overlay takes the guest's writes; the guest does not notice. Add
  ``quiesce=True`` to have the guest agent flush and freeze file systems around it.
* **External with memory** (``create(external=True)``): memory is written to a file the way
  a migration sends it, so the guest sees a migration-like downtime at the end (``live=True``
  keeps the guest running while most memory is written, shortening that pause).
* **Internal** (``create()`` on a running domain): disks and memory are stored inside the
  qcow2 images (QEMU ``savevm``). With QEMU the guest is paused for the whole save, a lengthy
  downtime that grows with guest memory, and internal snapshots cannot be quiesced.

Every change is preceded by a preflight that refuses, before anything is touched, the cases
known to hurt (see ``docs/snapshots.md``): internal snapshots on disks with persistent dirty
bitmaps, reverting to external snapshots on daemons that cannot, quiescing without a connected
agent, and external files that exist already or cannot be written.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from html import escape
from typing import TYPE_CHECKING, Final

import attrs

from . import _bitmaps, _files, _locks, _qemuimg
from ._agent import AgentState, agent_state
from ._hints import add_names_hint
from ._host import is_local_uri, writes_host_files
from ._ports import SnapshotObjectPort
from .errors import (
    CleanupError,
    GuestAgentError,
    InvalidStateError,
    NotFoundError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from .xml import Disk, DomainXML
from .xml._checkpoint import METADATA_NAME_MAX
from .xml._snapshot import (
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
)

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "EXTERNAL_DELETE_SINCE",
    "EXTERNAL_REVERT_SINCE",
    "Snapshot",
    "SnapshotCollection",
    "SnapshotDiskMode",
    "SnapshotKind",
    "SnapshotMemoryMode",
    "SnapshotPlan",
]

EXTERNAL_REVERT_SINCE: Final = (9, 9, 0)
"""First libvirt (daemon) version that reverts to external snapshots."""
EXTERNAL_DELETE_SINCE: Final = (9, 0, 0)
"""First libvirt (daemon) version that deletes external snapshots (merging their overlays)."""

_BAD_NAME: Final = re.compile(r"[/\x00-\x1f\x7f]")
_FILE_NAME_MAX: Final = 255

PathLike = str | os.PathLike[str]


class SnapshotKind(enum.Enum):
    """What a snapshot holds and where: internal or external, with memory or disk-only."""

    INTERNAL = "internal"
    """Disks and memory inside the qcow2 images (a running domain's ``savevm``)."""
    INTERNAL_DISK_ONLY = "internal-disk-only"
    """Disks inside the qcow2 images, no memory (typically a shut-off domain)."""
    EXTERNAL = "external"
    """Disk overlays plus a memory state file."""
    EXTERNAL_DISK_ONLY = "external-disk-only"
    """Disk overlays only; reverting boots from the captured disks."""

    @property
    def external(self) -> bool:
        """Whether the snapshot lives in files outside the original images."""
        return self in (SnapshotKind.EXTERNAL, SnapshotKind.EXTERNAL_DISK_ONLY)

    @property
    def with_memory(self) -> bool:
        """Whether the snapshot holds memory (reverting resumes the guest where it was)."""
        return self in (SnapshotKind.INTERNAL, SnapshotKind.EXTERNAL)

    @classmethod
    def of(cls, definition: SnapshotXML) -> SnapshotKind:
        """The kind a snapshot definition describes."""
        if definition.is_external:
            return cls.EXTERNAL if definition.has_memory else cls.EXTERNAL_DISK_ONLY
        return cls.INTERNAL if definition.has_memory else cls.INTERNAL_DISK_ONLY


# ---------------------------------------------------------------------------------- helpers


def _dirty_bitmap_problems(dom: Domain, disks: Iterable[Disk]) -> builtins.list[str]:
    """Reasons why the disks hold (or will hold) persistent dirty bitmaps."""
    problems: builtins.list[str] = []
    # QEMU's own view first (HAZARDS 19): a bitmap that lives only in the running QEMU
    # (metadata-only checkpoint delete, a failed checkpoint create, another tool) is in
    # neither libvirt's checkpoint list nor the image file yet.
    live = _bitmaps.query_or_none(dom)
    if live:
        problems.extend(_bitmaps.describe(live))
    checkpoints = dom.port.checkpoint_names()
    if checkpoints:
        problems.append(
            f"the domain has checkpoints ({', '.join(sorted(checkpoints))}), each backed by "
            "a persistent dirty bitmap in its qcow2 disks"
        )
    if not writes_host_files(dom.connection):
        return problems
    seen: set[str] = set()
    for disk in disks:
        if (
            disk.device != "disk"
            or disk.type != "file"
            or disk.source is None
            or disk.format not in (None, "qcow2")
            or disk.source in seen
            or not os.path.isfile(disk.source)
        ):
            continue
        seen.add(disk.source)
        names = _qemuimg.persistent_bitmaps(disk.source)
        if names:
            problems.append(
                f"disk {disk.target} ({disk.source}) holds persistent dirty bitmaps "
                f"{', '.join(names)} (left by a checkpoint or deleted metadata-only)"
            )
    return problems


def _refuse_bitmaps(dom: Domain, problems: builtins.list[str], action: str, operation: str) -> None:
    if not problems:
        return
    raise UnsupportedError(
        f"refusing to {action} of domain {dom.name!r}: " + "; ".join(problems) + ". "
        "QEMU cannot load an internal snapshot on a disk with dirty bitmaps: it "
        "exits with 'Device has active dirty bitmaps' and the running domain dies (seen with "
        "QEMU 7.2). Nothing was changed. To proceed, take an external snapshot instead "
        "(create(disk_only=True) or create(external=True)), or remove the bitmaps first: "
        "delete the checkpoints with their bitmaps, and remove a bitmap no checkpoint uses "
        "with 'qemu-img bitmap --remove IMAGE NAME' once the domain is shut off (QEMU writes "
        "a persistent bitmap into the image when it closes it).",
        operation=operation,
        domain_name=dom.name,
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or _BAD_NAME.search(name):
        raise UsageError(
            f"snapshot name must be a non-empty string without '/' or control characters, "
            f"got {name!r}"
        )
    size = len(name.encode("utf-8"))
    if size > METADATA_NAME_MAX:
        raise UsageError(
            f"snapshot name is {size} bytes long; libvirt keeps at most {METADATA_NAME_MAX} "
            "(its metadata file is named after it and file names have at most 255 bytes): "
            f"{name[:40]}…"
        )


def _check_file_name(path: str, what: str) -> None:
    """Refuse a file whose name (not path) exceeds the file system's 255 bytes."""
    base = os.path.basename(path)
    if len(os.fsencode(base)) > _FILE_NAME_MAX:
        raise UsageError(
            f"cannot create {what} {path}: its name is {len(os.fsencode(base))} bytes long and "
            f"file names have at most {_FILE_NAME_MAX}. Choose a shorter snapshot name, or "
            "name the file (external={'vda': '/path/short.qcow2'}, memory='/path/file')."
        )


def _abs_path(value: PathLike, what: str) -> str:
    path = os.fspath(value)
    if not isinstance(path, str) or not path.startswith("/"):
        raise UsageError(f"{what} must be an absolute path, got {value!r}")
    return os.path.normpath(path)


def _check_target(path: str, what: str, *, check_dir: bool) -> None:
    """Refuse a target file that exists or whose directory cannot take a new file."""
    if _files.lexists(path):
        raise TargetExistsError(
            f"{what} {path} already exists; statecapture never overwrites a file. Pick another "
            "snapshot name or path (external={'vda': '/path/new.qcow2'}), or move the file away.",
            path=path,
        )
    if not check_dir:
        return
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UsageError(
            f"cannot create {what} {path}: directory {parent} does not exist (or is not a "
            "directory). Create it, or choose another path "
            "(external={'vda': '/path/new.qcow2'}, memory='/path/file')."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot create {what} {path}: directory {parent} is not writable by this "
            "process (or is on a read-only file system). Choose a writable directory "
            "(external={'vda': '/path/new.qcow2'}, memory='/path/file')."
        )
    # libvirtd/QEMU create the file by this path and it keeps that path: no one else may
    # be able to plant or swap a name on the way (HAZARDS 20).
    _files.require_trusted(parent, staged=False, what=f"{what} {path}")


def _owner_only(paths: Iterable[str]) -> None:
    """Make the files a snapshot just created owner-only; failures are a :class:`CleanupError`."""
    try:
        _files.owner_only(paths, what="snapshot files")
    except CleanupError as exc:
        raise CleanupError(f"the snapshot was created, but {exc}") from None


@attrs.frozen
class _Plan:
    """What a create() call will ask libvirt for, decided before anything changes."""

    xml: SnapshotXML
    disk_only_flag: bool
    new_files: tuple[str, ...]
    internal: bool


@attrs.frozen
class SnapshotPlan:
    """A snapshot checked and worked out before anything changes; see
    :meth:`SnapshotCollection.plan`. ``print(plan)`` tells what it would create;
    ``dom.snapshots.create(plan=plan)`` takes it with one libvirt call — the form to use
    inside :func:`~statecapture.fs_frozen`, where only the capture call should run::

        plan = dom.snapshots.plan("before-upgrade", disk_only=True)
        with statecapture.fs_frozen(dom):
            snap = dom.snapshots.create(plan=plan)
    """

    domain: str
    """Name of the domain."""
    domain_uuid: str
    """UUID of the domain (the plan is taken only on that domain)."""
    name: str
    """The snapshot's name."""
    internal: bool
    """An internal snapshot (inside the qcow2 images) rather than external overlays."""
    xml: SnapshotXML
    """The ``<domainsnapshot>`` to pass to libvirt."""
    new_files: tuple[str, ...]
    """Files the snapshot creates (overlays, memory state file)."""
    disk_only: bool
    """Whether libvirt is asked for a disk-only snapshot."""
    quiesce: bool
    """Whether libvirt freezes the guest's filesystems itself (guest agent)."""
    atomic: bool
    """All-or-nothing over the disks."""
    live: bool
    """External memory written while the guest runs."""
    metadata: bool
    """Whether libvirt keeps the snapshot's metadata."""
    xml_text: str = attrs.field(default="", repr=False)
    """:attr:`xml` serialized once, when the plan was made (sent as it is)."""
    host_files: bool = attrs.field(default=False, repr=False)
    """Whether :attr:`new_files` are made on this host (then made owner-only)."""

    def __str__(self) -> str:
        kind = "internal" if self.internal else ("disk-only" if self.disk_only else "external")
        lines = [f"{kind} snapshot {self.name!r} of {self.domain!r}"]
        for d in self.xml.disks:
            mode = d.mode.value if d.mode is not None else "default"
            lines.append(f"  {d.name}: {mode}" + (f" -> {d.source}" if d.source else ""))
        if self.xml.memory is not None:
            mem = self.xml.memory
            lines.append(f"  memory: {mem.mode.value}" + (f" -> {mem.file}" if mem.file else ""))
        flags = [f for f in ("quiesce", "atomic", "live") if getattr(self, f)]
        if not self.metadata:
            flags.append("no metadata")
        if flags:
            lines.append(f"  flags: {', '.join(flags)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        return f"<pre>{escape(str(self))}</pre>"


# ---------------------------------------------------------------------------------- handles


@attrs.define(eq=False)
class Snapshot:
    """A live handle on one snapshot. Get one from :attr:`Domain.snapshots`.

    Properties query libvirt each time. Two handles on the same snapshot are different
    objects; compare :attr:`name` (within one domain).
    """

    domain: Domain
    """The domain the snapshot belongs to."""
    _port: SnapshotObjectPort = attrs.field(repr=False)
    name: str
    """The snapshot's name (unique within its domain)."""
    _requested: SnapshotXML | None = attrs.field(default=None, repr=False)

    @classmethod
    def _from_port(
        cls, domain: Domain, vir: SnapshotObjectPort, requested: SnapshotXML | None = None
    ) -> Snapshot:
        return cls(domain, vir, vir.name, requested)

    # ------------------------------------------------------------------ facts
    @property
    def definition(self) -> SnapshotXML:
        """The snapshot's XML as libvirt reports it.

        For a snapshot made with ``metadata=False`` libvirt keeps nothing: this is then the
        definition that was requested.
        """
        try:
            return SnapshotXML.from_xml(self._port.xml_desc())
        except NotFoundError:
            if self._requested is not None:
                return self._requested
            raise

    @property
    def kind(self) -> SnapshotKind:
        """Internal or external, with memory or disk-only."""
        return SnapshotKind.of(self.definition)

    @property
    def parent(self) -> Snapshot | None:
        """The parent snapshot, or ``None`` for a root."""
        name = self.definition.parent
        return None if name is None else self.domain.snapshots[name]

    @property
    def children(self) -> tuple[Snapshot, ...]:
        """The direct children."""
        return tuple(Snapshot._from_port(self.domain, v) for v in self._port.children())

    def descendants(self) -> tuple[Snapshot, ...]:
        """Every snapshot below this one, each parent before its children."""
        return tuple(
            Snapshot._from_port(self.domain, v) for v in self._port.children(descendants=True)
        )

    @property
    def is_current(self) -> bool:
        """Whether this is the domain's current snapshot (the parent of the next one)."""
        return self._port.is_current()

    @property
    def has_metadata(self) -> bool:
        """Whether libvirt tracks this snapshot (``False`` for ``metadata=False``)."""
        try:
            return self._port.has_metadata()
        except NotFoundError:
            return False

    # ------------------------------------------------------------------ actions
    def revert(self, *, running: bool = False, paused: bool = False, force: bool = False) -> None:
        """Bring the domain back to this snapshot.

        Disks return to their captured content; a snapshot with memory resumes the guest
        exactly where it was (a running guest's later work is lost). ``running`` or
        ``paused`` choose the state after the revert instead of the captured one. ``force``
        lets libvirt revert where it would otherwise refuse as risky (for example across
        configuration changes it cannot apply live, which restarts the hypervisor process).

        Preflight, before anything changes:

        * reverting to an external snapshot needs libvirt ≥ 9.9 on the daemon; older
          daemons raise :class:`UnsupportedError` (see ``docs/snapshots.md`` for a manual way);
        * an internal snapshot is refused with :class:`UnsupportedError` while any disk
          holds dirty bitmaps (checkpoints, bitmaps in the image, or — read from the
          running QEMU itself — bitmaps that live only in QEMU, as a metadata-only
          checkpoint delete or a failed checkpoint create leaves them): QEMU exits with
          "Device has active dirty bitmaps" and the running domain dies. The error names
          the disk and the bitmap. Reading QEMU's view makes libvirt mark the domain
          tainted (``custom-monitor``; see ``docs/hazards.md``, hazard 19).

        QEMU figures seen here: reverting an internal snapshot of a small TCG guest takes
        about 3.5 s, during which the guest is stopped.
        """
        if running and paused:
            raise UsageError("revert() takes running=True or paused=True, not both")
        definition = self.definition
        dom = self.domain
        if definition.is_external:
            daemon = dom.connection.versions.daemon
            if daemon < EXTERNAL_REVERT_SINCE:
                raise UnsupportedError(
                    f"refusing to revert domain {dom.name!r} to external snapshot "
                    f"{self.name!r}: libvirt {daemon} on the daemon cannot revert to external "
                    "snapshots (libvirt 9.9 and later can). Nothing was changed. To go back "
                    "by hand: shut the domain off, create a new qcow2 overlay on each "
                    "snapshot image (qemu-img create -f qcow2 -b IMAGE -F qcow2 NEW) and "
                    "point the disk at it, or upgrade libvirt.",
                    operation="snapshot revert",
                    domain_name=dom.name,
                )
            self._port.revert(running=running, paused=paused, force=force)
            return
        # Held from the bitmap check through the revert: no checkpoint made by statecapture
        # can slip in between (hazard 21).
        with _locks.domain_lock(dom.uuid, "snapshot revert"):
            disks: builtins.list[Disk] = builtins.list(dom.definition.disks)
            if definition.domain is not None:
                disks.extend(definition.domain.disks)
            _refuse_bitmaps(
                dom,
                _dirty_bitmap_problems(dom, disks),
                f"revert to internal snapshot {self.name!r}",
                "snapshot revert",
            )
            self._port.revert(running=running, paused=paused, force=force)

    def delete(
        self,
        *,
        children: bool = False,
        children_only: bool = False,
        metadata_only: bool = False,
    ) -> None:
        """Delete this snapshot (with ``children``: and every descendant; with
        ``children_only``: only the descendants).

        Deleting an internal snapshot frees its space in the qcow2 images. Deleting an
        external one merges its overlay into the image below and removes the overlay file
        (libvirt ≥ 9.0 on the daemon; older daemons raise :class:`UnsupportedError`). libvirt
        keeps the memory state file of an external snapshot: read
        ``definition.memory.file`` before deleting if you want to remove it too.
        ``metadata_only`` only makes libvirt forget the snapshot; every file and internal
        snapshot stays as it is.

        libvirt 9.0 refuses (:class:`UnsupportedError`, nothing changed) to delete external
        snapshots together with their children (delete them one at a time, leaves first) and
        to delete an external snapshot whose parent is internal.
        """
        if children and children_only:
            raise UsageError("delete() takes children=True or children_only=True, not both")
        dom = self.domain
        if not metadata_only:
            involved = [] if children_only else [self]
            if children or children_only:
                involved.extend(self.descendants())
            if any(s.definition.is_external for s in involved):
                daemon = dom.connection.versions.daemon
                if daemon < EXTERNAL_DELETE_SINCE:
                    raise UnsupportedError(
                        f"refusing to delete external snapshot data of domain {dom.name!r}: "
                        f"libvirt {daemon} on the daemon cannot merge external snapshots "
                        "(libvirt 9.0 and later can). Nothing was changed. Use "
                        "delete(metadata_only=True) and merge the overlays with block commit, "
                        "or upgrade libvirt.",
                        operation="snapshot delete",
                        domain_name=dom.name,
                    )
        try:
            self._port.delete(
                children=children, children_only=children_only, metadata_only=metadata_only
            )
        except UnsupportedError as exc:
            if children or children_only:
                exc.add_note(
                    "libvirt may refuse to delete external snapshots together with their "
                    "children: delete them one at a time, leaves first."
                )
            raise

    def _repr_html_(self) -> str:
        from ._html import table

        d = self.definition
        rows = [
            [x.name, x.effective_mode.value if x.effective_mode else "", x.source or ""]
            for x in d.disks
        ]
        return (
            f"<div><b>{escape(self.name)}</b> — {self.kind.value}, state "
            f"{escape(d.state or '?')}, parent {escape(d.parent or '(root)')}"
            + table(["disk", "mode", "overlay"], rows)
            + "</div>"
        )


@attrs.define(eq=False)
class SnapshotCollection:
    """The snapshots of one domain: ``dom.snapshots``.

    ``dom.snapshots["name"]`` looks one up (:class:`NotFoundError` when there is none; its
    message lists the snapshots that exist, or the closest names),
    ``"name" in dom.snapshots`` tests for one, ``len()`` counts them, iterating yields every
    snapshot with parents before children. :meth:`create` takes a new one after a preflight.
    """

    domain: Domain
    """The domain whose snapshots these are."""

    # ------------------------------------------------------------------ queries
    def list(
        self,
        *,
        leaves: bool | None = None,
        external: bool | None = None,
        disk_only: bool | None = None,
    ) -> tuple[Snapshot, ...]:
        """Every snapshot, parents before children, optionally filtered.

        ``leaves`` True/False keeps only snapshots without/with children; ``external``
        True/False keeps only external/internal ones; ``disk_only`` True/False keeps only
        disk-only snapshots of running domains / the others.
        """
        vir = self.domain.port.snapshot_list(
            leaves=leaves, external=external, disk_only=disk_only, topological=True
        )
        return tuple(Snapshot._from_port(self.domain, v) for v in vir)

    def roots(self) -> tuple[Snapshot, ...]:
        """The snapshots without a parent."""
        vir = self.domain.port.snapshot_list(roots=True)
        return tuple(Snapshot._from_port(self.domain, v) for v in vir)

    @property
    def current(self) -> Snapshot | None:
        """The current snapshot (parent of the next one), or ``None``."""
        vir = self.domain.port.snapshot_current()
        return None if vir is None else Snapshot._from_port(self.domain, vir)

    def __getitem__(self, name: str) -> Snapshot:
        if not isinstance(name, str):
            raise UsageError(f"snapshots are looked up by name, got {name!r}")
        vir = self.domain.port
        try:
            found = vir.snapshot_lookup(name)
        except NotFoundError as exc:
            add_names_hint(exc, name, lambda: (s.name for s in vir.snapshot_list()), "snapshot")
            raise
        return Snapshot._from_port(self.domain, found)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.domain.port.snapshot_lookup(name)
        except NotFoundError:
            return False
        return True

    def __len__(self) -> int:
        return self.domain.port.snapshot_count()

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.list())

    # ------------------------------------------------------------------ changes
    def redefine(self, xml: str | SnapshotXML, *, current: bool = False) -> Snapshot:
        """Register a snapshot from its XML (e.g. one saved with ``definition.to_xml()``
        before a ``metadata_only`` delete, or carried over to another host).

        Nothing on disk changes: the images must already hold what the XML describes.
        ``current`` makes it the domain's current snapshot.
        """
        text = xml.to_xml() if isinstance(xml, SnapshotXML) else xml
        if not isinstance(text, str):
            raise UsageError(
                f"redefine() takes XML text or a SnapshotXML, got {type(xml).__name__}"
            )
        parsed = SnapshotXML.from_xml(text)
        if not parsed.name:
            raise UsageError("a redefined snapshot needs a <name>")
        vir = self.domain.port.snapshot_create(text, redefine=True, current=current)
        return Snapshot._from_port(self.domain, vir)

    def create(
        self,
        name: str | None = None,
        *,
        disk_only: bool = False,
        memory: SnapshotMemoryMode | PathLike | None = None,
        external: bool | Mapping[str, PathLike | None] = False,
        quiesce: bool = False,
        atomic: bool = True,
        live: bool = False,
        description: str | None = None,
        metadata: bool = True,
        plan: SnapshotPlan | None = None,
    ) -> Snapshot:
        """Take a snapshot; returns its handle.

        What is captured:

        * default: an **internal** snapshot, with memory when the domain runs. With QEMU the
          guest is paused while memory and disks are saved into the qcow2 images: a lengthy
          downtime that grows with memory size (about 0.6 s for a 256 MiB TCG guest here).
        * ``disk_only=True``: an **external disk-only** snapshot. Quick: each disk's image is
          frozen and a new qcow2 overlay takes the writes (about 0.3 s here). Reverting to
          it later is like booting after a power cut, unless ``quiesce=True`` asked the guest
          agent to flush and freeze the file systems around the snapshot.
        * ``external=True``: an **external snapshot with memory** (disk-only on a shut-off
          domain). Memory is written the way a migration sends it, so the guest sees a
          migration-like downtime; ``live=True`` keeps the guest running while most memory is
          written and pauses it only at the end.

        ``external`` may instead map disk targets to overlay paths
        (``{"vda": "/images/vda.snap1", "vdb": None}``; ``None`` leaves that disk out).
        Unnamed overlays go next to each disk's current image as ``<image>.<name>``.
        ``memory`` chooses the memory part: a :class:`SnapshotMemoryMode`, or the path of
        the memory state file for an external snapshot (default
        ``<first image's directory>/<domain>.<name>.memory``).

        ``name`` defaults to the creation time in seconds (libvirt's convention).
        ``atomic`` makes a multi-disk snapshot all-or-nothing. ``metadata=False`` asks
        libvirt to forget the snapshot at once (the files stay; the handle then only knows
        the requested definition).

        Preflight, before anything changes (nothing is created when one fails):

        * :class:`UnsupportedError` for an internal snapshot while a disk holds persistent
          dirty bitmaps (see :meth:`Snapshot.revert`);
        * :class:`GuestAgentError` for ``quiesce=True`` without a connected guest agent;
        * :class:`TargetExistsError` when an overlay or memory file exists already, and
          :class:`UsageError` when its directory is missing or not writable;
        * :class:`UsageError` for contradicting arguments or a name already in use,
          :class:`InvalidStateError` when memory is asked of a shut-off domain.

        Files the snapshot creates on this host are made owner-only (0600).

        ``plan=`` takes a :class:`SnapshotPlan` made by :meth:`plan` (pass no other
        argument then): the preflight ran when the plan was made, so this is one libvirt
        call — what should run inside a freeze.
        """
        if plan is None:
            plan = self._prepare(
                name,
                disk_only=disk_only,
                memory=memory,
                external=external,
                quiesce=quiesce,
                atomic=atomic,
                live=live,
                description=description,
                metadata=metadata,
                check_internal=False,  # below, under the domain's lock
            )
        elif not isinstance(plan, SnapshotPlan):
            raise UsageError(f"plan= takes a SnapshotPlan (dom.snapshots.plan(...)), not {plan!r}")
        elif (name, disk_only, memory, external, quiesce, atomic, live, description, metadata) != (
            None,
            False,
            None,
            False,
            False,
            True,
            False,
            None,
            True,
        ):
            raise UsageError("pass either plan= or the snapshot's arguments, not both")
        dom = self.domain
        if plan.domain_uuid != dom.uuid:
            raise UsageError(f"this plan is for domain {plan.domain!r}, not {dom.name!r}")
        with contextlib.ExitStack() as guard:
            if plan.internal:
                # Held from the bitmap check through the savevm: no checkpoint made by
                # statecapture can slip in between (hazard 21).
                guard.enter_context(_locks.domain_lock(dom.uuid, "snapshot create"))
                self._refuse_internal()
            vir = dom.port.snapshot_create(
                plan.xml_text or plan.xml.to_xml(),
                disk_only=plan.disk_only,
                quiesce=plan.quiesce,
                atomic=plan.atomic,
                live=plan.live,
                no_metadata=not plan.metadata,
                # No VALIDATE: libvirt 9.0 reloads its RelaxNG schema for every validated call
                # (35-60 ms, spent inside a freeze for quiesced snapshots). The XML is ours,
                # built by SnapshotXML, and the test suite checks it against that schema.
                validate=False,
            )
        snapshot = Snapshot._from_port(dom, vir, None if plan.metadata else plan.xml)
        if plan.host_files:
            _owner_only(plan.new_files)
        return snapshot

    def plan(
        self,
        name: str | None = None,
        *,
        disk_only: bool = False,
        memory: SnapshotMemoryMode | PathLike | None = None,
        external: bool | Mapping[str, PathLike | None] = False,
        quiesce: bool = False,
        atomic: bool = True,
        live: bool = False,
        description: str | None = None,
        metadata: bool = True,
    ) -> SnapshotPlan:
        """Check a snapshot as :meth:`create` would and work it out; nothing changes.

        Takes :meth:`create`'s arguments and raises its preflight errors. Returns a
        :class:`SnapshotPlan`; ``create(plan=plan)`` takes the snapshot with one libvirt call.
        """
        return self._prepare(
            name,
            disk_only=disk_only,
            memory=memory,
            external=external,
            quiesce=quiesce,
            atomic=atomic,
            live=live,
            description=description,
            metadata=metadata,
            check_internal=True,
        )

    def _prepare(
        self,
        name: str | None = None,
        *,
        disk_only: bool = False,
        memory: SnapshotMemoryMode | PathLike | None = None,
        external: bool | Mapping[str, PathLike | None] = False,
        quiesce: bool = False,
        atomic: bool = True,
        live: bool = False,
        description: str | None = None,
        metadata: bool = True,
        check_internal: bool,
    ) -> SnapshotPlan:
        dom = self.domain
        if description is not None and not isinstance(description, str):
            raise UsageError(f"description must be a string, got {description!r}")
        if name is None:
            name = self._generated_name()
        else:
            _check_name(name)
        plan = self._plan(
            name, disk_only=disk_only, memory=memory, external=external, description=description
        )
        # ---- preflight: nothing here changes anything.
        if name in self:
            raise UsageError(
                f"domain {dom.name!r} already has a snapshot named {name!r}; pick another "
                "name or delete that snapshot first"
            )
        if plan.internal and check_internal:
            self._refuse_internal()
        if quiesce and agent_state(dom) is not AgentState.CONNECTED:
            raise GuestAgentError(
                f"refusing to create a quiesced snapshot of domain {dom.name!r}: its guest "
                "agent is not connected (no running domain, no org.qemu.guest_agent.0 "
                "channel, or qemu-ga not answering yet). Nothing was changed. Start qemu-ga "
                "in the guest (right after boot, wait for it to connect), or snapshot "
                "without quiesce=True for crash-consistent disks.",
                operation="snapshot create",
                domain_name=dom.name,
            )
        for path in plan.new_files:
            _check_file_name(path, "snapshot file")
        if is_local_uri(dom.connection.uri):
            check_dir = writes_host_files(dom.connection)
            for path in plan.new_files:
                _check_target(path, "snapshot file", check_dir=check_dir)
        return SnapshotPlan(
            domain=dom.name,
            domain_uuid=dom.uuid,
            name=name,
            internal=plan.internal,
            xml=plan.xml,
            new_files=plan.new_files,
            disk_only=plan.disk_only_flag,
            quiesce=quiesce,
            atomic=atomic,
            live=live,
            metadata=metadata,
            xml_text=plan.xml.to_xml(),
            host_files=writes_host_files(dom.connection),
        )

    def _refuse_internal(self) -> None:
        dom = self.domain
        _refuse_bitmaps(
            dom,
            _dirty_bitmap_problems(dom, dom.definition.disks),
            "create an internal snapshot",
            "snapshot create",
        )

    # ------------------------------------------------------------------ planning
    def _generated_name(self) -> str:
        base = str(int(time.time()))
        name, n = base, 0
        while name in self:
            n += 1
            name = f"{base}-{n}"
        return name

    def _plan(
        self,
        name: str,
        *,
        disk_only: bool,
        memory: SnapshotMemoryMode | PathLike | None,
        external: bool | Mapping[str, PathLike | None],
        description: str | None,
    ) -> _Plan:
        dom = self.domain
        mem_mode: SnapshotMemoryMode | None
        mem_file: str | None = None
        if memory is None or isinstance(memory, SnapshotMemoryMode):
            mem_mode = memory
        elif isinstance(memory, str) and memory in {m.value for m in SnapshotMemoryMode}:
            mem_mode = SnapshotMemoryMode(memory)
        elif isinstance(memory, str | os.PathLike):
            mem_mode = SnapshotMemoryMode.EXTERNAL
            mem_file = _abs_path(memory, "the memory state file")
        else:
            raise UsageError(f"memory must be a SnapshotMemoryMode or a path, got {memory!r}")
        if not isinstance(external, bool | Mapping):
            raise UsageError(f"external must be True/False or a mapping, got {external!r}")
        mapping: Mapping[str, PathLike | None] = external if isinstance(external, Mapping) else {}
        is_external = bool(external) or disk_only or mem_mode is SnapshotMemoryMode.EXTERNAL
        if disk_only and mem_mode not in (None, SnapshotMemoryMode.NO):
            raise UsageError("disk_only=True snapshots hold no memory; drop memory=…")
        if is_external and mem_mode is SnapshotMemoryMode.INTERNAL:
            raise UsageError(
                "internal memory cannot go with external disk overlays; use "
                "memory=SnapshotMemoryMode.EXTERNAL (or a path) or an internal snapshot"
            )
        active = dom.is_active
        if not active and mem_mode in (SnapshotMemoryMode.INTERNAL, SnapshotMemoryMode.EXTERNAL):
            raise InvalidStateError(
                f"domain {dom.name!r} is {dom.state.value}: memory can only be captured from "
                "a running or paused domain",
                operation="snapshot create",
                domain_name=dom.name,
            )
        definition = dom.definition
        if not is_external:
            if not active:
                final_mem = SnapshotMemoryMode.NO
            else:
                final_mem = mem_mode or SnapshotMemoryMode.INTERNAL
            xml = SnapshotXML(name=name, description=description, memory=SnapshotMemory(final_mem))
            return _Plan(xml, False, (), True)
        disks = self._external_disks(name, definition, mapping)
        with_memory = active and not disk_only and mem_mode is not SnapshotMemoryMode.NO
        new_files = [d.source for d in disks if d.source is not None and d.type == "file"]
        if with_memory:
            if mem_file is None:
                mem_file = self._memory_path(name, definition, disks)
            mem = SnapshotMemory(SnapshotMemoryMode.EXTERNAL, mem_file)
            new_files.append(mem_file)
        else:
            mem = SnapshotMemory(SnapshotMemoryMode.NO)
        if len(set(new_files)) != len(new_files):
            raise UsageError(f"two snapshot files would share a path: {sorted(new_files)}")
        xml = SnapshotXML(name=name, description=description, memory=mem, disks=disks)
        return _Plan(xml, not with_memory, tuple(new_files), False)

    def _external_disks(
        self, name: str, definition: DomainXML, mapping: Mapping[str, PathLike | None]
    ) -> tuple[SnapshotDisk, ...]:
        known = {d.target for d in definition.disks}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise UsageError(
                f"domain {self.domain.name!r} has no disk {', '.join(unknown)} "
                f"(disks: {', '.join(sorted(known)) or 'none'})"
            )
        out: builtins.list[SnapshotDisk] = []
        for disk in definition.disks:
            excluded = disk.device != "disk" or disk.readonly or disk.snapshot == "no"
            if disk.target in mapping:
                target = mapping[disk.target]
                if target is None:
                    out.append(SnapshotDisk(disk.target, SnapshotDiskMode.NO))
                    continue
                if excluded and disk.device != "disk":
                    raise UsageError(f"disk {disk.target} is a {disk.device}; it has no snapshot")
                path = _abs_path(target, f"the overlay for disk {disk.target}")
            elif excluded:
                out.append(SnapshotDisk(disk.target, SnapshotDiskMode.NO))
                continue
            else:
                if disk.type != "file" or not disk.source:
                    raise UsageError(
                        f"disk {disk.target} is not a local file ({disk.type}); name its "
                        f"overlay: external={{'{disk.target}': '/path/overlay.qcow2'}}, or "
                        f"leave it out with {{'{disk.target}': None}}"
                    )
                path = f"{disk.source}.{name}"
            out.append(SnapshotDisk(disk.target, SnapshotDiskMode.EXTERNAL, path, "qcow2"))
        if not any(d.mode is SnapshotDiskMode.EXTERNAL for d in out):
            raise UsageError(f"domain {self.domain.name!r} has no disk to snapshot externally")
        return tuple(out)

    def _memory_path(self, name: str, definition: DomainXML, disks: Iterable[SnapshotDisk]) -> str:
        for d in disks:
            if d.mode is SnapshotDiskMode.EXTERNAL and d.source and d.type == "file":
                return os.path.join(os.path.dirname(d.source), f"{self.domain.name}.{name}.memory")
        raise UsageError(
            "no local disk image to put the memory state file next to; pass memory='/path/file'"
        )
