"""Backup plans: what a backup job will do, worked out before anything changes.

:func:`plan_backup` reads the domain's state once — the live definition, the checkpoint list,
the ``incremental_from`` checkpoint's definition — checks every argument against it and
returns a frozen :class:`BackupPlan`: the disks and their modes, every file name (computed
here and nowhere else), the checkpoint and backup XML, the NBD socket and the private
directories the job will use, and what a failure would undo. Making a plan changes nothing
(the one exception is a probe file created and removed at once to prove ``target_dir``
writable); :meth:`Domain.backup` (``plan=``) executes it, and the sequences execute it with
nothing but ``virDomainBackupBegin`` inside the guest's freeze.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Final, TypedDict

import attrs

from . import _files
from .errors import InvalidStateError, NotFoundError, UnsupportedError, UsageError
from .xml import (
    BackupDiskXML,
    BackupMode,
    BackupXML,
    CheckpointXML,
    DiskBackupMode,
    DomainXML,
    NBDServer,
)
from .xml._checkpoint import check_checkpoint_name

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "BackupOptions",
    "BackupPlan",
    "BackupPlanDisk",
    "backup_file_name",
    "check_writable",
    "partial_name",
    "plan_backup",
]

SOCKET_MAX: Final = 107
PUSH_STAGING: Final = ".sc-push-"
"""Prefix of the private directory QEMU writes push targets into (inside target_dir)."""
SCRATCH_STAGING: Final = ".sc-scratch-"
"""Prefix of the private directory holding a pull job's scratch files (inside scratch_dir)."""

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def _safe(name: str) -> str:
    """``name`` as a file-name component."""
    return _SAFE.sub("_", name).lstrip(".") or "_"


def backup_file_name(domain: str, disk: str, label: str) -> str:
    """The file name statecapture gives disk ``disk``'s backup labelled ``label``."""
    return f"{_safe(domain)}.{_safe(disk)}.{_safe(label)}.qcow2"


def partial_name(name: str) -> str:
    """The name a download is written under until it is complete."""
    return f".{name}.partial"


def scratch_name(domain: str, disk: str, label: str) -> str:
    """The name of a pull job's scratch file for ``disk``."""
    return f".{backup_file_name(domain, disk, label)}.scratch"


def check_writable(directory: Path, what: str) -> None:
    """Refuse (:class:`UsageError`) a directory this process cannot create files in.

    Tried for real — a hidden probe file created exclusively (``O_EXCL|O_NOFOLLOW``) and
    removed at once — because permission bits do not tell root about a read-only mount.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = f".sc-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{what} {directory} cannot be opened: {exc.strerror}") from exc
    try:
        try:
            os.close(os.open(name, flags, 0o600, dir_fd=dir_fd))
        except OSError as exc:
            raise UsageError(
                f"{what} {directory} is not writable ({exc.strerror}); nothing was changed"
            ) from exc
        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@attrs.frozen
class BackupPlanDisk:
    """One disk of a :class:`BackupPlan`."""

    disk: str
    """The disk's target name (``vda``)."""
    mode: DiskBackupMode
    """Full, or incremental from :attr:`incremental_from`."""
    incremental_from: str | None
    """The checkpoint an incremental disk starts from (``None``: full)."""
    file_name: str
    """The backup image's file name: in ``target_dir`` (push) or the download directory."""
    store: Path
    """Where QEMU writes: the push target in its private staging directory, or the pull
    job's scratch file."""


