"""The typed ports statecapture talks to libvirt through (no libvirt import here).

A *port* is a :class:`typing.Protocol`: the calls one side of libvirt offers, with keyword
arguments instead of flag integers and typed values instead of the binding's loose ones.
:mod:`statecapture._adapter` implements them (``VirConnection``, ``VirDomain``,
``VirSnapshot``, ``VirCheckpoint``; mypy checks the conformance there); everything else
receives the port it needs:

* :class:`ConnectionPort` — one per :class:`~statecapture.Connection`;
* :class:`DomainPort` — one per :class:`~statecapture.Domain`, composed of narrow capability
  ports (:class:`DomainInfoPort` is in each): :class:`LifecyclePort`,
  :class:`MetadataPort`, :class:`MemoryPort`, :class:`SnapshotPort`,
  :class:`CheckpointPort`, :class:`BackupPort`, :class:`FreezePort`,
  :class:`BlockJobPort`, :class:`BitmapPort`, :class:`ProbePort`, :class:`GuestPort`.
  A concept module's function is annotated with the narrow one it uses;
* :class:`SnapshotObjectPort`, :class:`CheckpointObjectPort` — one libvirt snapshot or
  checkpoint object.

Every method raises statecapture's errors only (the adapter translates ``libvirtError`` in
one place). ``statecapture.testing.faults`` wraps a handle's port to inject failures and to
record the calls made through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

import attrs

if TYPE_CHECKING:
    from ._events import Event

__all__ = [
    "BackupPort",
    "BitmapPort",
    "BlockJobInfo",
    "BlockJobPort",
    "CheckpointObjectPort",
    "CheckpointPort",
    "ConnectionPort",
    "DomainInfoPort",
    "DomainPort",
    "FilesystemInfo",
    "FreezePort",
    "GuestPort",
    "JobStats",
    "LifecyclePort",
    "MemoryPort",
    "MetadataPort",
    "NodeBitmap",
    "ProbeAnswer",
    "ProbePort",
    "SnapshotObjectPort",
    "SnapshotPort",
]

# --------------------------------------------------------------------------- values

JobStats: TypeAlias = dict[str, int | float | str]
"""``virDomainGetJobStats`` / the JOB_COMPLETED event's statistics (typed parameters)."""


class BlockJobInfo(NamedTuple):
    """The block job running on one disk (``virDomainGetBlockJobInfo``)."""

    kind: str
    """A :class:`~statecapture.BlockJobKind` value (``"copy"``, ``"commit"`` ...)."""
    cur: int
    end: int
    bandwidth: int
    """Bytes per second (0: unlimited)."""


class FilesystemInfo(NamedTuple):
    """One guest filesystem as the agent reports it (``virDomainGetFSInfo``)."""

    mountpoint: str
    name: str
    """The guest's device name (``sda1``)."""
    fstype: str
    targets: tuple[str, ...]
    """The domain's disk targets backing it (``vda``)."""


class ProbeAnswer(NamedTuple):
    """Whether the driver implements an API: ``supported`` (``None``: cannot tell), and why."""

    supported: bool | None
    evidence: str


@attrs.frozen
class NodeBitmap:
    """One dirty bitmap as QEMU sees it (``query-named-block-nodes``)."""

    node: str
    """The block node holding it (libvirt 9.0 names them ``libvirt-<index>-format``)."""
    driver: str
    """The node's driver (``qcow2``, ``file`` ...)."""
    filename: str | None
    """The image the node opened, when QEMU reports it."""
    name: str
    persistent: bool
    """Whether QEMU writes it into the qcow2 image when it closes the image."""
    recording: bool
    busy: bool
    """In use by a job (a backup): it cannot be removed or changed now."""
    granularity: int
    count: int
    """Dirty bytes counted so far."""


# --------------------------------------------------------------------------- object ports


class SnapshotObjectPort(Protocol):
    """One ``virDomainSnapshot``."""

    @property
    def name(self) -> str: ...
    def xml_desc(self, *, secure: bool = False) -> str: ...
    def children(self, *, descendants: bool = False) -> list[SnapshotObjectPort]: ...
    def is_current(self) -> bool: ...
    def has_metadata(self) -> bool: ...
    def revert(
        self, *, running: bool = False, paused: bool = False, force: bool = False
    ) -> None: ...
    def delete(
        self, *, children: bool = False, children_only: bool = False, metadata_only: bool = False
    ) -> None: ...


