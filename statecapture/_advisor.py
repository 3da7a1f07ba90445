"""Which state-capture method fits: :func:`advise` ranks every method of libvirt's guide.

libvirt's "domain state capture" page compares the capture APIs along nine trade-off facets
(duration, amount of state, quiescing, quantity of files, impact to the guest definition,
third-party integration, full vs. incremental, local vs. remote, network latency) and ends
with two sequences. Its knowledge lives here as *data* (:data:`GUIDE`: one row per method,
one statement per facet, with the corrections from the guide's review), and :func:`advise`
combines it with what it finds on the live domain:

* what the driver and daemon can do (:meth:`Domain.capabilities`, probed),
* whether the guest agent is connected (the live XML's channel state),
* disk formats (raw images hold neither dirty bitmaps nor internal snapshots),
* dirty bitmaps (checkpoints, or persistent bitmaps inside a qcow2 image) that make an
  internal snapshot impossible to revert,
* an unfinished statecapture sequence journalled in the domain's metadata,
* running backup or block jobs.

Ranking: methods without blockers first, then by how many of the caller's needs they leave
unmet, then by the estimated guest downtime (in classes: none, under a second, seconds,
longer), then by how many needs they meet only partially, then methods the guide's review
discourages (block copy) after the others, then by the exact estimate.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import attrs
from lxml import etree

from ._capabilities import Capabilities, probe_domain
from ._enums import DomainState
from ._journal import JOURNAL_NS
from .errors import StateCaptureError, UsageError, XMLError
from .xml import Disk
from .xml._base import parse
from .xml._domain import AGENT_CHANNEL

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "Advice",
    "Blocker",
    "BlockerKind",
    "Consistency",
    "DomainFacts",
    "Facet",
    "Fit",
    "Method",
    "MethodAdvice",
    "Needs",
    "Storage",
    "Verdict",
    "advise",
]


# --------------------------------------------------------------------------- needs


class Consistency(enum.Enum):
    """How consistent captured disk state must be."""

    CRASH = "crash"
    """Like a power cut: what was on disk at one instant (journaling filesystems cope)."""
    APPLICATION = "application"
    """Quiesced: the guest flushed and froze its filesystems (needs the guest agent), or
    memory is captured together with the disks."""


class Storage(enum.Enum):
    """Where the domain's storage (and the captured state) lives."""

    LOCAL = "local"
    REMOTE = "remote"
    """Network or shared storage: latency and bandwidth matter."""


def _bad_enum(cls: type[enum.Enum], value: object) -> UsageError:
    allowed = ", ".join(repr(m.value) for m in cls)
    return UsageError(f"{cls.__name__} must be one of {allowed}, got {value!r}")


def _to_consistency(value: Consistency | str) -> Consistency:
    try:
        return value if isinstance(value, Consistency) else Consistency(value)
    except ValueError:
        raise _bad_enum(Consistency, value) from None


def _to_storage(value: Storage | str) -> Storage:
    try:
        return value if isinstance(value, Storage) else Storage(value)
    except ValueError:
        raise _bad_enum(Storage, value) from None


def _check_bool(_inst: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"Needs.{attribute.name} must be True or False, got {value!r}")


def _check_downtime(
    _inst: object, _attribute: attrs.Attribute[float | None], value: object
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"Needs.max_downtime must be None or seconds >= 0, got {value!r}")


@attrs.frozen
class Needs:
    """What the caller wants from a capture. Change one with :func:`attrs.evolve`.

    The defaults describe a crash-consistent copy of the disks, local storage, any downtime.
    """

    memory: bool = attrs.field(default=False, validator=_check_bool)
    """Memory state wanted (resume the guest exactly where it was)."""
    disks: bool = attrs.field(default=True, validator=_check_bool)
    """Disk state wanted."""
    consistency: Consistency = attrs.field(
        default=Consistency.CRASH,
        converter=_to_consistency,
    )
    """Crash- or application-consistent disk state."""
    incremental: bool = attrs.field(default=False, validator=_check_bool)
    """Repeated captures should copy only what changed since the last one."""
    max_downtime: float | None = attrs.field(default=None, validator=_check_downtime)
    """Longest acceptable guest downtime (paused, stopped or I/O frozen) in seconds;
    ``None``: any."""
    keep_definition: bool = attrs.field(default=False, validator=_check_bool)
    """The domain definition must stay unchanged (no overlays swapped in, even briefly)."""
    third_party_access: bool = attrs.field(default=False, validator=_check_bool)
    """Another tool must read the captured data (e.g. a backup product over NBD)."""
    storage: Storage = attrs.field(
        default=Storage.LOCAL,
        converter=_to_storage,
    )
    """Whether storage is local or remote (network latency becomes a factor)."""

    def __attrs_post_init__(self) -> None:
        if not (self.memory or self.disks):
            raise UsageError("Needs must want memory state, disk state, or both")
        if self.incremental and not self.disks:
            raise UsageError("incremental captures are of disk state: set disks=True")

    def describe(self) -> str:
        """The needs as one readable line."""
        parts = []
        if self.memory and self.disks:
            parts.append("memory and disk state")
        elif self.memory:
            parts.append("memory state")
        else:
            parts.append("disk state")
        parts.append(f"{self.consistency.value}-consistent")
        if self.incremental:
            parts.append("incremental")
        if self.max_downtime is not None:
            parts.append(f"downtime ≤ {self.max_downtime:g} s")
        if self.keep_definition:
            parts.append("definition unchanged")
        if self.third_party_access:
            parts.append("third-party access")
        parts.append(f"{self.storage.value} storage")
        return ", ".join(parts)


# --------------------------------------------------------------------------- vocabulary


class Method(enum.Enum):
    """Every state-capture method the guide lists, plus its two sequences."""

    MANAGED_SAVE = "managed save"
    SAVE = "save to file"
    INTERNAL_SNAPSHOT = "internal snapshot with memory"
    INTERNAL_DISK_SNAPSHOT = "internal disk-only snapshot"
    EXTERNAL_SNAPSHOT = "external snapshot with memory"
    EXTERNAL_DISK_SNAPSHOT = "external disk-only snapshot"
    FREEZE_THAW = "freeze/thaw"
    BLOCK_COPY = "block copy"
    CHECKPOINT = "checkpoint"
    BACKUP_PUSH = "backup, push mode"
    BACKUP_PULL = "backup, pull mode"
    TEMPORARY_SNAPSHOT_BACKUP = "backup via temporary external snapshot"
    """Sequence 1: freeze, disk-only external snapshot, thaw, copy the frozen base files,
    active block commit, pivot (:func:`statecapture.backup_via_temporary_snapshot`)."""
    DIRECT_BACKUP = "direct backup"
    """Sequence 2: freeze, backup job with a new checkpoint, thaw, push or pull, end the job
    (:func:`statecapture.direct_backup`)."""


