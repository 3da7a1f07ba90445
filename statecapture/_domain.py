"""Live domain handles: :class:`Domain`."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import attrs
from lxml import etree

from ._enums import DomainState, ShutdownMode
from ._events import EventKind
from ._ports import DomainPort
from .errors import (
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    UsageError,
)
from .xml import Disk, DomainXML

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable  # backup

    from ._backup import BackupJob, BackupStart  # backup
    from ._backup_plan import BackupPlan  # backup plan
    from ._blockjob import BlockJob
    from ._capabilities import Capabilities  # advisor
    from ._checkpoint import CheckpointCollection  # checkpoints
    from ._connection import Connection
    from ._freeze import Filesystem  # freeze
    from ._memory import ManagedSaveResult, SaveImage
    from ._snapshot import SnapshotCollection  # snapshots
    from .xml import BackupMode, CheckpointXML  # backup

__all__ = ["Domain"]

#: What libvirt's refusal to undefine mentions → the keyword argument that allows it.
_UNDEFINE_HINTS = {
    "checkpoint": (
        "pass undefine(checkpoints_metadata=True) to drop the checkpoint metadata with the "
        "definition (the dirty bitmaps stay in the qcow2 images: delete the checkpoints "
        "first to remove those too)"
    ),
    "snapshot": (
        "pass undefine(snapshots_metadata=True) to drop the snapshot metadata with the "
        "definition (the snapshot data in the images and overlay files stays)"
    ),
    "managed save": "pass undefine(managed_save=True) to remove the managed-save image too",
    "nvram": "pass undefine(nvram=True) to remove the NVRAM file too",
}


@attrs.define(eq=False)
class Domain:
    """A live handle on one libvirt domain. Get one from :meth:`Connection.domain`.

    Properties query libvirt each time (nothing is cached but the name and UUID), so a
    handle always shows the domain as it is now. Two handles on the same domain are
    different objects; compare :attr:`uuid` to tell whether they name the same domain.

    Thread safety: a handle may be used from several threads at once (see
    :class:`Connection`); statecapture serializes per domain the operations QEMU/libvirt
    cannot overlap (checkpoint changes and a backup job's start and end, hazard 21). What one
    thread read may be stale when it acts: a checkpoint listed by one thread may be deleted
    by another (:class:`NotFoundError`).
    """

    connection: Connection
    """The connection this handle belongs to."""
    _port: DomainPort = attrs.field(repr=False)
    name: str
    """The domain's name."""
    uuid: str
    """The domain's UUID (the stable identity)."""

    @classmethod
    def _from_port(cls, conn: Connection, port: DomainPort) -> Domain:
        return cls(conn, port, port.name, port.uuid())

    @property
    def port(self) -> DomainPort:
        """The typed libvirt port this handle talks through (advanced use).

        One method per libvirt call (``fs_freeze``, ``backup_begin``, ``snapshot_create``
        ...), keyword arguments in, typed values out, statecapture's errors only. It is
        ``statecapture._ports.DomainPort``, composed of narrow capability ports; its
        methods may change between releases. statecapture's own modules act through it,
        and :mod:`statecapture.testing.faults` puts a pass-through in front of it to inject
        failures and record calls.
        """
        return self._port

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> DomainState:
        """The current run state."""
        return DomainState(self._port.state()[0])

    @property
    def is_active(self) -> bool:
        """Whether the domain is running or paused (has a live hypervisor process)."""
        return self._port.is_active()

    @property
    def is_persistent(self) -> bool:
        """Whether the domain has a persistent definition (survives being stopped)."""
        return self._port.is_persistent()

    @property
    def definition(self) -> DomainXML:
        """The live definition (the inactive one when the domain is not running)."""
        return DomainXML.from_xml(self._port.xml_desc())

    @property
    def inactive_definition(self) -> DomainXML:
        """The persistent definition used at the next start."""
        return DomainXML.from_xml(self._port.xml_desc(inactive=True))

    def xml(self, *, inactive: bool = False, secure: bool = False) -> str:
        """The domain's XML document as libvirt returns it (no parsing, nothing dropped).

        The live document by default (with runtime details such as device aliases and the
        agent channel's state), the persistent one with ``inactive``; ``secure`` includes
        security-sensitive values (passwords), which needs a read-write connection.
        :attr:`definition` is the same document parsed.
        """
        return self._port.xml_desc(inactive=inactive, secure=secure)

    def metadata(self, namespace_uri: str) -> str | None:
        """The custom metadata element stored under ``namespace_uri``, or ``None``.

        libvirt keeps one element per namespace in ``<metadata>``; statecapture itself uses
        ``urn:x-statecapture:journal:2`` (the crash record of a run: a sequence or a backup
        job) and ``urn:x-statecapture:boot:1`` (the record of a domain made by
        ``Repository.boot``). ``recover()`` also reads what an older statecapture left in
        ``urn:x-statecapture:journal:1`` and ``urn:x-statecapture:backup:1``.
        """
        return self._port.get_metadata(namespace_uri)

    def set_metadata(self, namespace_uri: str, key: str, xml: str | None) -> None:
        """Store ``xml`` (one element) under ``namespace_uri`` with prefix ``key``, in the live
        and the persistent definition; ``None`` removes the element.

        Writing statecapture's own namespaces (see :meth:`metadata`) replaces its crash
        record; recovery then acts on what was written. Raises :class:`UsageError`
        when ``key`` is not an XML name or ``xml`` is not one well-formed element, before
        anything is written.
        """
        if not namespace_uri:
            raise UsageError("namespace_uri must not be empty")
        if not key.isidentifier():
            raise UsageError(f"metadata key {key!r} is not an XML name prefix")
        if xml is not None:
            try:
                etree.fromstring(xml.encode())
            except etree.XMLSyntaxError as exc:
                raise UsageError(f"metadata is not one well-formed XML element: {exc}") from None
        self._port.set_metadata(namespace_uri, key, xml)

    @property
    def disks(self) -> tuple[Disk, ...]:
        """The domain's disks (cdroms and floppies included; filter on ``device``)."""
        return self.definition.disks

    def disk(self, target: str) -> Disk:
        """The disk with guest target ``target`` (``vda``); :class:`NotFoundError` if none."""
        definition = self.definition
        try:
            return definition.disk(target)
        except KeyError:
            known = ", ".join(d.target for d in definition.disks) or "none"
            raise NotFoundError(
                f"domain {self.name!r} has no disk {target!r} (disks: {known})",
                operation="look up disk",
                domain_name=self.name,
            ) from None

    @property
    def has_agent_channel(self) -> bool:
        """Whether the definition has a guest-agent channel (not whether an agent answers)."""
        return self.definition.has_agent_channel

    # ------------------------------------------------------------------ lifecycle
    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None:
        """Start the domain.

        A domain with a managed-save image resumes from it unless ``force_boot`` is set
        (which discards the image). ``paused`` leaves the vCPUs stopped.
        """
        self._port.start(paused=paused, bypass_cache=bypass_cache, force_boot=force_boot)

    def shutdown(
        self, *, mode: ShutdownMode = ShutdownMode.DEFAULT, timeout: float | None = None
    ) -> None:
        """Ask the guest to power off; with ``timeout``, wait until it is shut off.

        Raises :class:`OperationTimeoutError` when the guest is still running after
        ``timeout`` seconds (the request stays in effect; call :meth:`destroy` to force).
        An agent shutdown whose reply is lost because qemu-ga exited first ("End of file
        from agent socket", seen under load) counts as sent when ``timeout`` is given: the
        wait for the shut-off state then decides.
        """
        agent = {ShutdownMode.DEFAULT: None, ShutdownMode.AGENT: True, ShutdownMode.ACPI: False}[
            ShutdownMode(mode)
        ]
        try:
            self._port.shutdown(agent=agent)
        except LibvirtError as exc:
            eof = "end of file from agent" in str(exc).lower()
            if not (eof and agent is not False and timeout is not None):
                raise
        if timeout is not None:
            self.wait_for_state(DomainState.SHUTOFF, timeout=timeout)

    def destroy(self, *, graceful: bool = False) -> None:
        """Stop the domain at once (power cut). ``graceful`` refuses to kill a stuck process."""
        self._port.destroy(graceful=graceful)

    def suspend(self) -> None:
        """Pause the vCPUs; the domain stays active."""
        self._require_active("suspend")
        self._port.suspend()

    def resume(self) -> None:
        """Resume paused vCPUs; :class:`InvalidStateError` when the domain is not paused."""
        state = self.state
        if state is not DomainState.PAUSED:
            raise InvalidStateError(
                f"resume needs a paused domain; {self.name!r} is {state.value}",
                operation="resume",
                domain_name=self.name,
            )
        self._port.resume()

    def undefine(
        self,
        *,
        managed_save: bool = False,
        snapshots_metadata: bool = False,
        checkpoints_metadata: bool = False,
        nvram: bool = False,
    ) -> None:
        """Remove the persistent definition (a running domain becomes transient).

        libvirt refuses while managed-save images, snapshot or checkpoint metadata exist
        unless the matching flag asks to remove those too; the error then names the flag.
        """
        try:
            self._port.undefine(
                managed_save=managed_save,
                snapshots_metadata=snapshots_metadata,
                checkpoints_metadata=checkpoints_metadata,
                nvram=nvram,
            )
        except LibvirtError as exc:
            said = (exc.libvirt_message or "").lower()
            asked = {
                "checkpoint": checkpoints_metadata,
                "snapshot": snapshots_metadata,
                "managed save": managed_save,
                "nvram": nvram,
            }
            for word, hint in _UNDEFINE_HINTS.items():
                if word in said and not asked[word] and exc.args:
                    exc.args = (f"{exc.args[0]}; {hint}", *exc.args[1:])
                    break
            raise

    def wait_for_state(self, *states: DomainState, timeout: float) -> DomainState:
        """Block until the domain is in one of ``states``; returns the state reached."""
        if not states:
            raise UsageError("wait_for_state() needs at least one state")
        with self.connection.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=self.uuid) as exp:
            deadline = time.monotonic() + timeout
            while True:
                current = self.state
                if current in states:
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OperationTimeoutError(
                        f"domain {self.name!r} is {current.value}, not "
                        f"{'/'.join(s.value for s in states)}, after {timeout} s",
                        operation="wait for state",
                        domain_name=self.name,
                    )
                # Wake on the next lifecycle event, or re-check every 0.5 s regardless.
                with contextlib.suppress(OperationTimeoutError):
                    exp.wait(min(remaining, 0.5))

    def _require_active(self, operation: str) -> None:
        if not self.is_active:
            raise InvalidStateError(
                f"{operation} needs a running domain; {self.name!r} is {self.state.value}",
                operation=operation,
                domain_name=self.name,
            )

    # ------------------------------------------------------ memory state (_memory.py)
    def managed_save(
        self, *, bypass_cache: bool = False, running: bool | None = None
    ) -> ManagedSaveResult:
        """Save the guest's memory into an image libvirt manages, then stop the domain.

        The next :meth:`start` resumes the guest from the image (and deletes it); ``start(
        force_boot=True)`` or :meth:`remove_managed_save` discards it. ``running`` sets the
        state after that start: ``True`` running, ``False`` paused, ``None`` as it was.
        ``bypass_cache`` writes without filling the host's page cache.

        This is not a rollback mechanism: the image is only valid while the disks stay
        unchanged, and starting consumes it. Use :meth:`save` with disk copies for that.

        Raises :class:`InvalidStateError` for an inactive or a transient domain (nothing
        happens then). If the save fails, the domain keeps running. Returns a
        :class:`ManagedSaveResult` with the measured downtime.
        """
        from . import _memory

        return _memory.managed_save(self, bypass_cache=bypass_cache, running=running)

    @property
    def has_managed_save(self) -> bool:
        """Whether a managed save image exists (the next :meth:`start` resumes from it)."""
        from . import _memory

        return _memory.has_managed_save(self)

    def remove_managed_save(self) -> None:
        """Delete the managed save image, so the next :meth:`start` boots afresh.

        Raises :class:`NotFoundError` when there is none.
        """
        from . import _memory

        _memory.remove_managed_save(self)

    @property
    def managed_save_definition(self) -> DomainXML:
        """The definition stored in the managed save image (used when :meth:`start` resumes).

        Raises :class:`NotFoundError` when there is no image, :class:`UnsupportedError` on
        drivers that cannot read it (the test driver).
        """
        from . import _memory

        return _memory.managed_save_definition(self)

    def redefine_managed_save(
        self, definition: DomainXML | str | None = None, *, running: bool | None = None
    ) -> None:
        """Replace the definition in the managed save image, its run state on start, or both.

        The definition must describe this domain (same name and UUID) and stay
        ABI-compatible with the saved guest. Raises :class:`NotFoundError` when there is no
        image, :class:`UnsupportedError` where the driver cannot (the test driver).
        """
        from . import _memory

        _memory.redefine_managed_save(self, definition, running=running)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        running: bool | None = None,
        definition: DomainXML | str | None = None,
        bypass_cache: bool = False,
    ) -> SaveImage:
        """Save the guest's memory to ``path`` (a file you own), then stop the domain.

        Returns a :class:`SaveImage`; its :attr:`~SaveImage.result` holds the measured
        downtime. Restore with :meth:`SaveImage.restore` or :meth:`Connection.restore`.
        ``running`` sets the state after a restore (``True`` running, ``False`` paused,
        ``None`` as it was); ``definition`` stores an alternative (ABI-compatible)
        definition in the image.

        The file is created owner-only (0600). An existing file raises
        :class:`TargetExistsError` (also a ``FileExistsError``) unless ``overwrite=True``,
        which replaces it only once the new image is complete. Everything is checked before
        the guest is touched; if the save fails, the domain keeps running and no partial
        file is left. Uses ``virDomainSaveParams`` on libvirt >= 8.4.
        """
        from . import _memory

        return _memory.save(
            self,
            path,
            overwrite=overwrite,
            running=running,
            definition=definition,
            bypass_cache=bypass_cache,
        )

    # ------------------------------------------------------------------ snapshots (_snapshot/)
    @property
    def snapshots(self) -> SnapshotCollection:
        """The domain's snapshots: ``create()``, ``list()``, ``roots()``, ``current``,
        ``dom.snapshots["name"]``, ``"name" in``, ``len()`` (see :class:`SnapshotCollection`)."""
        from ._snapshot import SnapshotCollection

        return SnapshotCollection(self)

    # ------------------------------------------------------ guest agent, freeze (_freeze/)
    @property
    def agent_connected(self) -> bool:
        """Whether the domain runs and its guest agent is connected.

        Read from the live definition (the agent channel's ``state``), so no agent command
        is sent. ``False`` without an agent channel. Drivers that do not report the channel
        state (the test driver) count a defined channel of a running domain as connected.
        """
        from ._agent import agent_connected

        return agent_connected(self)

    def wait_for_agent(self, timeout: float) -> float:
        """Block until the guest agent is connected; returns the seconds waited.

        Driven by the agent-lifecycle event (subscribed before looking, so a connect is
        never missed), and done only once the agent answers a command (``guest-get-time``,
        which adds no taint): a process that has just opened an embedded driver sees the
        channel "connected" while the driver is still reconnecting to the agent. Right after
        a boot the agent is not connected yet; freezing before it is raises
        :class:`GuestAgentError`. Raises :class:`OperationTimeoutError` after
        ``timeout`` seconds, :class:`GuestAgentError` when the domain has no agent channel,
        and :class:`InvalidStateError` when the domain is not (or stops) running.
        """
        from ._freeze import wait_for_agent

        return wait_for_agent(self, timeout)

    def fs_info(self) -> tuple[Filesystem, ...]:
        """The guest's mounted filesystems, sorted by mount point, from the guest agent.

        Raises :class:`GuestAgentError` when the agent is missing or not connected, and
        :class:`InvalidStateError` when the domain is not running or its filesystems are
        frozen (the agent refuses to list them while frozen).
        """
        from ._freeze import fs_info

        return fs_info(self)

    def fs_freeze_status(self) -> str:
        """The guest agent's view: ``"frozen"`` or ``"thawed"`` (``guest-fsfreeze-status``).

        libvirt has no API for it, so the command is passed through to the agent (libvirt
        marks the domain tainted with ``custom-ga-command``, which is harmless). Raises
        :class:`GuestAgentError` when the agent is missing or does not answer.
        """
        return self._port.fs_freeze_status()

    def fs_thaw(self) -> int:
        """Thaw every frozen filesystem of the guest; returns how many thawed.

        The recovery for a guest left frozen (by a crashed process, or after a
        :class:`ThawError`); 0 means nothing was frozen. To freeze, use
        :func:`statecapture.fs_frozen`, which always thaws. Raises :class:`ThawError` when
        the thaw fails.
        """
        from ._freeze import fs_thaw

        return fs_thaw(self)

    # ------------------------------------------------------------------ block jobs (_blockjob/)
    def block_commit(
        self,
        disk: str,
        *,
        top: str | None = None,
        base: str | None = None,
        active: bool | None = None,
        shallow: bool = False,
        delete: bool = False,
        bandwidth: int | None = None,
    ) -> BlockJob:
        """Start merging a disk's upper layers down its backing chain (``virDomainBlockCommit``).

        ``top`` and ``base`` name layers by path or as ``vda[N]`` (libvirt's index from the
        live XML); ``top=None`` is the active layer, ``base=None`` the bottom of the chain
        (``shallow=True``: the layer right below ``top``). Committing the active layer is an
        *active commit* (chosen automatically; ``active`` only double-checks): the job then
        becomes ready and ends with :meth:`BlockJob.pivot` (guest moves to ``base``) or
        :meth:`BlockJob.abort` (guest stays on the overlay). A commit below the active layer
        ends by itself (:meth:`BlockJob.wait`). ``delete`` removes the committed images
        afterwards; ``bandwidth`` limits the job in bytes per second.

        Raises :class:`NotFoundError` (unknown disk), :class:`InvalidStateError` (domain not
        running, no backing image, a job already running on the disk) before libvirt is
        asked.
        """
        from ._blockjob import start_commit

        return start_commit(
            self,
            disk,
            top=top,
            base=base,
            active=active,
            shallow=shallow,
            delete=delete,
            bandwidth=bandwidth,
        )

    def block_copy(
        self,
        disk: str,
        destination: str | os.PathLike[str],
        *,
        format: str = "qcow2",
        shallow: bool = False,
        reuse_external: bool = False,
        synchronous_writes: bool = False,
        bandwidth: int | None = None,
    ) -> BlockJob:
        """Start mirroring a running disk to ``destination`` (``virDomainBlockCopy``).

        libvirt creates ``destination`` (owner-only, ``format`` ``qcow2`` or ``raw``) unless
        ``reuse_external`` asks to copy into an existing image; an existing file without it
        raises :class:`TargetExistsError` before anything starts. ``shallow`` copies only
        the active layer (the copy keeps the backing chain), ``synchronous_writes`` makes
        guest writes reach the destination before they complete. Persistent domains get a
        transient job (libvirt 9.0 requires it): the job is not resumed after a restart.

        The job becomes ready when the copy is in sync; then :meth:`BlockJob.pivot` moves
        the guest to the copy, :meth:`BlockJob.abort` leaves it on the original and keeps
        the copy (consistent to the moment of the abort). For several disks at one instant
        use :func:`statecapture.consistent_copy`.
        """
        from ._blockjob import start_copy

        return start_copy(
            self,
            disk,
            destination,
            format=format,
            shallow=shallow,
            reuse_external=reuse_external,
            synchronous_writes=synchronous_writes,
            bandwidth=bandwidth,
        )

    def block_pull(self, disk: str, *, bandwidth: int | None = None) -> BlockJob:
        """Start copying a running disk's whole backing chain into its top image
        (``virDomainBlockPull``); afterwards the disk no longer needs its backing files.

        The job ends by itself (:meth:`BlockJob.wait`); :meth:`BlockJob.progress` reports
        how far it is. Leaving the handle's ``with`` block early aborts it (the top image
        keeps what was pulled and still needs its backing files). Raises
        :class:`NotFoundError` (unknown disk) or :class:`InvalidStateError` (domain not
        running, no backing image, a job already running on the disk) before libvirt is
        asked.
        """
        from ._blockjob import start_pull

        return start_pull(self, disk, bandwidth=bandwidth)

    def block_jobs(self) -> tuple[BlockJob, ...]:
        """The block jobs running on this domain now, one handle per disk with a job.

        Works on a fresh connection too (e.g. after a reconnect): readiness of a mirror
        started elsewhere is read from the live XML's ``<mirror ready='yes'>``. Handles
        returned here do not own their jobs: leaving their ``with`` block still aborts.
        """
        from ._blockjob import running_jobs

        return running_jobs(self)

    # ------------------------------------------------------ checkpoints, backup (_backup.py)
    # checkpoints
    @property
    def checkpoints(self) -> CheckpointCollection:
        """The domain's checkpoints: ``create()``, ``list()``, ``dom.checkpoints["c1"]`` ...

        A checkpoint tracks the blocks written since it was made (one qcow2 dirty bitmap per
        disk), the base of incremental backups. See :class:`CheckpointCollection`.
        """
        from ._checkpoint import CheckpointCollection

        return CheckpointCollection(self)

    # backup
    def backup(
        self,
        *,
        mode: BackupMode | str = "push",
        disks: Iterable[str] | None = None,
        incremental_from: str | None = None,
        checkpoint: str | CheckpointXML | None = None,
        target_dir: str | os.PathLike[str] | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        plan: BackupPlan | None = None,
    ) -> BackupJob:
        """Start a backup job of the running domain's disks; returns a :class:`BackupJob`.

        ``mode="push"``: QEMU writes ``<domain>.<disk>.<label>.qcow2`` into ``target_dir``
        (required); call :meth:`BackupJob.wait`. ``mode="pull"``: QEMU serves the disks over
        NBD on ``socket`` (default: a private socket) with scratch files in ``scratch_dir``
        (default: a private directory); call :meth:`BackupJob.download`. The label is the
        name of ``checkpoint`` — a checkpoint created atomically with the job's start,
        tracking exactly the disks backed up — or a time stamp.

        ``disks`` (default: every writable disk) chooses disks by target. With
        ``incremental_from`` only blocks changed since that checkpoint are copied; disks
        without a bitmap in it (added later) are copied in full, the rest incrementally.

        Refused before anything changes: a second job (:class:`InvalidStateError`; one
        backup job per domain), a driver without backups such as the test driver
        (:class:`UnsupportedError`, naming the missing API), an existing file
        (:class:`TargetExistsError`), an unknown disk or checkpoint (:class:`NotFoundError`).
        Use the job as a context manager so it always ends.

        ``plan=`` executes a :class:`BackupPlan` made by :meth:`backup_plan` (pass no other
        argument then); without it the job is planned and executed in one call.
        """
        from ._backup import begin_backup

        return begin_backup(
            self,
            plan=plan,
            mode=mode,
            disks=disks,
            incremental_from=incremental_from,
            checkpoint=checkpoint,
            target_dir=target_dir,
            scratch_dir=scratch_dir,
            socket=socket,
        )

    def backup_start(
        self,
        plan: BackupPlan | None = None,
        *,
        mode: BackupMode | str = "push",
        disks: Iterable[str] | None = None,
        incremental_from: str | None = None,
        checkpoint: str | CheckpointXML | None = None,
        target_dir: str | os.PathLike[str] | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
    ) -> BackupStart:
        """A backup job's start split around its capture call, for your own freeze.

        :meth:`backup` does all of this in one call; to freeze the guest yourself, freeze
        only the capture call::

            with dom.backup_start(plan) as start:   # checks, record, directories, lock
                with fs_frozen(dom):
                    start.begin()                   # virDomainBackupBegin, nothing else
            job = start.job                         # read back after the thaw

        Takes a :class:`BackupPlan` (from :meth:`backup_plan`; re-checked on entering) or
        the arguments of :meth:`backup`, with the same errors. Leaving the block by an
        exception, or without :meth:`BackupStart.begin`, undoes everything it did.
        """
        from ._backup import start_backup

        return start_backup(
            self,
            plan=plan,
            mode=mode,
            disks=disks,
            incremental_from=incremental_from,
            checkpoint=checkpoint,
            target_dir=target_dir,
            scratch_dir=scratch_dir,
            socket=socket,
        )

    def backup_plan(
        self,
        *,
        mode: BackupMode | str = "push",
        disks: Iterable[str] | None = None,
        incremental_from: str | None = None,
        checkpoint: str | CheckpointXML | None = None,
        target_dir: str | os.PathLike[str] | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
    ) -> BackupPlan:
        """What :meth:`backup` with these arguments would do, as a :class:`BackupPlan`.

        A dry run: the arguments are checked as :meth:`backup` checks them (the same errors)
        and nothing changes. ``print(plan)`` shows the disks, modes, file names, checkpoint
        and what a failure would undo; ``dom.backup(plan=plan)`` executes it.
        """
        from ._backup_plan import plan_backup

        return plan_backup(
            self,
            mode=mode,
            disks=disks,
            incremental_from=incremental_from,
            checkpoint=checkpoint,
            target_dir=target_dir,
            scratch_dir=scratch_dir,
            socket=socket,
        )

    def active_backup(self) -> BackupJob | None:  # backup
        """The domain's running backup job, or ``None`` — also one another process started.

        After a crash, a kill or a reconnect, a leftover job blocks new jobs; end it with
        ``dom.active_backup().end()``: that waits for ``JOB_COMPLETED`` and removes the
        checkpoint and files the interrupted run recorded (it never delivered them).
        """
        from ._backup import active_backup

        return active_backup(self)

    # ------------------------------------------------------------- capabilities (_capabilities.py)
    def capabilities(self) -> Capabilities:
        """What this driver and daemon version can do for this domain, probed.

        Every answer comes from asking libvirt in a way that cannot change anything (an API
        called with an undefined flag, a read-only query) or from a version gate on the
        daemon; each :class:`Capability` says which, in its ``reason``.
        """
        from ._capabilities import probe_domain

        return probe_domain(self)

    # ------------------------------------------------------------------ notebook view
    def _repr_html_(self) -> str:
        from ._html import domain_html

        return domain_html(self)
