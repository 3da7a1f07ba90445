"""Backup repositories: :class:`Repository` and its values (see ``docs/repository.md``).

Modules: ``manifest`` (versioned JSON values), ``store`` (atomic writes, locks), ``digests``
(per-block content digests read straight from the stored qcow2 files), ``chain`` (chain
validation), ``retention`` (which points a policy keeps), ``reports`` (verify/prune/check
results), ``repository`` (the handle).
"""

from __future__ import annotations

from .custody import BootedDomain
from .instant import DetachProgress
from .manifest import DiskEntry, PointKind, RestorePoint
from .reports import CheckReport, Difference, PruneReport, VerifyReport
from .repository import Repository

__all__ = [
    "BootedDomain",
    "CheckReport",
    "Difference",
    "DetachProgress",
    "DiskEntry",
    "PointKind",
    "PruneReport",
    "Repository",
    "RestorePoint",
    "VerifyReport",
]