@attrs.frozen
class BackupPlan:
    """What a backup job will do, worked out from one read of the domain's state.

    Made by :meth:`Domain.backup_plan` (nothing changes); carried out by
    ``dom.backup(plan=plan)``. ``print(plan)`` tells what the job would do::

        plan = dom.backup_plan(mode="push", target_dir="/backups", checkpoint="cp2",
                               incremental_from="cp1")
        print(plan)
        with dom.backup(plan=plan) as job:
            job.wait()

    A plan is a snapshot of the domain's state when it was made: executing it re-checks
    that no backup job runs and that the checkpoint does not exist yet, and libvirt refuses
    anything else that changed. Execute a plan once; make a new one for the next job.
    """

    domain: str
    """Name of the domain."""
    domain_uuid: str
    """UUID of the domain (a plan executes only on that domain)."""
    mode: BackupMode
    """Push or pull."""
    label: str
    """The label in the file names: the new checkpoint's name, or a UTC time stamp."""
    disks: tuple[BackupPlanDisk, ...]
    """The disks to copy, in the domain's order."""
    incremental_from: str | None
    """The checkpoint incremental disks start from (``None``: a full backup)."""
    checkpoint: str | None
    """The checkpoint created atomically with the job's start (``None``: none)."""
    checkpoint_xml: str | None = attrs.field(repr=False)
    """The ``<domaincheckpoint>`` passed to ``virDomainBackupBegin``."""
    backup_xml: str = attrs.field(repr=False)
    """The ``<domainbackup>`` passed to ``virDomainBackupBegin``."""
    target_dir: Path | None
    """Push: where the images land (``None`` for pull)."""
    socket: Path | None
    """Pull: the NBD server's UNIX socket (``None`` for push)."""
    private_dirs: tuple[Path, ...]
    """Private (0700) directories the job makes and removes: push staging, scratch, socket."""
    made_socket_dir: bool = attrs.field(default=False, repr=False)
    """Whether :attr:`socket` lives in one of :attr:`private_dirs` (made by the job)."""

    @property
    def files(self) -> dict[str, Path]:
        """Push: disk → the image the job will deliver (empty for pull: see ``download``)."""
        if self.target_dir is None:
            return {}
        return {d.disk: self.target_dir / d.file_name for d in self.disks}

    @property
    def undo(self) -> tuple[str, ...]:
        """What a failed or interrupted job undoes, in words."""
        steps = ["end the job (abortJob, then wait for JOB_COMPLETED)"]
        if self.checkpoint is not None:
            steps.append(f"delete the checkpoint {self.checkpoint!r} made with it")
        if self.target_dir is not None:
            steps.append("remove the images it wrote")
        steps.append("remove its private directories and its metadata record")
        return tuple(steps)

    def __str__(self) -> str:
        kind = f"incremental from {self.incremental_from!r}" if self.incremental_from else "full"
        lines = [f"{self.mode.value} backup of {self.domain!r} ({kind}), label {self.label!r}"]
        for d in self.disks:
            where = (
                self.target_dir / d.file_name
                if self.target_dir is not None
                else f"{d.file_name} (download)"
            )
            extra = f" from {d.incremental_from!r}" if d.incremental_from else ""
            lines.append(f"  {d.disk}: {d.mode.value}{extra} -> {where}")
        if self.checkpoint is not None:
            lines.append(f"  new checkpoint: {self.checkpoint!r} (created with the job)")
        if self.socket is not None:
            lines.append(f"  NBD socket: {self.socket}")
        for p in self.private_dirs:
            lines.append(f"  private directory: {p}")
        lines.append("  on failure: " + "; ".join(self.undo))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        from ._html import table

        rows = [
            [
                d.disk,
                d.mode.value,
                d.incremental_from or "",
                str(self.target_dir / d.file_name) if self.target_dir else d.file_name,
            ]
            for d in self.disks
        ]
        return (
            f"<div><b>{escape(self.mode.value)} backup plan</b> of "
            f"<b>{escape(self.domain)}</b>, label <code>{escape(self.label)}</code>"
            + table(["disk", "mode", "from", "image"], rows)
            + f"<p>on failure: {escape('; '.join(self.undo))}</p></div>"
        )


def _choose_disks(dom: Domain, definition: DomainXML, disks: Iterable[str] | None) -> list[str]:
    eligible = [
        d.target
        for d in definition.disks
        if d.device == "disk" and not d.readonly and d.source is not None
    ]
    if disks is None:
        chosen = list(eligible)
    else:
        if isinstance(disks, str):
            raise UsageError("disks must be a list of disk targets, e.g. ['vda']")
        chosen = list(dict.fromkeys(disks))
        for name in chosen:
            if name not in {d.target for d in definition.disks}:
                raise NotFoundError(
                    f"domain {dom.name!r} has no disk {name!r}",
                    operation="backup",
                    domain_name=dom.name,
                )
            if name not in eligible:
                raise UsageError(f"disk {name!r} cannot be backed up (read-only, empty or cdrom)")
    if not chosen:
        raise UsageError(f"domain {dom.name!r} has no disk to back up")
    return chosen