class Facet(enum.Enum):
    """The guide's trade-off facets."""

    DURATION = "duration"
    AMOUNT_OF_STATE = "amount of state"
    QUIESCING = "quiescing of data"
    QUANTITY_OF_FILES = "quantity of files"
    DEFINITION_IMPACT = "impact to guest definition"
    THIRD_PARTY = "third-party integration"
    INCREMENTAL = "full vs. incremental"
    LOCALITY = "local vs. remote"
    NETWORK_LATENCY = "network latency"


class Fit(enum.Enum):
    """How one method does on one facet, measured against the caller's needs."""

    GOOD = "good"
    """Meets the need."""
    PARTIAL = "partial"
    """Meets it with a caveat (see the statement)."""
    POOR = "poor"
    """Does not meet the need."""
    NEUTRAL = "n/a"
    """Not among the caller's needs (the statement still informs)."""


class BlockerKind(enum.Enum):
    """Why a method cannot be used on this domain right now."""

    UNSUPPORTED = "unsupported"
    """The driver or daemon version lacks the API, or the driver forbids this case."""
    DOMAIN_STATE = "domain state"
    """The domain is shut off (or transient) and the method needs otherwise."""
    AGENT = "guest agent"
    """Quiescing needs the guest agent, which is not configured or not connected."""
    NON_QCOW2_DISK = "non-qcow2 disk"
    """A raw (non-qcow2) disk holds no dirty bitmaps and no internal snapshots."""
    DIRTY_BITMAPS = "dirty bitmaps"
    """Checkpoints or persistent bitmaps make an internal snapshot impossible to revert."""
    UNFINISHED_SEQUENCE = "unfinished sequence"
    """A statecapture sequence was interrupted and must be recovered first."""
    JOB_RUNNING = "job running"
    """A backup or block job already runs on the domain or disk."""


@attrs.frozen
class Verdict:
    """One method on one facet: the guide's statement and how it fits the needs."""

    facet: Facet
    fit: Fit
    statement: str

    def __str__(self) -> str:
        return f"{self.facet.value}: {self.fit.value} — {self.statement}"


@attrs.frozen
class Blocker:
    """Something found on the live domain that makes a method unusable now."""

    kind: BlockerKind
    message: str
    disk: str | None = None
    """The disk concerned, when it is one disk."""

    def __str__(self) -> str:
        return f"[{self.kind.value}] {self.message}"


# --------------------------------------------------------------------------- the guide as data


@attrs.frozen
class _Row:
    """One method in the guide: what it captures and one statement per facet.

    ``facets[f] = (fit when the caller asks for f, statement)``; the DURATION fit is
    computed from the downtime estimate, the AMOUNT_OF_STATE fit from ``memory``/``disks``.
    """

    apis: str
    summary: str
    memory: bool
    disks: bool
    running: bool
    """Needs a running domain."""
    quiesce_with_agent: bool
    """Application consistency of disk state comes from freezing through the agent."""
    requires: tuple[str, ...]
    """Capabilities that must be present."""
    facets: Mapping[Facet, tuple[Fit, str]]
    discouraged: str | None = None
    """Why the guide (or its review) advises against this method, if it does."""


_G, _P, _X, _N = Fit.GOOD, Fit.PARTIAL, Fit.POOR, Fit.NEUTRAL

