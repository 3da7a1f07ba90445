"""Repository maintenance: :meth:`Repository.verify`, :meth:`Repository.check` and
:meth:`Repository.prune` (retention with layer merging)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .._journal import boundary
from .._qemuimg import qemu_img
from ..errors import (
    ChainError,
    RepositoryError,
    StateCaptureError,
    ToolError,
    UsageError,
)
from . import chain as _chain
from . import digests as _dg
from . import retention
from .common import _not_found, _safe, _uuid_of
from .crypto import SECRET_ID, chain_opts, key_file, secret_object
from .manifest import DiskEntry, PointKind, RestorePoint, dumps
from .reports import CheckReport, Difference, PruneReport, VerifyReport
from .store import fsync_dir, read_bytes, write_atomic
from .store import remove as _remove

if TYPE_CHECKING:
    from .._connection import Connection
    from .._domain import Domain
    from .repository import Repository

__all__ = ["check", "prune", "verify"]


def digest_map(
    repo: Repository, ddir: Path, entry: DiskEntry, cache: dict[str, _dg.DigestMap]
) -> _dg.DigestMap:
    if entry.digests is None:
        raise RepositoryError(f"{entry.file} has no digests")
    if entry.digests not in cache:
        path = ddir / "digests" / entry.digests
        cache[entry.digests] = _dg.DigestMap.from_json(read_bytes(path), str(path))
    return cache[entry.digests]


def verify_disk(
    repo: Repository,
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
    maps = [digest_map(repo, ddir, e, cache) for e in expected_entries]
    own = maps[0]
    size = expected_entries[0].size
    from .crypto import opened

    with opened(repo, layers[0]) as args:
        extents = _dg.read_map(layers[0], opened=args)
    key = None if repo.key is None else repo.key.digest_key(repo.info.id)
    wanted = _dg.layer_blocks(extents) | set(own.blocks)
    if own.complete:  # a full layer: every block it stores, and the zero ones too
        wanted |= set(range((size + _dg.BLOCK_SIZE - 1) // _dg.BLOCK_SIZE))
    from .transform import reader

    with reader(repo, layers[0]) as through_qemu:
        got = _dg.digest_blocks(
            layers[0],
            size,
            wanted.__contains__,
            extents=extents,
            files=layers,
            read=through_qemu,
            key=key,
        )
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
            want = _dg.zero_digest(size, b, key=key)
        if got.get(b) != want:
            off = b * _dg.BLOCK_SIZE
            bad.append(Difference(p.id, disk, off, min(_dg.BLOCK_SIZE, size - off)))
    return read, bad


def remove_point(repo: Repository, ddir: Path, rid: str) -> list[str]:
    """Remove point ``rid``, merging its layers into the layers that sit on them.

    Order (each step leaves every listed point restorable when the process dies):
    rebase each child layer (its guest-visible data never changes during a safe
    rebase) → rewrite the child's manifest → remove ``rid``'s manifest → its files.
    """
    images = ddir / "images"
    merged: list[str] = []
    pts = repo._load(ddir)
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
            lower = digest_map(repo, ddir, re_, cache)
            upper = digest_map(repo, ddir, ce, cache)
            boundary("repo:prune:before-rebase")
            if re_.parent_file is not None:
                _rebase(repo, images, child, re_.parent_file)
                new_e = attrs.evolve(ce, parent_file=re_.parent_file)
            else:
                _rebase(repo, images, child, None)
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


def reads(pts: Mapping[str, RestorePoint], p: RestorePoint) -> set[str]:
    """The ids of ``p`` and of every point whose layers ``p``'s chains rest on."""
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
    return wanted


def verify(repo: Repository, point: RestorePoint | str | None = None) -> VerifyReport:
    """Re-read stored data and compare it with the digests recorded at backup time.

    ``point=None`` checks every point of every domain; a point checks it and the points
    its chains rest on. For each point and disk, every block its own layer stores (and
    every block its digest delta names) is read through the chain and compared; each
    stored byte is read about once. No guest, original disk or libvirt is needed.
    """
    if point is None:
        targets: list[tuple[Path, dict[str, RestorePoint], list[RestorePoint]]] = []
        for ddir in repo._domain_dirs():
            pts = repo._load(ddir)
            targets.append((ddir, pts, sorted(pts.values(), key=lambda q: q.id)))
    else:
        p, ddir, pts = repo._resolve(point)
        wanted = reads(pts, p)
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
                    n, bad = verify_disk(repo, ddir, pts, index, p, disk, cache)
                except (RepositoryError, StateCaptureError, OSError) as exc:
                    errors.append(f"point {p.id} disk {disk}: {exc}")
                    continue
                read += n
                diffs.extend(bad)
    return VerifyReport(tuple(checked), read, tuple(diffs), tuple(errors))


