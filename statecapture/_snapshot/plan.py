"""What the snapshot handles share: :class:`SnapshotKind`, the plan values (:class:`SnapshotPlan`)
and the preflight checks (names, target files, persistent dirty bitmaps).
"""

from __future__ import annotations

import builtins
import enum
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import attrs

from .. import _bitmaps, _files, _qemuimg
from .._host import writes_host_files
from ..errors import (
    CleanupError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from ..xml import Disk
from ..xml._checkpoint import METADATA_NAME_MAX
from ..xml._snapshot import (
    SnapshotXML,
)

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import SnapshotPort

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
    checkpoints = _port(dom).checkpoint_names()
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


def _port(dom: Domain) -> SnapshotPort:
    """The domain's port as this module uses it: ``SnapshotPort`` (mypy checks it)."""
    return dom.port
