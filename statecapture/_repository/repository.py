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
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._journal import boundary
from .._qemuimg import qemu_img
from ..errors import (
    NotFoundError,
    RepositoryError,
    RepositoryFormatError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from . import backup as _bk
from . import chain as _chain
from . import maintenance as _maint
from .common import _UUID, _not_found, _safe, _uuid_of
from .crypto import RepositoryKey, check_key, opened
from .custody import BootedDomain
from .domainxml import _rewrite_domain
from .manifest import (
    RepositoryInfo,
    RestorePoint,
    dumps,
    is_point_id,
    now,
    parse_json,
    points_html,
)
from .reports import CheckReport, PruneReport, VerifyReport
from .store import (
    DomainLock,
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
    from .instant import DetachProgress

__all__ = ["Repository"]

HEADER: Final = "repository.json"


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
    key: RepositoryKey | None = attrs.field(repr=False)
    """The key an encrypted repository was opened with (``None``: not encrypted)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 60.0,
        key: RepositoryKey | None = None,
    ) -> None:
        """Open the repository at ``path`` (an encrypted one with its ``key``:
        :class:`RepositoryKeyError` when it is missing or wrong)."""
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
        self.key = check_key(self.info, key, str(root))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 60.0,
        compression: str | None = None,
        key: RepositoryKey | None = None,
    ) -> Repository:
        """Create a new, empty repository at ``path`` (a new or empty directory), owner-only.

        ``compression="zstd"`` (or ``"zlib"``) stores every image with qcow2 compressed
        clusters (any QEMU tool still reads them); ``None`` stores them uncompressed.
        ``key`` (a :class:`RepositoryKey`) makes an encrypted repository: every image is a
        LUKS-encrypted qcow2, digests are keyed; the key is never stored (QEMU cannot
        combine compression with encryption: asking for both is a :class:`UsageError`).
        Raises :class:`TargetExistsError` when ``path`` is a non-empty directory or a file.
        """
        from .manifest import COMPRESSIONS

        if compression not in COMPRESSIONS:
            raise UsageError(f"compression must be 'zstd', 'zlib' or None, not {compression!r}")
        if key is not None and not isinstance(key, RepositoryKey):
            raise UsageError(f"key must be a RepositoryKey, not {type(key).__name__}")
        if key is not None and compression is not None:
            raise UsageError(
                "QEMU cannot compress encrypted qcow2 images: choose compression or a key"
            )
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
        rid = secrets.token_hex(16)
        info = RepositoryInfo(
            id=rid,
            created=now(),
            compression=compression,
            version=1 if key is None else 2,
            encryption=None if key is None else "luks",
            key_check=None if key is None else key.check_value(rid),
        )
        write_atomic(root, HEADER, dumps(info.to_json()), replace=False)
        return cls(root, lock_timeout=lock_timeout, key=key)

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
        independent chains of one domain. A shut-off domain is copied with ``qemu-img``
        (consistent: nothing runs): incremental from the bitmaps a clean close left in its
        qcow2 images, else full; a checkpoint is then defined while it is off, so the next
        running backup continues incrementally. Each point also stores the domain's
        configuration (inactive and live XML), its NVRAM file and TPM state when present,
        and a digest of every 1 MiB block for :meth:`verify` (taken from the NBD export
        while a pull download copies it). In an encrypted repository every image is
        written encrypted from its first byte (pull mode only for a running domain).

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
        if mode == "push" and self.key is not None and dom.is_active:
            raise UsageError(
                "an encrypted repository backs up a running domain in pull mode only: in "
                "push mode QEMU writes the plain data to disk itself"
            )
        if disks is not None:
            if isinstance(disks, str):
                raise UsageError("disks must be a list of disk targets, e.g. ['vda']")
            disks = list(dict.fromkeys(disks))
            known = {d.target for d in dom.definition.disks}
            for d in disks:
                if d not in known:
                    raise _not_found(f"domain {dom.name!r} has no disk {d!r}")
        ddir = self._domain_dir(dom.uuid, create=True)
        with self._lock(dom.uuid).held(), contextlib.ExitStack() as keyed:
            self._clean_leftovers(dom, ddir)
            boundary("repo:backup:cleaned")
            points = self._load(ddir)
            if self.key is not None:  # writers of new layers open the encrypted chains below
                from .._nbd import encrypted_layers
                from .crypto import key_file

                kf = keyed.enter_context(key_file(self.key, self.info.id))
                keyed.enter_context(encrypted_layers(str(kf), self._chain_lengths(ddir, points)))
            if not dom.is_active:
                return _bk.offline_backup(self, dom, ddir, points, full=full, disks=disks)
            return _bk.live_backup(
                self,
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

    def _chain_lengths(self, ddir: Path, points: Mapping[str, RestorePoint]) -> dict[str, int]:
        """Stored image path → how many layers its chain has (itself included)."""
        index = _chain.file_index(points)
        out: dict[str, int] = {}
        for p in points.values():
            for d in p.disks:
                with contextlib.suppress(RepositoryError):
                    n = len(_chain.expected_chain(p, d, index))
                    out[str((ddir / "images" / p.disks[d].file).absolute())] = n
        return out

    # ------------------------------------------------------------------ leftovers
    def _clean_leftovers(self, dom: Domain | None, ddir: Path) -> list[str]:
        """Under the domain's lock: remove what no point lists; what was removed."""
        removed: list[str] = []
        if dom is not None:
            from .._journal import read_journal
            from .._recover import recover

            with contextlib.suppress(StateCaptureError):
                journal = read_journal(dom)
                if journal is not None and not journal.is_backup_job:
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
        from .._backup import delete_checkpoint as _delete_checkpoint

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
                with opened(self, tops[d]) as args:
                    src = ("-f", "qcow2", str(tops[d])) if args is None else args
                    qemu_img("convert", "-O", format, *src, str(target))
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

    # ------------------------------------------------------------------ instant recovery
    def export(
        self, point: RestorePoint | str, disk: str
    ) -> contextlib.AbstractContextManager[str]:
        """Serve ``disk`` of ``point`` read-only over NBD while the ``with`` block runs.

        ``with repo.export(point, "vda") as uri:`` yields an NBD URI
        (``nbd+unix:///vda?socket=/tmp/sc-export-.../nbd.sock``) any NBD client can read:
        ``nbdfuse``, ``guestfish --format=raw -a URI``, ``qemu-img convert URI``, libnbd. The
        server is ``qemu-nbd``, started as our child on a socket in a new owner-only
        directory and stopped (the directory removed) when the block ends, also on an
        error or ^C. The chain is validated first (:class:`ChainError`); a disk the point
        does not hold is :class:`NotFoundError`. The repository's files are never written.
        """
        from .instant import export

        return export(self, point, disk)

    def boot(
        self,
        point: RestorePoint | str,
        conn: Connection,
        *,
        name: str,
        overlay_dir: str | os.PathLike[str],
        start: bool = True,
        detach: bool = False,
        progress: Callable[[DetachProgress], None] | None = None,
        timeout: float | None = None,
    ) -> Domain:
        """Define (and start) a new domain ``name`` that runs straight from ``point``.

        Each disk of the point gets a new qcow2 overlay in the new owner-only directory
        ``overlay_dir`` whose backing file is the disk's chain in the repository, opened
        read-only by QEMU: the domain starts within seconds whatever the disk size, the
        guest's writes go to the overlays, and the repository's files never change. The
        configuration is the point's captured inactive XML with a new name, UUID and MAC
        addresses (disks the point did not copy are left out; NVRAM is a copy in
        ``overlay_dir``).

        ``detach=True`` then pulls the backing data into the overlays while the guest runs
        (libvirt block pull, one disk after the other, ``progress`` called with
        :class:`DetachProgress` about twice a second) so the domain ends independent of the
        repository; :meth:`detach` does the same later. Until then, do not prune the
        point's domain (its ``qemu-img rebase`` is refused while QEMU holds the images).

        From an encrypted repository each disk's backing is instead a private ``qemu-nbd``
        that opens the chain with the key, read-only, and serves it decrypted on a UNIX
        socket in ``overlay_dir/nbd/`` (0700); the key reaches it through a pipe and then
        lives only in that process's memory. The server ends by itself when the domain's
        QEMU lets go of it: when the domain stops (a plain ``dom.start()`` then fails:
        :meth:`start_booted` starts the servers again with it) or when a detach has pulled
        everything (the detach also makes sure it ended and removes the socket directory).
        With ``start=False`` the domain is defined with its overlays but no server runs
        yet: start it with :meth:`start_booted`, not ``dom.start()``. ``overlay_dir`` must
        be short enough for a socket path (107 bytes; :class:`UsageError` otherwise).

        Refused before anything is made: a domain ``name`` exists or ``overlay_dir`` exists
        (:class:`TargetExistsError`), the point's chain does not validate
        (:class:`ChainError`), the point has no configuration (:class:`RepositoryError`),
        the repository's key is missing or wrong (:class:`RepositoryKeyError`). On a later
        failure the domain is destroyed and undefined, the servers stopped and
        ``overlay_dir`` removed. The overlays are outside the repository: a crash while
        booted leaves them (and the domain), and the repository is unchanged. The new
        domain carries a boot record in its own libvirt metadata (repository, point,
        ``overlay_dir``, disks; removed by :meth:`detach`), so :meth:`booted`,
        ``check(conn=...)`` and :func:`~statecapture.recover` report it afterwards.
        """
        from .instant import boot

        return boot(
            self,
            point,
            conn,
            name=name,
            overlay_dir=overlay_dir,
            start=start,
            detach=detach,
            progress=progress,
            timeout=timeout,
        )

    def start_booted(self, dom: Domain) -> None:
        """Start again a shut-off domain that :meth:`boot` made from this repository.

        For a plain repository this is ``dom.start()`` after checking that the overlays'
        backing files are still the point's chain. From an encrypted repository the
        decrypting ``qemu-nbd`` servers ended when the domain stopped: each disk still
        resting on one gets it started again, exactly as :meth:`boot` does (the key through
        a pipe, socket in ``overlay_dir/nbd/``, made again 0700 if it was removed; the
        socket and pid file an ended server left are removed first), then the domain
        starts. If starting fails, the servers started are stopped again and the domain
        stays shut off; otherwise they live until the domain stops, as after :meth:`boot`.
        A disk already detached needs nothing. The repository is never written.

        Refused before anything changes: ``dom`` is not a :class:`~statecapture.Domain`,
        carries no boot record (never booted, or detached already) or one of another
        repository (:class:`UsageError`); it is running (:class:`InvalidStateError`); an
        overlay is missing or the point is gone (:class:`NotFoundError`); the point's chain
        does not validate (:class:`ChainError`) or the overlays rest elsewhere
        (:class:`RepositoryError`); the key is missing or wrong
        (:class:`RepositoryKeyError`); a ``qemu-nbd`` still serves the domain's socket
        (:class:`RepositoryError`) or something not ours is in its place
        (:class:`TargetExistsError`).
        """
        from .instant import start_booted

        start_booted(self, dom)

    def detach(
        self,
        dom: Domain,
        *,
        progress: Callable[[DetachProgress], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Pull every backing file of running ``dom`` into its top image (block pull).

        For a domain made by :meth:`boot`: afterwards its overlays are standalone images
        and it no longer reads the repository. ``timeout`` (seconds, overall) aborts the
        pull still running with :class:`OperationTimeoutError`; the domain keeps running
        on its chain. A domain booted from an encrypted repository reads through private
        ``qemu-nbd`` servers until then: afterwards they have ended (stopped by their
        verified pid if they did not end by themselves) and ``overlay_dir/nbd`` is removed.
        """
        from .instant import detach

        detach(dom, progress=progress, timeout=timeout)

    # ------------------------------------------------------------------ verify
    def verify(self, point: RestorePoint | str | None = None) -> VerifyReport:
        """Re-read stored data and compare it with the digests recorded at backup time.

        ``point=None`` checks every point of every domain; a point checks it and the points
        its chains rest on. For each point and disk, every block its own layer stores (and
        every block its digest delta names) is read through the chain and compared; each
        stored byte is read about once. No guest, original disk or libvirt is needed.
        """
        return _maint.verify(self, point)

    def booted(self, conn: Connection) -> tuple[BootedDomain, ...]:
        """The domains on ``conn`` that :meth:`boot` made from this repository and that have
        not been detached yet (recognised by the repository's id in the boot record each
        carries in its own metadata; a moved repository is still recognised), by name.

        Each :class:`BootedDomain` says whether it runs, whether it still depends on the
        repository (a disk's overlay still has a backing file in it, or a decrypting
        ``qemu-nbd``), whether those servers still run (encrypted), and a ``problem`` when it
        cannot run (again) as it is: servers ended, overlays or backing files gone. Reads
        only: nothing is changed, in the repository or elsewhere.
        """
        from .custody import booted

        return booted(self, conn)

    # ------------------------------------------------------------------ check
    def check(self, *, repair: bool = False, conn: Connection | None = None) -> CheckReport:
        """Look for inconsistencies: orphan files, points whose chains do not validate.

        ``repair=True`` (taking each domain's lock) removes the orphans and the manifests of
        points that cannot be restored (their files are kept out of the listing, then
        removed as orphans). Without ``conn`` it never needs libvirt. With ``conn`` the
        report also lists the domains :meth:`booted` finds there (``CheckReport.booted``); one
        that still depends on the repository is information (``ok`` stays ``True``), one
        that cannot run again is also a problem line. ``repair`` never touches a domain or
        its overlays.
        """
        return _maint.check(self, repair=repair, conn=conn)

    # ------------------------------------------------------------------ prune
    def prune(
        self,
        domain: Domain | str,
        *,
        keep_last: int | None = None,
        keep_daily: int | None = None,
        keep_weekly: int | None = None,
        dry_run: bool = False,
        conn: Connection | None = None,
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
        In an encrypted repository the layers are merged with ``qemu-img`` and the key,
        never decrypted onto the disk.

        A point that a domain :meth:`boot` made still reads (running or shut off, not
        :meth:`detach`-ed) is kept whatever the policy says, with the points its chains rest
        on, and a note in the report says which domain keeps it. Booted domains are looked
        for on ``conn``, by default the Domain's own connection; with a name or UUID and no
        ``conn`` they are not looked for (a note says so).
        """
        return _maint.prune(
            self,
            domain,
            keep_last=keep_last,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            dry_run=dry_run,
            conn=conn,
        )


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"lock_timeout must be a number of seconds >= 0, not {value!r}")
    return float(value)