def check(repo: Repository, *, repair: bool = False, conn: Connection | None = None) -> CheckReport:
    """Look for inconsistencies: orphan files, points whose chains do not validate.

    ``repair=True`` (taking each domain's lock) removes the orphans and the manifests of
    points that cannot be restored (their files are kept out of the listing, then
    removed as orphans). Needs libvirt only with ``conn``: then the domains booted from
    the repository are listed too (never changed), those that cannot run as they are as problems.
    """
    orphans: list[str] = []
    broken: list[str] = []
    problems: list[str] = []
    for ddir in repo._domain_dirs():
        lock = repo._lock(ddir.name)
        with lock.held() if repair else contextlib.nullcontext():
            for _ in range(100):  # a removed point can break its children: repeat
                pts = repo._load(ddir)
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
            found = repo._orphans(ddir, repo._load(ddir))
            orphans.extend(found)
            if repair:
                for rel in found:
                    _remove(repo.path / rel)
    booted: tuple[str, ...] = ()
    if conn is not None:
        from .custody import check_lines

        booted, stale = check_lines(repo, conn)
        problems.extend(stale)
    return CheckReport(
        tuple(orphans), tuple(broken), tuple(problems), repaired=repair, booted=booted
    )


def prune(
    repo: Repository,
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

    A point that a domain booted from this repository still reads (running or shut off,
    not detached; found on ``conn``, by default the Domain's own connection) is kept, with
    the points its chains rest on, whatever the policy says: no file such a domain reads is
    rewritten or removed (:func:`protected`; a note says why each one is kept).
    """
    from .._domain import Domain

    uuid = _uuid_of(domain)
    if conn is None and isinstance(domain, Domain):
        conn = domain.connection
    policy = {"keep_last": keep_last, "keep_daily": keep_daily, "keep_weekly": keep_weekly}
    all_pts = repo.points(domain, newest_first=False)
    if uuid is None:
        uuids = {p.domain_uuid for p in all_pts}
        if len(uuids) > 1:
            raise UsageError(f"several domains are named {domain!r}; pass the UUID")
        if not uuids:
            raise _not_found(f"the repository has no points of domain {domain!r}")
        uuid = uuids.pop()
    keep = retention.select(all_pts, **policy)
    if dry_run:
        extra, notes = protected(repo, conn, uuid, {p.id: p for p in all_pts}, keep)
        keep |= extra
        return PruneReport(
            removed=tuple(p for p in all_pts if p.id not in keep),
            kept=tuple(p for p in all_pts if p.id in keep),
            dry_run=True,
            notes=tuple(notes),
        )
    ddir = repo._domain_dir(uuid)
    dom = domain if isinstance(domain, Domain) else None
    merged: list[str] = []
    notes = []
    with repo._lock(uuid).held():
        repo._clean_leftovers(dom, ddir)
        notes += [
            f"repaired the backing name of {n}" for n in repair_backing_names(repo, ddir / "images")
        ]
        pts = repo._load(ddir)
        # decided again under the lock: a point added meanwhile is the newest, kept
        keep = retention.select(list(pts.values()), **policy)
        extra, why = protected(repo, conn, uuid, pts, keep)
        keep |= extra
        notes += why
        order = sorted(pts.values(), key=lambda q: (q.time, q.id))
        removed = [p for p in order if p.id not in keep]
        for r in removed:
            merged.extend(remove_point(repo, ddir, r.id))
        boundary("repo:prune:removed")
        kept = sorted(repo._load(ddir).values(), key=lambda q: (q.time, q.id))
        deleted: list[str] = []
        if dom is not None:
            newest = kept[-1].checkpoint if kept else None
            deleted = repo._delete_checkpoints(dom, keep={newest} if newest else set())
            if newest:  # the next incremental starts there; older ones are not needed
                kept = [
                    attrs.evolve(q, checkpoint=None) if q.checkpoint != newest else q for q in kept
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


def protected(
    repo: Repository,
    conn: Connection | None,
    uuid: str,
    pts: Mapping[str, RestorePoint],
    keep: set[str],
) -> tuple[set[str], list[str]]:
    """The points of domain ``uuid`` that prune must keep beyond ``keep`` because a domain
    booted from this repository still reads them, and one note per such point.

    A booted domain's overlays name the top layer of its point P, whose chain reads P's own
    layers and those of the points below it. Removing P deletes its files; removing a point
    below P merges that point's data into P's layers by rewriting them in place (``qemu-img
    rebase``), which a running domain's image locks refuse and which would rewrite files
    under a shut-off one. So P and every point its chains rest on are kept: nothing a booted
    domain reads changes. ``conn=None``: nothing is found, a note says so.
    """
    if conn is None:
        return set(), [
            "booted domains were not checked (pass conn=..., or a Domain): a domain booted "
            "from a removed point would lose its backing files"
        ]
    from .custody import readers

    extra: set[str] = set()
    notes: list[str] = []
    for point, names in sorted(readers(repo, conn, uuid).items()):
        p = pts.get(point)
        if p is None:  # its point is gone already (booted() reports it as a problem)
            continue
        who = ("domain " if len(names) == 1 else "domains ") + ", ".join(map(repr, names))
        let = "detach it, or undefine it," if len(names) == 1 else "detach or undefine them"
        for q in sorted(reads(pts, p)):
            if q in keep or q in extra:
                continue
            extra.add(q)
            what = "from it" if q == point else f"from point {point} (resting on it)"
            notes.append(
                f"point {q} kept: {who} booted {what} still reads it ({let} to let prune remove it)"
            )
    return extra, notes


def _rebase(repo: Repository, images: Path, child: Path, new_backing: str | None) -> None:
    """Safe ``qemu-img rebase`` of ``child`` onto ``new_backing`` (a name; ``None``: none)."""
    if repo.key is not None:
        _rebase_encrypted(repo, images, child, new_backing)
        return
    argv = ["rebase", "-f", "qcow2", "-b", new_backing or ""]
    if new_backing:
        argv += ["-F", "qcow2"]
    try:
        qemu_img(*argv, child.name, cwd=images)
    except ToolError as exc:
        raise RepositoryError(f"qemu-img rebase {child} failed: {exc.stderr.strip()}") from exc


def _json_chain(files: list[str]) -> dict[str, Any]:
    """QEMU's JSON options of the encrypted chain ``files`` (top first), keys included."""
    node: dict[str, Any] | None = None
    for f in reversed(files):
        spec: dict[str, Any] = {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": f},
            "encrypt": {"key-secret": SECRET_ID},
        }
        if node is not None:
            spec["backing"] = node
        node = spec
    assert node is not None
    return node


def _rebase_encrypted(repo: Repository, images: Path, child: Path, new_backing: str | None) -> None:
    """The safe rebase of an encrypted layer, with ``qemu-img`` alone.

    ``qemu-img rebase`` opens the child (``--image-opts``, every layer's key) and the new
    backing by the name given with ``-b``, which cannot carry a key; a ``json:`` name can.
    So: a safe rebase onto ``json:{…the new backing chain with its keys…}`` (the child
    absorbs what it needs), then an unsafe one (header only) that records the plain name.
    A crash between the two leaves the ``json:`` name in the header: the guest-visible data
    is right, and :func:`repair_backing_names` (run by the next prune) records the name.
    """
    assert repo.key is not None
    layers = len(_dg.chain_files(child))
    with key_file(repo.key, repo.info.id) as kf:
        obj = ("--object", secret_object(kf))
        opts = chain_opts(child, layers)
        if new_backing is None:
            qemu_img("rebase", *obj, "--image-opts", "-b", "", opts)
            return
        files = [str(x["filename"]) for x in _dg.chain_files(images / new_backing)]
        spec = "json:" + json.dumps(_json_chain(files))
        qemu_img("rebase", *obj, "--image-opts", "-F", "qcow2", "-b", spec, opts)
        qemu_img("rebase", *obj, "-u", "--image-opts", "-F", "qcow2", "-b", new_backing,
                 chain_opts(child, 1))  # fmt: skip


def repair_backing_names(repo: Repository, images: Path) -> list[str]:
    """Record the plain backing name in every layer whose header holds a ``json:`` name
    (an encrypted prune that died between its two rebases); the layers repaired."""
    if repo.key is None:
        return []
    repaired = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(images)):
            path = images / name
            info = json.loads(qemu_img("info", "--output=json", "-U", str(path)))
            backing = str(info.get("backing-filename") or "")
            if not backing.startswith("json:"):
                continue
            target = Path(json.loads(backing[5:])["file"]["filename"]).name
            with key_file(repo.key, repo.info.id) as kf:
                qemu_img("rebase", "--object", secret_object(kf), "-u", "--image-opts",
                         "-F", "qcow2", "-b", target, chain_opts(path, 1))  # fmt: skip
            repaired.append(name)
    return repaired
