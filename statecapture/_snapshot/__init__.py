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

Modules: ``plan.py`` (:class:`SnapshotKind`, :class:`SnapshotPlan`, the preflight checks),
``handle.py`` (:class:`Snapshot`), ``collection.py`` (:class:`SnapshotCollection`).
"""

from __future__ import annotations

from ..xml._snapshot import SnapshotDiskMode, SnapshotMemoryMode
from .collection import SnapshotCollection
from .handle import Snapshot
from .plan import EXTERNAL_DELETE_SINCE, EXTERNAL_REVERT_SINCE, SnapshotKind, SnapshotPlan

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