class CheckpointObjectPort(Protocol):
    """One ``virDomainCheckpoint``."""

    @property
    def name(self) -> str: ...
    def xml_desc(self, *, size: bool = False, no_domain: bool = False) -> str: ...
    def children(self) -> list[CheckpointObjectPort]: ...
    def delete(self, *, children: bool = False, metadata_only: bool = False) -> None: ...


# --------------------------------------------------------------------------- domain ports


class DomainInfoPort(Protocol):
    """Identity and the live/persistent definition: part of every domain port."""

    @property
    def name(self) -> str: ...
    def uuid(self) -> str: ...
    def state(self) -> tuple[str, int]: ...
    def is_active(self) -> bool: ...
    def is_persistent(self) -> bool: ...
    def xml_desc(self, *, inactive: bool = False, secure: bool = False) -> str: ...


class LifecyclePort(DomainInfoPort, Protocol):
    """Start, stop, pause, undefine."""

    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None: ...
    def shutdown(self, *, agent: bool | None = None) -> None: ...
    def destroy(self, *, graceful: bool = False) -> None: ...
    def suspend(self) -> None: ...
    def resume(self) -> None: ...
    def undefine(
        self,
        *,
        managed_save: bool = False,
        snapshots_metadata: bool = False,
        checkpoints_metadata: bool = False,
        nvram: bool = False,
    ) -> None: ...


class MetadataPort(DomainInfoPort, Protocol):
    """Custom metadata elements (journal, backup record, fleet labels)."""

    def get_metadata(self, namespace_uri: str, *, config: bool = False) -> str | None: ...
    def set_metadata(self, namespace_uri: str, key: str, xml: str | None) -> None: ...


class MemoryPort(DomainInfoPort, Protocol):
    """Managed save and save (the connection restores: :class:`ConnectionPort`)."""

    def save(
        self,
        path: str,
        *,
        dxml: str | None = None,
        running: bool | None = None,
        bypass_cache: bool = False,
        use_params: bool = True,
    ) -> str: ...
    def managed_save(self, *, running: bool | None = None, bypass_cache: bool = False) -> None: ...
    def has_managed_save(self) -> bool: ...
    def managed_save_remove(self) -> None: ...
    def managed_save_xml(self, *, secure: bool = False) -> str: ...
    def managed_save_define(self, dxml: str, *, running: bool | None = None) -> None: ...
    def shut_off_by_save(self) -> bool: ...
    def resume(self) -> None: ...


class SnapshotPort(DomainInfoPort, Protocol):
    """Snapshots: create/redefine, look up, list."""

    def snapshot_create(
        self,
        xml: str,
        *,
        disk_only: bool = False,
        quiesce: bool = False,
        atomic: bool = False,
        live: bool = False,
        no_metadata: bool = False,
        redefine: bool = False,
        current: bool = False,
        validate: bool = False,
    ) -> SnapshotObjectPort: ...
    def snapshot_lookup(self, name: str) -> SnapshotObjectPort: ...
    def snapshot_list(
        self,
        *,
        roots: bool = False,
        leaves: bool | None = None,
        external: bool | None = None,
        disk_only: bool | None = None,
        topological: bool = False,
    ) -> list[SnapshotObjectPort]: ...
    def snapshot_count(self) -> int: ...
    def snapshot_current(self) -> SnapshotObjectPort | None: ...
    def checkpoint_names(self) -> list[str]: ...


class CheckpointPort(DomainInfoPort, Protocol):
    """Checkpoints: create/redefine/validate, look up, list."""

    def checkpoint_create(
        self, xml: str, *, redefine: bool = False, validate: bool = False
    ) -> CheckpointObjectPort: ...
    def checkpoint_lookup(self, name: str) -> CheckpointObjectPort: ...
    def list_checkpoints(
        self, *, roots: bool = False, topological: bool = False
    ) -> list[CheckpointObjectPort]: ...
    def checkpoint_names(self) -> list[str]: ...


class BackupPort(DomainInfoPort, Protocol):
    """Backup jobs (libvirt has no BackupEnd: ``abortJob`` ends one)."""

    def backup_begin(
        self, backup_xml: str, checkpoint_xml: str | None, *, reuse_external: bool = False
    ) -> None: ...
    def backup_xml_desc(self) -> str | None: ...
    def backup_abort_job(self) -> None: ...
    def backup_job_stats(self, *, completed: bool = False) -> JobStats: ...


