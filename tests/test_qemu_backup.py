"""Backup-job promises proven on real QEMU (``Domain.backup``, ``BackupJob``). The dead
push run counted as completed needs a process of its own: see
``tests/test_qemu_signals.py``.

One TCG guest (one qcow2 data disk, no agent needed: backups need a QEMU process, the guest
runs anyway) serves most tests; each leaves no job, checkpoint or file behind.
"""

from __future__ import annotations

import filecmp
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import statecapture
from statecapture import BackupProgress, CleanupError, NotFoundError, TargetExistsError
from tests._proof import flush_disk, module_guest, qemu_img, tmpfs, write_known

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def bguest(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[statecapture.Domain]:
    """One running guest with one qcow2 data disk and an agent, shared by the module."""
    tmp = tmp_path_factory.mktemp("qbackup")
    with module_guest(qemu_conn, kit, tmp, "qbackup") as (dom, _image):
        yield dom


@pytest.fixture
def b(bguest: statecapture.Domain) -> Iterator[statecapture.Domain]:
    yield bguest
    assert bguest.active_backup() is None, "the test left a backup job"
    assert len(bguest.checkpoints) == 0, "the test left a checkpoint"


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _private_dirs(job: statecapture.BackupJob) -> tuple[Path, Path]:
    """(socket directory, scratch directory) of a pull job with default paths."""
    sock = Path(job.exports[0].socket)
    stores = [Path(d.store) for d in job.xml.backed_up if d.store]
    assert len(stores) == 1
    return sock.parent, stores[0].parent


def test_nbd_socket_and_scratch_directories_are_owner_only(
    b: statecapture.Domain, tmp_path: Path
) -> None:
    """A pull job's default NBD socket directory and scratch directory are private (0700),
    under the temporary directory, and are gone after the job ends."""
    with b.backup(mode="pull") as job:
        sock_dir, scratch_dir = _private_dirs(job)
        assert sock_dir.name.startswith("sc-nbd-") and scratch_dir.name.startswith("sc-scratch-")
        assert _mode(sock_dir) == 0o700 and _mode(scratch_dir) == 0o700
        assert os.lstat(sock_dir).st_uid == os.getuid() == os.lstat(scratch_dir).st_uid
        assert stat.S_ISSOCK(os.lstat(job.exports[0].socket).st_mode)
        job.download(tmp_path)
    assert not sock_dir.exists() and not scratch_dir.exists()


def test_discard_removes_everything_the_job_made(b: statecapture.Domain, tmp_path: Path) -> None:
    """job.discard() on a pull job that already downloaded ends the job and removes the
    downloaded image, the checkpoint made with the job, the scratch file and the private
    directories; the next job starts at once."""
    job = b.backup(mode="pull", checkpoint="discarded")
    sock_dir, scratch_dir = _private_dirs(job)
    result = job.download(tmp_path)
    image = result.disk("vda").file
    assert image.is_file() and "discarded" in b.checkpoints
    job.discard()
    assert job.state == "failed" and b.active_backup() is None
    assert not image.exists() and list(tmp_path.iterdir()) == []
    assert "discarded" not in b.checkpoints
    assert not sock_dir.exists() and not scratch_dir.exists()
    with b.backup(mode="pull"):
        pass


@pytest.mark.parametrize("exc", [ValueError("in the block"), KeyboardInterrupt()])
def test_push_job_abandoned_by_an_exception_leaves_nothing(
    b: statecapture.Domain, tmp_path: Path, exc: BaseException
) -> None:
    """An exception — KeyboardInterrupt too — in a push job's with block ends the job and
    removes its checkpoint and its target file; the exception itself propagates, its only
    addition a note that says what the rollback undid."""
    with (
        pytest.raises(type(exc)) as caught,
        b.backup(mode="push", target_dir=tmp_path, checkpoint="abandoned"),
    ):
        raise exc
    assert caught.value is exc
    notes = getattr(exc, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("statecapture: rolled back the backup")
    assert "deleted the checkpoint 'abandoned'" in notes[0]
    assert b.active_backup() is None
    assert "abandoned" not in b.checkpoints
    assert list(tmp_path.iterdir()) == []


def test_cleanup_failure_raises_cleanup_error(b: statecapture.Domain, tmp_path: Path) -> None:
    """When the cleanup of an undelivered job really fails (its downloaded image sits on a
    file system remounted read-only), discard() raises CleanupError naming the file; the
    job is still ended and its checkpoint still removed."""
    with tmpfs(tmp_path / "dest") as dest:
        job = b.backup(mode="pull", checkpoint="stuck")
        image = job.download(dest).disk("vda").file
        subprocess.run(["mount", "-o", "remount,ro", str(dest)], check=True)
        with pytest.raises(CleanupError, match="Read-only file system") as info:
            job.discard()
        assert str(image) in str(info.value)
        assert image.exists()  # really left behind
        assert b.active_backup() is None and "stuck" not in b.checkpoints
        subprocess.run(["mount", "-o", "remount,rw", str(dest)], check=True)


def test_download_never_overwrites_a_file(b: statecapture.Domain, tmp_path: Path) -> None:
    """download() refuses an existing target or partial file (TargetExistsError, nothing
    written), and a target that appears while the download runs is not replaced either:
    the download fails, the file keeps its content and no partial file is left."""
    with b.backup(mode="pull", checkpoint="clash") as job:
        target = tmp_path / f"{b.name}.vda.clash.qcow2"
        partial = tmp_path / f".{target.name}.partial"
        for blocker in (target, partial):
            blocker.write_bytes(b"keep me")
            with pytest.raises(TargetExistsError):
                job.download(tmp_path)
            assert blocker.read_bytes() == b"keep me"
            assert sorted(p.name for p in tmp_path.iterdir()) == [blocker.name]
            blocker.unlink()

        def plant(_p: BackupProgress) -> None:
            if not target.exists():
                target.write_bytes(b"planted during the download")

        with pytest.raises(FileExistsError):
            job.download(tmp_path, progress=plant)
        assert target.read_bytes() == b"planted during the download"
        assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert "clash" not in b.checkpoints  # nothing was delivered


def test_download_previous_names_the_base(b: statecapture.Domain, tmp_path: Path) -> None:
    """An incremental pull downloaded with previous={'vda': <full image elsewhere>} is a
    layer backed by that file (without it, the download refuses: NotFoundError, nothing
    written); full + incremental restore to the guest's disk at the incremental job's
    start, byte for byte (reference taken with the guest paused, QEMU flushed first)."""
    full_dir, inc_dir = tmp_path / "full", tmp_path / "inc"
    full_dir.mkdir()
    inc_dir.mkdir()
    write_known(b, "first")
    with b.backup(mode="pull", checkpoint="p0") as job:
        full = job.download(full_dir).disk("vda").file
    write_known(b, "second", blocks=16)
    reference = tmp_path / "reference.raw"
    b.suspend()
    try:
        flush_disk(b, "vda")
        qemu_img("convert", "-U", "-O", "raw", str(b.disk("vda").source), str(reference))
        job = b.backup(mode="pull", incremental_from="p0", checkpoint="p1")
    finally:
        b.resume()
    with job:
        with pytest.raises(NotFoundError, match="previous"):
            job.download(inc_dir)
        assert list(inc_dir.iterdir()) == []
        inc = job.download(inc_dir, previous={"vda": full}).disk("vda").file
    info = json.loads(qemu_img("info", "--output=json", str(inc)))
    assert (
        Path(inc_dir / info["backing-filename"]).resolve() == full.resolve()
        or Path(info["full-backing-filename"]) == full.resolve()
    )
    restored = statecapture.restore_disk([full, inc], tmp_path / "restored.raw", format="raw")
    assert filecmp.cmp(restored, reference, shallow=False)
    for cp in reversed(b.checkpoints.list()):
        cp.delete()