GUIDE: Final[Mapping[Method, _Row]] = MappingProxyType(
    {
        Method.MANAGED_SAVE: _Row(
            apis="virDomainManagedSave",
            summary="saves guest memory, libvirt manages the image, then stops the guest; "
            "suited to suspending a guest across a host reboot, not to rolling back",
            memory=True,
            disks=False,
            running=True,
            quiesce_with_agent=False,
            requires=("managed_save",),
            facets={
                Facet.DURATION: (
                    _X,
                    "potentially long downtime: the guest stops until started "
                    "again; does not lend itself to live backups",
                ),
                Facet.AMOUNT_OF_STATE: (
                    _G,
                    "memory only; while stopped, the disks can be copied by a third party",
                ),
                Facet.QUIESCING: (
                    _G,
                    "the guest is stopped with its memory saved: disks copied "
                    "meanwhile match it (restart works only if they stay so)",
                ),
                Facet.QUANTITY_OF_FILES: (_N, "one memory image, managed by libvirt"),
                Facet.DEFINITION_IMPACT: (
                    _G,
                    "definition unchanged; the next start resumes from the image",
                ),
                Facet.THIRD_PARTY: (
                    _X,
                    "the memory image is out of reach (not a rollback "
                    "mechanism); only the disks can be copied while stopped",
                ),
                Facet.INCREMENTAL: (_X, "the whole memory every time"),
                Facet.LOCALITY: (
                    _G,
                    "memory state is what a domain on remote storage needs; "
                    "the image stays on the host",
                ),
                Facet.NETWORK_LATENCY: (_G, "written to the host's own save directory"),
            },
        ),
        Method.SAVE: _Row(
            apis="virDomainSaveFlags / virDomainRestoreFlags",
            summary="like managed save, but the caller manages the memory image: couple it "
            "with copies of the disks to revert to an arbitrary earlier state",
            memory=True,
            disks=False,
            running=True,
            quiesce_with_agent=False,
            requires=("save",),
            facets={
                Facet.DURATION: (
                    _X,
                    "the same potentially long downtime as managed save: the "
                    "guest stops until restored",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "memory only; couple it with copies of the disks"),
                Facet.QUIESCING: (
                    _G,
                    "the guest is stopped with its memory saved: disk copies "
                    "taken meanwhile are consistent with it",
                ),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "one memory image the caller manages, plus the disk copies",
                ),
                Facet.DEFINITION_IMPACT: (_G, "definition unchanged (the image carries a copy)"),
                Facet.THIRD_PARTY: (
                    _G,
                    "the image is an ordinary file the caller or a third party manages",
                ),
                Facet.INCREMENTAL: (_X, "the whole memory every time"),
                Facet.LOCALITY: (
                    _G,
                    "keeps the memory state; remote storage is managed by external means",
                ),
                Facet.NETWORK_LATENCY: (
                    _P,
                    "the guest stays stopped while the image is "
                    "written: a remote target's latency adds downtime",
                ),
            },
        ),
        Method.INTERNAL_SNAPSHOT: _Row(
            apis="virDomainSnapshotCreateXML (internal, with memory)",
            summary="memory and disk state stored inside the qcow2 images",
            memory=True,
            disks=True,
            running=True,
            quiesce_with_agent=False,
            requires=("snapshot",),
            facets={
                Facet.DURATION: (
                    _X,
                    "QEMU: lengthy downtime, the guest is paused while memory "
                    "and disk state are written",
                ),
                Facet.AMOUNT_OF_STATE: (
                    _G,
                    "memory and disks (disk state is taken after all memory is collected)",
                ),
                Facet.QUIESCING: (
                    _P,
                    "consistent together with its memory; the downtime is "
                    "incompatible with freezing guest I/O",
                ),
                Facet.QUANTITY_OF_FILES: (_N, "internal: all state in the same image file"),
                Facet.DEFINITION_IMPACT: (_G, "definition unchanged"),
                Facet.THIRD_PARTY: (
                    _X,
                    "the state lives inside the guest's images: nothing "
                    "for a third party to read while the guest runs",
                ),
                Facet.INCREMENTAL: (
                    _X,
                    "unchanged clusters are shared inside the image, but "
                    "nothing can be exported incrementally",
                ),
                Facet.LOCALITY: (
                    _X,
                    "needs qcow2 images the hypervisor writes; remote "
                    "(network) storage usually cannot hold internal snapshots",
                ),
                Facet.NETWORK_LATENCY: (
                    _X,
                    "memory is written into the image while the guest "
                    "is paused: storage latency adds downtime",
                ),
            },
        ),
        Method.INTERNAL_DISK_SNAPSHOT: _Row(
            apis="virDomainSnapshotCreateXML (internal, disk only)",
            summary="disk state stored inside the qcow2 images",
            memory=False,
            disks=True,
            running=False,
            quiesce_with_agent=False,
            requires=("snapshot",),
            facets={
                Facet.DURATION: (
                    _G,
                    "QEMU takes it only while the domain is shut off (a running "
                    "domain's internal snapshot must include memory)",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disk state only"),
                Facet.QUIESCING: (
                    _X,
                    "internal snapshots are incompatible with freezing guest "
                    "I/O: crash-consistent at best while running",
                ),
                Facet.QUANTITY_OF_FILES: (_N, "internal: inside the same image file"),
                Facet.DEFINITION_IMPACT: (_G, "definition unchanged"),
                Facet.THIRD_PARTY: (_X, "inside the guest's images"),
                Facet.INCREMENTAL: (
                    _X,
                    "unchanged clusters are shared inside the image, but "
                    "nothing can be exported incrementally",
                ),
                Facet.LOCALITY: (
                    _X,
                    "needs qcow2 images; remote storage usually cannot hold internal snapshots",
                ),
                Facet.NETWORK_LATENCY: (_P, "only metadata is written, but on the storage path"),
            },
        ),
        Method.EXTERNAL_SNAPSHOT: _Row(
            apis="virDomainSnapshotCreateXML (external, with memory)",
            summary="memory to a file and new overlay images on top of the disks",
            memory=True,
            disks=True,
            running=True,
            quiesce_with_agent=False,
            requires=("snapshot",),
            facets={
                Facet.DURATION: (
                    _X,
                    "with memory it involves a migration with potentially lengthy "
                    "downtime (the review's correction: only disk-only external "
                    "snapshots are quick); the estimate assumes the default mode, "
                    "which pauses the guest while memory is written",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "memory and disks"),
                Facet.QUIESCING: (_P, "consistent together with its memory state"),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "external: a memory file plus a chain of overlay "
                    "files that must be used together",
                ),
                Facet.DEFINITION_IMPACT: (
                    _X,
                    "the overlays replace the disks in the definition "
                    "until merged back with block commit",
                ),
                Facet.THIRD_PARTY: (
                    _G,
                    "the backing files are frozen in time: a third party can read them",
                ),
                Facet.INCREMENTAL: (
                    _P,
                    "each overlay holds only later changes, but the chain must be kept together",
                ),
                Facet.LOCALITY: (_P, "overlays must be created where the hypervisor can write"),
                Facet.NETWORK_LATENCY: (
                    _X,
                    "the memory copy must converge over the storage "
                    "path: latency lengthens the downtime",
                ),
            },
        ),
        Method.EXTERNAL_DISK_SNAPSHOT: _Row(
            apis="virDomainSnapshotCreateXML (external, disk only)",
            summary="new overlay images on top of the disks; the old images stop changing",
            memory=False,
            disks=True,
            running=False,
            quiesce_with_agent=True,
            requires=("snapshot",),
            facets={
                Facet.DURATION: (_G, "quick: the overlays open in one step"),
                Facet.AMOUNT_OF_STATE: (_G, "disk state only"),
                Facet.QUIESCING: (
                    _G,
                    "can freeze the guest's filesystems through the agent (quiesce)",
                ),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "a chain of related files that must be used together",
                ),
                Facet.DEFINITION_IMPACT: (
                    _X,
                    "changes the active images in the definition until committed back",
                ),
                Facet.THIRD_PARTY: (
                    _G,
                    "a third-party tool can read the backing files before a live commit",
                ),
                Facet.INCREMENTAL: (
                    _P,
                    "each overlay holds only later changes, but the chain must be kept together",
                ),
                Facet.LOCALITY: (_P, "overlays must be created where the hypervisor can write"),
                Facet.NETWORK_LATENCY: (_G, "no data is copied when taking it"),
            },
        ),
        Method.FREEZE_THAW: _Row(
            apis="virDomainFSFreeze / virDomainFSThaw",
            summary="no capture by itself: quiesces a trusted guest's filesystems around "
            "another capture",
            memory=False,
            disks=False,
            running=True,
            quiesce_with_agent=True,
            requires=("fs_freeze",),
            facets={
                Facet.DURATION: (
                    _G,
                    "guest I/O stops while frozen; guests may rightfully panic "
                    "if frozen too long (Linux qemu-ga never thaws by itself)",
                ),
                Facet.AMOUNT_OF_STATE: (_X, "captures nothing by itself"),
                Facet.QUIESCING: (
                    _G,
                    "makes a capture application-consistent rather than "
                    "crash-consistent; needs a trusted guest running the agent",
                ),
                Facet.QUANTITY_OF_FILES: (_N, "no files"),
                Facet.DEFINITION_IMPACT: (_G, "definition unchanged"),
                Facet.THIRD_PARTY: (_N, "nothing to hand over"),
                Facet.INCREMENTAL: (_N, "not a capture"),
                Facet.LOCALITY: (
                    _G,
                    "guest cooperation so no I/O is in flight across the "
                    "network matters most for remote storage",
                ),
                Facet.NETWORK_LATENCY: (_N, "no data moves"),
            },
        ),
        Method.BLOCK_COPY: _Row(
            apis="virDomainBlockCopy (+ virDomainBlockJobAbort)",
            summary="mirrors one disk per job to a new file; consistent only when the job "
            "ends (the guide's review discourages it as a backup path)",
            memory=False,
            disks=True,
            running=True,
            quiesce_with_agent=True,
            requires=("block_copy",),
            discouraged="the guide's review asked not to present block copy as a backup method",
            facets={
                Facet.DURATION: (
                    _G,
                    "up-front: the copy is complete only when the job ends; "
                    "the guest pauses briefly to end several disks' jobs together",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disks only, one disk per job"),
                Facet.QUIESCING: (
                    _P,
                    "consistent only at the end of the job: freeze before "
                    "ending it for application consistency",
                ),
                Facet.QUANTITY_OF_FILES: (_N, "one new full copy per disk"),
                Facet.DEFINITION_IMPACT: (
                    _P,
                    "the live definition carries a mirror during the "
                    "job; pivoting switches the guest to the copy",
                ),
                Facet.THIRD_PARTY: (_P, "the result is a plain file, usable once the job ended"),
                Facet.INCREMENTAL: (_X, "a full copy every time"),
                Facet.LOCALITY: (_P, "the destination can be anywhere the hypervisor can write"),
                Facet.NETWORK_LATENCY: (
                    _X,
                    "the mirror must keep up with guest writes over the "
                    "network or it never converges",
                ),
            },
        ),
        Method.CHECKPOINT: _Row(
            apis="virDomainCheckpointCreateXML",
            summary="no capture by itself: tracks which blocks change, enabling incremental "
            "backups (usually made by a backup job)",
            memory=False,
            disks=False,
            running=True,
            quiesce_with_agent=False,
            requires=("checkpoint",),
            facets={
                Facet.DURATION: (_G, "instant: a dirty bitmap is created per disk"),
                Facet.AMOUNT_OF_STATE: (_X, "captures nothing: tracks changes from now on"),
                Facet.QUIESCING: (_N, "nothing is captured"),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "no files: a bitmap inside each qcow2 image plus libvirt metadata",
                ),
                Facet.DEFINITION_IMPACT: (_G, "definition unchanged"),
                Facet.THIRD_PARTY: (_N, "nothing to hand over"),
                Facet.INCREMENTAL: (_G, "the base of incremental backups"),
                Facet.LOCALITY: (_P, "needs qcow2 images to hold the bitmaps"),
                Facet.NETWORK_LATENCY: (_N, "no data moves"),
            },
        ),
        Method.BACKUP_PUSH: _Row(
            apis="virDomainBackupBegin (push) + virDomainAbortJob",
            summary="the hypervisor writes a copy of the disks, consistent to the job's start, "
            "to files outside the guest's images",
            memory=False,
            disks=True,
            running=True,
            quiesce_with_agent=True,
            requires=("backup",),
            facets={
                Facet.DURATION: (
                    _G,
                    "consistent to the start of the job; the copy runs alongside the guest",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disks only (no memory)"),
                Facet.QUIESCING: (
                    _G,
                    "freeze before the job starts, thaw right after: the job "
                    "keeps that point in time",
                ),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "one backup file per disk, outside the guest's images",
                ),
                Facet.DEFINITION_IMPACT: (
                    _G,
                    "stored outside the guest's images: no commit needed, definition unchanged",
                ),
                Facet.THIRD_PARTY: (
                    _P,
                    "the hypervisor writes the files; a third party takes "
                    "them once the job completed",
                ),
                Facet.INCREMENTAL: (_G, "incremental when coupled with checkpoints"),
                Facet.LOCALITY: (_G, "the target may be any path the hypervisor can write"),
                Facet.NETWORK_LATENCY: (
                    _P,
                    "a remote target's bandwidth sets the job's duration, not the guest's downtime",
                ),
            },
        ),
        Method.BACKUP_PULL: _Row(
            apis="virDomainBackupBegin (pull) + virDomainAbortJob",
            summary="the disks are exported over NBD as they were at the job's start, for a "
            "third party to read",
            memory=False,
            disks=True,
            running=True,
            quiesce_with_agent=True,
            requires=("backup",),
            facets={
                Facet.DURATION: (
                    _G,
                    "consistent to the start of the job; data is read while the guest runs",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disks only (no memory)"),
                Facet.QUIESCING: (
                    _G,
                    "freeze before the job starts, thaw right after: the "
                    "export keeps that point in time",
                ),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "the reader decides; scratch files on the host "
                    "hold overwritten blocks meanwhile",
                ),
                Facet.DEFINITION_IMPACT: (_G, "no commit needed, definition unchanged"),
                Facet.THIRD_PARTY: (
                    _G,
                    "third-party integration: readers pull consistent data "
                    "over NBD while the guest keeps writing",
                ),
                Facet.INCREMENTAL: (
                    _G,
                    "incremental when coupled with checkpoints (the "
                    "export includes the dirty-block map)",
                ),
                Facet.LOCALITY: (_G, "NBD can be read from another host"),
                Facet.NETWORK_LATENCY: (
                    _P,
                    "reading over the network: latency sets the duration, not the guest's downtime",
                ),
            },
        ),
        Method.TEMPORARY_SNAPSHOT_BACKUP: _Row(
            apis="FSFreeze, SnapshotCreateXML(DISK_ONLY), FSThaw, copy, BlockCommit(ACTIVE), "
            "BlockJobAbort(PIVOT)",
            summary="freeze, disk-only external snapshot, thaw, copy the frozen base files, "
            "active block commit, pivot (statecapture.backup_via_temporary_snapshot)",
            memory=False,
            disks=True,
            running=True,
            quiesce_with_agent=True,
            requires=("snapshot", "block_commit"),
            facets={
                Facet.DURATION: (
                    _G,
                    "frozen only around the snapshot; most time goes to the "
                    "copy; the commit must converge before the pivot",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disks only"),
                Facet.QUIESCING: (_G, "freezes the filesystems around the snapshot"),
                Facet.QUANTITY_OF_FILES: (
                    _N,
                    "a temporary overlay per disk, merged back and removed; the copies are yours",
                ),
                Facet.DEFINITION_IMPACT: (
                    _X,
                    "changes the definition until the commit ends; an "
                    "interruption leaves the guest on the overlay and "
                    "needs clean-up",
                ),
                Facet.THIRD_PARTY: (_G, "a third party copies the frozen base files"),
                Facet.INCREMENTAL: (_X, "full copies"),
                Facet.LOCALITY: (_P, "overlays live next to the images"),
                Facet.NETWORK_LATENCY: (
                    _P,
                    "the commit must converge: slow storage under heavy writes delays the pivot",
                ),
            },
        ),
        Method.DIRECT_BACKUP: _Row(
            apis="FSFreeze, BackupBegin(+checkpoint), FSThaw, push/pull, AbortJob",
            summary="freeze, backup job with a new checkpoint, thaw, push or pull, end the "
            "job (statecapture.direct_backup)",
            memory=False,
            disks=True,
            running=True,
            quiesce_with_agent=True,
            requires=("backup",),
            facets={
                Facet.DURATION: (
                    _G,
                    "frozen only around the job's start; the copy runs while the guest works",
                ),
                Facet.AMOUNT_OF_STATE: (_G, "disks only"),
                Facet.QUIESCING: (_G, "freezes the filesystems around the job's start"),
                Facet.QUANTITY_OF_FILES: (_N, "backup files outside the guest's images"),
                Facet.DEFINITION_IMPACT: (_G, "no impact to the definition, even when interrupted"),
                Facet.THIRD_PARTY: (_G, "pull mode hands the data to a third party over NBD"),
                Facet.INCREMENTAL: (
                    _G,
                    "each run creates the checkpoint the next incremental starts from",
                ),
                Facet.LOCALITY: (_G, "push to any writable path, or pull from another host"),
                Facet.NETWORK_LATENCY: (
                    _P,
                    "latency sets the copy's duration, not the guest's downtime",
                ),
            },
        ),
    }
)
"""The guide as a table: method → what it captures and one statement per facet."""