def _checkpoint_xml(
    dom: Domain,
    definition: DomainXML,
    checkpoint: str | CheckpointXML | None,
    chosen: list[str],
    existing: set[str],
) -> tuple[str | None, str | None]:
    """(name, XML) of the checkpoint to create with the job."""
    if checkpoint is None:
        return None, None
    if isinstance(checkpoint, CheckpointXML):
        if checkpoint.name is None:
            raise UsageError("checkpoint= needs a named CheckpointXML")
        name, xml = checkpoint.name, checkpoint.to_xml()
    elif isinstance(checkpoint, str):
        name = check_checkpoint_name(checkpoint)
        # Track exactly the disks this backup copies: a checkpoint over a disk that was
        # not backed up would make its next incremental miss data.
        cp_disks = dom.checkpoints._plan_disks(chosen, definition=definition)
        xml = CheckpointXML(name=name, disks=cp_disks).to_xml()
    else:
        raise UsageError(f"checkpoint= takes a name or a CheckpointXML, not {checkpoint!r}")
    if name in existing:
        raise InvalidStateError(
            f"domain {dom.name!r} already has a checkpoint {name!r}",
            operation="backup",
            domain_name=dom.name,
        )
    return name, xml


def parse_mode(mode: BackupMode | str) -> BackupMode:
    """``mode`` as a :class:`BackupMode`; :class:`UsageError` for anything else."""
    try:
        return BackupMode(mode)
    except ValueError:
        raise UsageError(f"mode must be 'push' or 'pull', not {mode!r}") from None


def refuse_running_job(dom: Domain, text: str | EllipsisType | None = ...) -> None:
    """:class:`InvalidStateError` when ``dom`` already runs a backup job (one per domain).

    ``text`` is the running job's XML (``None``: none) when the caller has just read it;
    by default it is read now (also the support probe: the test driver lacks backups).
    """
    from ._backup import job_xml

    if text is ...:
        try:
            text = job_xml(dom)
        except UnsupportedError as exc:
            raise unsupported(dom, exc, "backup") from exc
    if text is not None:
        running = BackupXML.from_xml(text)
        raise InvalidStateError(
            f"domain {dom.name!r} already runs a {running.mode.value} backup job (one per "
            "domain); end it with dom.active_backup().end(). Nothing was changed.",
            operation="backup",
            domain_name=dom.name,
        )


class BackupOptions(TypedDict, total=False):
    """The arguments of :func:`plan_backup` (and :meth:`Domain.backup`) after ``dom``."""

    mode: BackupMode | str
    disks: Iterable[str] | None
    incremental_from: str | None
    checkpoint: str | CheckpointXML | None
    target_dir: str | os.PathLike[str] | None
    scratch_dir: str | os.PathLike[str] | None
    socket: str | os.PathLike[str] | None


