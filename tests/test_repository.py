"""Backup repositories on real QEMU (embedded driver, TCG guests).

References are taken as in ``test_backup.py``: the domain is paused, its disks flushed
through QEMU and copied raw, and the backup starts while it is still paused, so a point is
correct iff its restore is byte-identical to the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from lxml import etree

import statecapture
from statecapture import PointKind, Repository, RestorePoint
from statecapture.testing import wait_agent
from tests._raw import raw_domain

MiB = 1 << 20


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _aliases(dom: statecapture.Domain) -> dict[str, str]:
    root = etree.fromstring(dom.definition.raw.encode())
    out = {}
    for disk in root.iter("disk"):
        target, alias = disk.find("target"), disk.find("alias")
        if target is not None and alias is not None:
            out[target.get("dev", "")] = alias.get("name", "")
    return out


def _references(dom: statecapture.Domain, tmp: Path, tag: str) -> dict[str, Path]:
    import libvirt_qemu

    refs = {}
    for disk, alias in _aliases(dom).items():
        libvirt_qemu.qemuMonitorCommand(raw_domain(dom), f'qemu-io -d {alias} "flush"', 1)
        ref = tmp / f"ref-{tag}-{disk}.raw"
        _qemu_img("convert", "-U", "-O", "raw", str(dom.disk(disk).source), str(ref))
        refs[disk] = ref
    return refs


def _guest_writes(dom: statecapture.Domain, name: str, mib: int = 2) -> None:
    from statecapture.testing import guest_exec

    code, _out, err = guest_exec(
        dom,
        ["sh", "-c", f"dd if=/dev/urandom of=/data/{name} bs=64k count={16 * mib} && sync"],
        timeout=120,
    )
    assert code == 0, err


def _paused_backup(
    repo: Repository, dom: statecapture.Domain, tmp: Path, tag: str, **kw: object
) -> tuple[RestorePoint, dict[str, Path]]:
    dom.suspend()
    try:
        refs = _references(dom, tmp, tag)
        latest = repo.latest(dom)
        if latest is not None and latest.checkpoint in dom.checkpoints:
            assert latest.checkpoint is not None
            with contextlib.suppress(statecapture.CheckpointInconsistentError):
                DIRTY[tag] = dom.checkpoints[latest.checkpoint].dirty_bytes()
        point = repo.backup(dom, quiesce=False, **kw)  # type: ignore[arg-type]
    finally:
        dom.resume()
    return point, refs


DIRTY: dict[str, dict[str, int]] = {}
"""Dirty bytes per disk since the previous point's checkpoint, by backup tag."""


def _restore_equals(
    repo: Repository, point: RestorePoint, refs: dict[str, Path], out: Path
) -> None:
    files = repo.restore(point, out, format="raw")
    assert set(files) == set(refs)
    for disk, path in files.items():
        assert _sha(path) == _sha(refs[disk]), (point.id, disk)
        assert (path.stat().st_mode & 0o777) == 0o600


