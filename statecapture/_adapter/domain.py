"""The domain: ``virDomain`` behind :class:`VirDomain` (a
:class:`~statecapture._ports.DomainPort`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import libvirt

from .. import errors
from .._ports import (
    BlockJobInfo,
    CheckpointObjectPort,
    FilesystemInfo,
    JobStats,
    NodeBitmap,
    ProbeAnswer,
    SnapshotObjectPort,
)
from . import probe, qemu
from .objects import VirCheckpoint, VirSnapshot
from .translate import _const, _flags, call, lacks_api, listing, translate_error

if TYPE_CHECKING:
    from .connection import VirConnection

__all__ = ["VirDomain", "block_job_kind_name", "params_call", "save_flags"]

T = TypeVar("T")


def save_flags(*, running: bool | None, bypass_cache: bool = False) -> int:
    """``VIR_DOMAIN_SAVE_*`` flags: ``running`` None keeps the saved state."""
    flags = 0
    if running is True:
        flags |= libvirt.VIR_DOMAIN_SAVE_RUNNING
    elif running is False:
        flags |= libvirt.VIR_DOMAIN_SAVE_PAUSED
    if bypass_cache:
        flags |= libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
    return flags


def params_call(
    invoke: Callable[..., object],
    operation: str,
    api: Callable[..., object],
    path: str,
    dxml: str | None,
    flags: int,
) -> bool:
    """Save or restore through the typed-parameter ``api`` (``virDomainSaveParams``,
    ``virDomainRestoreParams``: libvirt >= 8.4) with ``invoke`` (a ``_call``); ``False``
    when the driver lacks it (nothing happened: use the ``…Flags`` API)."""
    params: dict[str, str] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: path}
    if dxml is not None:
        params[libvirt.VIR_DOMAIN_SAVE_PARAM_DXML] = dxml
    try:
        invoke(operation, api, params, flags)
    except errors.UnsupportedError as exc:
        if not lacks_api(exc):
            raise
        return False
    return True


# libvirt's virDomainBlockJobType, named; the integer never leaves this package.
_BLOCK_JOB_KINDS: Final = {
    0: "unknown",
    1: "pull",
    2: "copy",
    3: "commit",
    4: "active-commit",
    5: "backup",
}


def block_job_kind_name(type_code: int) -> str:
    """The ``BlockJobKind`` value for libvirt's job type (events carry the integer)."""
    return _BLOCK_JOB_KINDS.get(int(type_code), "unknown")


_STATE_NAMES: Final = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