def plan_backup(
    dom: Domain,
    *,
    mode: BackupMode | str = BackupMode.PUSH,
    disks: Iterable[str] | None = None,
    incremental_from: str | None = None,
    checkpoint: str | CheckpointXML | None = None,
    target_dir: str | os.PathLike[str] | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    socket: str | os.PathLike[str] | None = None,
    active_checked: bool = False,
) -> BackupPlan:
    """Check a backup's arguments against the domain and plan it; see :meth:`Domain.backup`.

    Reads the running job once (none may run), the live definition once, the checkpoint
    list once and the ``incremental_from`` checkpoint's definition once; changes nothing.
    ``active_checked``: the caller refused a domain that is not running just now (a
    sequence's preflight), so that is not asked again.
    """
    bmode = parse_mode(mode)
    push = bmode is BackupMode.PUSH
    if push and target_dir is None:
        raise UsageError("a push backup needs target_dir= (where the images go)")
    if not push and target_dir is not None:
        raise UsageError("a pull backup writes nowhere by itself: use download(dest_dir)")
    refuse_running_job(dom)
    if not active_checked:
        dom._require_active("backup")
    definition = dom.definition
    chosen = _choose_disks(dom, definition, disks)
    listed = {c.name: c for c in dom.checkpoints.list()}
    existing = set(listed)
    with_bitmap: set[str] = set()
    if incremental_from is not None:
        if incremental_from not in existing:
            raise NotFoundError(
                f"domain {dom.name!r} has no checkpoint {incremental_from!r} to back up from",
                operation="backup",
                domain_name=dom.name,
            )
        tracked = listed[incremental_from].definition.tracked_disks
        with_bitmap = {d.name for d in tracked}
    cp_name, cp_xml = _checkpoint_xml(dom, definition, checkpoint, chosen, existing)
    label = cp_name or time.strftime(
        f"{'inc' if incremental_from else 'full'}-%Y%m%dT%H%M%SZ", time.gmtime()
    )
    token = secrets.token_hex(6)
    names = {disk: backup_file_name(dom.name, disk, label) for disk in chosen}
    private_dirs: list[Path] = []
    server: NBDServer | None = None
    sock: Path | None = None
    tdir_path: Path | None = None
    made_socket_dir = False
    # QEMU/libvirtd create push targets and scratch files by path: they go into a private
    # 0700 staging directory made inside the caller's directory (no one else can plant or
    # swap a name there); finished push targets move to their final names without replacing.
    if push:
        assert target_dir is not None
        with _files.Directory.open(target_dir, what="target_dir") as tdir:
            _files.require_trusted(tdir.path, staged=True, what="push backup target_dir")
            check_writable(Path(tdir.path), "target_dir")
            tdir.check_free(*names.values(), what="backup target")
            tdir_path = Path(tdir.path)
        stage = tdir_path / f"{PUSH_STAGING}{token}"
        private_dirs.append(stage)
        store = {disk: stage / name for disk, name in names.items()}
    else:
        if scratch_dir is None:
            sdir = Path(tempfile.gettempdir()) / f"sc-scratch-{token}"
        else:
            with _files.Directory.open(scratch_dir, what="scratch_dir") as sd:
                _files.require_trusted(sd.path, staged=True, what="backup scratch_dir")
                sdir = Path(sd.path) / f"{SCRATCH_STAGING}{token}"
        private_dirs.append(sdir)
        store = {disk: sdir / scratch_name(dom.name, disk, label) for disk in chosen}
        if socket is None:
            sock_dir = Path(tempfile.gettempdir()) / f"sc-nbd-{token}"
            private_dirs.append(sock_dir)
            sock = sock_dir / "nbd.sock"
            made_socket_dir = True
        else:
            sock = Path(socket).absolute()
            _files.check_free(sock, "socket path")
            _files.require_trusted(sock.parent, staged=True, what="NBD socket directory")
        if len(str(sock)) > SOCKET_MAX:
            raise UsageError(f"socket path {sock} is longer than {SOCKET_MAX} bytes")
        server = NBDServer.unix(str(sock))
    planned: list[BackupPlanDisk] = []
    entries: list[BackupDiskXML] = []
    for d in definition.disks:
        if d.target in chosen:
            full = incremental_from is None or d.target not in with_bitmap
            dmode = DiskBackupMode.FULL if full else DiskBackupMode.INCREMENTAL
            inc = None if full else incremental_from
            planned.append(BackupPlanDisk(d.target, dmode, inc, names[d.target], store[d.target]))
            entries.append(
                BackupDiskXML(
                    d.target,
                    mode=dmode,
                    incremental=inc,
                    store=str(store[d.target]),
                    format="qcow2",
                )
            )
        elif d.device == "disk":
            entries.append(BackupDiskXML(d.target, backup=False))
    return BackupPlan(
        domain=dom.name,
        domain_uuid=dom.uuid,
        mode=bmode,
        label=label,
        disks=tuple(planned),
        incremental_from=incremental_from,
        checkpoint=cp_name,
        checkpoint_xml=cp_xml,
        backup_xml=BackupXML(mode=bmode, server=server, disks=tuple(entries)).to_xml(),
        target_dir=tdir_path,
        socket=sock,
        private_dirs=tuple(private_dirs),
        made_socket_dir=made_socket_dir,
    )


def unsupported(dom: Domain, exc: UnsupportedError, what: str) -> UnsupportedError:
    """``exc`` reworded: the driver lacks backup jobs (naming the missing API)."""
    api = "virDomainBackupBegin"
    match = re.search(r"(virDomain\w+)", exc.libvirt_message or str(exc))
    missing = match.group(1) if match else api
    also = "" if missing == api else f" and {api}"
    return UnsupportedError(
        f"{what} on domain {dom.name!r}: the {dom.connection.driver} driver does not support "
        f"backup jobs ({missing}{also} missing; they need the QEMU driver, libvirt >= 7.6 "
        "and QEMU >= 6.1)",
        code=exc.code,
        operation=what,
        domain_name=dom.name,
        libvirt_message=exc.libvirt_message,
    )
