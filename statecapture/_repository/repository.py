"""The backup repository handle: :class:`Repository`.

Layout (documented in ``docs/repository.md``)::

    <repo>/repository.json                     format, version, id
    <repo>/locks/<domain uuid>.lock            one writer per domain (flock)
    <repo>/domains/<domain uuid>/points/<id>.json      one manifest per point (written last)
    <repo>/domains/<domain uuid>/images/<domain>.<disk>.<label>.qcow2
    <repo>/domains/<domain uuid>/digests/<id>.<disk>.json
    <repo>/domains/<domain uuid>/config/<id>/{inactive.xml,live.xml,nvram,tpm/}

A point exists once its manifest exists; everything it lists is written (and fsynced)
before. Anything no manifest lists is a leftover of an interrupted run: the next backup or
prune of that domain (under its lock) removes it, and :meth:`Repository.check` reports it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
from lxml import etree

from .._advisor import Consistency
from .._journal import boundary
from .._nbd import qemu_img
from ..errors import (
    ChainError,
    CheckpointInconsistentError,
    NotFoundError,
    RepositoryError,
    RepositoryFormatError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from . import chain as _chain
from . import digests as _dg
from . import retention
from .manifest import (
    DiskEntry,
    PointKind,
    RepositoryInfo,
    RestorePoint,
    dumps,
    is_point_id,
    new_point_id,
    now,
    parse_json,
    points_html,
)
from .reports import CheckReport, Difference, PruneReport, VerifyReport
from .store import (
    DomainLock,
    copy_in,
    copy_tree_in,
    fsync_dir,
    private_dir,
    read_bytes,
    write_atomic,
)
from .store import remove as _remove

if TYPE_CHECKING:
    from .._backup import BackupProgress
    from .._connection import Connection
    from .._domain import Domain

__all__ = ["Repository"]

HEADER: Final = "repository.json"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_OP: Final = "repository"


def _not_found(what: str) -> NotFoundError:
    return NotFoundError(what, operation=_OP)


@attrs.define(eq=False, init=False)
class Repository:
    """A directory holding the backups of any number of domains (a handle).

    ``Repository.create(path)`` makes one; ``Repository(path)`` opens one (a directory that
    is not a repository, or one written by a newer format, raises
    :class:`RepositoryFormatError`). Several processes may use it at once: writers of the
    same domain take turns (``lock_timeout`` seconds, then :class:`RepositoryLockedError`),
    readers never wait. Listing, verifying and restoring never need libvirt.

    ::

        repo = statecapture.Repository.create("/backups/nightly")
        point = repo.backup(dom)                 # full the first time, then incremental
        repo.restore(point, "/restore/web1")     # {"vda": Path(".../vda.qcow2")}
        repo.prune(dom, keep_daily=7)
    """

    path: Path
    """The repository's directory."""
    info: RepositoryInfo
    """The repository's header (id, format version)."""
    lock_timeout: float
    """Seconds a writer waits for another writer of the same domain."""

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> None:
        """Open the repository at ``path``."""
        root = Path(path).absolute()
        header = root / HEADER
        try:
            raw = read_bytes(header)
        except FileNotFoundError:
            raise RepositoryFormatError(
                f"{root} is not a statecapture repository (no {HEADER}); create one with "
                "Repository.create()",
                path=str(root),
            ) from None
        except OSError as exc:
            raise RepositoryFormatError(f"cannot open {header}: {exc}", path=str(root)) from exc
        self.path = root
        self.info = RepositoryInfo.from_json(parse_json(raw, str(header)), str(header))
        self.lock_timeout = _check_timeout(lock_timeout)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> Repository:
        """Create a new, empty repository at ``path`` (a new or empty directory), owner-only.

        Raises :class:`TargetExistsError` when ``path`` is a non-empty directory or a file.
        """
        root = Path(path).absolute()
        if not root.parent.is_dir():
            raise UsageError(f"{root.parent} is not a directory")
        if os.path.lexists(root):
            if root.is_symlink() or not root.is_dir() or any(root.iterdir()):
                raise TargetExistsError(
                    f"{root} exists and is not an empty directory; not making a repository there",
                    path=str(root),
                )
            os.chmod(root, 0o700)
        else:
            private_dir(root)
        private_dir(root / "locks")
        private_dir(root / "domains")
        info = RepositoryInfo(id=secrets.token_hex(16), created=now())
        write_atomic(root, HEADER, dumps(info.to_json()), replace=False)
        return cls(root, lock_timeout=lock_timeout)

    # ------------------------------------------------------------------ context manager
    def close(self) -> None:
        """Nothing to release (no lock is held between calls); for symmetry, idempotent."""

    def __enter__(self) -> Repository:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repository {str(self.path)!r} id={self.info.id[:8]}>"

    def _repr_html_(self) -> str:
        pts = self.points()
        return (
            f"<div><b>Repository</b> <code>{self.path}</code> ({len(pts)} points)"
            + points_html(pts)
            + "</div>"
        )

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_prefix(self) -> str:
        """The prefix of every checkpoint this repository creates: ``scr-<8 hex of its id>-``."""
        return f"scr-{self.info.id[:8]}-"

    def _domain_dir(self, uuid: str, *, create: bool = False) -> Path:
        if not _UUID.match(uuid):
            raise UsageError(f"{uuid!r} is not a domain UUID")
        d = self.path / "domains" / uuid
        if create:
            private_dir(d)
            for sub in ("points", "images", "digests", "config"):
                private_dir(d / sub)
        return d

    def _domain_dirs(self) -> Iterator[Path]:
        base = self.path / "domains"
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(base.iterdir()):
                if _UUID.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                    yield entry

    def _lock(self, uuid: str) -> DomainLock:
        if not _UUID.match(uuid):
            raise UsageError(f"{uuid!r} is not a domain UUID")
        return DomainLock(self.path / "locks" / f"{uuid}.lock", self.lock_timeout)

    # ------------------------------------------------------------------ reading points
    def _load(self, ddir: Path) -> dict[str, RestorePoint]:
        out: dict[str, RestorePoint] = {}
        pdir = ddir / "points"
        try:
            names = os.listdir(pdir)
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".json") or not is_point_id(name[:-5]):
                continue
            where = str(pdir / name)
            try:
                raw = read_bytes(pdir / name)
            except FileNotFoundError:  # removed by a prune meanwhile
                continue
            point = RestorePoint.from_json(parse_json(raw, where), root=ddir, where=where)
            out[point.id] = point
        return out

    def points(
        self, domain: Domain | str | None = None, *, newest_first: bool = True
    ) -> list[RestorePoint]:
        """Every point (of ``domain``: a Domain, a name or a UUID), newest first by default."""
        found: list[RestorePoint] = []
        uuid = _uuid_of(domain)
        for ddir in self._domain_dirs():
            if uuid is not None and ddir.name != uuid:
                continue
            pts = list(self._load(ddir).values())
            if domain is not None and uuid is None:
                pts = [p for p in pts if p.domain == domain]
            found.extend(pts)
        found.sort(key=lambda p: (p.time, p.id), reverse=newest_first)
        return found

    def point(self, point_id: str | RestorePoint) -> RestorePoint:
        """The point with id ``point_id`` (re-read); :class:`NotFoundError` when unknown."""
        pid = point_id.id if isinstance(point_id, RestorePoint) else point_id
        if not isinstance(pid, str) or not is_point_id(pid):
            raise _not_found(f"the repository has no point {pid!r}")
        for ddir in self._domain_dirs():
            path = ddir / "points" / f"{pid}.json"
            try:
                raw = read_bytes(path)
            except FileNotFoundError:
                continue
            return RestorePoint.from_json(parse_json(raw, str(path)), root=ddir, where=str(path))
        raise _not_found(f"the repository {self.path} has no point {pid!r}")

    def latest(self, domain: Domain | str) -> RestorePoint | None:
        """The newest point of ``domain``, or ``None``."""
        pts = self.points(domain)
        return pts[0] if pts else None

    # ------------------------------------------------------------------ backup
    def backup(
        self,
        dom: Domain,
        *,
        mode: str = "pull",
        quiesce: bool | str = True,
        full: bool = False,
        disks: Sequence[str] | None = None,
        progress: Callable[[BackupProgress], None] | None = None,
        max_frozen: float = 10.0,
    ) -> RestorePoint:
        """Back up ``dom`` into the repository; the new :class:`RestorePoint`.

        A running domain is copied with :func:`statecapture.direct_backup` (pull by
        default): incremental from this repository's latest point of the domain when that
        point's checkpoint still exists on the domain and validates, full otherwise — the
        reason is :attr:`RestorePoint.reason`. A disk new since the last point is copied in
        full while the others stay incremental. The checkpoint created carries this
        repository's identity (:attr:`checkpoint_prefix`), so several repositories keep
        independent chains of one domain. A shut-off domain is copied in full with
        ``qemu-img`` (consistent: nothing runs). Each point also stores the domain's
        configuration (inactive and live XML), its NVRAM file and TPM state when present,
        and a digest of every 1 MiB block for :meth:`verify`.

        Leftovers of an interrupted earlier run (an unfinished sequence on the domain,
        files and checkpoints no point lists) are cleaned up first. On any error the
        checkpoint and files of this run are removed and no point is listed.
        """
        from .._domain import Domain

        if not isinstance(dom, Domain):
            raise UsageError(f"backup() needs a statecapture Domain, got {type(dom).__name__}")
        if mode not in ("pull", "push"):
            raise UsageError(f"mode must be 'pull' or 'push', not {mode!r}")
        if not isinstance(full, bool):
            raise UsageError(f"full must be a bool, not {full!r}")
        if disks is not None:
            if isinstance(disks, str):
                raise UsageError("disks must be a list of disk targets, e.g. ['vda']")
            disks = list(dict.fromkeys(disks))
            known = {d.target for d in dom.definition.disks}
            for d in disks:
                if d not in known:
                    raise _not_found(f"domain {dom.name!r} has no disk {d!r}")
        ddir = self._domain_dir(dom.uuid, create=True)
        with self._lock(dom.uuid).held():
            self._clean_leftovers(dom, ddir)
            boundary("repo:backup:cleaned")
            points = self._load(ddir)
            if not dom.is_active:
                return self._offline_backup(dom, ddir, points, full=full, disks=disks)
            return self._live_backup(
                dom,
                ddir,
                points,
                mode=mode,
                quiesce=quiesce,
                full=full,
                disks=disks,
                progress=progress,
                max_frozen=max_frozen,
            )

    def _decide(
        self, dom: Domain, ddir: Path, points: Mapping[str, RestorePoint], full: bool
    ) -> tuple[RestorePoint | None, str]:
        """(the point to build on or ``None``, the reason)."""
        if not points:
            return None, "first backup"
        latest = max(points.values(), key=lambda p: (p.time, p.id))
        if full:
            return None, "full=True"
        cp = latest.checkpoint
        if cp is None or cp not in dom.checkpoints:
            return None, f"checkpoint missing ({cp or 'the last point has none'})"
        try:
            dom.checkpoints[cp].validate()
        except CheckpointInconsistentError as exc:
            return None, f"bitmap broken ({exc.disk or '?'}: {exc})"
        except UnsupportedError:
            pass
        from .._backup import backup_file_name

        index = _chain.file_index(points)
        for disk, entry in latest.disks.items():
            if entry.file != backup_file_name(dom.name, disk, cp):
                return None, "domain renamed since the last point"
            try:
                _chain.validate_chain(ddir / "images", latest, disk, index)
            except ChainError as exc:
                return None, f"last point damaged ({exc})"
        return latest, "incremental"

    def _live_backup(
        self,
        dom: Domain,
        ddir: Path,
        points: Mapping[str, RestorePoint],
        *,
        mode: str,
        quiesce: bool | str,
        full: bool,
        disks: list[str] | None,
        progress: Callable[[BackupProgress], None] | None,
        max_frozen: float,
    ) -> RestorePoint:
        from .._sequences import direct_backup

        base, reason = self._decide(dom, ddir, points, full)
        pid = new_point_id()
        cp_name = self.checkpoint_prefix + pid
        images = ddir / "images"
        result = direct_backup(
            dom,
            images,
            mode=mode,
            incremental_from=base.checkpoint if base is not None else None,
            checkpoint=cp_name,
            quiesce=quiesce,  # type: ignore[arg-type]
            max_frozen=max_frozen,
            disks=disks,
            progress=progress,
        )
        boundary("repo:backup:copied")
        with ExitStack() as undo:
            undo.callback(self._discard_run, dom, ddir, pid, cp_name, dict(result.files))
            entries: dict[str, DiskEntry] = {}
            for disk, path in sorted(result.files.items()):
                parent_entry = base.disks.get(disk) if base is not None else None
                entries[disk] = self._record_layer(
                    ddir, pid, disk, Path(path), parent_entry, base is not None
                )
                boundary(f"repo:backup:digested:{disk}")
            kind = (
                PointKind.INCREMENTAL
                if any(e.kind is PointKind.INCREMENTAL for e in entries.values())
                else PointKind.FULL
            )
            if base is not None and kind is PointKind.FULL:
                reason = "checkpoint covered no disk of this backup"
            added = sorted(d for d, e in entries.items() if e.reason)
            if kind is PointKind.INCREMENTAL and added:
                reason = f"incremental; full copy of {', '.join(added)} (disk added)"
            config = self._capture_config(dom, ddir, pid)
            point = RestorePoint(
                id=pid,
                domain=dom.name,
                domain_uuid=dom.uuid,
                time=_time_of(pid),
                kind=kind,
                reason=reason,
                checkpoint=cp_name,
                parent=base.id if kind is PointKind.INCREMENTAL and base is not None else None,
                disks=entries,
                bytes_copied=sum(e.bytes_copied for e in entries.values()),
                frozen_for=result.frozen_for,
                consistency=result.consistency,
                mode=mode,
                config=config,
                notes=result.notes,
                root=ddir,
            )
            self._commit(ddir, point)
            undo.pop_all()
        return point

    def _record_layer(
        self,
        ddir: Path,
        pid: str,
        disk: str,
        path: Path,
        parent: DiskEntry | None,
        incremental: bool,
    ) -> DiskEntry:
        """Make the stored layer self-describing (relative backing name), digest it."""
        images = ddir / "images"
        os.chmod(path, 0o600)
        layers = _dg.chain_files(path)
        top = layers[0]
        backing = top.get("backing-filename")
        parent_file: str | None = None
        if backing:
            name = Path(str(backing)).name
            if parent is None or name != parent.file or not (images / name).is_file():
                raise RepositoryError(
                    f"{path} sits on {backing}, which is not the previous point's image",
                    path=str(path),
                )
            if str(backing) != name:
                qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", name, str(path))
            parent_file = name
        size = int(top["virtual-size"])
        extents = _dg.read_map(path)
        files = [images / path.name] + [images / Path(str(x["filename"])).name for x in layers[1:]]
        copied = sum(e.length for e in extents if e.depth == 0 and e.data)
        if parent_file is None:
            blocks = _dg.digest_blocks(path, size, extents=extents, files=files)
            blocks = {k: v for k, v in blocks.items() if v != _dg.zero_digest(size, k)}
            dmap = _dg.DigestMap(size, blocks, complete=True)
        else:
            touched = _dg.layer_blocks(extents)
            blocks = _dg.digest_blocks(
                path, size, touched.__contains__, extents=extents, files=files
            )
            dmap = _dg.DigestMap(size, blocks, complete=False)
        dname = f"{pid}.{_safe(disk)}.json"
        write_atomic(ddir / "digests", dname, dmap.to_json(), replace=False)
        return DiskEntry(
            file=path.name,
            kind=PointKind.INCREMENTAL if parent_file else PointKind.FULL,
            size=size,
            bytes_copied=copied,
            parent_file=parent_file,
            digests=dname,
            reason="disk added" if incremental and parent_file is None else None,
        )

    def _capture_config(self, dom: Domain, ddir: Path, pid: str) -> tuple[str, ...]:
        cdir = private_dir(ddir / "config" / pid)
        made: list[str] = []
        inactive = dom.inactive_definition.raw
        write_atomic(cdir, "inactive.xml", inactive.encode(), replace=False)
        made.append("inactive.xml")
        if dom.is_active:
            write_atomic(cdir, "live.xml", dom.definition.raw.encode(), replace=False)
            made.append("live.xml")
        root = etree.fromstring(inactive.encode())
        nvram = root.findtext("os/nvram")
        if nvram and os.path.isfile(nvram.strip()):
            copy_in(Path(nvram.strip()), cdir, "nvram")
            made.append("nvram")
        if root.find("devices/tpm/backend[@type='emulator']") is not None:
            for base in (Path("/var/lib/libvirt/swtpm"), Path("/var/lib/swtpm")):
                tpm = base / dom.uuid
                if tpm.is_dir():
                    copy_tree_in(tpm, cdir, "tpm")
                    made.append("tpm")
                    break
        return tuple(made)

    def _commit(self, ddir: Path, point: RestorePoint) -> None:
        """List the point: its manifest, written last and atomically."""
        fsync_dir(ddir / "images")
        boundary("repo:backup:before-manifest")
        write_atomic(ddir / "points", f"{point.id}.json", dumps(point.to_json()), replace=False)
        boundary("repo:backup:listed")

    def _discard_run(
        self, dom: Domain, ddir: Path, pid: str, cp_name: str | None, files: Mapping[str, Path]
    ) -> None:
        """Undo a run whose point was not listed: its checkpoint and every file it made."""
        from .._backup import _delete_checkpoint

        errors: list[str] = []
        if cp_name is not None:
            _delete_checkpoint(dom, cp_name, errors)
        for path in files.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for f in (ddir / "digests").glob(f"{pid}.*"):
            _remove(f)
        _remove(ddir / "config" / pid)
        if errors:
            raise RepositoryError(f"cleaning up the failed backup left: {'; '.join(errors)}")

    def _offline_backup(
        self,
        dom: Domain,
        ddir: Path,
        points: Mapping[str, RestorePoint],
        *,
        full: bool,
        disks: list[str] | None,
    ) -> RestorePoint:
        """A shut-off domain: copy every disk with qemu-img (no job, no checkpoint)."""
        from .._backup import backup_file_name

        definition = dom.inactive_definition
        chosen = [
            d
            for d in definition.disks
            if d.device == "disk"
            and not d.readonly
            and d.source is not None
            and (disks is None or d.target in disks)
        ]
        if not chosen:
            raise UsageError(f"domain {dom.name!r} has no disk to back up")
        pid = new_point_id()
        images = ddir / "images"
        made: dict[str, Path] = {}
        with ExitStack() as undo:
            undo.callback(self._discard_run, dom, ddir, pid, None, made)
            entries: dict[str, DiskEntry] = {}
            for d in chosen:
                target = images / backup_file_name(dom.name, d.target, pid)
                partial = images / f".{target.name}.partial"
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                made[f"partial:{d.target}"] = partial
                src_fmt = d.format or "raw"
                qemu_img(
                    "convert",
                    "-f",
                    src_fmt,
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=65536",
                    str(d.source),
                    str(partial),
                )
                os.chmod(partial, 0o600)
                with contextlib.suppress(OSError):
                    fd = os.open(partial, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                os.link(partial, target)
                made[d.target] = target
                os.unlink(partial)
                entries[d.target] = self._record_layer(ddir, pid, d.target, target, None, False)
            config = self._capture_config(dom, ddir, pid)
            reason = "domain shut off" + (" (full=True)" if full else "")
            point = RestorePoint(
                id=pid,
                domain=dom.name,
                domain_uuid=dom.uuid,
                time=_time_of(pid),
                kind=PointKind.FULL,
                reason=reason,
                checkpoint=None,
                parent=None,
                disks=entries,
                bytes_copied=sum(e.bytes_copied for e in entries.values()),
                frozen_for=None,
                consistency=Consistency.APPLICATION,
                mode="offline",
                config=config,
                notes=("copied while the domain was shut off; the next backup is full",),
                root=ddir,
            )
            self._commit(ddir, point)
            undo.pop_all()
        return point

    # ------------------------------------------------------------------ leftovers
    def _clean_leftovers(self, dom: Domain | None, ddir: Path) -> list[str]:
        """Under the domain's lock: remove what no point lists; what was removed."""
        removed: list[str] = []
        if dom is not None:
            from .._journal import read_journal
            from .._recover import recover

            with contextlib.suppress(StateCaptureError):
                if read_journal(dom) is not None:
                    recover(dom)
                    removed.append(f"recovered an interrupted run on {dom.name}")
        points = self._load(ddir)
        orphans = self._orphans(ddir, points)
        for rel in orphans:
            _remove(self.path / rel)
            removed.append(rel)
        if dom is not None:
            wanted = {p.checkpoint for p in points.values() if p.checkpoint}
            removed.extend(self._delete_checkpoints(dom, keep=wanted))
        return removed

    def _orphans(self, ddir: Path, points: Mapping[str, RestorePoint]) -> list[str]:
        listed_images = {e.file for p in points.values() for e in p.disks.values()}
        listed_digests = {e.digests for p in points.values() for e in p.disks.values()}
        out: list[str] = []
        for sub, listed in (
            ("images", listed_images),
            ("digests", listed_digests),
            ("config", set(points)),
            ("points", {f"{p}.json" for p in points}),
        ):
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(ddir / sub)):
                    if name not in listed:
                        out.append(str((ddir / sub / name).relative_to(self.path)))
        return out

    def _delete_checkpoints(self, dom: Domain, *, keep: set[str]) -> list[str]:
        """Delete this repository's checkpoints on ``dom`` other than ``keep``."""
        from .._backup import _delete_checkpoint

        deleted: list[str] = []
        errors: list[str] = []
        try:
            names = [c.name for c in dom.checkpoints.list()]
        except UnsupportedError:
            return deleted
        # children before parents, so libvirt merges each bitmap into a remaining one
        for name in reversed(names):
            if name.startswith(self.checkpoint_prefix) and name not in keep:
                _delete_checkpoint(dom, name, errors)
                deleted.append(name)
        if errors:
            raise RepositoryError(f"deleting checkpoints failed: {'; '.join(errors)}")
        return deleted

    # ------------------------------------------------------------------ restore
    def _resolve(self, point: RestorePoint | str) -> tuple[RestorePoint, Path, dict[str, Any]]:
        p = self.point(point)
        assert p.root is not None
        return p, p.root, self._load(p.root)

    def restore(
        self,
        point: RestorePoint | str,
        dest_dir: str | os.PathLike[str],
        *,
        disks: Sequence[str] | None = None,
        format: str = "qcow2",
        verify: bool = False,
    ) -> Mapping[str, Path]:
        """Restore ``point``'s disks into the new directory ``dest_dir``; disk → image path.

        Images are named ``<disk>.<format>`` (``"qcow2"`` or ``"raw"``), standalone and
        owner-only. Before anything is written every chain is validated (manifest, each
        layer's backing reference and virtual size; :class:`ChainError`), and with
        ``verify=True`` its digests too (:class:`RepositoryError`). ``dest_dir`` must not
        exist (:class:`TargetExistsError`); on failure it is removed again.
        """
        if format not in ("qcow2", "raw"):
            raise UsageError(f"format must be 'qcow2' or 'raw', not {format!r}")
        p, ddir, points = self._resolve(point)
        chosen = self._choose_disks(p, disks)
        dest = Path(dest_dir).absolute()
        if os.path.lexists(dest):
            raise TargetExistsError(
                f"{dest} exists; restore writes a new directory", path=str(dest)
            )
        if not dest.parent.is_dir():
            raise UsageError(f"{dest.parent} is not a directory")
        index = _chain.file_index(points)
        tops = {d: _chain.validate_chain(ddir / "images", p, d, index)[0] for d in chosen}
        if verify:
            report = self.verify(p)
            if not report.ok:
                raise RepositoryError(f"point {p.id} does not verify:\n{report}")
        os.mkdir(dest, 0o700)
        out: dict[str, Path] = {}
        try:
            for d in chosen:
                target = dest / f"{_safe(d)}.{format}"
                qemu_img("convert", "-f", "qcow2", "-O", format, str(tops[d]), str(target))
                os.chmod(target, 0o600)
                out[d] = target
            fsync_dir(dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return MappingProxyType(out)

    def _choose_disks(self, p: RestorePoint, disks: Sequence[str] | None) -> list[str]:
        if disks is None:
            return sorted(p.disks)
        if isinstance(disks, str):
            raise UsageError("disks must be a list of disk targets, e.g. ['vda']")
        for d in disks:
            if d not in p.disks:
                raise _not_found(f"point {p.id} has no disk {d!r}")
        return list(dict.fromkeys(disks))

    def restore_domain(
        self,
        point: RestorePoint | str,
        conn: Connection,
        *,
        name: str,
        dest_dir: str | os.PathLike[str],
        format: str = "qcow2",
        verify: bool = False,
        start: bool = False,
    ) -> Domain:
        """Restore ``point`` as a new domain ``name`` defined on ``conn``; the Domain.

        The images are restored into ``dest_dir`` (see :meth:`restore`); the domain is
        defined from the captured inactive configuration with a new name and UUID, new MAC
        addresses, its disks pointed at the restored images (disks the point did not copy
        are left out) and its NVRAM pointing at a restored copy. ``start=True`` starts it.
        Refused before anything is written when ``name`` exists (:class:`TargetExistsError`)
        or the point has no captured configuration.
        """
        p, ddir, _points = self._resolve(point)
        if "inactive.xml" not in p.config:
            raise RepositoryError(f"point {p.id} holds no domain configuration")
        if not isinstance(name, str) or not name:
            raise UsageError("restore_domain() needs a new domain name")
        try:
            conn.domain(name)
        except NotFoundError:
            pass
        else:
            raise TargetExistsError(f"a domain named {name!r} exists already", path=name)
        xml = read_bytes(ddir / "config" / p.id / "inactive.xml")
        files = self.restore(p, dest_dir, format=format, verify=verify)
        dest = Path(dest_dir).absolute()
        try:
            if "nvram" in p.config:
                nv = dest / "nvram.fd"
                shutil.copyfile(ddir / "config" / p.id / "nvram", nv)
                os.chmod(nv, 0o600)
            else:
                nv = None
            text = _rewrite_domain(xml, name=name, files=files, fmt=format, nvram=nv)
            dom = conn.define(text)
            if start:
                dom.start()
            return dom
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ verify
    def verify(self, point: RestorePoint | str | None = None) -> VerifyReport:
        """Re-read stored data and compare it with the digests recorded at backup time.

        ``point=None`` checks every point of every domain; a point checks it and the points
        its chains rest on. For each point and disk, every block its own layer stores (and
        every block its digest delta names) is read through the chain and compared; each
        stored byte is read about once. No guest, original disk or libvirt is needed.
        """
        if point is None:
            targets: list[tuple[Path, dict[str, RestorePoint], list[RestorePoint]]] = []
            for ddir in self._domain_dirs():
                pts = self._load(ddir)
                targets.append((ddir, pts, sorted(pts.values(), key=lambda q: q.id)))
        else:
            p, ddir, pts = self._resolve(point)
            chain = [p]
            while chain[-1].parent is not None and chain[-1].parent in pts:
                chain.append(pts[chain[-1].parent])
            # full disks of an incremental point (disk added) rest on older points too
            index = _chain.file_index(pts)
            owner = {e.file: q for q in pts.values() for e in q.disks.values()}
            wanted = {q.id for q in chain}
            for q in list(chain):
                for d in q.disks:
                    with contextlib.suppress(ChainError):
                        for e in _chain.expected_chain(q, d, index):
                            wanted.add(owner[e.file].id)
            targets = [(ddir, pts, sorted((pts[i] for i in wanted), key=lambda q: q.id))]
        checked: list[str] = []
        diffs: list[Difference] = []
        errors: list[str] = []
        read = 0
        for ddir, pts, todo in targets:
            cache: dict[str, _dg.DigestMap] = {}
            index = _chain.file_index(pts)
            for p in todo:
                checked.append(p.id)
                for disk in sorted(p.disks):
                    try:
                        n, bad = self._verify_disk(ddir, pts, index, p, disk, cache)
                    except (RepositoryError, StateCaptureError, OSError) as exc:
                        errors.append(f"point {p.id} disk {disk}: {exc}")
                        continue
                    read += n
                    diffs.extend(bad)
        return VerifyReport(tuple(checked), read, tuple(diffs), tuple(errors))

    def _digest_map(
        self, ddir: Path, entry: DiskEntry, cache: dict[str, _dg.DigestMap]
    ) -> _dg.DigestMap:
        if entry.digests is None:
            raise RepositoryError(f"{entry.file} has no digests")
        if entry.digests not in cache:
            path = ddir / "digests" / entry.digests
            cache[entry.digests] = _dg.DigestMap.from_json(read_bytes(path), str(path))
        return cache[entry.digests]

    def _verify_disk(
        self,
        ddir: Path,
        pts: Mapping[str, RestorePoint],
        index: Mapping[str, DiskEntry],
        p: RestorePoint,
        disk: str,
        cache: dict[str, _dg.DigestMap],
    ) -> tuple[int, list[Difference]]:
        images = ddir / "images"
        layers = _chain.validate_chain(images, p, disk, index)
        expected_entries = _chain.expected_chain(p, disk, index)
        maps = [self._digest_map(ddir, e, cache) for e in expected_entries]
        own = maps[0]
        size = expected_entries[0].size
        extents = _dg.read_map(layers[0])
        wanted = _dg.layer_blocks(extents) | set(own.blocks)
        if own.complete:  # a full layer: every block it stores, and the zero ones too
            wanted |= set(range((size + _dg.BLOCK_SIZE - 1) // _dg.BLOCK_SIZE))
        got = _dg.digest_blocks(layers[0], size, wanted.__contains__, extents=extents, files=layers)
        read = sum(e.length for e in extents if e.depth == 0 and e.data)
        bad: list[Difference] = []
        for b in sorted(wanted):
            want = None
            for m in maps:
                if b in m.blocks:
                    want = m.blocks[b]
                    break
                if m.complete:
                    break
            if want is None:
                want = _dg.zero_digest(size, b)
            if got.get(b) != want:
                off = b * _dg.BLOCK_SIZE
                bad.append(Difference(p.id, disk, off, min(_dg.BLOCK_SIZE, size - off)))
        return read, bad

    # ------------------------------------------------------------------ check
    def check(self, *, repair: bool = False) -> CheckReport:
        """Look for inconsistencies: orphan files, points whose chains do not validate.

        ``repair=True`` (taking each domain's lock) removes the orphans and the manifests of
        points that cannot be restored (their files are kept out of the listing, then
        removed as orphans). Never needs libvirt.
        """
        orphans: list[str] = []
        broken: list[str] = []
        problems: list[str] = []
        for ddir in self._domain_dirs():
            lock = self._lock(ddir.name)
            with lock.held() if repair else contextlib.nullcontext():
                for _ in range(100):  # a removed point can break its children: repeat
                    pts = self._load(ddir)
                    index = _chain.file_index(pts)
                    bad_now: list[str] = []
                    for p in sorted(pts.values(), key=lambda q: q.id):
                        for disk in sorted(p.disks):
                            try:
                                _chain.validate_chain(ddir / "images", p, disk, index)
                                e = p.disks[disk]
                                if e.digests and not (ddir / "digests" / e.digests).is_file():
                                    problems.append(f"point {p.id} disk {disk}: digests missing")
                            except (ChainError, RepositoryError) as exc:
                                problems.append(str(exc))
                                bad_now.append(p.id)
                                break
                    broken.extend(b for b in bad_now if b not in broken)
                    if not repair or not bad_now:
                        break
                    for b in bad_now:
                        _remove(ddir / "points" / f"{b}.json")
                    fsync_dir(ddir / "points")
                found = self._orphans(ddir, self._load(ddir))
                orphans.extend(found)
                if repair:
                    for rel in found:
                        _remove(self.path / rel)
        return CheckReport(tuple(orphans), tuple(broken), tuple(problems), repaired=repair)

    # ------------------------------------------------------------------ prune
    def prune(
        self,
        domain: Domain | str,
        *,
        keep_last: int | None = None,
        keep_daily: int | None = None,
        keep_weekly: int | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove the points a retention policy does not keep; every kept point stays
        restorable.

        The rules (see :func:`~statecapture._repository.retention.select`) add up; the
        newest point is always kept. A removed point's incremental layers are merged into
        the layer that sits on them (``qemu-img rebase``: the successor absorbs what it
        needs, and a successor of a removed full copy becomes a full copy). With a
        :class:`Domain`, the checkpoints this repository made that no kept point needs
        (every one but the newest point's) are deleted, libvirt merging their bitmaps, so
        bitmaps do not pile up in the guest's images. ``dry_run=True`` changes nothing.
        """
        from .._domain import Domain

        uuid = _uuid_of(domain)
        all_pts = self.points(domain, newest_first=False)
        if uuid is None:
            uuids = {p.domain_uuid for p in all_pts}
            if len(uuids) > 1:
                raise UsageError(f"several domains are named {domain!r}; pass the UUID")
            if not uuids:
                raise _not_found(f"the repository has no points of domain {domain!r}")
            uuid = uuids.pop()
        keep = retention.select(
            all_pts, keep_last=keep_last, keep_daily=keep_daily, keep_weekly=keep_weekly
        )
        if dry_run:
            return PruneReport(
                removed=tuple(p for p in all_pts if p.id not in keep),
                kept=tuple(p for p in all_pts if p.id in keep),
                dry_run=True,
            )
        ddir = self._domain_dir(uuid)
        dom = domain if isinstance(domain, Domain) else None
        merged: list[str] = []
        notes: list[str] = []
        with self._lock(uuid).held():
            self._clean_leftovers(dom, ddir)
            pts = self._load(ddir)
            order = sorted(pts.values(), key=lambda q: (q.time, q.id))
            removed = [p for p in order if p.id not in keep]
            for r in removed:
                merged.extend(self._remove_point(ddir, r.id))
            boundary("repo:prune:removed")
            kept = sorted(self._load(ddir).values(), key=lambda q: (q.time, q.id))
            deleted: list[str] = []
            if dom is not None:
                newest = kept[-1].checkpoint if kept else None
                deleted = self._delete_checkpoints(dom, keep={newest} if newest else set())
                if newest:  # the next incremental starts there; older ones are not needed
                    kept = [
                        attrs.evolve(q, checkpoint=None) if q.checkpoint != newest else q
                        for q in kept
                    ]
                    for q in kept:
                        if q.checkpoint is None and pts.get(q.id, q).checkpoint is not None:
                            write_atomic(ddir / "points", f"{q.id}.json", dumps(q.to_json()))
            else:
                notes.append("no Domain given: checkpoints on the domain were left as they are")
        return PruneReport(
            removed=tuple(removed),
            kept=tuple(kept),
            merged=tuple(merged),
            checkpoints_deleted=tuple(deleted),
            notes=tuple(notes),
        )

    def _remove_point(self, ddir: Path, rid: str) -> list[str]:
        """Remove point ``rid``, merging its layers into the layers that sit on them.

        Order (each step leaves every listed point restorable when the process dies):
        rebase each child layer (its guest-visible data never changes during a safe
        rebase) → rewrite the child's manifest → remove ``rid``'s manifest → its files.
        """
        images = ddir / "images"
        merged: list[str] = []
        pts = self._load(ddir)
        r = pts[rid]
        cache: dict[str, _dg.DigestMap] = {}
        for re_ in r.disks.values():
            children = [
                (q, d)
                for q in pts.values()
                for d, e in q.disks.items()
                if e.parent_file == re_.file and q.id != rid
            ]
            for q, d in children:
                ce = q.disks[d]
                child = images / ce.file
                lower = self._digest_map(ddir, re_, cache)
                upper = self._digest_map(ddir, ce, cache)
                boundary("repo:prune:before-rebase")
                if re_.parent_file is not None:
                    _rebase(images, child, re_.parent_file)
                    new_e = attrs.evolve(ce, parent_file=re_.parent_file)
                else:
                    _rebase(images, child, None)
                    new_e = attrs.evolve(ce, parent_file=None, kind=PointKind.FULL)
                boundary("repo:prune:rebased")
                dmap = _dg.merge(lower, upper)
                dname = f"{q.id}.{_safe(d)}.m{secrets.token_hex(3)}.json"
                write_atomic(ddir / "digests", dname, dmap.to_json(), replace=False)
                old_digests = ce.digests
                new_e = attrs.evolve(new_e, digests=dname)
                qdisks = dict(q.disks)
                qdisks[d] = new_e
                kind = (
                    PointKind.INCREMENTAL
                    if any(e.kind is PointKind.INCREMENTAL for e in qdisks.values())
                    else PointKind.FULL
                )
                q = attrs.evolve(
                    q,
                    disks=qdisks,
                    kind=kind,
                    parent=r.parent if kind is PointKind.INCREMENTAL else None,
                    bytes_copied=q.bytes_copied,
                )
                write_atomic(ddir / "points", f"{q.id}.json", dumps(q.to_json()))
                boundary("repo:prune:child-listed")
                pts[q.id] = q
                if old_digests:
                    _remove(ddir / "digests" / old_digests)
                merged.append(f"{ce.file} <- {re_.file}")
        _remove(ddir / "points" / f"{rid}.json")
        fsync_dir(ddir / "points")
        boundary("repo:prune:unlisted")
        for e in r.disks.values():
            _remove(images / e.file)
            if e.digests:
                _remove(ddir / "digests" / e.digests)
        _remove(ddir / "config" / rid)
        return merged


def _rebase(images: Path, child: Path, new_backing: str | None) -> None:
    """Safe ``qemu-img rebase`` of ``child`` onto ``new_backing`` (a name; ``None``: none)."""
    argv = ["rebase", "-f", "qcow2", "-b", new_backing or ""]
    if new_backing:
        argv += ["-F", "qcow2"]
    exe = shutil.which("qemu-img")
    if exe is None:
        raise UnsupportedError("qemu-img is not installed (Debian package qemu-utils)")
    done = subprocess.run(
        [exe, *argv, child.name], cwd=images, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RepositoryError(f"qemu-img rebase {child} failed: {done.stderr.strip()}")


def _rewrite_domain(
    xml: bytes, *, name: str, files: Mapping[str, Path], fmt: str, nvram: Path | None
) -> str:
    root = etree.fromstring(xml)
    name_el = root.find("name")
    if name_el is None:
        name_el = etree.SubElement(root, "name")
    name_el.text = name
    uuid_el = root.find("uuid")
    if uuid_el is not None:
        root.remove(uuid_el)
    for mac in root.iterfind("devices/interface/mac"):
        mac.set("address", "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)))
    devices = root.find("devices")
    if devices is not None:
        for disk in list(devices.iterfind("disk")):
            target = disk.find("target")
            dev = target.get("dev") if target is not None else None
            if disk.get("device", "disk") != "disk":
                continue
            if dev is None or dev not in files:
                devices.remove(disk)
                continue
            disk.set("type", "file")
            for child in list(disk):
                if child.tag in ("source", "backingStore"):
                    disk.remove(child)
            driver = disk.find("driver")
            if driver is None:
                driver = etree.SubElement(disk, "driver", name="qemu")
            driver.set("type", fmt)
            src = etree.Element("source", file=str(files[dev]))
            disk.insert(list(disk).index(driver) + 1, src)
    nv = root.find("os/nvram")
    if nv is not None:
        if nvram is not None:
            nv.text = str(nvram)
        else:
            nv.getparent().remove(nv)  # type: ignore[union-attr]
    return etree.tostring(root, encoding="unicode")


def _uuid_of(domain: object) -> str | None:
    from .._domain import Domain

    if domain is None:
        return None
    if isinstance(domain, Domain):
        return domain.uuid
    if isinstance(domain, str):
        return domain if _UUID.match(domain) else None
    raise UsageError(f"domain must be a Domain, a name or a UUID, not {domain!r}")


def _time_of(pid: str) -> float:
    from .manifest import _parse_iso

    stamp = pid.split("Z-")[0]
    iso = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}Z"
    return _parse_iso(iso)


def _safe(disk: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", disk).lstrip(".") or "_"


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"lock_timeout must be a number of seconds >= 0, not {value!r}")
    return float(value)
