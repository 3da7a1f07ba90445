"""Instant recovery on real QEMU: export a point over NBD, boot from it, detach.

One guest writes known files, two points are taken (full + incremental); everything
below reads the incremental point, whose chain has two layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

import statecapture
from statecapture import DetachProgress, Repository

MiB = 1 << 20
LINE = b"SC-INSTANT-MARKER-0123456789\n"
MARKER = (LINE * (MiB // len(LINE) + 1))[:MiB]
LINE2 = b"SC-SECOND-LAYER-abcdefghij\n"
MARKER2 = (LINE2 * (MiB // len(LINE2) + 1))[:MiB]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _repo_sums(repo: Repository) -> dict[str, str]:
    return {
        str(p.relative_to(repo.path)): _sha(p)
        for p in sorted(repo.path.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _write_marker(dom: statecapture.Domain, name: str, line: bytes) -> None:
    from statecapture.testing import guest_exec

    text = line.decode().rstrip("\n")
    code, _out, err = guest_exec(
        dom,
        ["sh", "-c", f"yes {text} | head -c {MiB} > /data/{name} && sync"],
        timeout=120,
    )
    assert code == 0, err


def _guest_sha(dom: statecapture.Domain, name: str) -> str:
    from statecapture.testing import guest_exec

    code, out, err = guest_exec(dom, ["sha256sum", f"/data/{name}"], timeout=120)
    assert code == 0, err
    return out.split()[0].decode()


def _holds_file(data: bytes, content: bytes, block: int = 1024) -> bool:
    """Whether every file-system block of a file with ``content`` is somewhere in ``data``.

    The guest's tick writer appends to /data/ticks while a marker is written, so the
    marker's blocks need not be contiguous on disk: look for each block-aligned piece.
    """
    pieces = {content[i : i + block] for i in range(0, len(content), block)}
    return all(piece in data for piece in pieces)


def _read_export(uri: str, size_hint: int) -> bytes:
    from statecapture._nbd import load_nbd

    nbd = load_nbd()
    if nbd is None:
        pytest.skip("libnbd's Python binding is not available")
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        assert size == size_hint
        chunks = []
        for off in range(0, size, 4 * MiB):
            chunks.append(h.pread(min(4 * MiB, size - off), off))
        return b"".join(chunks)
    finally:
        h.shutdown()


def _backing(dom: statecapture.Domain, disk: str) -> str | None:
    root = etree.fromstring(dom.definition.raw.encode())
    for el in root.iterfind("devices/disk"):
        t = el.find("target")
        if t is not None and t.get("dev") == disk:
            b = el.find("backingStore")
            return None if b is None else b.get("type")
    raise AssertionError(disk)


def _remove(dom: statecapture.Domain) -> None:
    with contextlib.suppress(statecapture.StateCaptureError):
        if dom.is_active:
            dom.destroy()
    with contextlib.suppress(statecapture.StateCaptureError):
        dom.undefine()


BOOT_NS = "urn:x-statecapture:boot:1"


def _booted_is_reported(
    repo: Repository,
    conn: statecapture.Connection,
    dom: statecapture.Domain,
    point: statecapture.RestorePoint,
    overlay_dir: Path,
) -> None:
    """``dom`` (booted from ``point``, running, not detached) is what booted() lists,
    check(conn=) shows (ok: information only) and recover() reports without a change."""
    from tests.schema import assert_valid

    (b,) = repo.booted(conn)
    assert (b.name, b.uuid, b.point, b.source) == (dom.name, dom.uuid, point.id, point.domain)
    assert b.running and b.depends and b.problem is None and b.overlay_dir == overlay_dir
    assert b.encrypted is (repo.key is not None)
    assert b.servers_alive is (True if repo.key is not None else None)
    report = repo.check(conn=conn)
    assert report.ok and report.booted == (str(b),) and str(b) in str(report)
    assert repo.check().booted == ()
    inactive = dom.xml(inactive=True)
    assert_valid(inactive, "domain")
    assert dom.metadata(BOOT_NS) is not None
    for _ in range(2):  # idempotent: reports, changes nothing
        found = statecapture.recover(dom)
        assert found.clean and not found.actions and not found.errors
        (line,) = found.found
        assert point.id in line and "depends" in line and "detach" in line
    assert dom.xml(inactive=True) == inactive and dom.is_active


def _two_points(
    repo: Repository, guest: statecapture.Domain
) -> tuple[statecapture.RestorePoint, statecapture.RestorePoint]:
    """A full point after the guest wrote ``marker``, an incremental one after ``marker2``."""
    _write_marker(guest, "marker", LINE)
    p1 = repo.backup(guest, quiesce=False)
    _write_marker(guest, "marker2", LINE2)
    p2 = repo.backup(guest, quiesce=False)
    assert p2.kind is statecapture.PointKind.INCREMENTAL and p2.parent == p1.id
    return p1, p2


def _runs_without(
    repo: Repository, dom: statecapture.Domain, away: Path, name: str, content: bytes
) -> None:
    """Destroy ``dom``, move the repository to ``away``, start ``dom`` again and find the
    guest file ``name`` holding ``content``: the domain no longer needs the repository."""
    from statecapture.testing import wait_agent

    dom.destroy()
    os.rename(repo.path, away)
    try:
        dom.start()
        wait_agent(dom, timeout=240)
        assert _guest_sha(dom, name) == hashlib.sha256(content).hexdigest()
    finally:
        os.rename(away, repo.path)


@pytest.mark.qemu
def test_export_boot_detach(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """export() serves the point's chain read-only over NBD (the files the guest wrote are
    in the blocks read through libnbd; the server and its socket directory are gone
    afterwards; an unknown disk is NotFoundError); boot() runs a new domain (new name,
    UUID, MACs) on overlays over the chain, whose guest sees the files of the point; a
    taken name or overlay directory is refused first; destroyed before detach, it starts
    again with start_booted(); detach() pulls the chain into the
    overlays (progress reported) so the domain boots again with the repository moved away;
    the repository's files are unchanged by checksum throughout."""
    from statecapture.testing import wait_agent

    repo = Repository.create(tmp_path / "repo")
    _p1, p2 = _two_points(repo, guest)
    before = _repo_sums(repo)

    # export: read the disk over NBD
    with repo.export(p2, "vda") as uri:
        assert uri.startswith("nbd+unix:///vda?socket=")
        sock = Path(uri.split("socket=", 1)[1])
        assert (sock.parent.stat().st_mode & 0o777) == 0o700
        data = _read_export(uri, p2.disks["vda"].size)
    assert _holds_file(data, MARKER) and _holds_file(data, MARKER2)
    assert not sock.parent.exists()
    with pytest.raises(statecapture.NotFoundError), repo.export(p2, "vdz"):
        pass
    assert _repo_sums(repo) == before

    # boot: the original stops first (CPU, and its console log path is reused)
    guest.destroy()
    with pytest.raises(statecapture.TargetExistsError):
        repo.boot(p2, qemu_conn, name=guest.name, overlay_dir=tmp_path / "ov0")
    assert not (tmp_path / "ov0").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(statecapture.TargetExistsError):
        repo.boot(p2, qemu_conn, name=f"{guest.name}-b", overlay_dir=tmp_path / "taken")
    with pytest.raises(statecapture.NotFoundError):
        qemu_conn.domain(f"{guest.name}-b")

    seen: list[DetachProgress] = []
    new = repo.boot(p2, qemu_conn, name=f"{guest.name}-b", overlay_dir=tmp_path / "ov")
    try:
        assert new.is_active and new.uuid != guest.uuid
        assert Path(new.disk("vda").source or "").parent == tmp_path / "ov"
        assert (os.stat(tmp_path / "ov").st_mode & 0o777) == 0o700
        assert _backing(new, "vda") == "file"
        wait_agent(new, timeout=240)
        assert _guest_sha(new, "marker") == hashlib.sha256(MARKER).hexdigest()
        assert _guest_sha(new, "marker2") == hashlib.sha256(MARKER2).hexdigest()
        assert _repo_sums(repo) == before
        _booted_is_reported(repo, qemu_conn, new, p2, tmp_path / "ov")
        assert _repo_sums(repo) == before
        new.destroy()  # stopped before detach: start_booted() starts it again
        repo.start_booted(new)
        assert new.is_active and _backing(new, "vda") == "file"
        (b,) = repo.booted(qemu_conn)
        assert b.running and b.problem is None

        repo.detach(new, progress=seen.append, timeout=600)
        assert seen and seen[-1].fraction == 1.0 and seen[-1].disk == "vda"
        assert _backing(new, "vda") is None
        # independent: no record, no longer listed, nothing for check or recover to say
        assert new.metadata(BOOT_NS) is None
        assert repo.booted(qemu_conn) == ()
        assert repo.check(conn=qemu_conn).booted == ()
        assert statecapture.recover(new).nothing_found
        info = subprocess.run(
            ["qemu-img", "info", "-U", str(new.disk("vda").source)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "backing file" not in info
        assert _repo_sums(repo) == before

        # independent: boots again with the repository out of the way
        _runs_without(repo, new, tmp_path / "repo-away", "marker", MARKER)
        assert _repo_sums(repo) == before
    finally:
        _remove(new)


def test_compression_value_checked(tmp_path: Path) -> None:
    """An unknown compression is a UsageError before any directory is made; the choice is
    recorded in repository.json and read back on open."""
    with pytest.raises(statecapture.UsageError):
        Repository.create(tmp_path / "r", compression="lz4")
    assert not (tmp_path / "r").exists()
    repo = Repository.create(tmp_path / "z", compression="zstd")
    assert Repository(repo.path).info.compression == "zstd"
    assert Repository.create(tmp_path / "p").info.compression is None


@pytest.mark.qemu
def test_compressed_repository(guest: statecapture.Domain, tmp_path: Path) -> None:
    """With compression="zstd" every stored layer uses qcow2 compressed clusters (zstd),
    stores fewer bytes than the same backup uncompressed, restores byte for byte (full and
    incremental), verifies, and exports over NBD unchanged."""
    from tests.test_repository import _paused_backup, _restore_equals

    plain = Repository.create(tmp_path / "plain")
    repo = Repository.create(tmp_path / "z", compression="zstd")
    _write_marker(guest, "marker", LINE)
    p1, r1 = _paused_backup(repo, guest, tmp_path, "z1")
    q1 = plain.backup(guest, quiesce=False)
    z_file = p1.root / "images" / p1.disks["vda"].file  # type: ignore[operator]
    plain_file = q1.root / "images" / q1.disks["vda"].file  # type: ignore[operator]
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(z_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"compression-type": "zstd"' in info
    assert z_file.stat().st_blocks < plain_file.stat().st_blocks * 0.8
    _restore_equals(repo, p1, r1, tmp_path / "out1")
    _write_marker(guest, "marker2", LINE2)
    p2, r2 = _paused_backup(repo, guest, tmp_path, "z2")
    assert p2.kind is statecapture.PointKind.INCREMENTAL
    _restore_equals(repo, p2, r2, tmp_path / "out2")
    assert repo.verify().ok
    with repo.export(p2, "vda") as uri:
        data = _read_export(uri, p2.disks["vda"].size)
    assert data == r2["vda"].read_bytes()


KEY = statecapture.RepositoryKey(b"0123456789abcdef-test-secret")


def test_repository_key_rules(tmp_path: Path) -> None:
    """A key is never stored nor printed; an encrypted repository opens only with its key
    (missing or wrong: RepositoryKeyError), a plain one refuses a key; a short secret and
    compression together with a key are UsageErrors before anything is made."""
    with pytest.raises(statecapture.UsageError):
        statecapture.RepositoryKey(b"short")
    with pytest.raises(statecapture.UsageError):
        Repository.create(tmp_path / "both", compression="zstd", key=KEY)
    assert not (tmp_path / "both").exists()
    assert "0123456789" not in repr(KEY)
    repo = Repository.create(tmp_path / "enc", key=KEY)
    raw = (repo.path / "repository.json").read_bytes()
    assert KEY.secret not in raw and KEY.passphrase(repo.info.id) not in raw
    header = json.loads(raw)
    assert header["version"] == 2 and header["encryption"] == "luks"
    with pytest.raises(statecapture.RepositoryKeyError):
        Repository(repo.path)
    with pytest.raises(statecapture.RepositoryKeyError):
        Repository(repo.path, key=statecapture.RepositoryKey(b"another-secret-of-16+"))
    assert Repository(repo.path, key=KEY).key == KEY
    keyfile = tmp_path / "k"
    keyfile.write_bytes(KEY.secret)
    assert statecapture.RepositoryKey.from_file(keyfile) == KEY
    plain = Repository.create(tmp_path / "plain")
    with pytest.raises(statecapture.RepositoryKeyError):
        Repository(plain.path, key=KEY)


def _contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as f:
        prev = b""
        while chunk := f.read(4 * MiB):
            if needle in prev[-len(needle) :] + chunk:
                return True
            prev = chunk
    return False


class _PlaintextWatch:
    """Scans every file under ``root`` over and over, from a thread, for ``needles``."""

    def __init__(self, root: Path, needles: list[bytes]) -> None:
        import threading

        self.root = root
        self.needles = needles
        self.found: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            for f in list(self.root.rglob("*")):
                with contextlib.suppress(OSError):  # files come and go while it scans
                    if f.is_file() and any(_contains(f, n) for n in self.needles):
                        self.found.append(str(f))
            self.scans += 1

    def __enter__(self) -> _PlaintextWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.qemu
def test_encrypted_repository(guest: statecapture.Domain, tmp_path: Path) -> None:
    """With a key, every stored image is LUKS-encrypted qcow2 from its first byte: no file
    in the repository holds a line of the known pattern the guest wrote, neither after the
    backups nor at any moment while they run (a thread scans the store throughout);
    digests are keyed (HMAC); full and incremental points restore byte for byte and verify
    with the key, export reads through NBD with it; prune merges encrypted layers (the
    kept point restores equal, still no plaintext); without the key (or with a wrong one)
    the repository does not open; push mode is refused (QEMU would write plain data)."""
    from tests.test_repository import _paused_backup, _restore_equals

    repo = Repository.create(tmp_path / "enc", key=KEY)
    patterns = [LINE * 4, LINE2 * 4]
    _write_marker(guest, "marker", LINE)
    _write_marker(guest, "marker2", LINE2)
    with _PlaintextWatch(repo.path, patterns) as watch:
        p1, r1 = _paused_backup(repo, guest, tmp_path, "e1")
        _write_marker(guest, "marker3", LINE2)
        p2, r2 = _paused_backup(repo, guest, tmp_path, "e2")
    assert watch.scans >= 2 and watch.found == []
    assert p2.kind is statecapture.PointKind.INCREMENTAL
    assert _contains(r2["vda"], LINE * 4)  # the pattern is on the disk...
    stored = [p for p in repo.path.rglob("*") if p.is_file()]
    for f in stored:  # ...but in no stored file
        assert not any(_contains(f, n) for n in patterns), f
    for p in (p1, p2):
        img = p.root / "images" / p.disks["vda"].file  # type: ignore[operator]
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(img)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert '"encrypted": true' in info
        dg = json.loads((p.root / "digests" / p.disks["vda"].digests).read_text())  # type: ignore[operator]
        assert dg["algorithm"] == "hmac-sha256"
    _restore_equals(repo, p1, r1, tmp_path / "out1")
    _restore_equals(repo, p2, r2, tmp_path / "out2")
    assert repo.verify().ok
    with repo.export(p2, "vda") as uri:
        data = _read_export(uri, p2.disks["vda"].size)
    assert data == r2["vda"].read_bytes()
    with pytest.raises(statecapture.UsageError):
        repo.backup(guest, mode="push")
    before = _repo_sums(repo)
    with pytest.raises(statecapture.RepositoryKeyError):
        Repository(repo.path)
    assert _repo_sums(repo) == before
    # prune: the full point goes, the incremental absorbs what it needs (still encrypted)
    report = repo.prune(guest, keep_last=1)
    assert [p.id for p in report.removed] == [p1.id] and report.merged
    (kept,) = repo.points(guest)
    assert kept.id == p2.id and kept.kind is statecapture.PointKind.FULL
    _restore_equals(repo, kept, r2, tmp_path / "out3")
    assert repo.verify().ok
    for f in (p for p in repo.path.rglob("*") if p.is_file()):
        assert not any(_contains(f, n) for n in patterns), f


def _nbd_servers(root: Path) -> dict[int, list[bytes]]:
    """Live (not zombie) qemu-nbd processes whose command line names a path under ``root``."""
    found: dict[int, list[bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            if (
                state != b"Z"
                and os.path.basename(args[0]) == b"qemu-nbd"
                and any(os.fsencode(root) in a for a in args)
            ):
                found[int(entry.name)] = args
    return found


def _wait_no_servers(root: Path, timeout: float) -> float:
    """Seconds until no qemu-nbd under ``root`` is left (fails after ``timeout``)."""
    import time

    t0 = time.monotonic()
    while _nbd_servers(root):
        assert time.monotonic() - t0 < timeout, _nbd_servers(root)
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def nbd_reaper(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``; afterwards every qemu-nbd serving a socket under it is gone (a test
    that failed half-way has them killed, and fails if it had to)."""
    import signal

    yield tmp_path
    left = _nbd_servers(tmp_path)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_no_servers(tmp_path, 10)
    assert not left, f"qemu-nbd left running: {left}"


def _no_secret_under(root: Path, *secrets: bytes) -> None:
    for f in (p for p in root.rglob("*") if p.is_file()):
        for secret in secrets:
            assert not _contains(f, secret), f


@pytest.mark.qemu
def test_encrypted_boot_detach(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, nbd_reaper: Path
) -> None:
    """boot() from an encrypted repository runs the point through one private decrypting
    qemu-nbd per disk (socket in overlay_dir/nbd, 0700; the key in no file under
    overlay_dir or the repository and on no command line): the guest sees the point's
    files; the defined XML names the NBD chain and validates; detach() pulls everything
    in, after which no qemu-nbd is left, the socket directory is gone, the domain boots
    with the repository moved away, and the repository's files are unchanged by checksum.
    A domain destroyed without detach: its qemu-nbd ends by itself within seconds (a plain
    start fails, which booted() reports); start_booted() starts it again (refused, nothing
    left running, with a wrong key or a failing start; again a typed error while it runs):
    one server again, the guest sees the point's files, booted() has no problem; destroyed
    again, the server ends again. The repository is unchanged by checksum throughout."""
    from statecapture.testing import wait_agent
    from tests.schema import assert_valid

    tmp_path = nbd_reaper
    repo = Repository.create(tmp_path / "enc", key=KEY)
    _p1, p2 = _two_points(repo, guest)
    before = _repo_sums(repo)
    secrets = (KEY.secret, KEY.passphrase(repo.info.id))
    guest.destroy()

    made: list[statecapture.Domain] = []
    try:
        new = repo.boot(p2, qemu_conn, name=f"{guest.name}-e", overlay_dir=tmp_path / "ov")
        made.append(new)
        servers = _nbd_servers(tmp_path)
        assert len(servers) == len(p2.disks) == 1
        for args in servers.values():
            assert not any(s in a for s in secrets for a in args)
        sockdir = tmp_path / "ov" / "nbd"
        assert (sockdir.stat().st_mode & 0o777) == 0o700
        assert _backing(new, "vda") == "network"
        inactive = new.xml(inactive=True)
        assert_valid(inactive, "domain")
        assert f"socket='{sockdir / 'vda.sock'}'" in inactive.replace('"', "'")
        _no_secret_under(tmp_path / "ov", *secrets)
        _no_secret_under(repo.path, *secrets)
        wait_agent(new, timeout=240)
        assert _guest_sha(new, "marker") == hashlib.sha256(MARKER).hexdigest()
        assert _guest_sha(new, "marker2") == hashlib.sha256(MARKER2).hexdigest()
        _booted_is_reported(repo, qemu_conn, new, p2, tmp_path / "ov")

        seen: list[DetachProgress] = []
        repo.detach(new, progress=seen.append, timeout=600)
        assert seen and seen[-1].fraction == 1.0
        assert _backing(new, "vda") is None
        assert not _nbd_servers(tmp_path) and not sockdir.exists()
        assert repo.booted(qemu_conn) == () and new.metadata(BOOT_NS) is None
        assert _repo_sums(repo) == before
        _runs_without(repo, new, tmp_path / "enc-away", "marker2", MARKER2)
        _remove(new)
        assert _repo_sums(repo) == before

        # defined only (start=False): no server until start_booted() starts it
        other = repo.boot(
            p2, qemu_conn, name=f"{guest.name}-f", overlay_dir=tmp_path / "ov2", start=False
        )
        made.append(other)
        assert not other.is_active and not _nbd_servers(tmp_path)
        repo.start_booted(other)
        assert other.is_active and len(_nbd_servers(tmp_path)) == 1
        # destroyed without detach: the server ends by itself
        other.destroy()
        assert _wait_no_servers(tmp_path, 5) < 5
        with pytest.raises(statecapture.StateCaptureError):
            other.start()  # its backing is gone: start_booted() starts the server again
        # ... which booted(), check(conn=) and recover() say (and change nothing)
        (b,) = repo.booted(qemu_conn)
        assert b.name == other.name and b.encrypted and not b.running and b.depends
        assert b.servers_alive is False and b.problem is not None
        assert "start_booted" in b.problem and str(tmp_path / "ov2") in b.problem
        report = repo.check(conn=qemu_conn)
        assert not report.ok and report.booted == (str(b),)
        assert any(other.name in p and "start_booted" in p for p in report.problems)
        assert repo.check().ok and repo.check(repair=True, conn=qemu_conn).booted == (str(b),)
        found = statecapture.recover(other)
        assert not found.actions and any("start_booted" in f for f in found.found)
        assert (tmp_path / "ov2" / "vda.qcow2").exists() and other.metadata(BOOT_NS)
        assert _repo_sums(repo) == before
        _start_booted_again(repo, qemu_conn, other, p2, tmp_path)
        assert _repo_sums(repo) == before
    finally:
        for dom in made:
            _remove(dom)


def _start_booted_again(
    repo: Repository,
    conn: statecapture.Connection,
    dom: statecapture.Domain,
    point: statecapture.RestorePoint,
    tmp_path: Path,
) -> None:
    """``dom`` (booted from encrypted ``point`` into ``tmp_path/ov2``, destroyed, its server
    ended) starts again with start_booted(); refusals leave no server and it shut off."""
    from statecapture import LibvirtError
    from statecapture.testing import wait_agent
    from statecapture.testing.faults import inject

    sockdir = tmp_path / "ov2" / "nbd"
    wrong = Repository(repo.path, key=KEY)
    wrong.key = statecapture.RepositoryKey(b"another-secret-of-16+")
    with pytest.raises(statecapture.RepositoryKeyError):
        wrong.start_booted(dom)
    assert not _nbd_servers(tmp_path) and not dom.is_active
    boom = LibvirtError("injected failure", code=1)
    with inject(dom, "start", raises=boom), pytest.raises(LibvirtError, match="injected"):
        repo.start_booted(dom)  # the server was started, then stopped again
    assert not _nbd_servers(tmp_path) and not dom.is_active
    left = sorted(f.name for f in sockdir.iterdir()) if sockdir.exists() else None
    assert not left, left  # the failed start cleaned up its socket and pid file

    repo.start_booted(dom)
    servers = _nbd_servers(tmp_path)
    assert dom.is_active and len(servers) == len(point.disks) == 1
    assert (sockdir.stat().st_mode & 0o777) == 0o700
    wait_agent(dom, timeout=240)
    assert _guest_sha(dom, "marker2") == hashlib.sha256(MARKER2).hexdigest()
    _booted_is_reported(repo, conn, dom, point, tmp_path / "ov2")
    with pytest.raises(statecapture.InvalidStateError, match="running"):
        repo.start_booted(dom)
    assert dom.is_active and _nbd_servers(tmp_path) == servers
    dom.destroy()
    assert _wait_no_servers(tmp_path, 5) < 5
    (b,) = repo.booted(conn)
    assert not b.running and b.servers_alive is False and "start_booted" in (b.problem or "")


@pytest.mark.qemu
def test_encrypted_boot_bad_input(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, nbd_reaper: Path
) -> None:
    """Booting from an encrypted repository is refused before anything is made: a missing
    or wrong key (RepositoryKeyError), an overlay_dir too long for a socket path (UsageError);
    a define or start that fails stops the qemu-nbd servers already started and removes
    overlay_dir. No domain defined, no qemu-nbd, no overlay directory, the repository
    unchanged."""
    from statecapture import LibvirtError
    from statecapture.testing.faults import inject

    tmp_path = nbd_reaper
    repo = Repository.create(tmp_path / "enc", key=KEY)
    p = repo.backup(guest, quiesce=False)
    before = _repo_sums(repo)
    name = f"{guest.name}-x"
    ov = tmp_path / "ov"

    def nothing_made(where: Path = ov) -> None:
        assert not where.exists()
        assert not _nbd_servers(tmp_path)
        with pytest.raises(statecapture.NotFoundError):
            qemu_conn.domain(name)
        assert _repo_sums(repo) == before

    with pytest.raises(statecapture.RepositoryKeyError):
        Repository(repo.path, key=statecapture.RepositoryKey(b"another-secret-of-16+"))
    handle = Repository(repo.path, key=KEY)
    for bad in (None, statecapture.RepositoryKey(b"another-secret-of-16+")):
        handle.key = bad
        with pytest.raises(statecapture.RepositoryKeyError):
            handle.boot(p, qemu_conn, name=name, overlay_dir=ov)
        nothing_made()
    long_dir = tmp_path / ("o" * max(1, 110 - len(os.fsencode(tmp_path))))
    with pytest.raises(statecapture.UsageError, match="socket"):
        repo.boot(p, qemu_conn, name=name, overlay_dir=long_dir)
    nothing_made(long_dir)
    boom = LibvirtError("injected failure", code=1)
    for call in ("define", "start"):
        with inject(qemu_conn, call, raises=boom), pytest.raises(LibvirtError):
            repo.boot(p, qemu_conn, name=name, overlay_dir=ov)
        nothing_made()


def test_incremental_download_scans_block_status_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incremental pull download plans and copies over one connection to the export and
    asks for block status once per window (the plan is kept, not re-scanned); the layer it
    writes holds exactly the dirty data (issue 15)."""
    from statecapture import _nbd

    if _nbd.load_nbd() is None:
        pytest.skip("libnbd's Python binding is not available")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(base), "b"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(base)],
        check=True,
        capture_output=True,
    )
    full = tmp_path / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(full), "16M"], check=True)
    calls: list[str] = []
    real_new = _nbd._new_handle

    class Counting:
        def __init__(self, h: Any) -> None:
            self._h = h

        def __getattr__(self, name: str) -> Any:
            if name in ("block_status", "connect_unix"):
                calls.append(name)
            return getattr(self._h, name)

    monkeypatch.setattr(_nbd, "_new_handle", lambda: Counting(real_new()))
    from statecapture._repository.instant import serve_image

    layer = tmp_path / "layer.qcow2"
    fd = os.open(layer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with serve_image(base, "disk") as sock:
        proc_bitmap = subprocess.Popen(
            [
                "qemu-nbd",
                "--read-only",
                "--format=qcow2",
                "--bitmap=b",
                "--export-name=d",
                f"--socket={sock.parent / 'b.sock'}",
                "--persistent",
                str(base),
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            from statecapture._repository.instant import _wait_socket

            _wait_socket(proc_bitmap, sock.parent / "b.sock")  # type: ignore[arg-type]
            stats = _nbd.copy_export(
                _nbd.ExportSource(str(sock.parent / "b.sock"), "d", "qemu:dirty-bitmap:b"),
                layer,
                backing=full,
                client="libnbd",
            )
        finally:
            proc_bitmap.terminate()
            proc_bitmap.wait()
    assert calls.count("connect_unix") == 1
    assert calls.count("block_status") == 1  # 16 MiB: one window
    assert stats.bytes_planned == 2 * MiB
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(layer), str(base)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_instant_bad_input_changes_nothing(
    test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """boot/export refuse a point whose files are gone (ChainError), a disk the point does
    not hold (NotFoundError), an existing name or overlay directory (TargetExistsError) and
    detach=True without start (UsageError), before making anything; the repository's files
    stay as they were."""
    from tests.test_repository_unit import off_domain as _fixture

    dom = _fixture.__wrapped__(test_conn, tmp_path)  # type: ignore[attr-defined]
    repo = Repository.create(tmp_path / "repo")
    p = repo.backup(dom)
    before = _repo_sums(repo)
    with pytest.raises(statecapture.NotFoundError), repo.export(p, "vdz"):
        pass
    with pytest.raises(statecapture.TargetExistsError):
        repo.boot(p, test_conn, name=dom.name, overlay_dir=tmp_path / "ov")
    with pytest.raises(statecapture.UsageError):
        repo.boot(p, test_conn, name="new", overlay_dir=tmp_path / "ov", start=False, detach=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(statecapture.TargetExistsError):
        repo.boot(p, test_conn, name="new", overlay_dir=tmp_path / "taken", start=False)
    assert _repo_sums(repo) == before
    img = p.root / "images" / p.disks["vda"].file  # type: ignore[operator]
    os.rename(img, tmp_path / "away.qcow2")
    with pytest.raises(statecapture.ChainError), repo.export(p, "vda"):
        pass
    with pytest.raises(statecapture.ChainError):
        repo.boot(p, test_conn, name="new", overlay_dir=tmp_path / "ov", start=False)
    assert not (tmp_path / "ov").exists()
    with pytest.raises(statecapture.NotFoundError):
        test_conn.domain("new")
    assert [d.name for d in test_conn.domains()].count("new") == 0
