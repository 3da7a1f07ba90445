"""Snapshot and checkpoint objects: ``virDomainSnapshot``, ``virDomainCheckpoint``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import libvirt

from .._ports import CheckpointObjectPort, SnapshotObjectPort
from .translate import _flags, listing

if TYPE_CHECKING:
    from .domain import VirDomain

__all__ = ["VirCheckpoint", "VirSnapshot"]


class _VirObject:
    """A libvirt object of a domain (snapshot or checkpoint): its name, read once."""

    def __init__(self, raw: Any, domain: VirDomain) -> None:
        self._raw = raw
        self.domain = domain
        self._name: str = str(raw.getName())

    @property
    def name(self) -> str:
        return self._name


class VirSnapshot(_VirObject):
    """Typed wrapper around ``virDomainSnapshot`` (a
    :class:`~statecapture._ports.SnapshotObjectPort`); raises statecapture errors only."""

    def xml_desc(self, *, secure: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE if secure else 0
        return str(self.domain._call("get snapshot XML", self._raw.getXMLDesc, flags))

    def children(self, *, descendants: bool = False) -> list[SnapshotObjectPort]:
        """Direct children, or (``descendants``) the whole subtree below, parents first."""
        flags = 0
        if descendants:
            flags |= (
                libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS
                | libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
            )
        raws = self.domain._call("list snapshot children", self._raw.listAllChildren, flags)
        return [VirSnapshot(r, self.domain) for r in raws]

    def is_current(self) -> bool:
        return bool(self.domain._call("snapshot is current", self._raw.isCurrent, 0))

    def has_metadata(self) -> bool:
        return bool(self.domain._call("snapshot has metadata", self._raw.hasMetadata, 0))

    def revert(self, *, running: bool = False, paused: bool = False, force: bool = False) -> None:
        """``virDomainRevertToSnapshot``."""
        flags = _flags(
            (running, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING),
            (paused, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED),
            (force, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE),
        )
        self.domain._call("snapshot revert", self.domain._raw.revertToSnapshot, self._raw, flags)

    def delete(
        self, *, children: bool = False, children_only: bool = False, metadata_only: bool = False
    ) -> None:
        """``virDomainSnapshotDelete``."""
        flags = _flags(
            (children, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN),
            (children_only, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY),
            (metadata_only, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY),
        )
        self.domain._call("snapshot delete", self._raw.delete, flags)


class VirCheckpoint(_VirObject):
    """Typed wrapper around ``virDomainCheckpoint`` (a
    :class:`~statecapture._ports.CheckpointObjectPort`); raises statecapture errors only."""

    def xml_desc(self, *, size: bool = False, no_domain: bool = False) -> str:
        """The checkpoint's XML; ``size`` adds dirty byte counts (running domains only)."""
        flags = _flags(
            (size, libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE),
            (no_domain, libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN),
        )
        return str(self.domain._call("get checkpoint XML", self._raw.getXMLDesc, flags))

    def children(self) -> list[CheckpointObjectPort]:
        """Direct children."""
        self.domain.conn.check_open()
        raws = listing(
            "list checkpoint children",
            self._raw.listAllChildren,
            0,
            domain_name=self.domain.name,
            alive=self.domain.conn.is_alive,
        )
        return [VirCheckpoint(r, self.domain) for r in raws]

    def delete(self, *, children: bool = False, metadata_only: bool = False) -> None:
        """``virDomainCheckpointDelete`` (bitmaps too, unless ``metadata_only``)."""
        flags = _flags(
            (children, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN),
            (metadata_only, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY),
        )
        self.domain._call("checkpoint delete", self._raw.delete, flags)
