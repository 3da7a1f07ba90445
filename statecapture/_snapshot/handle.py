"""The :class:`Snapshot` handle: its facts (definition, kind, tree) and actions (revert,
delete).
"""

from __future__ import annotations

import builtins
from html import escape
from typing import TYPE_CHECKING

import attrs

from .. import _locks
from .._ports import SnapshotObjectPort
from ..errors import (
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from ..xml import Disk
from ..xml._snapshot import (
    SnapshotXML,
)
from .plan import (
    EXTERNAL_DELETE_SINCE,
    EXTERNAL_REVERT_SINCE,
    SnapshotKind,
    _dirty_bitmap_problems,
    _refuse_bitmaps,
)

if TYPE_CHECKING:
    from .._domain import Domain

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
        from .._html import table

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
