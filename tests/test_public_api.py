"""The public namespace is a contract: these tests pin it."""

from __future__ import annotations

import statecapture

EXPECTED = {
    # foundation
    "connect",
    "resolve_uri",
    "DEFAULT_URI",
    "Connection",
    "Domain",
    "DomainState",
    "ShutdownMode",
    "Version",
    "Versions",
    "Event",
    "EventKind",
    "Subscription",
    "DomainXML",
    "Disk",
    "BackingSource",
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
    # testing
    "TestEnvironmentError",
    "GuestBootError",
}


def test_all_is_pinned() -> None:
    """`statecapture.__all__` lists exactly the agreed public names, once each."""
    assert len(statecapture.__all__) == len(set(statecapture.__all__))
    assert set(statecapture.__all__) == EXPECTED


def test_every_public_name_exists_and_is_documented() -> None:
    """Each public name resolves and (for classes and functions) has a docstring."""
    for name in statecapture.__all__:
        obj = getattr(statecapture, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_public_classes_claim_the_package() -> None:
    """Errors show `statecapture` as their module, so tracebacks and pickles name the API."""
    for name in statecapture.__all__:
        obj = getattr(statecapture, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert obj.__module__ == "statecapture", name


def test_py_typed_shipped() -> None:
    """The package ships its py.typed marker."""
    from importlib.resources import files

    assert files("statecapture").joinpath("py.typed").is_file()
