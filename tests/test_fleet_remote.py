"""Remote libvirt for real: a guest driven through ``qemu+ssh://`` (a private system libvirtd
behind an sshd on a loopback port, both started and killed by the test; see tests/_remote.py).

Operations whose data stays on the daemon's host work through the remote URI (snapshots,
checkpoints, push backups); a pull download, which needs the NBD socket on that host, is
refused with the documented error and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import statecapture
from statecapture import fleet
from statecapture.errors import UnsupportedError
from statecapture.testing import wait_agent
from tests import _remote
from tests._raw import raw_domain

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[statecapture.Connection, Path]]:
    """A qemu+ssh:// connection to a private libvirtd, and a temp dir both sides see."""
    why = _remote.available()
    if why is not None:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="sc-remote-"))
    try:
        with _remote.libvirtd(base) as sock, _remote.sshd(base) as (port, key, wrapper):
            conn = statecapture.connect(_remote.ssh_uri(port, key, wrapper, sock))
            try:
                yield conn, base
            finally:
                for dom in conn.domains():
                    _remove(dom)
                conn.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _remove(dom: statecapture.Domain) -> None:
    raw = raw_domain(dom)
    with contextlib.suppress(Exception):
        raw.abortJob()
    with contextlib.suppress(Exception):
        raw.fsThaw()
    with contextlib.suppress(Exception):
        raw.destroy()
    with contextlib.suppress(Exception):
        dom.undefine(managed_save=True, snapshots_metadata=True, checkpoints_metadata=True)


@pytest.mark.timeout(900)
def test_guest_over_qemu_ssh(remote: tuple[statecapture.Connection, Path]) -> None:
    """Through qemu+ssh://: a snapshot, a checkpoint and a push backup work; a pull
    download is refused with the documented error (run it on the host's worker) and leaves
    no job, no checkpoint and no file behind."""
    from statecapture.testing.kit import domain_xml, ensure_kit, make_data_disk

    conn, base = remote
    assert conn.is_remote
    assert conn.driver == "QEMU"
    work = base / "guest"
    work.mkdir()
    disk = make_data_disk(work / "vda.qcow2", size_mib=32)
    name = f"sc-remote-{work.stat().st_ino}"
    dom = conn.define(domain_xml(name, ensure_kit(), [disk], log_path=work / "console.log"))
    dom.start()
    wait_agent(dom, timeout=300)

    snap = dom.snapshots.create("s1", disk_only=True, quiesce=True)
    assert [s.name for s in dom.snapshots.list()] == ["s1"]
    assert snap.name == "s1"

    cp = dom.checkpoints.create("c1")
    assert [c.name for c in dom.checkpoints.list()] == ["c1"]
    assert cp.name == "c1"

    out = work / "push"
    out.mkdir()
    job = dom.backup(mode="push", target_dir=out, incremental_from="c1", checkpoint="c2")
    result = job.wait(timeout=300)
    assert [d.disk for d in result.disks] == ["vda"]
    assert len(list(out.iterdir())) == 1
    assert dom.active_backup() is None

    pull_dir = work / "pull"
    pull_dir.mkdir()
    with pytest.raises(UnsupportedError, match="Run it on that host") as info:
        statecapture.direct_backup(dom, pull_dir, mode="pull", quiesce=False)
    assert "statecapture.fleet" in str(info.value)
    job = dom.backup(mode="pull")
    try:
        with pytest.raises(UnsupportedError, match="NBD export is a UNIX socket"):
            job.download(pull_dir)
    finally:
        job.discard()
    assert dom.active_backup() is None
    assert list(pull_dir.iterdir()) == []
    assert [c.name for c in dom.checkpoints.list()] == ["c1", "c2"]

    # The fleet over the same URI (thread pool in this process): its default pull backup is
    # refused per domain with the same error; a push backup into a repository both sides
    # see (here: the same machine) works.
    repo = statecapture.Repository.create(base / "repo")
    host = fleet.Host("remote", conn.uri, repository=repo)
    pulled = fleet.backup([host], select=name)
    assert not pulled.ok
    assert "Run it on that host" in (pulled.results[0].error or "")
    assert repo.points() == []
    pushed = fleet.backup([host], select=name, mode="push")
    assert pushed.ok, str(pushed)
    (r,) = pushed.results
    assert repo.point(r.point).mode == "push"
    assert repo.verify().ok
    assert dom.active_backup() is None
