"""Backup repositories, fast tier: manifest, retention, digests, locks, and the shut-off path.

libvirt's test driver has no backup jobs, but a shut-off domain whose disk is a real qcow2
file is backed up with ``qemu-img`` alone, so the whole repository (backup, restore, verify,
check, prune, restore_domain) runs here without QEMU.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import statecapture
from statecapture import (
    ChainError,
    NotFoundError,
    PointKind,
    Repository,
    RepositoryError,
    RepositoryFormatError,
    RepositoryLockedError,
    RestorePoint,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from statecapture._repository import digests as dg
from statecapture._repository import retention, store
from statecapture._repository.manifest import DiskEntry, new_point_id

MiB = 1 << 20


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _qemu_io(image: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], check=True, capture_output=True
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw(image: Path, out: Path) -> Path:
    _qemu_img("convert", "-O", "raw", str(image), str(out))
    return out


@pytest.fixture
def off_domain(test_conn: statecapture.Connection, tmp_path: Path) -> statecapture.Domain:
    """A shut-off test-driver domain with one 16 MiB qcow2 disk holding some data."""
    image = tmp_path / "gamma-vda.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    _qemu_io(image, "write -P 0x11 0 3M")
    _qemu_io(image, "write -P 0x22 9M 1M")
    xml = f"""<domain type='test'><name>gamma</name><memory>8192</memory>
      <os><type>hvm</type></os>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
        <interface type='network'><mac address='52:54:00:aa:bb:cc'/>
          <source network='default'/></interface>
      </devices></domain>"""
    return test_conn.define(xml)


# ----------------------------------------------------------------------------- open/create


def test_create_and_open(tmp_path: Path) -> None:
    """create() makes an owner-only repository with a versioned header; opening a path
    that is not a repository, or one of a newer format, is a clear typed error."""
    repo = Repository.create(tmp_path / "r")
    assert (repo.path.stat().st_mode & 0o777) == 0o700
    header = json.loads((repo.path / "repository.json").read_text())
    assert header["format"] == "statecapture-repository" and header["version"] == 1
    assert Repository(tmp_path / "r").info == repo.info
    assert repo.points() == []
    with pytest.raises(RepositoryFormatError, match="not a statecapture repository"):
        Repository(tmp_path)
    with pytest.raises(TargetExistsError):
        Repository.create(tmp_path)  # not empty
    header["version"] = 99
    (repo.path / "repository.json").write_text(json.dumps(header))
    with pytest.raises(RepositoryFormatError, match="newer statecapture"):
        Repository(repo.path)


# ----------------------------------------------------------------------------- values


def test_restore_point_json_round_trip(tmp_path: Path) -> None:
    """A point survives its manifest JSON unchanged; a damaged manifest is a typed error."""
    pid = new_point_id()
    p = RestorePoint(
        id=pid,
        domain="d",
        domain_uuid="12345678-1234-1234-1234-123456789abc",
        time=1.5,
        kind=PointKind.INCREMENTAL,
        reason="incremental",
        checkpoint="scr-x",
        parent=new_point_id(),
        disks={"vda": DiskEntry("d.vda.x.qcow2", PointKind.INCREMENTAL, 1024, 512, "p.qcow2")},
        config=("inactive.xml",),
    )
    assert RestorePoint.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.kind == "incremental" and str(p.kind) == "incremental"
    assert pid in str(p) and "<table>" in p._repr_html_()
    bad = p.to_json()
    bad["disks"]["vda"]["file"] = "../../etc/passwd"
    with pytest.raises(RepositoryError):
        RestorePoint.from_json(bad)


def _pt(day: int, hour: int = 12) -> RestorePoint:
    t = time.mktime((2026, 11, day, hour, 0, 0, 0, 0, 0)) - time.timezone
    return RestorePoint(
        id=new_point_id(t),
        domain="d",
        domain_uuid="12345678-1234-1234-1234-123456789abc",
        time=t,
        kind=PointKind.FULL,
        reason="first backup",
        checkpoint=None,
        parent=None,
        disks={},
    )


def test_retention_selection() -> None:
    """keep_last/keep_daily/keep_weekly add up, pick the newest point per day/week, and a
    policy keeping nothing is refused."""
    pts = [_pt(d, h) for d in (2, 3, 3, 4, 10, 11, 11) for h in (8,)]
    pts = [_pt(2, 8), _pt(3, 8), _pt(3, 20), _pt(4, 8), _pt(10, 8), _pt(11, 8), _pt(11, 20)]
    ids = [p.id for p in pts]
    assert retention.select(pts, keep_last=2) == {ids[5], ids[6]}
    assert retention.select(pts, keep_daily=3) == {ids[6], ids[4], ids[3]}
    # ISO weeks: Nov 2-4 (week 45), Nov 10-11 (week 46)
    assert retention.select(pts, keep_weekly=2) == {ids[6], ids[3]}
    assert retention.select(pts, keep_last=1, keep_weekly=2) == {ids[6], ids[3]}
    with pytest.raises(UsageError):
        retention.select(pts)
    with pytest.raises(UsageError):
        retention.select(pts, keep_last=-1)


def test_digests_follow_the_chain(tmp_path: Path) -> None:
    """Per-block digests read from the stored files equal the SHA-256 of the guest-visible
    blocks; an incremental layer touches only the blocks it stores."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "5M")
    _qemu_io(base, "write -P 0x33 0 2M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    _qemu_io(top, "write -P 0x44 1536k 64k")
    raw = _raw(top, tmp_path / "top.raw").read_bytes()
    got = dg.digest_blocks(top, 5 * MiB)
    for b in range(5):
        assert got[b] == hashlib.sha256(raw[b * MiB : (b + 1) * MiB]).hexdigest()
    assert dg.layer_blocks(dg.read_map(top)) == {1}
    assert got[4] == dg.zero_digest(5 * MiB, 4)


def test_lock_times_out_with_typed_error(tmp_path: Path) -> None:
    """A second writer waits for the lock, then gets RepositoryLockedError; the lock dies
    with the process holding it."""
    lock_path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, sys, time
                fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = store.DomainLock(lock_path, 0.3)
        with pytest.raises(RepositoryLockedError):
            lock.acquire()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with store.DomainLock(lock_path, 5).held():
        pass


# ----------------------------------------------------------------------------- shut-off domain


def test_shut_off_backup_restore_verify(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """A shut-off domain is copied in full (reason recorded, configuration captured); its
    restore and a plain ``qemu-img convert`` both equal the disk; verify passes, then finds
    one flipped byte; images are owner-only."""
    repo = Repository.create(tmp_path / "repo")
    source = Path(off_domain.disk("vda").source or "")
    ref = _raw(source, tmp_path / "ref.raw")
    p = repo.backup(off_domain)
    assert p.kind is PointKind.FULL and p.reason == "domain shut off, first backup"
    assert p.mode == "offline"
    # the test driver cannot define a checkpoint of a shut-off domain: none, and no bitmap
    assert p.checkpoint is None and "next backup is full" in p.notes[-1]
    assert list(off_domain.checkpoints) == []
    assert "bitmaps" not in _qemu_img("info", "--output=json", str(source))
    assert p.config == ("inactive.xml",)
    assert p.bytes_copied == 4 * MiB
    assert (p.files["vda"].stat().st_mode & 0o777) == 0o600
    files = repo.restore(p, tmp_path / "out", format="raw")
    assert _sha(files["vda"]) == _sha(ref)
    assert _sha(_raw(p.files["vda"], tmp_path / "plain.raw")) == _sha(ref)
    assert repo.verify().ok and repo.check().ok
    # flip one byte of stored data
    ext = next(e for e in dg.read_map(p.files["vda"]) if e.data and e.start >= 9 * MiB)
    assert ext.offset is not None
    with open(p.files["vda"], "r+b") as f:
        f.seek(ext.offset + 7)
        f.write(b"\x00")
    report = repo.verify(p)
    assert not report.ok
    assert [(d.point, d.disk, d.offset) for d in report.differences] == [(p.id, "vda", 9 * MiB)]


def test_encrypted_shut_off_backup_prune(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """Into an encrypted repository a shut-off domain's disk is copied encrypted as it is
    written (no stored file holds its known pattern; the image is LUKS qcow2); it restores
    equal with the key and verifies; prune works (the older point goes, the newer one
    restores)."""
    key = statecapture.RepositoryKey(b"fast-tier-secret-0123456789")
    repo = Repository.create(tmp_path / "enc", key=key)
    ref = _raw(Path(off_domain.disk("vda").source or ""), tmp_path / "ref.raw")
    p1 = repo.backup(off_domain)
    p2 = repo.backup(off_domain)
    for f in (x for x in repo.path.rglob("*") if x.is_file()):
        data = f.read_bytes()
        assert b"\x11" * 4096 not in data and b"\x22" * 4096 not in data, f
    assert json.loads(_qemu_img("info", "--output=json", str(p2.files["vda"])))["encrypted"]
    report = repo.prune(off_domain, keep_last=1)
    assert [p.id for p in report.removed] == [p1.id]
    files = repo.restore(p2, tmp_path / "out", format="raw")
    assert _sha(files["vda"]) == _sha(ref)
    assert repo.verify().ok


def test_compressed_shut_off_backup(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """Into a zstd repository a shut-off domain's disk is stored with compressed clusters
    (written by the copy itself); it takes less space than the data, restores equal and
    verifies."""
    repo = Repository.create(tmp_path / "z", compression="zstd")
    ref = _raw(Path(off_domain.disk("vda").source or ""), tmp_path / "ref.raw")
    p = repo.backup(off_domain)
    stored = p.files["vda"]
    info = json.loads(_qemu_img("info", "--output=json", str(stored)))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert stored.stat().st_blocks * 512 < MiB  # 4 MiB of two repeated bytes
    assert (stored.stat().st_mode & 0o777) == 0o600
    files = repo.restore(p, tmp_path / "out", format="raw")
    assert _sha(files["vda"]) == _sha(ref)
    assert repo.verify().ok


def test_prune_and_restore_domain_shut_off(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """prune keeps the newest points, removes the others' files; restore_domain defines a
    new domain (new name and UUID, new MAC) on the restored image."""
    repo = Repository.create(tmp_path / "repo")
    source = Path(off_domain.disk("vda").source or "")
    first = repo.backup(off_domain)
    ref1 = _raw(source, tmp_path / "ref1.raw")
    _qemu_io(source, "write -P 0x55 4M 1M")
    second = repo.backup(off_domain)
    ref = _raw(source, tmp_path / "ref.raw")
    # no checkpoint (test driver, shut off): a full copy again, with the reason
    assert second.kind is PointKind.FULL and second.parent is None
    assert second.reason == "domain shut off, checkpoint missing"
    assert _sha(repo.restore(first, tmp_path / "r1", format="raw")["vda"]) == _sha(ref1)
    assert _sha(repo.restore(second, tmp_path / "r2", format="raw")["vda"]) == _sha(ref)
    assert repo.verify().ok
    dry = repo.prune(off_domain, keep_last=1, dry_run=True)
    assert [p.id for p in dry.removed] == [first.id] and len(repo.points()) == 2
    report = repo.prune(off_domain, keep_last=1)
    assert [p.id for p in report.removed] == [first.id]
    assert [p.id for p in repo.points()] == [second.id]
    assert not first.files["vda"].exists()
    assert repo.check().ok and repo.verify().ok
    assert _sha(repo.restore(second, tmp_path / "r3", format="raw")["vda"]) == _sha(ref)
    with pytest.raises(NotFoundError):
        repo.point(first.id)
    dom = repo.restore_domain(second, test_conn, name="gamma-restored", dest_dir=tmp_path / "rd")
    assert dom.name == "gamma-restored" and dom.uuid != off_domain.uuid
    restored = Path(dom.disk("vda").source or "")
    assert restored.parent == tmp_path / "rd"
    assert _sha(_raw(restored, tmp_path / "rd.raw")) == _sha(ref)
    assert "52:54:00:aa:bb:cc" not in dom.inactive_definition.raw
    with pytest.raises(TargetExistsError):
        repo.restore_domain(second, test_conn, name="gamma-restored", dest_dir=tmp_path / "rd2")
    assert not (tmp_path / "rd2").exists()


def test_bad_input_changes_nothing(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """Unknown point, unknown disk, existing destination, bad format: typed errors before
    anything is written."""
    repo = Repository.create(tmp_path / "repo")
    p = repo.backup(off_domain)
    with pytest.raises(NotFoundError):
        repo.point(new_point_id())
    with pytest.raises(NotFoundError):
        repo.point("nonsense")
    (tmp_path / "exists").mkdir()
    with pytest.raises(TargetExistsError):
        repo.restore(p, tmp_path / "exists")
    assert list((tmp_path / "exists").iterdir()) == []
    with pytest.raises(UsageError):
        repo.restore(p, tmp_path / "o1", format="vmdk")
    with pytest.raises(NotFoundError):
        repo.restore(p, tmp_path / "o2", disks=["vdz"])
    with pytest.raises(NotFoundError):
        repo.backup(off_domain, disks=["vdz"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [q.id for q in repo.points()] == [p.id]


def test_running_domain_without_backup_jobs(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """The test driver has no backup jobs: a running domain's backup is refused with
    UnsupportedError and nothing is listed or left behind."""
    repo = Repository.create(tmp_path / "repo")
    with pytest.raises(UnsupportedError):
        repo.backup(test_domain, quiesce=False)
    assert repo.points() == []
    assert repo.check().ok


def test_failure_mid_backup_leaves_nothing_listed(
    off_domain: statecapture.Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a point's metadata: a typed error, no point listed, no file
    left behind, and the next backup works."""
    repo = Repository.create(tmp_path / "repo")
    real = store.write_atomic

    def full_disk(directory: Path, name: str, data: bytes, *, replace: bool = True) -> Path:
        if directory.name == "points":
            raise RepositoryError(f"cannot write {name}: {os.strerror(errno.ENOSPC)}")
        return real(directory, name, data, replace=replace)

    from statecapture._repository import backup as repo_mod

    monkeypatch.setattr(repo_mod, "write_atomic", full_disk)
    with pytest.raises(RepositoryError, match="No space left"):
        repo.backup(off_domain)
    monkeypatch.undo()
    assert repo.points() == []
    report = repo.check()
    assert report.ok, str(report)
    assert repo.backup(off_domain).kind is PointKind.FULL


def test_check_reports_and_repairs(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """check() reports orphan files and points whose files are missing; repair=True removes
    them so every listed point restores; the next backup also cleans orphans."""
    repo = Repository.create(tmp_path / "repo")
    p1 = repo.backup(off_domain)
    p2 = repo.backup(off_domain)
    assert p1.root is not None
    orphan = p1.root / "images" / "leftover.qcow2"
    orphan.write_bytes(b"x")
    p1.files["vda"].unlink()
    report = repo.check()
    assert not report.ok
    assert report.broken_points == (p1.id,)
    assert any("leftover.qcow2" in o for o in report.orphans)
    with pytest.raises(ChainError):
        repo.restore(p1, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    fixed = repo.check(repair=True)
    assert fixed.repaired
    assert [p.id for p in repo.points()] == [p2.id]
    assert repo.check().ok
    orphan.write_bytes(b"x")
    repo.backup(off_domain)
    assert not orphan.exists()


def test_second_writer_gets_locked_error_readers_are_not_blocked(
    off_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """While another process holds a domain's writer lock, backup() waits lock_timeout
    seconds, then raises RepositoryLockedError without writing anything; listing, restore
    and verify keep working meanwhile."""
    repo = Repository.create(tmp_path / "repo", lock_timeout=0.3)
    first = repo.backup(off_domain)
    lock_path = repo.path / "locks" / f"{off_domain.uuid}.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, time
                fd = os.open({str(lock_path)!r}, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(RepositoryLockedError):
            repo.backup(off_domain)
        assert time.monotonic() - started >= 0.3
        assert [p.id for p in repo.points()] == [first.id]
        assert repo.verify().ok
        repo.restore(first, tmp_path / "while-locked")
        assert repo.check().ok
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert repo.backup(off_domain).kind is PointKind.FULL


def test_encrypted_boot_xml_and_refusals(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """The configuration boot() defines from an encrypted repository names each disk's
    chain explicitly (the overlay, then the raw NBD export on its UNIX socket in
    overlay_dir/nbd, then the end of the chain) and validates against libvirt's
    domain.rng; a socket path over 107 bytes is a UsageError before anything is made;
    start=False defines the domain on its overlay and starts no server (booted() says to
    use start_booted)."""
    from lxml import etree

    from statecapture._repository import nbdboot
    from statecapture._repository.repository import _rewrite_domain
    from tests.schema import assert_valid

    key = statecapture.RepositoryKey(b"fast-tier-secret-0123456789")
    repo = Repository.create(tmp_path / "enc", key=key)
    p = repo.backup(off_domain)
    ov = tmp_path / "ov"
    nbd = nbdboot.plan(ov, ["vda"])
    assert nbd["vda"].uri == f"nbd+unix:///vda?socket={ov}/nbd/vda.sock"
    text = _rewrite_domain(
        off_domain.xml(inactive=True).encode(),
        name="boot-e",
        files={"vda": ov / "vda.qcow2"},
        fmt="qcow2",
        nvram=None,
        nbd=nbd,
    )
    assert_valid(text, "domain")
    disk = etree.fromstring(text.encode()).find("devices/disk")
    assert disk is not None
    assert [c.tag for c in disk if c.tag in ("source", "backingStore")] == [
        "source",
        "backingStore",
    ]
    store_el = disk.find("backingStore")
    assert store_el is not None and store_el.get("type") == "network"
    assert store_el.find("format").get("type") == "raw"  # type: ignore[union-attr]
    host = store_el.find("source[@protocol='nbd'][@name='vda']/host")
    assert host is not None and host.get("socket") == str(ov / "nbd" / "vda.sock")
    end = store_el.find("backingStore")
    assert end is not None and len(end) == 0
    with pytest.raises(UsageError, match="socket"):
        nbdboot.plan(tmp_path / ("o" * 120), ["vda"])
    # start=False: defined with its overlay and socket directory, no server started
    dom = repo.boot(p, test_conn, name="boot-e", overlay_dir=ov, start=False)
    try:
        assert not dom.is_active
        assert (ov / "nbd").is_dir() and not any((ov / "nbd").iterdir())
        assert ((ov / "nbd").stat().st_mode & 0o777) == 0o700
        info = json.loads(_qemu_img("info", "--output=json", str(ov / "vda.qcow2")))
        assert info["backing-filename"] == nbd["vda"].uri
        (b,) = repo.booted(test_conn)
        assert b.name == "boot-e" and b.servers_alive is False
        assert "repo.start_booted(dom)" in (b.problem or "")
    finally:
        dom.undefine()


# ----------------------------------------------------------------------------- custody

BOOT_NS = "urn:x-statecapture:boot:1"


def test_boot_record_in_the_defined_xml(off_domain: statecapture.Domain, tmp_path: Path) -> None:
    """The configuration boot() defines carries the boot record in <metadata> (in its own
    namespace, read back equal) and validates against domain.rng; statecapture's own
    records of the source domain (a run's journal, an older boot record) are not carried
    over, other metadata (another tool's, fleet labels) is."""
    from lxml import etree

    from statecapture._repository.custody import BootRecord
    from statecapture._repository.repository import _rewrite_domain
    from tests.schema import assert_valid

    off_domain.set_metadata("urn:x-statecapture:journal:2", "statecapture", "<journal/>")
    off_domain.set_metadata(BOOT_NS, "b", "<boot repository='/old'/>")
    off_domain.set_metadata("urn:example:other", "other", "<keep/>")
    off_domain.set_metadata("urn:x-statecapture:labels:1", "labels", "<labels/>")
    ov = tmp_path / "ov"
    rec = BootRecord(
        repository="/r",
        repository_id="rid",
        point="p1",
        source="gamma",
        source_uuid=off_domain.uuid,
        overlay_dir=str(ov),
        encrypted=False,
        disks={"vda": str(ov / "vda.qcow2")},
    )
    text = _rewrite_domain(
        off_domain.xml(inactive=True).encode(),
        name="boot-r",
        files={"vda": ov / "vda.qcow2"},
        fmt="qcow2",
        nvram=None,
        record=rec,
    )
    assert_valid(text, "domain")
    meta = etree.fromstring(text.encode()).find("metadata")
    assert meta is not None
    assert sorted(etree.QName(el).namespace or "" for el in meta) == [
        "urn:example:other",
        BOOT_NS,
        "urn:x-statecapture:labels:1",
    ]
    (el,) = meta.iterfind(f"{{{BOOT_NS}}}boot")
    assert BootRecord.from_xml(etree.tostring(el, encoding="unicode")) == rec
    with pytest.raises(statecapture.XMLError):
        BootRecord.from_xml("<boot repository='/old'/>")


def test_booted_check_recover_report_only(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """A domain booted (start=False, test driver) is listed by booted() (depends, shut
    off, no problem), by check(conn=) as information (ok), and recover() reports it;
    repair=True touches neither the domain nor its overlays; with its backing file gone
    it is a problem for both (check not ok); check() without conn is unchanged.
    A damaged record is skipped by booted() and reported by recover(). Another
    repository's boots are not listed. Nothing is written into the repository."""
    repo = Repository.create(tmp_path / "repo")
    other = Repository.create(tmp_path / "other")
    p = repo.backup(off_domain)
    before = {f: f.read_bytes() for f in repo.path.rglob("*") if f.is_file()}
    dom = repo.boot(p, test_conn, name="booted", overlay_dir=tmp_path / "ov", start=False)
    (b,) = repo.booted(test_conn)
    assert (b.name, b.uuid, b.point, b.source) == ("booted", dom.uuid, p.id, "gamma")
    assert not b.running and b.depends and not b.encrypted and b.problem is None
    assert b.overlay_dir == tmp_path / "ov" and b.servers_alive is None
    assert other.booted(test_conn) == ()
    report = repo.check(conn=test_conn)
    assert report.ok and report.booted == (str(b),) and "booted domain 'booted'" in str(report)
    assert "booted" in report._repr_html_()
    assert repo.check() == statecapture.CheckReport()
    inactive = dom.xml(inactive=True)
    assert repo.check(repair=True, conn=test_conn).booted == (str(b),)
    assert (tmp_path / "ov" / "vda.qcow2").exists() and dom.xml(inactive=True) == inactive
    found = statecapture.recover(dom)
    assert found.clean and not found.actions and len(found.found) == 1
    assert "depends" in found.found[0] and p.id in found.found[0]
    assert dom.xml(inactive=True) == inactive

    img = p.root / "images" / p.disks["vda"].file  # type: ignore[operator]
    os.rename(img, tmp_path / "away.qcow2")
    try:
        (b,) = repo.booted(test_conn)
        assert b.problem is not None and "cannot run" in b.problem
        report = repo.check(conn=test_conn)
        assert not report.ok and any("booted domain 'booted'" in x for x in report.problems)
        assert "backing file" in statecapture.recover(dom).found[0]
    finally:
        os.rename(tmp_path / "away.qcow2", img)
    dom.set_metadata(BOOT_NS, "statecaptureboot", "<boot point='x'/>")
    assert repo.booted(test_conn) == ()
    assert "damaged boot record" in statecapture.recover(dom).found[0]
    dom.undefine()
    assert {f: f.read_bytes() for f in repo.path.rglob("*") if f.is_file()} == before


def test_stale_encrypted_boot_is_a_problem(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """A record of an encrypted boot whose overlay rests on an NBD export nobody serves
    (its qemu-nbd ended with the domain): booted() says the servers are gone and that it
    cannot start as it is (start_booted, or undefine and remove overlay_dir)."""
    repo = Repository.create(tmp_path / "repo")
    ov = tmp_path / "ov"
    (ov / "nbd").mkdir(parents=True)
    sock = ov / "nbd" / "vda.sock"
    overlay = ov / "vda.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
        f"nbd+unix:///vda?socket={sock}", str(overlay), "16M",
    )  # fmt: skip
    record = (
        f"<boot repository='{repo.path}' repository-id='{repo.info.id}' point='p' "
        f"source='gamma' source-uuid='{off_domain.uuid}' overlay-dir='{ov}' "
        f"encrypted='yes'><disk target='vda' overlay='{overlay}'/></boot>"
    )
    off_domain.set_metadata(BOOT_NS, "statecaptureboot", record)
    (b,) = repo.booted(test_conn)
    assert b.encrypted and b.depends and b.servers_alive is False and not b.running
    assert b.problem is not None and "a plain start fails" in b.problem and str(ov) in b.problem
    assert "repo.start_booted(dom)" in b.problem
    report = repo.check(conn=test_conn)
    assert not report.ok and report.booted == (str(b),)
    assert "start_booted" in statecapture.recover(off_domain).found[0]
    with pytest.raises(statecapture.NotFoundError):  # its point is gone: nothing started
        repo.start_booted(off_domain)
    assert not off_domain.is_active and not (ov / "nbd" / "vda.pid").exists()
    overlay.unlink()
    (b,) = repo.booted(test_conn)
    assert b.problem is not None and "missing" in b.problem


def test_start_booted_plain_and_refusals(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """start_booted() starts a shut-off domain booted from a plain repository (test driver);
    refused, changing nothing: not a Domain, a domain not booted, one booted from another
    repository (named), a running one (InvalidStateError), the chain's file gone
    (ChainError), the repository moved (RepositoryError), an overlay gone (NotFoundError),
    a detached one (no record). Nothing is written into the repository."""
    repo = Repository.create(tmp_path / "repo")
    other = Repository.create(tmp_path / "other")
    p = repo.backup(off_domain)
    before = {f: f.read_bytes() for f in repo.path.rglob("*") if f.is_file()}
    dom = repo.boot(p, test_conn, name="booted", overlay_dir=tmp_path / "ov", start=False)
    inactive = dom.xml(inactive=True)
    with pytest.raises(statecapture.UsageError, match="Domain"):
        repo.start_booted("booted")  # type: ignore[arg-type]
    with pytest.raises(statecapture.UsageError, match="not booted from a repository"):
        repo.start_booted(off_domain)
    with pytest.raises(statecapture.UsageError, match="another repository") as exc:
        other.start_booted(dom)
    assert str(repo.path) in str(exc.value) and repo.info.id in str(exc.value)
    img = p.root / "images" / p.disks["vda"].file  # type: ignore[operator]
    os.rename(img, tmp_path / "away.qcow2")
    try:
        with pytest.raises(statecapture.ChainError):
            repo.start_booted(dom)
    finally:
        os.rename(tmp_path / "away.qcow2", img)
    os.rename(repo.path, tmp_path / "moved")
    try:
        with pytest.raises(statecapture.RepositoryError, match="moved"):
            Repository(tmp_path / "moved").start_booted(dom)
    finally:
        os.rename(tmp_path / "moved", repo.path)
    assert not dom.is_active and dom.xml(inactive=True) == inactive

    repo.start_booted(dom)
    assert dom.is_active
    (b,) = repo.booted(test_conn)
    assert b.running and b.depends and b.problem is None
    with pytest.raises(statecapture.InvalidStateError, match="running"):
        repo.start_booted(dom)
    assert dom.is_active
    dom.destroy()
    overlay = tmp_path / "ov" / "vda.qcow2"
    os.rename(overlay, tmp_path / "ov-away.qcow2")
    with pytest.raises(statecapture.NotFoundError, match="missing"):
        repo.start_booted(dom)
    os.rename(tmp_path / "ov-away.qcow2", overlay)
    assert not dom.is_active
    dom.set_metadata(BOOT_NS, "statecaptureboot", None)  # what detach does at its end
    with pytest.raises(statecapture.UsageError, match="detached already"):
        repo.start_booted(dom)
    assert not dom.is_active
    dom.undefine()
    assert {f: f.read_bytes() for f in repo.path.rglob("*") if f.is_file()} == before


def test_prune_keeps_points_booted_domains_read(
    off_domain: statecapture.Domain, test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """A point a shut-off booted domain (start=False, test driver) still reads is kept by
    prune whatever the policy says (a note names the domain), dry_run shows the same; the
    booted domain's backing stays valid and every kept point restores equal. With a name and
    no conn booted domains are not looked for (a note says so), with conn= they are. Once
    the booted domain is gone, prune removes its point."""
    repo = Repository.create(tmp_path / "repo")
    source = Path(off_domain.disk("vda").source or "")
    refs: dict[str, str] = {}
    pts = []
    for i in range(3):
        _qemu_io(source, f"write -P 0x{0x40 + i:x} 4M 1M")
        pts.append(repo.backup(off_domain))
        refs[pts[-1].id] = _sha(_raw(source, tmp_path / f"ref{i}.raw"))
    p1, p2, p3 = pts
    dom = repo.boot(p1, test_conn, name="booted", overlay_dir=tmp_path / "ov", start=False)
    why = f"point {p1.id} kept: domain 'booted' booted from it still reads it (detach it"

    dry = repo.prune(off_domain, keep_last=1, dry_run=True)
    assert [p.id for p in dry.removed] == [p2.id] and [p.id for p in dry.kept] == [p1.id, p3.id]
    assert any(n.startswith(why) for n in dry.notes) and len(repo.points()) == 3
    by_name = repo.prune("gamma", keep_last=1, dry_run=True)
    assert [p.id for p in by_name.removed] == [p1.id, p2.id]
    assert any("booted domains were not checked (pass conn=" in n for n in by_name.notes)
    by_uuid = repo.prune(off_domain.uuid, keep_last=1, dry_run=True, conn=test_conn)
    assert [p.id for p in by_uuid.removed] == [p2.id] and by_uuid.notes == dry.notes

    report = repo.prune(off_domain, keep_last=1)
    assert [p.id for p in report.removed] == [p2.id]
    assert [p.id for p in report.kept] == [p1.id, p3.id]
    assert any(n.startswith(why) for n in report.notes) and why in str(report)
    assert sorted(p.id for p in repo.points()) == [p1.id, p3.id]
    (b,) = repo.booted(test_conn)
    assert b.depends and b.problem is None
    assert repo.check(conn=test_conn).ok and repo.verify().ok
    for p in (p1, p3):
        assert _sha(repo.restore(p, tmp_path / f"r-{p.id}", format="raw")["vda"]) == refs[p.id]

    by_name = repo.prune("gamma", keep_last=1, conn=test_conn)  # still protected by name
    assert by_name.removed == () and any(n.startswith(why) for n in by_name.notes)
    dom.undefine()
    final = repo.prune(off_domain, keep_last=1)
    assert [p.id for p in final.removed] == [p1.id] and not any("kept" in n for n in final.notes)
    assert [p.id for p in repo.points()] == [p3.id] and repo.check().ok
    assert _sha(repo.restore(p3, tmp_path / "r-last", format="raw")["vda"]) == refs[p3.id]


def test_prune_protection_reads_the_whole_chain() -> None:
    """What prune protects with a booted point: the points its chains rest on (parents,
    and the owner of a full disk an incremental point took over), never newer ones."""
    import attrs

    from statecapture._repository.maintenance import reads

    def disk(name: str, parent: str | None = None) -> DiskEntry:
        kind = PointKind.FULL if parent is None else PointKind.INCREMENTAL
        return DiskEntry(name, kind, MiB, parent_file=parent)

    a = attrs.evolve(_pt(1), disks={"vda": disk("a.vda")})
    b = attrs.evolve(
        _pt(2), kind=PointKind.INCREMENTAL, parent=a.id,
        disks={"vda": disk("b.vda", "a.vda"), "vdb": disk("b.vdb")},
    )  # fmt: skip
    c = attrs.evolve(
        _pt(3), kind=PointKind.INCREMENTAL, parent=b.id,
        disks={"vda": disk("c.vda", "b.vda"), "vdb": disk("c.vdb", "b.vdb")},
    )  # fmt: skip
    d = attrs.evolve(_pt(4), disks={"vda": disk("d.vda")})
    pts = {p.id: p for p in (a, b, c, d)}
    assert reads(pts, c) == {a.id, b.id, c.id}
    assert reads(pts, b) == {a.id, b.id}
    assert reads(pts, d) == {d.id}