def _flip_byte_in_layer(image: Path) -> int:
    extents = json.loads(_qemu_img("map", "--output=json", str(image)))
    ext = next(e for e in extents if e["depth"] == 0 and e["data"])
    with open(image, "r+b") as f:
        f.seek(ext["offset"] + 100)
        b = f.read(1)
        f.seek(ext["offset"] + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    return int(ext["start"])


@pytest.mark.qemu
def test_full_and_incrementals_restore_verify_prune(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """1 full + 3 incrementals (pull, one pushed) with guest writes between: each point
    restores byte for byte to the disk at its instant; ``qemu-img convert TOP`` alone gives
    the same image; the next point is incremental from this repository's checkpoint; a
    second repository keeps an independent chain; verify passes, then finds one flipped
    byte in a middle incremental; prune keeps every remaining point restorable and deletes
    checkpoints no kept point needs."""
    repo = Repository.create(tmp_path / "repo")
    points, refs = [], []
    seen: list[object] = []
    for i in range(4):
        if i:
            _guest_writes(guest, f"round{i}")
        # round 2 lets QEMU push the layer; the others pull it over NBD
        kw = {"mode": "push"} if i == 2 else {"progress": seen.append}
        p, r = _paused_backup(repo, guest, tmp_path, f"r{i}", **kw)
        points.append(p)
        refs.append(r)
    assert [p.mode for p in points] == ["pull", "pull", "push", "pull"]
    assert seen  # progress reported while pulling
    print(*points, sep="\n")
    assert [p.kind for p in points] == [PointKind.FULL] + [PointKind.INCREMENTAL] * 3
    assert points[0].reason == "first backup"
    assert [p.parent for p in points[1:]] == [p.id for p in points[:3]]
    for p in points:
        assert p.checkpoint is not None and p.checkpoint.startswith(repo.checkpoint_prefix)
        assert "inactive.xml" in p.config and "live.xml" in p.config
    disk_size = points[0].disks["vda"].size
    for i, p in enumerate(points[1:], start=1):
        assert 0 < p.bytes_copied < disk_size / 4  # about the dirtied data, not the disk
        dirty = DIRTY[f"r{i}"]["vda"]
        assert p.bytes_copied <= 1.05 * dirty, (p.bytes_copied, dirty)
    assert [p.id for p in repo.points(guest)] == [p.id for p in reversed(points)]
    assert [p.id for p in repo.points(guest.name, newest_first=False)] == [p.id for p in points]
    assert repo.point(points[2].id) == points[2]
    # every point restores to its instant; qemu-img alone agrees
    for i, p in enumerate(points):
        _restore_equals(repo, p, refs[i], tmp_path / f"restore{i}")
    top = points[3].files["vda"]
    plain = tmp_path / "plain.raw"
    _qemu_img("convert", "-O", "raw", str(top), str(plain))
    assert _sha(plain) == _sha(refs[3]["vda"])
    for p in points:
        mode = os.stat(p.files["vda"]).st_mode & 0o777
        assert mode == 0o600
    # a second repository: an independent chain (its first point is full)
    other = Repository.create(tmp_path / "offsite")
    o1 = other.backup(guest, quiesce=False)
    _guest_writes(guest, "offsite")
    o2, oref = _paused_backup(other, guest, tmp_path, "o2")
    assert o1.kind is PointKind.FULL and o2.kind is PointKind.INCREMENTAL
    assert o2.checkpoint is not None and o2.checkpoint.startswith(other.checkpoint_prefix)
    _restore_equals(other, o2, oref, tmp_path / "restore-o2")
    p5 = repo.backup(guest, quiesce=False)  # still incremental on this repository's chain
    assert p5.kind is PointKind.INCREMENTAL and p5.parent == points[3].id
    # verify: clean, then one flipped byte in the middle incremental
    report = repo.verify()
    assert report.ok, str(report)
    assert report.bytes_read > 0
    assert repo.check().ok
    copy = tmp_path / "flipcopy"
    repo_copy_root = tmp_path / "repo-copy"
    subprocess.run(["cp", "-a", str(repo.path), str(repo_copy_root)], check=True)
    flipped = Repository(repo_copy_root)
    mid = flipped.point(points[2].id)
    start = _flip_byte_in_layer(mid.files["vda"])
    bad = flipped.verify()
    assert not bad.ok
    assert {(d.point, d.disk) for d in bad.differences} >= {(points[2].id, "vda")}
    assert any(d.offset <= start < d.offset + d.length for d in bad.differences)
    del copy
    # prune: keep the newest two; the others merge away, every kept point still restores
    before = {c.name for c in guest.checkpoints}
    pruned = repo.prune(guest, keep_last=2)
    assert [p.id for p in pruned.removed] == [p.id for p in points[:3]]
    kept = repo.points(guest, newest_first=False)
    assert [p.id for p in kept] == [points[3].id, p5.id]
    assert kept[0].kind is PointKind.FULL and kept[0].parent is None
    _restore_equals(repo, kept[0], refs[3], tmp_path / "after-prune")
    assert repo.verify().ok
    assert repo.check().ok
    after = {c.name for c in guest.checkpoints}
    mine = {c for c in after if c.startswith(repo.checkpoint_prefix)}
    assert mine == {p5.checkpoint}
    assert set(pruned.checkpoints_deleted) == {
        c for c in before if c.startswith(repo.checkpoint_prefix)
    } - {p5.checkpoint}
    assert {c for c in after if c.startswith(other.checkpoint_prefix)} == {
        o1.checkpoint,
        o2.checkpoint,
    }
    p6 = repo.backup(guest, quiesce=False)
    assert p6.kind is PointKind.INCREMENTAL and p6.parent == p5.id
    for cp in reversed(guest.checkpoints.list()):
        cp.delete()


# ----------------------------------------------------------------------------- kill matrix

KILL_MATRIX: list[tuple[str, str | None]] = [
    ("backup", None),
    ("backup", None),
    ("backup", "start:begin"),
    ("backup", "in:begin:captured"),
    ("backup", "mid:transfer"),
    ("backup", "done:transfer"),
    ("backup", "done:end"),
    ("backup", "repo:backup:copied"),
    ("backup", "repo:backup:digested:vda"),
    ("backup", "repo:backup:before-manifest"),
    ("backup", "repo:backup:listed"),
    ("backup", None),
    ("prune", "repo:prune:before-rebase"),
    ("prune", "repo:prune:rebased"),
    ("backup", None),
    ("prune", "repo:prune:child-listed"),
    ("backup", None),
    ("prune", "repo:prune:unlisted"),
    ("backup", None),
    ("prune", "repo:prune:removed"),
    ("backup", None),
]


def _kill_child(root: Path, repo: Path, action: str, **args: object) -> tuple[int, dict]:
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "tests/_repo_kill_child.py",
            str(root),
            str(repo),
            action,
            json.dumps(args),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {}
    if done.returncode not in (0, -9):
        raise AssertionError(f"{action} {args} failed:\n{done.stderr[-3000:]}")
    return done.returncode, result


@pytest.mark.qemu
def test_kill_matrix_backup_and_prune(kit: object, tmp_path: Path) -> None:
    """SIGKILL at every step of repo.backup (inside direct_backup and after it) and of
    repo.prune: afterwards every listed point restores to the same bytes as before the
    kill and verifies; the next backup (or prune) cleans the leftovers, so at the end the
    repository checks clean and the domain carries only checkpoints a point references."""
    import signal

    from statecapture.testing.kit import prepare_embed_root

    root = Path(f"/tmp/sc-rkill-{os.getpid()}")
    prepare_embed_root(root)
    repo = tmp_path / "repo"
    try:
        _kill_child(root, repo, "setup", tmp=str(tmp_path))
        shas: dict[str, str] = {}
        for n, (what, boundary) in enumerate(KILL_MATRIX):
            rc, out = _kill_child(root, repo, "run", what=what, boundary=boundary or "-", n=n)
            if boundary is None:
                assert rc == 0 and out == {"reached": False}
            else:
                assert rc == -signal.SIGKILL, f"boundary {boundary} was never reached"
            _rc, state = _kill_child(root, repo, "state", tmp=str(tmp_path))
            assert state["broken"] == [], (boundary, state["check"])
            assert state["verify_ok"], (boundary, state["verify"])
            for pid, sha in state["shas"].items():
                if pid in shas:
                    assert shas[pid] == sha, (boundary, pid)
            shas = state["shas"]
        assert state["check_ok"], state["check"]
        assert not state["journal"]
        prefix = "scr-"
        mine = {c for c in state["checkpoints"] if c.startswith(prefix)}
        assert mine <= set(state["referenced"]), state
        assert len(shas) >= 2
    finally:
        _kill_child(root, repo, "teardown")
        for pidfile in (root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _remove_bitmap_behind_libvirts_back(dom: statecapture.Domain, disk: str, name: str) -> None:
    import libvirt_qemu

    def qmp(command: str, **arguments: object) -> object:
        cmd: dict[str, object] = {"execute": command}
        if arguments:
            cmd["arguments"] = arguments
        raw = libvirt_qemu.qemuMonitorCommand(raw_domain(dom), json.dumps(cmd), 0)
        return json.loads(raw)["return"]

    source = dom.disk(disk).source
    nodes = qmp("query-named-block-nodes", flat=True)
    assert isinstance(nodes, list)
    node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == source)
    qmp("block-dirty-bitmap-remove", node=node, name=name)


def _attach_disk(dom: statecapture.Domain, target: str, tmp: Path) -> Path:
    from statecapture.testing.kit import make_data_disk

    path = make_data_disk(tmp / f"hotplug-{target}.qcow2", size_mib=32)
    xml = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
    )
    raw_domain(dom).attachDeviceFlags(xml, 1)  # VIR_DOMAIN_AFFECT_LIVE
    return path


@pytest.mark.qemu
def test_broken_bitmap_added_disk_shut_off_and_restore_domain(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """A broken bitmap makes the next point full with the reason; a disk added since the
    last point is copied in full while the other stays incremental (each point restores
    byte for byte); a cleanly shut-off domain gets an incremental from its bitmaps and a
    checkpoint the next running backup continues from, one powered off hard a full copy
    with the reason; restore_domain defines a new domain from the captured configuration
    that boots."""
    repo = Repository.create(tmp_path / "repo")
    p1 = repo.backup(guest, quiesce=False)
    assert p1.checkpoint is not None
    _guest_writes(guest, "b1", mib=1)
    _remove_bitmap_behind_libvirts_back(guest, "vda", p1.checkpoint)
    p2, r2 = _paused_backup(repo, guest, tmp_path, "b2")
    assert p2.kind is PointKind.FULL and p2.reason.startswith("bitmap broken"), p2.reason
    _restore_equals(repo, p2, r2, tmp_path / "rb2")
    # a disk added: vdb full, vda incremental
    _attach_disk(guest, "vdb", tmp_path)
    _guest_writes(guest, "b3", mib=1)
    p3, r3 = _paused_backup(repo, guest, tmp_path, "b3")
    assert p3.kind is PointKind.INCREMENTAL and p3.parent == p2.id
    assert p3.disks["vda"].kind is PointKind.INCREMENTAL
    assert p3.disks["vdb"].kind is PointKind.FULL and p3.disks["vdb"].reason == "disk added"
    assert "vdb" in p3.reason
    _restore_equals(repo, p3, r3, tmp_path / "rb3")
    assert repo.verify().ok
    # restore_domain: a new domain on the restored images, booting
    new = repo.restore_domain(p2, qemu_conn, name=f"{guest.name}-r", dest_dir=tmp_path / "rd")
    try:
        assert new.uuid != guest.uuid
        assert Path(new.disk("vda").source or "").parent == tmp_path / "rd"
        new.start()
        assert new.is_active
    finally:
        with contextlib.suppress(Exception):
            new.destroy()
        new.undefine()
    # a clean shutdown writes the bitmaps into the images: the shut-off point is an
    # incremental from them, and it defines a new checkpoint (metadata + bitmap)

    _guest_writes(guest, "b4", mib=1)
    guest.shutdown(mode=statecapture.ShutdownMode.AGENT, timeout=180)
    source = Path(guest.disk("vda").source or "")
    ref4 = tmp_path / "off4.raw"
    _qemu_img("convert", "-O", "raw", str(source), str(ref4))
    p4 = repo.backup(guest)
    assert p4.mode == "offline" and set(p4.disks) == {"vda"}  # vdb was attached live only
    assert p4.kind is PointKind.INCREMENTAL, p4.reason
    assert p4.reason == "domain shut off, incremental" and p4.parent == p3.id
    assert 0 < p4.bytes_copied < p4.disks["vda"].size / 4
    _restore_equals(repo, p4, {"vda": ref4}, tmp_path / "rb4")
    guest.start()
    wait_agent(guest, timeout=180)
    _guest_writes(guest, "b5", mib=1)
    p5, r5 = _paused_backup(repo, guest, tmp_path, "b5")
    if p4.checkpoint is not None:  # the driver defined a checkpoint while shut off
        assert p5.kind is PointKind.INCREMENTAL and p5.parent == p4.id, p5.reason
    else:
        assert p5.kind is PointKind.FULL and p5.reason.startswith("checkpoint missing")
    _restore_equals(repo, p5, r5, tmp_path / "rb5")
    # destroy(): QEMU still closes its images on SIGTERM, so the bitmaps are there
    guest.destroy()
    ref6 = tmp_path / "off6.raw"
    _qemu_img("convert", "-O", "raw", str(source), str(ref6))
    p6 = repo.backup(guest)
    assert p6.kind is PointKind.INCREMENTAL and p6.parent == p5.id, p6.reason
    _restore_equals(repo, p6, {"vda": ref6}, tmp_path / "rb6")
    # a bitmap lost while shut off: the next point is full, with the reason
    if p6.checkpoint is not None:
        _qemu_img("bitmap", "--remove", str(source), p6.checkpoint)
    p7 = repo.backup(guest)
    assert p7.kind is PointKind.FULL and "bitmap" in p7.reason, p7.reason
    _restore_equals(repo, p7, {"vda": ref6}, tmp_path / "rb7")
    assert repo.verify().ok and repo.check().ok
    for cp in reversed(guest.checkpoints.list()):
        with contextlib.suppress(statecapture.StateCaptureError):
            cp.delete()