class VirDomain:
    """Typed wrapper around ``virDomain``; raises statecapture errors only.

    It implements :class:`~statecapture._ports.DomainPort` (checked statically at the end
    of :mod:`statecapture._adapter`)."""

    def __init__(self, raw: Any, conn: VirConnection) -> None:
        self._raw = raw
        self.conn = conn
        self._name: str = str(raw.name())

    @property
    def name(self) -> str:
        return self._name

    def _call(self, operation: str, fn: Callable[..., T], *args: object) -> T:
        self.conn.check_open()
        return call(operation, fn, *args, domain_name=self._name, alive=self.conn.is_alive)

    def uuid(self) -> str:
        return str(self._call("get UUID", self._raw.UUIDString))

    def state(self) -> tuple[str, int]:
        """(state name, reason code)."""
        state, reason = self._call("get state", self._raw.state, 0)
        return _STATE_NAMES.get(int(state), "nostate"), int(reason)

    def is_active(self) -> bool:
        return bool(self._call("get active", self._raw.isActive))

    def is_persistent(self) -> bool:
        return bool(self._call("get persistent", self._raw.isPersistent))

    def xml_desc(self, *, inactive: bool = False, secure: bool = False) -> str:
        flags = _flags(
            (inactive, libvirt.VIR_DOMAIN_XML_INACTIVE),
            (secure, libvirt.VIR_DOMAIN_XML_SECURE),
        )
        return str(self._call("get XML", self._raw.XMLDesc, flags))

    # ---- lifecycle
    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None:
        flags = _flags(
            (paused, libvirt.VIR_DOMAIN_START_PAUSED),
            (bypass_cache, libvirt.VIR_DOMAIN_START_BYPASS_CACHE),
            (force_boot, libvirt.VIR_DOMAIN_START_FORCE_BOOT),
        )
        self._call("start", self._raw.createWithFlags, flags)

    def shutdown(self, *, agent: bool | None = None) -> None:
        if agent is None:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_DEFAULT
        elif agent:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
        else:
            flags = libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        self._call("shutdown", self._raw.shutdownFlags, flags)

    def destroy(self, *, graceful: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0
        self._call("destroy", self._raw.destroyFlags, flags)

    def suspend(self) -> None:
        self._call("suspend", self._raw.suspend)

    def resume(self) -> None:
        self._call("resume", self._raw.resume)

    def undefine(
        self,
        *,
        managed_save: bool = False,
        snapshots_metadata: bool = False,
        checkpoints_metadata: bool = False,
        nvram: bool = False,
    ) -> None:
        flags = _flags(
            (managed_save, libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE),
            (snapshots_metadata, libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA),
            (checkpoints_metadata, _const("VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 16)),
            (nvram, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM),
        )
        self._call("undefine", self._raw.undefineFlags, flags)

    # ---- memory state (managed save, save/restore)
    def save(
        self,
        path: str,
        *,
        dxml: str | None = None,
        running: bool | None = None,
        bypass_cache: bool = False,
        use_params: bool = True,
    ) -> str:
        """Save memory to ``path`` and stop the domain; returns the libvirt API that did it.

        ``use_params`` tries ``virDomainSaveParams`` (libvirt >= 8.4) first and falls back
        to ``virDomainSaveFlags`` when the driver lacks it (nothing happened then).
        """
        flags = save_flags(running=running, bypass_cache=bypass_cache)
        if use_params and params_call(self._call, "save", self._raw.saveParams, path, dxml, flags):
            return "virDomainSaveParams"
        self._call("save", self._raw.saveFlags, path, dxml, flags)
        return "virDomainSaveFlags"

    def managed_save(self, *, running: bool | None = None, bypass_cache: bool = False) -> None:
        flags = save_flags(running=running, bypass_cache=bypass_cache)
        self._call("managed save", self._raw.managedSave, flags)

    def has_managed_save(self) -> bool:
        return bool(self._call("check managed save", self._raw.hasManagedSaveImage, 0))

    def managed_save_remove(self) -> None:
        self._call("remove managed save", self._raw.managedSaveRemove, 0)

    def managed_save_xml(self, *, secure: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE if secure else 0
        return str(self._call("read managed save image", self._raw.managedSaveGetXMLDesc, flags))

    def managed_save_define(self, dxml: str, *, running: bool | None = None) -> None:
        if not isinstance(dxml, str):  # the binding crashes on None
            raise errors.UsageError("managed_save_define() needs the XML text")
        flags = save_flags(running=running)
        self._call("redefine managed save image", self._raw.managedSaveDefineXML, dxml, flags)

    def shut_off_by_save(self) -> bool:
        """Whether the domain is shut off because its memory was saved (reason SAVED)."""
        state, reason = self._call("get state", self._raw.state, 0)
        return bool(
            state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_SAVED
        )

    # ---- snapshots
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
    ) -> VirSnapshot:
        """``virDomainSnapshotCreateXML`` with flags built from keywords."""
        flags = _flags(
            (disk_only, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY),
            (quiesce, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE),
            (atomic, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC),
            (live, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE),
            (no_metadata, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA),
            (redefine, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE),
            (current, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT),
            (validate, _const("VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE", 512)),
        )
        operation = "snapshot redefine" if redefine else "snapshot create"
        raw = self._call(operation, self._raw.snapshotCreateXML, xml, flags)
        return VirSnapshot(raw, self)

    def snapshot_lookup(self, name: str) -> VirSnapshot:
        raw = self._call("look up snapshot", self._raw.snapshotLookupByName, name, 0)
        return VirSnapshot(raw, self)

    def snapshot_list(
        self,
        *,
        roots: bool = False,
        leaves: bool | None = None,
        external: bool | None = None,
        disk_only: bool | None = None,
        topological: bool = False,
    ) -> list[SnapshotObjectPort]:
        """``virDomainListAllSnapshots``; ``None`` filters do not filter."""
        flags = 0
        if roots:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS
        if leaves is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES
        elif leaves is False:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_NO_LEAVES
        if external is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL
        elif external is False:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_INTERNAL
        if disk_only is True:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DISK_ONLY
        elif disk_only is False:
            flags |= (
                libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ACTIVE | libvirt.VIR_DOMAIN_SNAPSHOT_LIST_INACTIVE
            )
        if topological:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
        raws = self._call("list snapshots", self._raw.listAllSnapshots, flags)
        return [VirSnapshot(r, self) for r in raws]

    def snapshot_count(self) -> int:
        return int(self._call("count snapshots", self._raw.snapshotNum, 0))

    def snapshot_current(self) -> VirSnapshot | None:
        """The current snapshot, or ``None`` when there is none."""
        if not self._call("has current snapshot", self._raw.hasCurrentSnapshot, 0):
            return None
        self.conn.check_open()
        try:
            raw = self._raw.snapshotCurrent(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None  # deleted between the two calls
            raise translate_error(
                exc, "get current snapshot", domain_name=self._name, alive=self.conn.is_alive
            ) from exc
        return VirSnapshot(raw, self)

    def checkpoint_names(self) -> list[str]:
        """Names of the domain's checkpoints (each one means dirty bitmaps in its disks);
        empty when the driver has no checkpoints (no bitmaps to fear)."""
        return self.probe_listing("checkpoint") or []

    # ---- guest agent, freeze
    def fs_freeze(self, mountpoints: list[str] | None = None) -> int:
        """Freeze guest filesystems through the agent (all when ``mountpoints`` is None).

        Returns how many filesystems froze. libvirt before 11.2 reports an agent *timeout*
        as "agent unresponsive" (code 86) although the freeze may still happen in the guest.
        """
        mps = list(mountpoints) if mountpoints is not None else None
        return int(self._call("filesystem freeze", self._raw.fsFreeze, mps, 0))

    def fs_thaw(self) -> int:
        """Thaw every frozen guest filesystem; how many thawed (0 when none was frozen).

        Always thaws all: the QEMU driver refuses a mountpoint list for thaw.
        """
        return int(self._call("filesystem thaw", self._raw.fsThaw, None, 0))

    def fs_info(self) -> list[FilesystemInfo]:
        """(mountpoint, guest device name, fs type, disk targets) per guest filesystem.

        The binding's type hint claims ``str``; it returns a list of 4-tuples.
        """
        rows = self._call("get filesystem info", self._raw.fsInfo, 0)
        return [
            FilesystemInfo(str(mp), str(name), str(fstype), tuple(str(a) for a in (aliases or ())))
            for mp, name, fstype, aliases in rows
        ]

    def agent_time(self) -> float:
        """The guest's clock in seconds, read through the guest agent (``guest-get-time``).

        A cheap command that proves the agent answers, without the ``custom-ga-command``
        taint a passthrough ``guest-ping`` would add.
        """
        answer = self._call("get guest time", self._raw.getTime, 0)
        return float(answer["seconds"]) + float(answer.get("nseconds", 0)) / 1e9

    def set_agent_timeout(self, seconds: int | None) -> None:
        """Set the domain's agent response timeout; ``None`` restores libvirt's default."""
        if seconds is None:
            value = _const("VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT", -1)
        else:
            value = int(seconds)
        self._call("set agent response timeout", self._raw.agentSetResponseTimeout, value, 0)

    # ---- block jobs
    def block_job_info(self, disk: str) -> BlockJobInfo | None:
        """The job on ``disk`` (kind name, cur, end, bandwidth in bytes/s), or None."""
        info: Any = self._call(
            "get block job info",
            self._raw.blockJobInfo,
            disk,
            libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES,
        )
        # The binding's hint says str; it returns a dict, empty when no job runs (HAZARDS 18).
        if not info:
            return None
        return BlockJobInfo(
            block_job_kind_name(int(info.get("type", 0))),
            int(info.get("cur", 0)),
            int(info.get("end", 0)),
            int(info.get("bandwidth", 0)),
        )

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
    ) -> None:
        """``virDomainBlockCommit``; ``bandwidth`` in bytes per second (None: unlimited)."""
        flags = _flags(
            (active, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE),
            (shallow, libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW),
            (delete, libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE),
            (bandwidth, libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES),
        )
        self._call("block commit", self._raw.blockCommit, disk, base, top, bandwidth or 0, flags)

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
    ) -> None:
        """``virDomainBlockCopy`` to the ``<disk>`` in ``destination_xml``."""
        flags = _flags(
            (shallow, libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW),
            (reuse_external, libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT),
            (transient_job, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB),
            (synchronous_writes, _const("VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES", 8)),
        )
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
        self._call("block copy", self._raw.blockCopy, disk, destination_xml, params, flags)

    def block_pull(self, disk: str, *, bandwidth: int | None) -> None:
        """``virDomainBlockPull``: copy the whole backing chain into the top image of ``disk``."""
        flags = _flags((bandwidth, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES))
        self._call("block pull", self._raw.blockPull, disk, bandwidth or 0, flags)

    def block_job_abort(
        self, disk: str, *, pivot: bool = False, asynchronous: bool = False
    ) -> None:
        """``virDomainBlockJobAbort``: end the job on ``disk``, pivoting a ready mirror."""
        flags = _flags(
            (pivot, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            (asynchronous, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC),
        )
        operation = "block job pivot" if pivot else "block job abort"
        self._call(operation, self._raw.blockJobAbort, disk, flags)

    def block_job_set_speed(self, disk: str, bandwidth: int) -> None:
        """``virDomainBlockJobSetSpeed`` in bytes per second (0: unlimited)."""
        self._call(
            "set block job speed",
            self._raw.blockJobSetSpeed,
            disk,
            bandwidth,
            libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES,
        )

    # ---- checkpoints, backup, domain jobs
    # checkpoints: create/redefine, look up, list (handles: VirCheckpoint at the end)
    def checkpoint_create(
        self, xml: str, *, redefine: bool = False, validate: bool = False
    ) -> VirCheckpoint:
        """``virDomainCheckpointCreateXML``; ``validate`` (with ``redefine``) checks bitmaps."""
        flags = _flags(
            (redefine, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE),
            (validate, _const("VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE", 4)),
        )
        if validate:
            operation = "checkpoint validate"
        else:
            operation = "checkpoint redefine" if redefine else "checkpoint create"
        raw = self._call(operation, self._raw.checkpointCreateXML, xml, flags)
        return VirCheckpoint(raw, self)

    def checkpoint_lookup(self, name: str) -> VirCheckpoint:
        raw = self._call("look up checkpoint", self._raw.checkpointLookupByName, name, 0)
        return VirCheckpoint(raw, self)

    def list_checkpoints(
        self, *, roots: bool = False, topological: bool = False
    ) -> list[CheckpointObjectPort]:
        flags = _flags(
            (roots, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS),
            (topological, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL),
        )
        self.conn.check_open()
        raws = listing(
            "list checkpoints",
            self._raw.listAllCheckpoints,
            flags,
            domain_name=self._name,
            alive=self.conn.is_alive,
        )
        return [VirCheckpoint(r, self) for r in raws]

    # backup: begin / describe / end a backup job (libvirt has no BackupEnd: abortJob ends it)
    def backup_begin(
        self, backup_xml: str, checkpoint_xml: str | None, *, reuse_external: bool = False
    ) -> None:
        flags = _const("VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL", 1) if reuse_external else 0
        self._call("backup begin", self._raw.backupBegin, backup_xml, checkpoint_xml, flags)

    def backup_xml_desc(self) -> str | None:
        """The running backup job's ``<domainbackup>``, or ``None`` when no job runs."""
        self.conn.check_open()
        try:
            return str(self._raw.backupGetXMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _const("VIR_ERR_NO_DOMAIN_BACKUP", 104):
                return None
            raise translate_error(
                exc, "backup get XML", domain_name=self._name, alive=self.conn.is_alive
            ) from exc

    def backup_abort_job(self) -> None:
        """``virDomainAbortJob``: ends a pull backup, cancels a push backup."""
        self._call("abort job", self._raw.abortJob)

    def backup_job_stats(self, *, completed: bool = False) -> JobStats:
        """``virDomainGetJobStats`` (the binding's hint says str; it returns a dict)."""
        flags = _const("VIR_DOMAIN_JOB_STATS_COMPLETED", 1) if completed else 0
        stats: Any = self._call("get job stats", self._raw.jobStats, flags)
        return dict(stats)

    # ---- metadata (sequence journal)
    def get_metadata(self, namespace_uri: str, *, config: bool = False) -> str | None:
        """Our XML element stored under ``namespace_uri``, or ``None`` when there is none."""
        self.conn.check_open()
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else libvirt.VIR_DOMAIN_AFFECT_CURRENT
        try:
            return str(
                self._raw.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace_uri, flags)
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise translate_error(
                exc, "read metadata", domain_name=self._name, alive=self.conn.is_alive
            ) from exc

    def set_metadata(self, namespace_uri: str, key: str, xml: str | None) -> None:
        """Store (``None``: remove) our element in the live and persistent definitions."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CURRENT
        if self.is_active() and self.is_persistent():
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self._call(
            "write metadata",
            self._raw.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            xml,
            key if xml is not None else None,
            namespace_uri,
            flags,
        )

    # ---- sequences, recovery

    # ---- QEMU passthrough: agent, monitor, dirty bitmaps (see qemu.py)
    def fs_freeze_status(self, *, timeout: int = 5) -> str:
        """The guest agent's ``guest-fsfreeze-status``: ``"frozen"`` or ``"thawed"``.

        libvirt has no API for it; the command goes through ``qemuAgentCommand`` (libvirt
        marks the domain tainted with ``custom-ga-command``, harmless). Raises
        :class:`~statecapture.GuestAgentError` when the agent is missing or does not answer.
        """
        self.conn.check_open()
        return qemu.fs_freeze_status(self._raw, self._name, self.conn.is_alive, timeout)

    def agent_command(self, command: dict[str, Any], *, timeout: int = 10) -> Any:
        """Send one guest-agent command (a QMP-style dict) and return its ``"return"`` member.

        Goes through ``qemuAgentCommand`` (libvirt marks the domain tainted with
        ``custom-ga-command``, harmless for test guests). Every failure — agent not
        configured or connected, no answer within ``timeout`` seconds, or the agent's own
        error reply — raises :class:`~statecapture.GuestAgentError` with libvirt's message.
        """
        self.conn.check_open()
        return qemu.agent_command(self._raw, self._name, command, timeout)

    def hmp_command(self, command: str) -> str:
        """Run one QEMU human-monitor (HMP) command through ``qemuMonitorCommand``.

        For test support only (e.g. ``qemu-io -d <alias> "flush"`` to write QEMU's cached
        qcow2 metadata back before an outside process reads the image); libvirt marks the
        domain tainted with ``custom-monitor``.
        """
        self.conn.check_open()
        return qemu.hmp_command(self._raw, self._name, self.conn.is_alive, command)

    def block_dirty_bitmaps(self) -> list[NodeBitmap]:
        """Every dirty bitmap QEMU holds, on every block node (QMP
        ``query-named-block-nodes``, ``flat``), persistent or not, written to an image yet
        or not. The domain must run (:class:`~statecapture.InvalidStateError` otherwise);
        drivers without a QEMU monitor raise :class:`~statecapture.UnsupportedError`.
        """
        self.conn.check_open()
        nodes = qemu.qmp(
            self._raw,
            self._name,
            self.conn.is_alive,
            "query dirty bitmaps",
            "query-named-block-nodes",
            {"flat": True},
        )
        return qemu.node_bitmaps(nodes)

    def remove_block_dirty_bitmap(self, node: str, name: str) -> None:
        """Remove one dirty bitmap from a block node (QMP ``block-dirty-bitmap-remove``).

        A persistent bitmap is removed from the image as well. Only for bitmaps libvirt
        does not know (no checkpoint names them): libvirt's own go through checkpoint
        delete. :class:`~statecapture.NotFoundError` when the node or bitmap is not there.
        """
        self.conn.check_open()
        qemu.qmp(
            self._raw,
            self._name,
            self.conn.is_alive,
            "remove dirty bitmap",
            "block-dirty-bitmap-remove",
            {"node": node, "name": name},
        )

    # ---- capability probes (read-only; see probe.py)
    def probe_api(self, feature: str) -> ProbeAnswer:
        """Whether the driver implements the API behind ``feature`` (a domain-level one:
        ``save``, ``snapshot``, ``backup`` ...); connection-level ones are probed by
        :meth:`VirConnection.probe_api`."""
        self.conn.check_open()
        calls = probe.domain_calls(self._raw)
        if feature not in calls:
            return self.conn.probe_api(feature)
        api, fn = calls[feature]
        return probe.probe(api, fn, self.conn.is_alive)

    def probe_backup_job(self) -> tuple[bool, str | None]:
        """(backup API implemented, the running backup job's XML or ``None`` when idle).

        ``virDomainBackupGetXMLDesc`` answers NO_DOMAIN_BACKUP (104) when the driver supports
        backups but none runs, NO_SUPPORT when it has no backup support.
        """
        try:
            return True, self.backup_xml_desc()
        except errors.UnsupportedError:
            return False, None

    def probe_listing(self, kind: str) -> list[str] | None:
        """Names of the domain's ``snapshot``/``checkpoint`` objects; ``None``: unsupported."""
        self.conn.check_open()
        fn = self._raw.listAllSnapshots if kind == "snapshot" else self._raw.listAllCheckpoints
        try:
            found = listing(
                f"list {kind}s", fn, 0, domain_name=self._name, alive=self.conn.is_alive
            )
        except errors.UnsupportedError:
            return None
        return [str(o.getName()) for o in found]

    def probe_managed_save_image(self) -> bool | None:
        """Whether a managed-save image exists; ``None`` when the driver cannot say."""
        try:
            return self.has_managed_save()
        except errors.UnsupportedError:
            return None

    def probe_block_job(self, disk: str) -> bool | None:
        """Whether a block job runs on ``disk``; ``None`` when the driver cannot say (no
        block-job support, domain not running)."""
        self.conn.check_open()
        try:
            # The binding's hint says str; it returns a dict, empty when idle (HAZARDS 18).
            found: Any = call(
                "get block job info",
                self._raw.blockJobInfo,
                disk,
                0,
                domain_name=self._name,
                alive=self.conn.is_alive,
            )
        except (errors.UnsupportedError, errors.InvalidStateError):
            return None
        except errors.LibvirtError as exc:
            if exc.code == libvirt.VIR_ERR_INVALID_ARG:  # no such disk
                return None
            raise
        return bool(found)