# Measured on these machines (2 cores, TCG, 256 MiB guest; HAZARDS "Figures"): downtime
# estimates scale these to the domain's memory size.
_FREEZE_WINDOW_S: Final = 0.2  # freeze → backupBegin → thaw ≈ 0.2 s
_FREEZE_SNAPSHOT_S: Final = 0.15  # freeze → disk-only external snapshot → thaw 0.13-0.16 s
_DISK_SNAPSHOT_S: Final = 0.1  # disk-only external snapshot ≈ 0.11 s
_FREEZE_ROUND_TRIP_S: Final = 0.003  # fsFreeze + fsThaw ≈ 3 ms
_SAVE_S_PER_GIB: Final = 8.8  # save 2.2 s
_RESTORE_S_PER_GIB: Final = 3.0  # restore 0.75 s
_INTERNAL_S_PER_GIB: Final = 0.8  # internal snapshot with memory 0.2 s
_PAUSE_TO_END_JOBS_S: Final = 0.05

_DISK_TOUCHING: Final = frozenset(
    {
        Method.INTERNAL_SNAPSHOT,
        Method.INTERNAL_DISK_SNAPSHOT,
        Method.EXTERNAL_SNAPSHOT,
        Method.EXTERNAL_DISK_SNAPSHOT,
        Method.BLOCK_COPY,
        Method.CHECKPOINT,
        Method.BACKUP_PUSH,
        Method.BACKUP_PULL,
        Method.TEMPORARY_SNAPSHOT_BACKUP,
        Method.DIRECT_BACKUP,
    }
)
_INTERNAL: Final = frozenset({Method.INTERNAL_SNAPSHOT, Method.INTERNAL_DISK_SNAPSHOT})
_BACKUPS: Final = frozenset({Method.BACKUP_PUSH, Method.BACKUP_PULL, Method.DIRECT_BACKUP})
_BLOCK_JOB_USERS: Final = frozenset(
    {Method.BLOCK_COPY, Method.TEMPORARY_SNAPSHOT_BACKUP, *_BACKUPS}
)


