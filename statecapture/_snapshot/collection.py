"""The :class:`SnapshotCollection` of a domain (``Domain.snapshots``): queries, ``create``,
``plan`` and the planning behind them.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs

from .. import _locks
from .._agent import AgentState, agent_state
from .._hints import add_names_hint
from .._host import is_local_uri, writes_host_files
from ..errors import (
    GuestAgentError,
    InvalidStateError,
    NotFoundError,
    UsageError,
)
from ..xml import DomainXML
from ..xml._snapshot import (
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
)
from .handle import Snapshot
from .plan import (
    PathLike,
    SnapshotPlan,
    _abs_path,
    _check_file_name,
    _check_name,
    _check_target,
    _dirty_bitmap_problems,
    _owner_only,
    _Plan,
    _port,
    _refuse_bitmaps,
)

if TYPE_CHECKING:
    from .._domain import Domain


@attrs.frozen
class _Request:
    """A snapshot's arguments as :meth:`SnapshotCollection.create` and
    :meth:`SnapshotCollection.plan` take them (the defaults: none given)."""

    name: str | None = None
    disk_only: bool = False
    memory: SnapshotMemoryMode | PathLike | None = None
    external: bool | Mapping[str, PathLike | None] = False
    quiesce: bool = False
    atomic: bool = True
    live: bool = False
    description: str | None = None
    metadata: bool = True


@attrs.define(eq=False)
class SnapshotCollection:
    """The snapshots of one domain: ``dom.snapshots``.

    ``dom.snapshots["name"]`` looks one up (:class:`NotFoundError` when there is none; its
    message lists the snapshots that exist, or the closest names),
    ``"name" in dom.snapshots`` tests for one, ``len()`` counts them, iterating yields every
    snapshot with parents before children. :meth:`create` takes a new one after a preflight.
    """

    domain: Domain
    """The domain whose snapshots these are."""

    # ------------------------------------------------------------------ queries
    def list(
        self,
        *,
        leaves: bool | None = None,
        external: bool | None = None,
        disk_only: bool | None = None,
    ) -> tuple[Snapshot, ...]:
        """Every snapshot, parents before children, optionally filtered.

        ``leaves`` True/False keeps only snapshots without/with children; ``external``
        True/False keeps only external/internal ones; ``disk_only`` True/False keeps only
        disk-only snapshots of running domains / the others.
        """
        vir = _port(self.domain).snapshot_list(
            leaves=leaves, external=external, disk_only=disk_only, topological=True
        )
        return tuple(Snapshot._from_port(self.domain, v) for v in vir)

    def roots(self) -> tuple[Snapshot, ...]:
        """The snapshots without a parent."""
        vir = _port(self.domain).snapshot_list(roots=True)
        return tuple(Snapshot._from_port(self.domain, v) for v in vir)

    @property
    def current(self) -> Snapshot | None:
        """The current snapshot (parent of the next one), or ``None``."""
        vir = _port(self.domain).snapshot_current()
        return None if vir is None else Snapshot._from_port(self.domain, vir)

    def __getitem__(self, name: str) -> Snapshot:
        if not isinstance(name, str):
            raise UsageError(f"snapshots are looked up by name, got {name!r}")
        vir = _port(self.domain)
        try:
            found = vir.snapshot_lookup(name)
        except NotFoundError as exc:
            add_names_hint(exc, name, lambda: (s.name for s in vir.snapshot_list()), "snapshot")
            raise
        return Snapshot._from_port(self.domain, found)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            _port(self.domain).snapshot_lookup(name)
        except NotFoundError:
            return False
        return True

    def __len__(self) -> int:
        return _port(self.domain).snapshot_count()

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.list())

    # ------------------------------------------------------------------ changes
    def redefine(self, xml: str | SnapshotXML, *, current: bool = False) -> Snapshot:
        """Register a snapshot from its XML (e.g. one saved with ``definition.to_xml()``
        before a ``metadata_only`` delete, or carried over to another host).

        Nothing on disk changes: the images must already hold what the XML describes.
        ``current`` makes it the domain's current snapshot.
        """
        text = xml.to_xml() if isinstance(xml, SnapshotXML) else xml
        if not isinstance(text, str):
            raise UsageError(
                f"redefine() takes XML text or a SnapshotXML, got {type(xml).__name__}"
            )
        parsed = SnapshotXML.from_xml(text)
        if not parsed.name:
            raise UsageError("a redefined snapshot needs a <name>")
        vir = _port(self.domain).snapshot_create(text, redefine=True, current=current)
        return Snapshot._from_port(self.domain, vir)

    def create(
        self,
        name: str | None = None,
        *,
        disk_only: bool = False,
        memory: SnapshotMemoryMode | PathLike | None = None,
        external: bool | Mapping[str, PathLike | None] = False,
        quiesce: bool = False,
        atomic: bool = True,
        live: bool = False,
        description: str | None = None,
        metadata: bool = True,
        plan: SnapshotPlan | None = None,
    ) -> Snapshot:
        """Take a snapshot; returns its handle.

        What is captured:

        * default: an **internal** snapshot, with memory when the domain runs. With QEMU the
          guest is paused while memory and disks are saved into the qcow2 images: a lengthy
          downtime that grows with memory size (about 0.6 s for a 256 MiB TCG guest here).
        * ``disk_only=True``: an **external disk-only** snapshot. Quick: each disk's image is
          frozen and a new qcow2 overlay takes the writes (about 0.3 s here). Reverting to
          it later is like booting after a power cut, unless ``quiesce=True`` asked the guest
          agent to flush and freeze the file systems around the snapshot.
        * ``external=True``: an **external snapshot with memory** (disk-only on a shut-off
          domain). Memory is written the way a migration sends it, so the guest sees a
          migration-like downtime; ``live=True`` keeps the guest running while most memory is
          written and pauses it only at the end.

        ``external`` may instead map disk targets to overlay paths
        (``{"vda": "/images/vda.snap1", "vdb": None}``; ``None`` leaves that disk out).
        Unnamed overlays go next to each disk's current image as ``<image>.<name>``.
        ``memory`` chooses the memory part: a :class:`SnapshotMemoryMode`, or the path of
        the memory state file for an external snapshot (default
        ``<first image's directory>/<domain>.<name>.memory``).

        ``name`` defaults to the creation time in seconds (libvirt's convention).
        ``atomic`` makes a multi-disk snapshot all-or-nothing. ``metadata=False`` asks
        libvirt to forget the snapshot at once (the files stay; the handle then only knows
        the requested definition).

        Preflight, before anything changes (nothing is created when one fails):

        * :class:`UnsupportedError` for an internal snapshot while a disk holds persistent
          dirty bitmaps (see :meth:`Snapshot.revert`);
        * :class:`GuestAgentError` for ``quiesce=True`` without a connected guest agent;
        * :class:`TargetExistsError` when an overlay or memory file exists already, and
          :class:`UsageError` when its directory is missing or not writable;
        * :class:`UsageError` for contradicting arguments or a name already in use,
          :class:`InvalidStateError` when memory is asked of a shut-off domain.

        Files the snapshot creates on this host are made owner-only (0600).

        ``plan=`` takes a :class:`SnapshotPlan` made by :meth:`plan` (pass no other
        argument then): the preflight ran when the plan was made, so this is one libvirt
        call — what should run inside a freeze.
        """
        request = _Request(
            name, disk_only, memory, external, quiesce, atomic, live, description, metadata
        )
        if plan is None:
            plan = self._prepare(request, check_internal=False)  # below, under the lock
        elif not isinstance(plan, SnapshotPlan):
            raise UsageError(f"plan= takes a SnapshotPlan (dom.snapshots.plan(...)), not {plan!r}")
        elif request != _Request():
            raise UsageError("pass either plan= or the snapshot's arguments, not both")
        dom = self.domain
        if plan.domain_uuid != dom.uuid:
            raise UsageError(f"this plan is for domain {plan.domain!r}, not {dom.name!r}")
        with contextlib.ExitStack() as guard:
            if plan.internal:
                # Held from the bitmap check through the savevm: no checkpoint made by
                # statecapture can slip in between (hazard 21).
                guard.enter_context(_locks.domain_lock(dom.uuid, "snapshot create"))
                self._refuse_internal()
            vir = _port(dom).snapshot_create(
                plan.xml_text or plan.xml.to_xml(),
                disk_only=plan.disk_only,
                quiesce=plan.quiesce,
                atomic=plan.atomic,
                live=plan.live,
                no_metadata=not plan.metadata,
                # No VALIDATE: libvirt 9.0 reloads its RelaxNG schema for every validated call
                # (35-60 ms, spent inside a freeze for quiesced snapshots). The XML is ours,
                # built by SnapshotXML, and the test suite checks it against that schema.
                validate=False,
            )
        snapshot = Snapshot._from_port(dom, vir, None if plan.metadata else plan.xml)
        if plan.host_files:
            _owner_only(plan.new_files)
        return snapshot

    def plan(
        self,
        name: str | None = None,
        *,
        disk_only: bool = False,
        memory: SnapshotMemoryMode | PathLike | None = None,
        external: bool | Mapping[str, PathLike | None] = False,
        quiesce: bool = False,
        atomic: bool = True,
        live: bool = False,
        description: str | None = None,
        metadata: bool = True,
    ) -> SnapshotPlan:
        """Check a snapshot as :meth:`create` would and work it out; nothing changes.

        Takes :meth:`create`'s arguments and raises its preflight errors. Returns a
        :class:`SnapshotPlan`; ``create(plan=plan)`` takes the snapshot with one libvirt call.
        """
        request = _Request(
            name, disk_only, memory, external, quiesce, atomic, live, description, metadata
        )
        return self._prepare(request, check_internal=True)

    def _prepare(self, request: _Request, *, check_internal: bool) -> SnapshotPlan:
        name, description, quiesce = request.name, request.description, request.quiesce
        dom = self.domain
        if description is not None and not isinstance(description, str):
            raise UsageError(f"description must be a string, got {description!r}")
        if name is None:
            name = self._generated_name()
        else:
            _check_name(name)
        plan = self._plan(
            name,
            disk_only=request.disk_only,
            memory=request.memory,
            external=request.external,
            description=description,
        )
        # ---- preflight: nothing here changes anything.
        if name in self:
            raise UsageError(
                f"domain {dom.name!r} already has a snapshot named {name!r}; pick another "
                "name or delete that snapshot first"
            )
        if plan.internal and check_internal:
            self._refuse_internal()
        if quiesce and agent_state(dom) is not AgentState.CONNECTED:
            raise GuestAgentError(
                f"refusing to create a quiesced snapshot of domain {dom.name!r}: its guest "
                "agent is not connected (no running domain, no org.qemu.guest_agent.0 "
                "channel, or qemu-ga not answering yet). Nothing was changed. Start qemu-ga "
                "in the guest (right after boot, wait for it to connect), or snapshot "
                "without quiesce=True for crash-consistent disks.",
                operation="snapshot create",
                domain_name=dom.name,
            )
        for path in plan.new_files:
            _check_file_name(path, "snapshot file")
        if is_local_uri(dom.connection.uri):
            check_dir = writes_host_files(dom.connection)
            for path in plan.new_files:
                _check_target(path, "snapshot file", check_dir=check_dir)
        return SnapshotPlan(
            domain=dom.name,
            domain_uuid=dom.uuid,
            name=name,
            internal=plan.internal,
            xml=plan.xml,
            new_files=plan.new_files,
            disk_only=plan.disk_only_flag,
            quiesce=quiesce,
            atomic=request.atomic,
            live=request.live,
            metadata=request.metadata,
            xml_text=plan.xml.to_xml(),
            host_files=writes_host_files(dom.connection),
        )

    def _refuse_internal(self) -> None:
        dom = self.domain
        _refuse_bitmaps(
            dom,
            _dirty_bitmap_problems(dom, dom.definition.disks),
            "create an internal snapshot",
            "snapshot create",
        )

    # ------------------------------------------------------------------ planning
    def _generated_name(self) -> str:
        base = str(int(time.time()))
        name, n = base, 0
        while name in self:
            n += 1
            name = f"{base}-{n}"
        return name

    def _plan(
        self,
        name: str,
        *,
        disk_only: bool,
        memory: SnapshotMemoryMode | PathLike | None,
        external: bool | Mapping[str, PathLike | None],
        description: str | None,
    ) -> _Plan:
        dom = self.domain
        mem_mode: SnapshotMemoryMode | None
        mem_file: str | None = None
        if memory is None or isinstance(memory, SnapshotMemoryMode):
            mem_mode = memory
        elif isinstance(memory, str) and memory in {m.value for m in SnapshotMemoryMode}:
            mem_mode = SnapshotMemoryMode(memory)
        elif isinstance(memory, str | os.PathLike):
            mem_mode = SnapshotMemoryMode.EXTERNAL
            mem_file = _abs_path(memory, "the memory state file")
        else:
            raise UsageError(f"memory must be a SnapshotMemoryMode or a path, got {memory!r}")
        if not isinstance(external, bool | Mapping):
            raise UsageError(f"external must be True/False or a mapping, got {external!r}")
        mapping: Mapping[str, PathLike | None] = external if isinstance(external, Mapping) else {}
        is_external = bool(external) or disk_only or mem_mode is SnapshotMemoryMode.EXTERNAL
        if disk_only and mem_mode not in (None, SnapshotMemoryMode.NO):
            raise UsageError("disk_only=True snapshots hold no memory; drop memory=…")
        if is_external and mem_mode is SnapshotMemoryMode.INTERNAL:
            raise UsageError(
                "internal memory cannot go with external disk overlays; use "
                "memory=SnapshotMemoryMode.EXTERNAL (or a path) or an internal snapshot"
            )
        active = dom.is_active
        if not active and mem_mode in (SnapshotMemoryMode.INTERNAL, SnapshotMemoryMode.EXTERNAL):
            raise InvalidStateError(
                f"domain {dom.name!r} is {dom.state.value}: memory can only be captured from "
                "a running or paused domain",
                operation="snapshot create",
                domain_name=dom.name,
            )
        definition = dom.definition
        if not is_external:
            if not active:
                final_mem = SnapshotMemoryMode.NO
            else:
                final_mem = mem_mode or SnapshotMemoryMode.INTERNAL
            xml = SnapshotXML(name=name, description=description, memory=SnapshotMemory(final_mem))
            return _Plan(xml, False, (), True)
        disks = self._external_disks(name, definition, mapping)
        with_memory = active and not disk_only and mem_mode is not SnapshotMemoryMode.NO
        new_files = [d.source for d in disks if d.source is not None and d.type == "file"]
        if with_memory:
            if mem_file is None:
                mem_file = self._memory_path(name, definition, disks)
            mem = SnapshotMemory(SnapshotMemoryMode.EXTERNAL, mem_file)
            new_files.append(mem_file)
        else:
            mem = SnapshotMemory(SnapshotMemoryMode.NO)
        if len(set(new_files)) != len(new_files):
            raise UsageError(f"two snapshot files would share a path: {sorted(new_files)}")
        xml = SnapshotXML(name=name, description=description, memory=mem, disks=disks)
        return _Plan(xml, not with_memory, tuple(new_files), False)

    def _external_disks(
        self, name: str, definition: DomainXML, mapping: Mapping[str, PathLike | None]
    ) -> tuple[SnapshotDisk, ...]:
        known = {d.target for d in definition.disks}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise UsageError(
                f"domain {self.domain.name!r} has no disk {', '.join(unknown)} "
                f"(disks: {', '.join(sorted(known)) or 'none'})"
            )
        out: builtins.list[SnapshotDisk] = []
        for disk in definition.disks:
            excluded = disk.device != "disk" or disk.readonly or disk.snapshot == "no"
            if disk.target in mapping:
                target = mapping[disk.target]
                if target is None:
                    out.append(SnapshotDisk(disk.target, SnapshotDiskMode.NO))
                    continue
                if excluded and disk.device != "disk":
                    raise UsageError(f"disk {disk.target} is a {disk.device}; it has no snapshot")
                path = _abs_path(target, f"the overlay for disk {disk.target}")
            elif excluded:
                out.append(SnapshotDisk(disk.target, SnapshotDiskMode.NO))
                continue
            else:
                if disk.type != "file" or not disk.source:
                    raise UsageError(
                        f"disk {disk.target} is not a local file ({disk.type}); name its "
                        f"overlay: external={{'{disk.target}': '/path/overlay.qcow2'}}, or "
                        f"leave it out with {{'{disk.target}': None}}"
                    )
                path = f"{disk.source}.{name}"
            out.append(SnapshotDisk(disk.target, SnapshotDiskMode.EXTERNAL, path, "qcow2"))
        if not any(d.mode is SnapshotDiskMode.EXTERNAL for d in out):
            raise UsageError(f"domain {self.domain.name!r} has no disk to snapshot externally")
        return tuple(out)

    def _memory_path(self, name: str, definition: DomainXML, disks: Iterable[SnapshotDisk]) -> str:
        for d in disks:
            if d.mode is SnapshotDiskMode.EXTERNAL and d.source and d.type == "file":
                return os.path.join(os.path.dirname(d.source), f"{self.domain.name}.{name}.memory")
        raise UsageError(
            "no local disk image to put the memory state file next to; pass memory='/path/file'"
        )