class FreezePort(DomainInfoPort, Protocol):
    """Guest filesystem freeze and thaw through the agent."""

    def fs_freeze(self, mountpoints: list[str] | None = None) -> int: ...
    def fs_thaw(self) -> int: ...
    def fs_info(self) -> list[FilesystemInfo]: ...
    def fs_freeze_status(self, *, timeout: int = 5) -> str: ...


class BlockJobPort(DomainInfoPort, Protocol):
    """Block jobs: commit, copy, pull; query, abort/pivot, speed."""

    def block_job_info(self, disk: str) -> BlockJobInfo | None: ...
    def block_commit(
        self,
        disk: str,
        *,
        base: str | None,
        top: str | None,
        bandwidth: int | None,
        active: bool,
        shallow: bool,
        delete: bool,
    ) -> None: ...
    def block_copy(
        self,
        disk: str,
        destination_xml: str,
        *,
        bandwidth: int | None,
        shallow: bool,
        reuse_external: bool,
        transient_job: bool,
        synchronous_writes: bool,
    ) -> None: ...
    def block_pull(self, disk: str, *, bandwidth: int | None) -> None: ...
    def block_job_abort(
        self, disk: str, *, pivot: bool = False, asynchronous: bool = False
    ) -> None: ...
    def block_job_set_speed(self, disk: str, bandwidth: int) -> None: ...


class BitmapPort(DomainInfoPort, Protocol):
    """QEMU's live dirty bitmaps (monitor commands; see docs/hazards.md)."""

    def block_dirty_bitmaps(self) -> list[NodeBitmap]: ...
    def remove_block_dirty_bitmap(self, node: str, name: str) -> None: ...


class ProbePort(DomainInfoPort, Protocol):
    """Read-only capability probes on a domain: they never change anything and answer
    ``None`` (or ``False``) instead of raising when the driver lacks the API."""

    def probe_api(self, feature: str) -> ProbeAnswer: ...
    def probe_backup_job(self) -> tuple[bool, str | None]: ...
    def probe_listing(self, kind: str) -> list[str] | None: ...
    def probe_managed_save_image(self) -> bool | None: ...
    def probe_block_job(self, disk: str) -> bool | None: ...


class GuestPort(DomainInfoPort, Protocol):
    """Guest-agent and QEMU monitor passthrough (statecapture.testing)."""

    def agent_command(self, command: dict[str, Any], *, timeout: int = 10) -> Any:
        """The command's ``"return"`` member: JSON, whose shape the command decides."""
        ...

    def hmp_command(self, command: str) -> str: ...
    def set_agent_timeout(self, seconds: int | None) -> None: ...


class DomainPort(
    LifecyclePort,
    MetadataPort,
    MemoryPort,
    SnapshotPort,
    CheckpointPort,
    BackupPort,
    FreezePort,
    BlockJobPort,
    BitmapPort,
    ProbePort,
    GuestPort,
    Protocol,
):
    """Everything a :class:`~statecapture.Domain` does through libvirt."""


# --------------------------------------------------------------------------- connection port


class ConnectionPort(Protocol):
    """Everything a :class:`~statecapture.Connection` does through libvirt."""

    @property
    def uri(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def check_open(self) -> None: ...
    def close(self) -> None: ...
    def driver_type(self) -> str: ...
    def canonical_uri(self) -> str: ...
    def hostname(self) -> str: ...
    def daemon_version(self) -> int: ...
    def hypervisor_version(self) -> int: ...
    def is_alive(self) -> bool: ...
    def lookup_domain(self, name_or_uuid: str) -> DomainPort: ...
    def list_domains(self) -> list[DomainPort]: ...
    def define(self, xml: str, *, validate: bool = True) -> DomainPort: ...
    def create_transient(self, xml: str, *, paused: bool = False) -> DomainPort: ...
    def restore(
        self,
        path: str,
        *,
        dxml: str | None = None,
        running: bool | None = None,
        bypass_cache: bool = False,
        use_params: bool = True,
    ) -> str: ...
    def save_image_xml(self, path: str, *, secure: bool = False) -> str: ...
    def save_image_define(self, path: str, dxml: str, *, running: bool | None = None) -> None: ...
    def probe_api(self, feature: str) -> ProbeAnswer: ...
    def domain_capabilities_xml(self) -> str | None: ...
    def register_events(self, sink: Callable[[Event], None]) -> None: ...