# --------------------------------------------------------------------------- facts


@attrs.frozen
class DomainFacts:
    """What :func:`advise` found on the live domain (all read-only queries)."""

    name: str
    driver: str
    state: DomainState
    persistent: bool
    memory_mib: int | None
    """The domain's current memory size (for downtime estimates)."""
    agent: str
    """``connected``, ``disconnected``, ``no channel`` or ``unknown`` (the driver does not
    report the channel state)."""
    disks: tuple[Disk, ...]
    """Writable disks (cdroms, floppies and read-only disks left out)."""
    checkpoints: tuple[str, ...]
    snapshots: tuple[str, ...]
    bitmaps: Mapping[str, tuple[str, ...]]
    """Dirty bitmaps by disk target: those inside the qcow2 images, and for a running QEMU
    domain those QEMU holds (a bitmap on no known disk appears under ``node <name>``)."""
    journal: str | None
    """The unfinished sequence's name when a journal is present, else ``None``."""
    backup_job: bool
    """A backup job is running."""
    block_jobs: tuple[str, ...]
    """Disks with a running block job."""
    managed_save_image: bool | None
    notes: tuple[str, ...] = ()
    """What could not be found out, and why."""

    @property
    def active(self) -> bool:
        """Whether the domain is running or paused."""
        return self.state not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)

    @property
    def non_qcow2(self) -> tuple[Disk, ...]:
        """Writable disks whose active image is not qcow2."""
        return tuple(d for d in self.disks if d.format != "qcow2")


def _memory_mib(root: etree._Element) -> int | None:
    for tag in ("currentMemory", "memory"):
        el = root.find(tag)
        if el is None or not (el.text or "").strip().isdigit():
            continue
        value = int((el.text or "0").strip())
        unit = (el.get("unit") or "KiB").lower()
        scale = {
            "b": 1 / 2**20,
            "bytes": 1 / 2**20,
            "kib": 1 / 1024,
            "k": 1 / 1024,
            "mib": 1,
            "m": 1,
            "gib": 1024,
            "g": 1024,
            "tib": 2**20,
            "t": 2**20,
        }.get(unit)
        if scale is None:
            return None
        return int(value * scale)
    return None


def _agent_state(root: etree._Element) -> str:
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            state = target.get("state")
            return state if state in ("connected", "disconnected") else "unknown"
    return "no channel"


