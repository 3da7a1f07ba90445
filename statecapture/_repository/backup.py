"""What :meth:`Repository.backup` does: choose full or incremental, copy, record, list.

A running domain is copied by :func:`statecapture.direct_backup` into the domain's
``images/`` directory; each new layer is then made self-describing (its backing reference
a plain name inside the repository) and digested from the stored file (see ``digests``);
the configuration is captured; the point's manifest is written last. A shut-off domain is
copied with ``qemu-img convert``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Set
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from lxml import etree

from .._advisor import Consistency
from .._journal import boundary
from .._nbd import Target, compressed_full_copies, create_target, key_objects
from .._nbd_digest import BlockDigests, Taken, collecting, file_key
from .._qemuimg import qemu_img
from ..errors import (
    ChainError,
    CheckpointInconsistentError,
    RepositoryError,
    StateCaptureError,
    UnsupportedError,
    UsageError,
)
from . import chain as _chain
from . import digests as _dg
from .common import _safe, _time_of
from .manifest import DiskEntry, PointKind, RestorePoint, dumps, new_point_id
from .store import copy_in, copy_tree_in, fsync_dir, private_dir, write_atomic
from .store import remove as _remove

if TYPE_CHECKING:
    from .._backup import BackupProgress
    from .._domain import Domain
    from .repository import Repository

__all__ = ["decide", "live_backup", "offline_backup"]


def _undo(fn: Callable[..., None], *args: Any) -> Callable[..., bool]:
    """An ExitStack exit callback running ``fn(*args)`` on error; its own failure becomes a
    note on the original error, never replaces it."""

    def exit_(_t: object, exc: BaseException | None, _tb: object) -> bool:
        if exc is None:
            return False
        try:
            fn(*args)
        except BaseException as cleanup:
            exc.add_note(f"cleaning up after the failed backup failed too: {cleanup!r}")
        return False

    return exit_


def decide(
    repo: Repository, dom: Domain, ddir: Path, points: Mapping[str, RestorePoint], full: bool
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
    from .._backup_plan import backup_file_name

    index = _chain.file_index(points)
    for disk, entry in latest.disks.items():
        if entry.file != backup_file_name(dom.name, disk, cp):
            return None, "domain renamed since the last point"
        try:
            _chain.validate_chain(ddir / "images", latest, disk, index)
        except ChainError as exc:
            return None, f"last point damaged ({exc})"
    return latest, "incremental"


def live_backup(
    repo: Repository,
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

    base, reason = decide(repo, dom, ddir, points, full)
    pid = new_point_id()
    cp_name = repo.checkpoint_prefix + pid
    images = ddir / "images"
    sink = digest_sink(repo)
    method = None if repo.key is not None else repo.info.compression
    with collecting(sink), compressed_full_copies(method) as compressed:
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
    with ExitStack() as undo:
        undo.push(_undo(discard_run, repo, dom, ddir, pid, cp_name, dict(result.files)))
        boundary("repo:backup:copied")
        entries: dict[str, DiskEntry] = {}
        for disk, path in sorted(result.files.items()):
            parent_entry = base.disks.get(disk) if base is not None else None
            entries[disk] = record_layer(
                repo,
                ddir,
                pid,
                disk,
                Path(path),
                parent_entry,
                base is not None,
                sink,
                compressed=compressed,
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
        config = capture_config(repo, dom, ddir, pid)
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
        commit(repo, ddir, point)
        undo.pop_all()
    return point


def digest_sink(repo: Repository) -> BlockDigests:
    """Where downloads file the block digests they take while copying (this repository's
    block size and hash: SHA-256, or HMAC-SHA256 under the key of an encrypted one)."""
    key = None if repo.key is None else repo.key.digest_key(repo.info.id)
    return BlockDigests(_dg.BLOCK_SIZE, lambda: _dg.hasher(key))


def record_layer(
    repo: Repository,
    ddir: Path,
    pid: str,
    disk: str,
    path: Path,
    parent: DiskEntry | None,
    incremental: bool,
    sink: BlockDigests | None = None,
    *,
    compressed: Set[tuple[int, int]] = frozenset(),
) -> DiskEntry:
    """Make the stored layer self-describing (relative backing name), digest it (with the
    digests ``sink`` took during the copy when they match the stored layer). A layer whose
    ``(st_dev, st_ino)`` is in ``compressed`` was written compressed by its copy already."""
    images = ddir / "images"
    os.chmod(path, 0o600)
    taken = None if sink is None else sink.taken.get(file_key(path))
    layers = _dg.chain_files(path)
    top = layers[0]
    encrypted = bool(top.get("encrypted"))
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
            _rebase_unsafe(path, name, encrypted)
        parent_file = name
    from .crypto import opened
    from .transform import reader, store_layer

    store_layer(
        repo, path, parent_file, encrypted=encrypted, compressed=file_key(path) in compressed
    )
    size = int(top["virtual-size"])
    with opened(repo, path) as args:
        extents = _dg.read_map(path, opened=args)
    copied = sum(e.length for e in extents if e.depth == 0 and e.data)
    key = None if repo.key is None else repo.key.digest_key(repo.info.id)
    blocks = _taken_blocks(taken, extents, size, full=parent_file is None)
    if blocks is None:  # not taken during the copy: read the stored chain
        files = [images / path.name] + [images / Path(str(x["filename"])).name for x in layers[1:]]
        wanted = None if parent_file is None else _dg.layer_blocks(extents).__contains__
        with reader(repo, path) as read:
            blocks = _dg.digest_blocks(
                path, size, wanted, extents=extents, files=files, read=read, key=key
            )
    if parent_file is None:
        blocks = {k: v for k, v in blocks.items() if v != _dg.zero_digest(size, k, key=key)}
    dmap = _dg.DigestMap(size, blocks, complete=parent_file is None, keyed=key is not None)
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


def _taken_blocks(
    taken: Taken | None, extents: list[_dg.Extent], size: int, *, full: bool
) -> dict[int, str] | None:
    """The digests taken during the copy, when they cover the stored layer: a full layer's
    data blocks must all have been digested, an incremental layer's touched blocks must be
    exactly the digested ones; ``None`` otherwise (then the stored files are read)."""
    if taken is None or taken.size != size:
        return None
    if full:
        held = _dg.layer_blocks(e for e in extents if e.data)
        return dict(taken.blocks) if held <= taken.blocks.keys() else None
    return dict(taken.blocks) if _dg.layer_blocks(extents) == set(taken.blocks) else None


def _rebase_unsafe(path: Path, name: str, encrypted: bool) -> None:
    """Record ``name`` as the backing of ``path`` (metadata only)."""
    if not encrypted:
        qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", name, str(path))
        return
    target = Target(str(path), None, encrypted=True)
    qemu_img(
        "rebase",
        *key_objects(),
        "-u",
        "-F",
        "qcow2",
        "-b",
        name,
        "--image-opts",
        target.image_opts(),
    )


def capture_config(repo: Repository, dom: Domain, ddir: Path, pid: str) -> tuple[str, ...]:
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


def commit(repo: Repository, ddir: Path, point: RestorePoint) -> None:
    """List the point: its manifest, written last and atomically."""
    fsync_dir(ddir / "images")
    boundary("repo:backup:before-manifest")
    write_atomic(ddir / "points", f"{point.id}.json", dumps(point.to_json()), replace=False)
    boundary("repo:backup:listed")


def discard_run(
    repo: Repository,
    dom: Domain,
    ddir: Path,
    pid: str,
    cp_name: str | None,
    files: Mapping[str, Path],
) -> None:
    """Undo a run whose point was not listed: its checkpoint and every file it made."""
    from .._backup import delete_checkpoint as _delete_checkpoint

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


def _offline_bitmap_ok(image: str, name: str) -> bool:
    """Whether qcow2 ``image`` holds a consistent persistent bitmap ``name`` (clean close)."""
    from .._qemuimg import image_info

    try:
        info = image_info(image)
    except StateCaptureError:
        return False
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    for b in (data or {}).get("bitmaps", []) if isinstance(data, dict) else []:
        if isinstance(b, dict) and b.get("name") == name:
            flags = b.get("flags", [])
            return "in-use" not in flags and "auto" in flags
    return False


def _offline_base(
    dom: Domain, ddir: Path, points: Mapping[str, RestorePoint], full: bool
) -> tuple[RestorePoint | None, str]:
    """The point a shut-off backup builds on (``None``: full) and the reason."""
    if not points:
        return None, "domain shut off, first backup"
    if full:
        return None, "domain shut off (full=True)"
    latest = max(points.values(), key=lambda p: (p.time, p.id))
    cp = latest.checkpoint
    try:
        known = cp is not None and cp in dom.checkpoints
    except UnsupportedError:
        known = False
    if cp is None or not known:
        return None, "domain shut off, checkpoint missing"
    index = _chain.file_index(points)
    for disk in latest.disks:
        try:
            _chain.validate_chain(ddir / "images", latest, disk, index)
        except ChainError as exc:
            return None, f"domain shut off, last point damaged ({exc})"
    return latest, "domain shut off, incremental"


def _copy_with_bitmap(source: str, bitmap: str, partial: Path, backing: Path) -> None:
    """Copy the blocks of qcow2 ``source`` that bitmap ``bitmap`` marks dirty into the new
    layer ``partial`` over ``backing`` (a private ``qemu-nbd`` serves the image)."""
    import shutil
    import subprocess
    import tempfile
    import time

    from .._nbd import ExportSource, copy_export

    exe = shutil.which("qemu-nbd")
    if exe is None:
        raise UnsupportedError("qemu-nbd is not installed (Debian package qemu-utils)")
    sockdir = Path(tempfile.mkdtemp(prefix="sc-nbd-"))
    sock = sockdir / "s"
    proc = subprocess.Popen(
        [
            exe,
            "--read-only",
            "--format=qcow2",
            f"--bitmap={bitmap}",
            f"--socket={sock}",
            "--export-name=disk",
            "--shared=8",
            "--persistent",
            source,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RepositoryError(f"qemu-nbd could not serve {source}: {err.strip()}")
            time.sleep(0.02)
        copy_export(
            ExportSource(str(sock), "disk", f"qemu:dirty-bitmap:{bitmap}"),
            partial,
            backing=backing,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def _convert_full(
    source: str, fmt: str, partial: Path, encrypted: bool, compression: str | None = None
) -> None:
    """Copy the shut-off domain's disk ``source`` into the new image ``partial``; into a
    LUKS image, encrypted as it is written, for an encrypted repository; with qcow2
    compressed clusters of ``compression`` written in the same pass, when given."""
    if not encrypted:
        opts = "cluster_size=65536"
        squeeze = [] if compression is None else ["-c", "-W"]
        if compression is not None:
            opts += f",compression_type={compression}"
        qemu_img("convert", "-f", fmt, "-O", "qcow2", *squeeze, "-o", opts, source, str(partial))
        return
    info = json.loads(qemu_img("info", "--output=json", "-f", fmt, "--force-share", source))
    create_target(partial, int(info["virtual-size"]), None, None)
    target = Target(str(partial), None, encrypted=True)
    qemu_img(
        "convert",
        "-n",
        "-f",
        fmt,
        *key_objects(),
        source,
        "--target-image-opts",
        target.image_opts(),
    )


def _offline_checkpoint(dom: Domain, name: str, disks: list[str], all_disks: list[str]) -> bool:
    """Create checkpoint ``name`` on the shut-off ``dom``: metadata first (redefined), then
    an enabled persistent bitmap in each qcow2 image, so the next start tracks writes.

    ``False`` when the driver cannot define a checkpoint of a shut-off domain (libvirt's
    test driver; QEMU before libvirt 7.x): then nothing was changed.
    """
    from ..xml import CheckpointDisk, CheckpointXML

    existing = dom.checkpoints.list()
    parent = existing[-1].name if existing else None
    entries = tuple(
        CheckpointDisk(d, checkpoint="bitmap", bitmap=name)
        if d in disks
        else CheckpointDisk(d, checkpoint="no")
        for d in all_disks
    )
    try:
        dom.checkpoints.redefine(
            CheckpointXML(
                name=name, parent=parent, creation_time=int(_time_of_now()), disks=entries
            ),
            validate=False,
        )
    except UnsupportedError:
        return False
    definition = dom.inactive_definition
    for d in disks:
        qemu_img("bitmap", "--add", str(definition.disk(d).source), name)
    return True


def _time_of_now() -> float:
    import time

    return time.time()


def offline_backup(
    repo: Repository,
    dom: Domain,
    ddir: Path,
    points: Mapping[str, RestorePoint],
    *,
    full: bool,
    disks: list[str] | None,
) -> RestorePoint:
    """A shut-off domain: copy every disk with qemu-img (nothing runs: consistent).

    Incremental from the latest point when its checkpoint's bitmap is in the image and was
    closed cleanly (served by ``qemu-nbd --bitmap``), full otherwise. A new checkpoint is
    created (metadata + bitmaps in the qcow2 images) so the next backup can be incremental.
    """
    from .._backup_plan import backup_file_name

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
    base, reason = _offline_base(dom, ddir, points, full)
    pid = new_point_id()
    qcow2 = [d.target for d in chosen if (d.format or "raw") == "qcow2"]
    cp_name = repo.checkpoint_prefix + pid if qcow2 else None
    images = ddir / "images"
    made: dict[str, Path] = {}
    compressed: set[tuple[int, int]] = set()  # layers written compressed by their copy
    with ExitStack() as undo:
        undo.push(_undo(discard_run, repo, dom, ddir, pid, cp_name, made))
        entries: dict[str, DiskEntry] = {}
        label = cp_name or pid
        for d in chosen:
            target = images / backup_file_name(dom.name, d.target, label)
            partial = images / f".{target.name}.partial"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            made[f"partial:{d.target}"] = partial
            parent = base.disks.get(d.target) if base is not None else None
            assert d.source is not None
            if (
                base is not None
                and base.checkpoint is not None
                and parent is not None
                and d.format == "qcow2"
                and _offline_bitmap_ok(d.source, base.checkpoint)
            ):
                _copy_with_bitmap(d.source, base.checkpoint, partial, images / parent.file)
            else:
                parent = None
                squeeze = None if repo.key is not None else repo.info.compression
                _convert_full(d.source, d.format or "raw", partial, repo.key is not None, squeeze)
                if squeeze is not None:
                    compressed.add(file_key(partial))
                fd = os.open(partial, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.chmod(partial, 0o600)
            os.link(partial, target)
            made[d.target] = target
            os.unlink(partial)
            entry = record_layer(
                repo, ddir, pid, d.target, target, parent, False, compressed=compressed
            )
            if base is not None and parent is None:
                why = (
                    "disk added"
                    if d.target not in base.disks
                    else "bitmap missing or not closed cleanly"
                )
                entry = attrs.evolve(entry, reason=why)
            entries[d.target] = entry
        config = capture_config(repo, dom, ddir, pid)
        notes = ["copied while the domain was shut off"]
        if cp_name is not None:
            all_disks = [x.target for x in definition.disks if x.device == "disk"]
            if not _offline_checkpoint(dom, cp_name, qcow2, all_disks):
                cp_name = None
                notes.append(
                    "the driver cannot define a checkpoint of a shut-off domain: the next "
                    "backup is full"
                )
        kind = (
            PointKind.INCREMENTAL
            if any(e.kind is PointKind.INCREMENTAL for e in entries.values())
            else PointKind.FULL
        )
        if base is not None and kind is PointKind.FULL:
            reason = "domain shut off, bitmap broken (not closed cleanly?)"
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
            frozen_for=None,
            consistency=Consistency.APPLICATION,
            mode="offline",
            config=config,
            notes=tuple(notes),
            root=ddir,
        )
        commit(repo, ddir, point)
        undo.pop_all()
    return point
