"""Pure, libvirt-free models of the XML documents statecapture handles.

Every model is a frozen value with ``from_xml()`` and ``to_xml()``; XML that statecapture
does not model survives a round trip. Parsing is hardened: no network access, no DTDs, no
entity expansion. Malformed input raises :class:`statecapture.XMLError` with the line.
"""

from ._backup import BackupDiskXML, BackupMode, BackupXML, DiskBackupMode, NBDServer  # backup
from ._base import MAX_DOCUMENT_BYTES, parse, serialize
from ._checkpoint import CheckpointDisk, CheckpointXML  # checkpoints
from ._domain import BackingSource, Disk, DomainXML
from ._snapshot import (  # snapshots
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "parse",
    "serialize",
    "DomainXML",
    "Disk",
    "BackingSource",
    # snapshots
    "SnapshotXML",
    "SnapshotMemory",
    "SnapshotMemoryMode",
    "SnapshotDisk",
    "SnapshotDiskMode",
    # checkpoints
    "CheckpointXML",
    "CheckpointDisk",
    # backup
    "BackupXML",
    "BackupDiskXML",
    "BackupMode",
    "DiskBackupMode",
    "NBDServer",
]