def _is_local(uri: str) -> bool:
    """Whether the images named in the domain XML are files on this host."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return not parts.hostname and transport in ("", "unix")


def _find_bitmaps(
    dom: Domain, disks: tuple[Disk, ...], driver: str
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    bitmaps: dict[str, tuple[str, ...]] = {}
    notes: list[str] = []
    if driver != "QEMU":
        return bitmaps, notes
    from . import _bitmaps, _qemuimg

    # QEMU's own view of a running domain: bitmaps that live only in QEMU (HAZARDS 19) are
    # neither in the image files yet nor, when orphaned, in libvirt's checkpoint list.
    try:
        live = _bitmaps.query_or_none(dom) or {}
    except StateCaptureError as exc:
        live = {}
        notes.append(f"QEMU's live dirty bitmaps could not be read: {exc}")
    for target, found_live in live.items():
        bitmaps[target] = tuple(dict.fromkeys(bm.name for bm in found_live))
    if not _is_local(dom.connection.uri):
        notes.append("images not inspected for dirty bitmaps: the host is remote")
        return bitmaps, notes
    for disk in disks:
        if disk.format != "qcow2" or disk.type != "file" or not disk.source:
            continue
        if not os.path.exists(disk.source):
            notes.append(f"{disk.target}: image {disk.source} not found on this host")
            continue
        try:
            found = _qemuimg.persistent_bitmaps(disk.source, timeout=15)
        except StateCaptureError as exc:
            notes.append(f"{disk.target}: could not inspect the image for bitmaps: {exc}")
            continue
        if found:
            bitmaps[disk.target] = tuple(dict.fromkeys((*bitmaps.get(disk.target, ()), *found)))
    return bitmaps, notes


def _journal_sequence(dom: Domain) -> str | None:
    text = dom._vir.get_metadata(JOURNAL_NS)
    if text is None:
        return None
    try:
        root = parse(text)
    except XMLError:
        return "unknown sequence"
    return root.get("sequence") or "unknown sequence"


def gather_facts(dom: Domain) -> DomainFacts:
    """Read everything the advisor needs from ``dom`` (read-only)."""
    vir = dom.connection._vir
    driver = dom.connection.versions.driver
    definition = dom.definition
    root = parse(definition.raw)
    state = dom.state
    disks = tuple(d for d in definition.disks if d.device == "disk" and not d.readonly)
    notes: list[str] = []
    snapshots = vir.probe_listing(dom._vir, "snapshot")
    checkpoints = vir.probe_listing(dom._vir, "checkpoint")
    backup_supported, job = vir.probe_backup_job(dom._vir)
    block_jobs: list[str] = []
    active = state not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)
    if active:
        for disk in disks:
            if vir.probe_block_job(dom._vir, disk.target):
                block_jobs.append(disk.target)
    if not definition.has_agent_channel:
        agent = "no channel"
    elif active:
        agent = _agent_state(root)
    else:
        agent = "disconnected"
    bitmaps, bitmap_notes = _find_bitmaps(dom, disks, driver)
    notes.extend(bitmap_notes)
    return DomainFacts(
        name=dom.name,
        driver=driver,
        state=state,
        persistent=dom.is_persistent,
        memory_mib=_memory_mib(root),
        agent=agent,
        disks=disks,
        checkpoints=tuple(checkpoints or ()),
        snapshots=tuple(snapshots or ()),
        bitmaps=MappingProxyType(bitmaps),
        journal=_journal_sequence(dom),
        backup_job=backup_supported and job is not None,
        block_jobs=tuple(block_jobs),
        managed_save_image=vir.probe_managed_save_image(dom._vir),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- advice values


@attrs.frozen
class MethodAdvice:
    """One method judged for one domain and one set of needs."""

    method: Method
    rank: int
    """1 is the best fit."""
    summary: str
    """What the method does, after the guide."""
    apis: str
    """The libvirt APIs involved."""
    verdicts: tuple[Verdict, ...]
    """One per :class:`Facet`, in the guide's order."""
    blockers: tuple[Blocker, ...]
    """Why the method cannot be used on this domain now (empty: usable)."""
    downtime: float
    """Estimated guest downtime in seconds (paused, stopped or I/O frozen), scaled from
    measurements on a small TCG guest: an order of magnitude, not a promise."""
    notes: tuple[str, ...] = ()
    """Caveats that do not block the method."""

    @property
    def usable(self) -> bool:
        """No blocker was found."""
        return not self.blockers

    @property
    def unmet(self) -> tuple[Facet, ...]:
        """Facets on which the method does not meet the needs."""
        return tuple(v.facet for v in self.verdicts if v.fit is Fit.POOR)

    @property
    def partial(self) -> tuple[Facet, ...]:
        """Facets on which the method meets the needs with a caveat."""
        return tuple(v.facet for v in self.verdicts if v.fit is Fit.PARTIAL)

    def verdict(self, facet: Facet) -> Verdict:
        """The verdict on ``facet``."""
        for v in self.verdicts:
            if v.facet is facet:
                return v
        raise KeyError(facet)  # pragma: no cover - every facet has a verdict

    def explain(self) -> str:
        """Several lines: summary, blockers, every facet's verdict, notes."""
        status = "usable" if self.usable else "BLOCKED"
        lines = [f"{self.rank}. {self.method.value} — {status}: {self.summary}"]
        lines.append(f"     APIs: {self.apis}; estimated downtime {_seconds(self.downtime)}")
        for b in self.blockers:
            lines.append(f"     blocked: {b}")
        width = max(len(f.value) for f in Facet)
        for v in self.verdicts:
            lines.append(f"     {v.facet.value:<{width}}  {v.fit.value:<7}  {v.statement}")
        for n in self.notes:
            lines.append(f"     note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _seconds(value: float) -> str:
    if value == 0:
        return "0 s"
    if value < 1:
        return f"≈{value:.2g} s"
    return f"≈{value:.0f} s"


@attrs.frozen
class Advice:
    """Every capture method ranked for one domain and one set of :class:`Needs`.

    Iterate for the ranking, index with a :class:`Method`, print (or :meth:`explain`) for a
    terminal, or display in a notebook for a table.
    """

    domain: str
    needs: Needs
    facts: DomainFacts
    capabilities: Capabilities
    methods: tuple[MethodAdvice, ...]
    """All methods, best first."""

    def __iter__(self) -> Iterator[MethodAdvice]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def __getitem__(self, method: Method) -> MethodAdvice:
        for m in self.methods:
            if m.method is method:
                return m
        raise KeyError(method)

    @property
    def best(self) -> MethodAdvice | None:
        """The best usable method, or ``None`` when every method is blocked."""
        return next((m for m in self.methods if m.usable), None)

    @property
    def usable(self) -> tuple[MethodAdvice, ...]:
        """The methods without blockers, best first."""
        return tuple(m for m in self.methods if m.usable)

    def explain(self, *, details: int = 3) -> str:
        """A report for a terminal: the ranking, then ``details`` methods in full."""
        f = self.facts
        lines = [
            f"Advice for domain {self.domain!r} ({f.driver} driver, libvirt "
            f"{self.capabilities.daemon}; {f.state.value}, agent {f.agent})",
            f"Needs: {self.needs.describe()}",
            "",
        ]
        width = max(len(m.value) for m in Method)
        lines.append(f" #  {'method':<{width}}  {'status':<7}  {'downtime':<8}  unmet needs")
        for m in self.methods:
            status = "usable" if m.usable else "blocked"
            unmet = ", ".join(facet.value for facet in m.unmet) or "-"
            lines.append(
                f"{m.rank:>2}  {m.method.value:<{width}}  {status:<7}  "
                f"{_seconds(m.downtime):<8}  {unmet}"
            )
            for b in m.blockers:
                lines.append(f"{'':>4}{'':<{width}}  ↳ {b}")
        shown = [m for m in self.methods if m.usable][:details]
        if shown:
            lines.append("")
            lines.append("Details:")
            for m in shown:
                lines.append(m.explain())
        for note in f.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def _repr_html_(self) -> str:
        from html import escape

        from ._html import table

        headers = ["#", "method", "status", "downtime", *[facet.value for facet in Facet]]
        rows = []
        for m in self.methods:
            status = (
                "usable" if m.usable else "blocked: " + "; ".join(b.message for b in m.blockers)
            )
            cells = [f"{v.fit.value}: {v.statement}" for v in m.verdicts]
            rows.append([str(m.rank), m.method.value, status, _seconds(m.downtime), *cells])
        f = self.facts
        caption = f"Needs: {self.needs.describe()}"
        return (
            f"<div><b>Advice for {escape(self.domain)}</b> — {escape(f.driver)} driver, "
            f"{escape(f.state.value)}, agent {escape(f.agent)}"
            + table(headers, rows, caption=caption)
            + "</div>"
        )


# --------------------------------------------------------------------------- judging


def _downtime(method: Method, facts: DomainFacts, needs: Needs) -> float:
    if not facts.active:
        return 0.0
    gib = (facts.memory_mib or 1024) / 1024
    app = needs.consistency is Consistency.APPLICATION
    if method in (Method.MANAGED_SAVE, Method.SAVE):
        return gib * (_SAVE_S_PER_GIB + _RESTORE_S_PER_GIB)
    if method is Method.INTERNAL_SNAPSHOT:
        return max(0.2, gib * _INTERNAL_S_PER_GIB)
    if method is Method.EXTERNAL_SNAPSHOT:
        return gib * _SAVE_S_PER_GIB
    if method is Method.INTERNAL_DISK_SNAPSHOT:
        return _DISK_SNAPSHOT_S
    if method is Method.EXTERNAL_DISK_SNAPSHOT:
        return _FREEZE_SNAPSHOT_S if app else _DISK_SNAPSHOT_S
    if method is Method.FREEZE_THAW:
        return _FREEZE_ROUND_TRIP_S
    if method is Method.BLOCK_COPY:
        pause = _PAUSE_TO_END_JOBS_S if len(facts.disks) > 1 else 0.0
        return pause + (_FREEZE_ROUND_TRIP_S if app else 0.0)
    if method is Method.TEMPORARY_SNAPSHOT_BACKUP:
        return _FREEZE_SNAPSHOT_S if app else _DISK_SNAPSHOT_S
    if method in (Method.BACKUP_PUSH, Method.BACKUP_PULL, Method.DIRECT_BACKUP):
        return _FREEZE_WINDOW_S if app else 0.0
    return 0.0


def _downtime_class(seconds: float) -> int:
    """0: none, 1: under a second, 2: seconds, 3: longer. Estimates are rough, so the
    ranking compares classes before it compares needs met only partially."""
    if seconds <= 0:
        return 0
    if seconds < 1:
        return 1
    return 2 if seconds < 10 else 3


def _asked(facet: Facet, needs: Needs) -> bool:
    return {
        Facet.DURATION: needs.max_downtime is not None,
        Facet.AMOUNT_OF_STATE: True,
        Facet.QUIESCING: needs.consistency is Consistency.APPLICATION,
        Facet.QUANTITY_OF_FILES: False,
        Facet.DEFINITION_IMPACT: needs.keep_definition,
        Facet.THIRD_PARTY: needs.third_party_access,
        Facet.INCREMENTAL: needs.incremental,
        Facet.LOCALITY: needs.storage is Storage.REMOTE,
        Facet.NETWORK_LATENCY: needs.storage is Storage.REMOTE,
    }[facet]


def _verdicts(
    method: Method, row: _Row, facts: DomainFacts, needs: Needs, downtime: float
) -> tuple[Verdict, ...]:
    out = []
    for facet in Facet:
        fit, text = row.facets[facet]
        if facet is Facet.DURATION:
            text = f"{text} (estimate {_seconds(downtime)})"
            if needs.max_downtime is None:
                fit = Fit.NEUTRAL
            elif downtime > needs.max_downtime:
                fit = Fit.POOR
                text += f"; more than the {needs.max_downtime:g} s allowed"
            else:
                fit = Fit.GOOD
        elif facet is Facet.AMOUNT_OF_STATE:
            fit = _amount_fit(method, row, facts, needs)
        elif not _asked(facet, needs):
            fit = Fit.NEUTRAL
        elif facet is Facet.QUIESCING:
            if row.memory and needs.memory:
                fit = Fit.GOOD
                text = "memory and disks together: restoring resumes the guest where it was"
            elif not facts.active and row.disks:
                fit = Fit.GOOD
                text = "the domain is shut off: its disks are at rest"
            elif fit is Fit.NEUTRAL:
                fit = Fit.POOR
        out.append(Verdict(facet, fit, text))
    return tuple(out)


def _amount_fit(method: Method, row: _Row, facts: DomainFacts, needs: Needs) -> Fit:
    if not (row.memory or row.disks):
        return Fit.POOR
    if needs.memory and not row.memory:
        return Fit.POOR
    if needs.disks and not row.disks:
        # Save and managed save leave the disks for the caller to copy while stopped.
        return Fit.PARTIAL if method in (Method.SAVE, Method.MANAGED_SAVE) else Fit.POOR
    if method is Method.BLOCK_COPY and len(facts.disks) > 1:
        return Fit.PARTIAL
    return Fit.GOOD


def _required(method: Method, row: _Row, needs: Needs) -> tuple[str, ...]:
    req = list(row.requires)
    app = needs.consistency is Consistency.APPLICATION
    if method is Method.TEMPORARY_SNAPSHOT_BACKUP and app:
        req.append("fs_freeze")
    if method in _BACKUPS:
        if app:
            req.append("fs_freeze")
        if needs.incremental:
            req += ["checkpoint", "incremental_backup"]
    return tuple(dict.fromkeys(req))


def _blockers(
    method: Method, row: _Row, facts: DomainFacts, caps: Capabilities, needs: Needs
) -> tuple[tuple[Blocker, ...], tuple[str, ...]]:
    blockers: list[Blocker] = []
    notes: list[str] = []
    app = needs.consistency is Consistency.APPLICATION
    qemu = facts.driver == "QEMU"

    if facts.journal is not None and method in _DISK_TOUCHING:
        blockers.append(
            Blocker(
                BlockerKind.UNFINISHED_SEQUENCE,
                f"an unfinished {facts.journal} run is journalled in the domain's metadata "
                f"({JOURNAL_NS}): recover it first, the disks may still be on its overlays",
            )
        )

    for name in _required(method, row, needs):
        cap = caps[name]
        if name == "incremental_backup" and False in (
            caps.backup.supported,
            caps.checkpoint.supported,
        ):
            continue  # already reported as missing backup or checkpoint support
        if cap.supported is False:
            blockers.append(Blocker(BlockerKind.UNSUPPORTED, f"{name}: {cap.reason}"))
        elif cap.supported is None:
            notes.append(f"{name} could not be probed: {cap.reason}")

    if row.running and not facts.active:
        blockers.append(
            Blocker(BlockerKind.DOMAIN_STATE, f"needs a running domain; it is {facts.state.value}")
        )
    if method is Method.MANAGED_SAVE and not facts.persistent:
        blockers.append(
            Blocker(BlockerKind.DOMAIN_STATE, "a transient domain cannot have a managed-save image")
        )
    if method is Method.INTERNAL_DISK_SNAPSHOT and qemu and facts.active:
        blockers.append(
            Blocker(
                BlockerKind.UNSUPPORTED,
                "QEMU driver: an internal snapshot of a running domain must include its memory",
            )
        )
    if method is Method.CHECKPOINT and facts.driver == "TEST" and facts.snapshots:
        blockers.append(
            Blocker(
                BlockerKind.UNSUPPORTED,
                "the test driver refuses a checkpoint while snapshots exist",
            )
        )

    wants_agent = method is Method.FREEZE_THAW or (app and row.quiesce_with_agent and facts.active)
    if wants_agent and facts.active:
        if facts.agent == "no channel":
            blockers.append(
                Blocker(
                    BlockerKind.AGENT,
                    "no guest-agent channel (org.qemu.guest_agent.0) in the definition: the "
                    "guest's filesystems cannot be frozen",
                )
            )
        elif facts.agent == "disconnected":
            blockers.append(
                Blocker(
                    BlockerKind.AGENT,
                    "the guest agent is not connected: the guest's filesystems cannot be frozen",
                )
            )
        elif facts.agent == "unknown":
            notes.append("the driver does not report whether the guest agent is connected")

    if qemu:
        for disk in facts.non_qcow2:
            fmt = disk.format or "unspecified (raw)"
            if method in _INTERNAL:
                blockers.append(
                    Blocker(
                        BlockerKind.NON_QCOW2_DISK,
                        f"{disk.target} is {fmt}: internal snapshots need every disk in qcow2",
                        disk=disk.target,
                    )
                )
            elif method is Method.CHECKPOINT:
                blockers.append(
                    Blocker(
                        BlockerKind.NON_QCOW2_DISK,
                        f"{disk.target} is {fmt}: it cannot hold a dirty bitmap (leave it out "
                        "of the checkpoint, or convert it to qcow2)",
                        disk=disk.target,
                    )
                )
            elif method in _BACKUPS and needs.incremental:
                blockers.append(
                    Blocker(
                        BlockerKind.NON_QCOW2_DISK,
                        f"{disk.target} is {fmt}: no dirty bitmap, so no incremental backup of "
                        "it (a full backup of it still works)",
                        disk=disk.target,
                    )
                )

    if method in _INTERNAL and (facts.checkpoints or facts.bitmaps):
        where = []
        if facts.checkpoints:
            where.append("checkpoints " + ", ".join(facts.checkpoints))
        for target, names in facts.bitmaps.items():
            where.append(f"bitmaps {', '.join(names)} inside {target}'s image")
        blockers.append(
            Blocker(
                BlockerKind.DIRTY_BITMAPS,
                "dirty bitmaps present (" + "; ".join(where) + "): reverting an internal "
                "snapshot then fails with 'Device has active dirty bitmaps' (QEMU 7.2 exited "
                "doing it)",
            )
        )

    if facts.backup_job and (method in _BACKUPS or method in _BLOCK_JOB_USERS):
        blockers.append(
            Blocker(
                BlockerKind.JOB_RUNNING,
                "a backup job is running (one per domain; block jobs on its disks must wait)",
            )
        )
    if method in _BLOCK_JOB_USERS:
        for target in facts.block_jobs:
            blockers.append(
                Blocker(
                    BlockerKind.JOB_RUNNING,
                    f"a block job is running on {target}",
                    disk=target,
                )
            )

    # Caveats.
    if method in (Method.EXTERNAL_SNAPSHOT, Method.EXTERNAL_DISK_SNAPSHOT):
        for name in ("snapshot_external_revert", "snapshot_external_delete"):
            cap = caps[name]
            if cap.supported is False:
                notes.append(f"{name}: {cap.reason}")
    if row.discouraged:
        notes.append(row.discouraged)
    if method in _BACKUPS and caps.backup_preserve_on_shutdown.supported is False:
        notes.append(
            f"a guest shutdown during the job ends it ({caps.backup_preserve_on_shutdown.reason})"
        )
    if method is Method.MANAGED_SAVE and facts.managed_save_image:
        notes.append("a managed-save image already exists for this domain")
    if method in (Method.SAVE, Method.MANAGED_SAVE) and needs.disks:
        notes.append("disk state: copy the disks while the guest is stopped")
    return tuple(blockers), tuple(dict.fromkeys(notes))


def advise(dom: Domain, needs: Needs | None = None) -> Advice:
    """Rank every state-capture method for ``dom`` and ``needs`` (default: :class:`Needs`).

    Only reads: the domain's capabilities are probed, its XML, snapshots, checkpoints, jobs
    and metadata are queried, local qcow2 images are inspected with ``qemu-img info
    --force-share``, and a running QEMU domain is asked for its live dirty bitmaps (a QMP
    query through libvirt, which marks the domain tainted ``custom-monitor``; see
    ``docs/hazards.md``). Nothing about the domain changes.
    """
    from ._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"advise() needs a statecapture Domain, got {type(dom).__name__}")
    if needs is None:
        needs = Needs()
    elif not isinstance(needs, Needs):
        raise UsageError(f"advise() needs a Needs value, got {type(needs).__name__}")
    caps = probe_domain(dom)
    facts = gather_facts(dom)
    judged = []
    for order, (method, row) in enumerate(GUIDE.items()):
        downtime = _downtime(method, facts, needs)
        verdicts = _verdicts(method, row, facts, needs, downtime)
        blockers, notes = _blockers(method, row, facts, caps, needs)
        unmet = sum(1 for v in verdicts if v.fit is Fit.POOR)
        partial = sum(1 for v in verdicts if v.fit is Fit.PARTIAL)
        key = (
            bool(blockers),
            unmet,
            _downtime_class(downtime),
            partial,
            row.discouraged is not None,
            downtime,
            order,
        )
        judged.append((key, method, row, verdicts, blockers, notes, downtime))
    judged.sort(key=lambda item: item[0])
    methods = tuple(
        MethodAdvice(
            method=method,
            rank=rank,
            summary=row.summary,
            apis=row.apis,
            verdicts=verdicts,
            blockers=blockers,
            downtime=downtime,
            notes=notes,
        )
        for rank, (_key, method, row, verdicts, blockers, notes, downtime) in enumerate(
            judged, start=1
        )
    )
    return Advice(dom.name, needs, facts, caps, methods)
