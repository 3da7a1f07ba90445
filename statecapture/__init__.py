"""statecapture: safe, composable and explainable capture of libvirt domain state.

The whole public API lives in this one namespace (plus :mod:`statecapture.xml` for the pure
XML models and :mod:`statecapture.errors` for the error hierarchy, both re-exported here).
"""

from ._connection import DEFAULT_URI, Connection, connect, resolve_uri
from ._domain import Domain
from ._enums import DomainState, ShutdownMode
from ._events import Event, EventKind, Subscription
from ._version import Version, Versions
from .errors import (
    CheckpointInconsistentError,
    CleanupError,
    ConnectionLostError,
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    StateCaptureError,
    TargetExistsError,
    ToolError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from .xml import BackingSource, Disk, DomainXML

# -- memory state (managed save, save/restore) imports
# isort: split
from ._memory import (
    ManagedSaveResult,
    RestoreResult,
    SaveImage,
    SaveResult,
)
from .errors import SaveImageError

# -- snapshot imports
# isort: split
from ._snapshot import Snapshot, SnapshotCollection, SnapshotKind, SnapshotPlan
from .xml import SnapshotDisk, SnapshotDiskMode, SnapshotMemory, SnapshotMemoryMode, SnapshotXML

# -- freeze imports
# isort: split
from ._freeze import Filesystem, FreezeScope, FreezeStatus, fs_frozen
from .errors import FreezeExpiredError, ThawError

# -- block job imports
# isort: split
from ._blockjob import (
    BlockJob,
    BlockJobKind,
    BlockJobProgress,
    BlockJobStatus,
    ConsistentCopy,
    consistent_copy,
)

# -- checkpoint and backup imports
# isort: split
from ._checkpoint import Checkpoint, CheckpointCollection  # checkpoints
from .xml import CheckpointDisk, CheckpointXML  # checkpoints

# isort: split
from ._backup import (  # backup
    BackupExport,
    BackupJob,
    BackupProgress,
    BackupResult,
    BackupStart,
    DiskBackup,
)
from ._backup_plan import BackupPlan, BackupPlanDisk  # backup
from ._restore import VerifyResult, restore_disk, verify  # backup
from .xml import BackupDiskXML, BackupMode, BackupXML, DiskBackupMode, NBDServer  # backup

# -- sequence and recovery imports
# isort: split
from ._recover import RecoveryReport, recover  # sequences
from ._sequences import (  # sequences
    SequenceResult,
    StepTiming,
    backup_via_temporary_snapshot,
    direct_backup,
)

# -- repository imports
# isort: split
from ._repository import (  # repository
    CheckReport,
    Difference,
    DiskEntry,
    PointKind,
    PruneReport,
    Repository,
    RestorePoint,
    VerifyReport,
)
from .errors import (  # repository
    ChainError,
    RepositoryError,
    RepositoryFormatError,
    RepositoryLockedError,
)

# -- instant imports
# isort: split
from ._repository.crypto import RepositoryKey  # instant
from ._repository.custody import BootedDomain  # instant
from ._repository.instant import DetachProgress  # instant
from .errors import RepositoryKeyError  # instant

# -- advisor imports
# isort: split
from ._advisor import (  # advisor
    Advice,
    Blocker,
    BlockerKind,
    Consistency,
    DomainFacts,
    Facet,
    Fit,
    Method,
    MethodAdvice,
    Needs,
    Storage,
    Verdict,
    advise,
)
from ._capabilities import Capabilities, Capability  # advisor

# -- testing imports
# isort: split
from .errors import GuestBootError, TestEnvironmentError  # testing

__version__ = "0.1.0.dev0"

__all__ = [
    # connections and domains
    "connect",
    "resolve_uri",
    "DEFAULT_URI",
    "Connection",
    "Domain",
    "DomainState",
    "ShutdownMode",
    "Version",
    "Versions",
    # events
    "Event",
    "EventKind",
    "Subscription",
    # XML values
    "DomainXML",
    "Disk",
    "BackingSource",
    # errors
    "StateCaptureError",
    "LibvirtError",
    "NotFoundError",
    "UnsupportedError",
    "InvalidStateError",
    "GuestAgentError",
    "OperationTimeoutError",
    "CheckpointInconsistentError",
    "ConnectionLostError",
    "XMLError",
    "CleanupError",
    "UsageError",
    "TargetExistsError",
    "ToolError",
    # -- memory state names
    "SaveImage",
    "SaveResult",
    "ManagedSaveResult",
    "RestoreResult",
    "SaveImageError",
    # -- snapshot names
    "Snapshot",
    "SnapshotCollection",
    "SnapshotKind",
    "SnapshotXML",
    "SnapshotMemory",
    "SnapshotMemoryMode",
    "SnapshotPlan",
    "SnapshotDisk",
    "SnapshotDiskMode",
    # -- freeze names
    "fs_frozen",
    "FreezeScope",
    "FreezeStatus",
    "Filesystem",
    "ThawError",
    "FreezeExpiredError",
    # -- block job names
    "BlockJob",
    "BlockJobKind",
    "BlockJobProgress",
    "BlockJobStatus",
    "ConsistentCopy",
    "consistent_copy",
    # -- checkpoint and backup names
    # checkpoints
    "Checkpoint",
    "CheckpointCollection",
    "CheckpointXML",
    "CheckpointDisk",
    # backup
    "BackupJob",
    "BackupStart",
    "BackupPlan",
    "BackupPlanDisk",
    "BackupResult",
    "DiskBackup",
    "BackupProgress",
    "BackupExport",
    "BackupXML",
    "BackupDiskXML",
    "BackupMode",
    "DiskBackupMode",
    "NBDServer",
    "restore_disk",
    "verify",
    "VerifyResult",
    # -- sequence and recovery names
    "backup_via_temporary_snapshot",
    "direct_backup",
    "SequenceResult",
    "StepTiming",
    "recover",
    "RecoveryReport",
    # -- repository names
    "Repository",
    "RestorePoint",
    "PointKind",
    "DiskEntry",
    "VerifyReport",
    "Difference",
    "PruneReport",
    "CheckReport",
    "RepositoryError",
    "RepositoryFormatError",
    "RepositoryLockedError",
    "ChainError",
    # -- instant names
    "DetachProgress",
    "BootedDomain",
    "RepositoryKey",
    "RepositoryKeyError",
    # -- advisor names
    "advise",
    "Needs",
    "Consistency",
    "Storage",
    "Advice",
    "MethodAdvice",
    "Verdict",
    "Fit",
    "Facet",
    "Method",
    "Blocker",
    "BlockerKind",
    "DomainFacts",
    "Capabilities",
    "Capability",
    # -- testing names
    "TestEnvironmentError",
    "GuestBootError",
]
