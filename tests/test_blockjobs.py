"""Block jobs: commit, copy, readiness from events, consistent multi-disk copy.

Fast tier: argument checks and the event-driven state machine on the test driver (which has
no block jobs: every libvirt block-job call is refused there, so anything that reaches
libvirt proves a check came too late). Real tier: QEMU 7.2 under TCG, three guest boots.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from lxml import etree

import statecapture
from statecapture import (
    BlockJob,
    BlockJobKind,
    BlockJobProgress,
    BlockJobStatus,
    ConsistentCopy,
    DomainState,
    Event,
    EventKind,
)
from statecapture._adapter import block_job_kind_name
from statecapture._blockjob.common import _expect
from statecapture._blockjob.start import destination_xml
from statecapture.testing.faults import inject
from tests._raw import raw_domain
from tests.schema import assert_valid

# ----------------------------------------------------------------------------- fast tier


def test_kinds_match_libvirt_job_types() -> None:
    """Every libvirt job type maps to its BlockJobKind; only copy and active commit mirror."""
    expected = {
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN: BlockJobKind.UNKNOWN,
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: BlockJobKind.PULL,
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: BlockJobKind.COPY,
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: BlockJobKind.COMMIT,
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: BlockJobKind.ACTIVE_COMMIT,
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: BlockJobKind.BACKUP,
    }
    for code, kind in expected.items():
        assert BlockJobKind(block_job_kind_name(code)) is kind
    assert BlockJobKind(block_job_kind_name(99)) is BlockJobKind.UNKNOWN
    assert {k for k in BlockJobKind if k.is_mirror} == {
        BlockJobKind.COPY,
        BlockJobKind.ACTIVE_COMMIT,
    }
    assert {s for s in BlockJobStatus if not s.ended} == {
        BlockJobStatus.RUNNING,
        BlockJobStatus.READY,
    }


def test_progress_value() -> None:
    """BlockJobProgress is a frozen value; fraction is clamped and safe for end == 0."""
    p = BlockJobProgress(cur=50, end=200, bandwidth=0)
    assert p.fraction == 0.25
    assert BlockJobProgress(cur=0, end=0, bandwidth=0).fraction == 0.0
    assert BlockJobProgress(cur=300, end=200, bandwidth=1).fraction == 1.0
    with pytest.raises(AttributeError):
        p.cur = 3  # type: ignore[misc]


def test_destination_xml_validates(tmp_path: Path) -> None:
    """The <disk> handed to virDomainBlockCopy is valid domain XML (inside a domain)."""
    for fmt, block in (("qcow2", False), ("raw", False), ("raw", True)):
        disk = etree.fromstring(destination_xml(tmp_path / "c.img", fmt=fmt, block=block))
        driver, source = disk.find("driver"), disk.find("source")
        assert driver is not None and source is not None
        assert driver.get("type") == fmt
        assert source.get("dev" if block else "file") == str(tmp_path / "c.img")
        etree.SubElement(disk, "target", dev="vdz")  # blockCopy ignores the target
        domain = etree.fromstring(
            "<domain type='qemu'><name>x</name><memory>65536</memory>"
            "<os><type>hvm</type></os><devices/></domain>"
        )
        devices = domain.find("devices")
        assert devices is not None
        devices.append(disk)
        assert_valid(etree.tostring(domain, encoding="unicode"), "domain")


def test_bad_input_refused_before_libvirt(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """Unknown disk, existing destination, bad arguments: typed errors, nothing changed."""
    dom = test_domain
    existing = tmp_path / "exists.qcow2"
    existing.write_bytes(b"precious")
    subs = len(test_conn.events)
    with pytest.raises(statecapture.NotFoundError, match="no disk 'vdz'"):
        dom.block_copy("vdz", tmp_path / "x.qcow2")
    with pytest.raises(statecapture.NotFoundError):
        dom.block_commit("vdz")
    with pytest.raises(statecapture.TargetExistsError) as info:
        dom.block_copy("vda", existing)
    assert info.value.path == str(existing)
    assert existing.read_bytes() == b"precious"
    with pytest.raises(statecapture.NotFoundError, match="does not exist"):
        dom.block_copy("vda", tmp_path / "missing.qcow2", reuse_external=True)
    with pytest.raises(statecapture.NotFoundError, match="directory"):
        dom.block_copy("vda", tmp_path / "no" / "dir.qcow2")
    with pytest.raises(statecapture.UsageError, match="format"):
        dom.block_copy("vda", tmp_path / "x.vmdk", format="vmdk")
    with pytest.raises(statecapture.UsageError, match="bandwidth"):
        dom.block_copy("vda", tmp_path / "x.qcow2", bandwidth=-1)
    with pytest.raises(statecapture.UsageError, match="runs on"):
        dom.block_copy("vda", "/var/lib/statecapture-test/alpha.qcow2", reuse_external=True)
    # alpha's disk has no backing chain: nothing to commit.
    with pytest.raises(statecapture.InvalidStateError, match="nothing to commit"):
        dom.block_commit("vda")
    # A disk may be named by its image path too.
    with pytest.raises(statecapture.InvalidStateError, match="'vda'"):
        dom.block_commit("/var/lib/statecapture-test/alpha.qcow2")
    # consistent_copy checks everything before starting anything.
    with pytest.raises(statecapture.UsageError):
        statecapture.consistent_copy(dom, {})
    with pytest.raises(statecapture.TargetExistsError):
        statecapture.consistent_copy(dom, {"vda": existing})
    with pytest.raises(statecapture.UsageError, match="same destination"):
        statecapture.consistent_copy(
            dom, {"vda": tmp_path / "c.qcow2", "sda": tmp_path / "c.qcow2"}
        )
    inactive = test_conn.domain("beta")
    if inactive.is_active:
        inactive.destroy()
    with pytest.raises(statecapture.InvalidStateError):
        inactive.block_copy("vda", tmp_path / "b.qcow2")
    assert inactive.block_jobs() == ()
    assert len(test_conn.events) == subs  # no subscription leaked
    assert not (tmp_path / "x.qcow2").exists()


def test_driver_without_block_jobs(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """A driver without block jobs says so with UnsupportedError and nothing is left behind."""
    subs = len(test_conn.events)
    with pytest.raises(statecapture.UnsupportedError):
        test_domain.block_copy("vda", tmp_path / "c.qcow2")
    with pytest.raises(statecapture.UnsupportedError):
        test_domain.block_jobs()
    assert len(test_conn.events) == subs
    assert not (tmp_path / "c.qcow2").exists()


def _fake_job(dom: statecapture.Domain, kind: BlockJobKind = BlockJobKind.COPY) -> BlockJob:
    # A handle subscribed exactly as block_copy() does it, for a job we drive by events.
    return BlockJob(dom, "vda", kind, None, exp=_expect(dom, "vda"), owned=True)


def _event(dom: statecapture.Domain, status: str, disk: str = "vda") -> Event:
    return Event(
        EventKind.BLOCK_JOB, dom.name, dom.uuid, {"disk": disk, "type": 2, "status": status}
    )


def test_readiness_comes_from_the_ready_event(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain
) -> None:
    """ready flips only on this disk's READY event; pivot before it is refused locally."""
    dom = test_domain
    job = _fake_job(dom)
    assert job.status is BlockJobStatus.RUNNING and not job.ready
    with pytest.raises(statecapture.InvalidStateError, match="not ready for pivot"):
        job.pivot()
    with pytest.raises(statecapture.UsageError, match="never ends by itself"):
        job.wait()
    with pytest.raises(statecapture.OperationTimeoutError):
        job.wait_ready(timeout=0.1)
    test_conn.events.publish(_event(dom, "ready", disk="vdb"))  # another disk's event
    assert not job.ready
    test_conn.events.publish(_event(dom, "ready"))
    assert job.ready and job.status is BlockJobStatus.READY
    job.wait_ready(timeout=0)
    subs = len(test_conn.events)
    test_conn.events.publish(_event(dom, "canceled"))
    assert job.ended and job.status is BlockJobStatus.CANCELED and not job.ready
    assert len(test_conn.events) == subs - 1  # the subscription ends with the job
    assert job.abort() is BlockJobStatus.CANCELED  # idempotent, no libvirt call
    with pytest.raises(statecapture.InvalidStateError, match="has ended"):
        job.pivot()
    with job:  # leaving the block of an ended job does nothing
        pass
    assert "copy vda" in repr(job)


def test_wait_reports_end_and_failure(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain
) -> None:
    """wait() returns COMPLETED for a commit that finished and raises for a failed one;
    wait_ready() on a job that cannot become ready is a UsageError."""
    dom = test_domain
    job = _fake_job(dom, BlockJobKind.COMMIT)
    with pytest.raises(statecapture.UsageError, match="never becomes ready"):
        job.wait_ready()
    with pytest.raises(statecapture.UsageError, match="only copy and active-commit"):
        job.pivot()
    test_conn.events.publish(_event(dom, "completed"))
    assert job.wait(timeout=1) is BlockJobStatus.COMPLETED
    failed = _fake_job(dom, BlockJobKind.COMMIT)
    test_conn.events.publish(_event(dom, "failed"))
    with pytest.raises(statecapture.LibvirtError, match="failed"):
        failed.wait(timeout=1)
    mirror = _fake_job(dom)
    test_conn.events.publish(_event(dom, "failed"))
    with pytest.raises(statecapture.LibvirtError, match="failed"):
        mirror.wait_ready(timeout=1)
    canceled = _fake_job(dom)
    test_conn.events.publish(_event(dom, "canceled"))
    with pytest.raises(statecapture.InvalidStateError, match="before it became ready"):
        canceled.wait_ready(timeout=1)


def test_context_manager_abort_failure_is_a_cleanup_error(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain
) -> None:
    """Leaving the block with the job running aborts it; when the abort fails (the test
    driver refuses it), a clean exit raises CleanupError and a failing body keeps its own
    error with the abort failure as a note."""
    dom = test_domain
    clean, failing = _fake_job(dom), _fake_job(dom)
    with pytest.raises(statecapture.CleanupError, match="could not abort"), clean:
        pass
    with pytest.raises(KeyError) as info, failing:
        raise KeyError("body")
    assert any("aborting the block job" in n for n in info.value.__notes__)
    # Both handles still run (the test driver refused the aborts); end them by event.
    test_conn.events.publish(_event(dom, "canceled"))
    assert clean.ended and failing.ended


# ----------------------------------------------------------------------------- real tier


@pytest.mark.qemu
def test_qemu_readiness_comes_only_from_this_disks_ready_event(
    guest_factory: Callable[..., statecapture.Domain], tmp_path: Path
) -> None:
    """Real run of what the event-driven test above shows with published events: two copies
    at once, one held back by a 1 byte/s limit; the other disk's READY event does not make
    the held-back job ready; it becomes ready on its own READY once the limit is lifted, and
    leaving the blocks aborts both jobs."""
    dom = guest_factory(disks=2)
    with (
        dom.block_copy("vda", tmp_path / "vda.copy.qcow2", bandwidth=1) as slow,
        dom.block_copy("vdb", tmp_path / "vdb.copy.qcow2") as fast,
    ):
        fast.wait_ready(timeout=120)
        assert fast.ready and fast.status is BlockJobStatus.READY
        assert not slow.ready and slow.status is BlockJobStatus.RUNNING
        slow.set_bandwidth(0)
        slow.wait_ready(timeout=120)
        assert slow.ready and slow.status is BlockJobStatus.READY
    assert slow.status is BlockJobStatus.CANCELED and fast.status is BlockJobStatus.CANCELED
    assert dom.block_jobs() == ()


GuestFactory = Callable[..., statecapture.Domain]

MiB = 1024 * 1024


def _sh(dom: statecapture.Domain, script: str, timeout: float = 30) -> str:
    from statecapture.testing import guest_exec

    code, out, err = guest_exec(dom, ["sh", "-c", script], timeout=timeout)
    assert code == 0, (script, out, err)
    return out.decode()


def _external_overlay(dom: statecapture.Domain, path: Path) -> None:
    """A disk-only external snapshot without metadata: the guest moves onto ``path``."""
    xml = (
        "<domainsnapshot><disks>"
        f"<disk name='vda' snapshot='external'><source file='{path}'/></disk>"
        "</disks></domainsnapshot>"
    )
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    )
    raw_domain(dom).snapshotCreateXML(xml, flags)


def _guest_md5(dom: statecapture.Domain, *paths: str) -> dict[str, str]:
    """md5 of guest files read from the disk (page cache dropped first)."""
    out = _sh(dom, "sync; echo 3 > /proc/sys/vm/drop_caches; md5sum " + " ".join(paths))
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def _write_random(dom: statecapture.Domain, path: str, kib: int = 256) -> str:
    _sh(dom, f"dd if=/dev/urandom of={path} bs=1024 count={kib} 2>/dev/null; sync")
    return _guest_md5(dom, path)[path]


def _offline_cat(image: Path, guest_path: str, work: Path) -> bytes:
    """A file's bytes from an ext4 image that no QEMU uses (journal replayed first)."""
    raw = work / (image.name + ".raw")
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
        check=True,
        capture_output=True,
    )
    fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: journal replayed
    out = subprocess.run(
        ["debugfs", "-R", f"cat {guest_path}", str(raw)], check=True, capture_output=True
    )
    raw.unlink()
    return out.stdout


@pytest.mark.qemu
def test_commit_chain_and_active_commit_with_pivot(
    guest_factory: GuestFactory, tmp_path: Path
) -> None:
    """Non-active commit in a 3-layer chain ends by itself; active commit of the overlay
    becomes ready (READY event), pivots back onto the base, and the guest's data -- files
    written before and after each snapshot -- reads back intact from the base image."""
    dom = guest_factory()
    base = Path(dom.disk("vda").source or "")
    s1, s2 = tmp_path / "s1.qcow2", tmp_path / "s2.qcow2"
    sums = {"/data/a": _write_random(dom, "/data/a")}
    _external_overlay(dom, s1)
    sums["/data/b"] = _write_random(dom, "/data/b")
    _external_overlay(dom, s2)
    sums["/data/c"] = _write_random(dom, "/data/c")  # written after the last snapshot
    disk = dom.disk("vda")
    assert disk.chain == (str(s2), str(s1), str(base))

    # Commit s1 (middle layer) into base: a plain commit, ends by itself.
    with pytest.raises(statecapture.UsageError, match="not the active layer"):
        dom.block_commit("vda", top=str(s1), active=True)
    with dom.block_commit("vda", top=str(s1)) as job:
        assert job.kind is BlockJobKind.COMMIT
        with pytest.raises(statecapture.UsageError):
            job.wait_ready(1)
        assert job.wait(timeout=120) is BlockJobStatus.COMPLETED
    assert dom.disk("vda").chain == (str(s2), str(base))
    assert dom.block_jobs() == ()

    # Active commit of s2 into base, then pivot.
    t0 = time.monotonic()
    with dom.block_commit("vda") as job:
        assert job.kind is BlockJobKind.ACTIVE_COMMIT
        with pytest.raises(statecapture.InvalidStateError, match="already has a active-commit"):
            dom.block_copy("vda", tmp_path / "busy.qcow2")
        assert not (tmp_path / "busy.qcow2").exists()
        with pytest.raises(statecapture.UsageError, match="never ends by itself"):
            job.wait()
        job.wait_ready(timeout=120)
        ready_after = time.monotonic() - t0
        assert job.ready
        (listed,) = dom.block_jobs()
        assert (listed.disk, listed.kind, listed.ready) == ("vda", BlockJobKind.ACTIVE_COMMIT, True)
        job.pivot()
        assert job.status is BlockJobStatus.COMPLETED
    assert dom.disk("vda").chain == (str(base),)
    assert dom.block_jobs() == ()
    assert _guest_md5(dom, *sums) == sums
    print(f"active commit ready after {ready_after:.2f} s")

    # The data is in the base image itself, not only in the running guest.
    dom.destroy()
    for guest_path, digest in sums.items():
        data = _offline_cat(base, guest_path[len("/data") :], tmp_path)
        assert hashlib.md5(data).hexdigest() == digest


@pytest.mark.qemu
def test_block_copy_pivot_abort_context_manager_and_reconnect(
    guest_factory: GuestFactory, qemu_uri: str, tmp_path: Path
) -> None:
    """Block copy without pivot leaves a complete standalone copy; with pivot the guest runs
    on the copy; a block left without pivot aborts the job (partial file removed); pivot
    before ready is refused; a second connection sees the running job and its readiness."""
    dom = guest_factory()
    original = dom.disk("vda").source
    before = _write_random(dom, "/data/before")

    # 1. Copy, then abort while ready: a standalone copy, guest stays on the original.
    keep = tmp_path / "keep.qcow2"
    with dom.block_copy("vda", keep) as job:
        assert job.kind is BlockJobKind.COPY and job.destination == keep
        assert oct(keep.stat().st_mode & 0o777) == "0o600"
        job.wait_ready(timeout=120)
        progress = job.progress()
        assert isinstance(progress, BlockJobProgress) and progress.end > 0
        assert job.abort() is BlockJobStatus.CANCELED
    assert dom.disk("vda").source == original
    assert keep.exists()
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(keep)], capture_output=True, text=True
    )
    assert '"backing-filename"' not in info.stdout  # a full, standalone image
    assert hashlib.md5(_offline_cat(keep, "/before", tmp_path)).hexdigest() == before

    # 2. Bad input on a real domain.
    with pytest.raises(statecapture.TargetExistsError):
        dom.block_copy("vda", keep)
    # A dangling symlink at the destination: refused, left alone, nothing created where it
    # points; a directory others can rename entries in is refused (libvirt creates by path).
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "planted.qcow2"
    planted.symlink_to(outside / "copy.qcow2")
    with pytest.raises(statecapture.TargetExistsError):
        dom.block_copy("vda", planted)
    assert os.readlink(planted) == str(outside / "copy.qcow2")
    assert list(outside.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(statecapture.UsageError, match="not sticky"):
        dom.block_copy("vda", shared / "copy.qcow2")
    assert list(shared.iterdir()) == [] and dom.disk("vda").source == original
    with pytest.raises(statecapture.NotFoundError):
        dom.block_copy("vdq", tmp_path / "q.qcow2")

    # 3. Context manager: leaving the block before ready aborts; pivot before ready refused.
    slow = tmp_path / "slow.qcow2"
    with dom.block_copy("vda", slow, bandwidth=1 * MiB) as job:
        with pytest.raises(statecapture.InvalidStateError, match="not ready for pivot"):
            job.pivot()
        assert job.progress().bandwidth == 1 * MiB
        assert not job.ready
    assert job.status is BlockJobStatus.CANCELED
    assert dom.block_jobs() == ()
    assert not slow.exists()  # the partial copy statecapture created is gone
    with pytest.raises(RuntimeError, match="body"), dom.block_copy("vda", slow, bandwidth=MiB):
        raise RuntimeError("body")
    assert dom.block_jobs() == () and not slow.exists()

    # 4. Reconnect: another connection sees the running job, and its readiness from the XML.
    moved = tmp_path / "moved.qcow2"
    job = dom.block_copy("vda", moved, bandwidth=1 * MiB)
    with statecapture.connect(qemu_uri) as conn2:
        (seen,) = conn2.domain(dom.name).block_jobs()
        assert (seen.disk, seen.kind, seen.destination) == ("vda", BlockJobKind.COPY, moved)
        assert not seen.ready
        seen.set_bandwidth(0)  # the adopted handle controls the job
    job.wait_ready(timeout=120)
    with statecapture.connect(qemu_uri) as conn3:
        (seen,) = conn3.domain(dom.name).block_jobs()
        assert seen.ready  # READY went to the first connection: read from <mirror ready>
        # 5. Pivot from the new connection; the owner's handle hears the end too.
        seen.pivot()
    deadline = time.monotonic() + 30
    while not job.ended:  # the owner's handle hears the end on its own connection
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.status is BlockJobStatus.COMPLETED
    assert dom.disk("vda").source == str(moved)
    # libvirt 9.0 updates the persistent definition on pivot too (documented).
    assert dom.inactive_definition.disk("vda").source == str(moved)
    after = _write_random(dom, "/data/after")
    assert _guest_md5(dom, "/data/before", "/data/after") == {
        "/data/before": before,
        "/data/after": after,
    }
    assert dom.block_jobs() == ()


_SEQ_LOOP = (
    "for d in /data /data1; do printf '%08d\\n' 0 > $d/seq; done; sync; "
    "setsid sh -c 'i=0; while :; do i=$((i+1)); "
    'printf "%08d\\n" $i | dd of=/data/seq conv=notrunc,fsync 2>/dev/null; '
    'printf "%08d\\n" $i | dd of=/data1/seq conv=notrunc,fsync 2>/dev/null; '
    "done' </dev/null >/dev/null 2>&1 &"
)


def _seqs(dom: statecapture.Domain) -> tuple[int, int]:
    out = _sh(dom, "cat /data/seq /data1/seq").split()
    return int(out[0]), int(out[1])


@pytest.mark.qemu
def test_consistent_copy_two_disks_same_instant(
    guest_factory: GuestFactory, tmp_path: Path
) -> None:
    """consistent_copy of a two-disk guest yields images from one instant: the guest writes
    sequence number i to vda, then to vdb, in a loop; in the copies vda holds i or i+1 where
    vdb holds i. The guest is paused only for the ending step, and resumed. A failure while
    ending one copy resumes the guest, aborts the rest and removes the copies."""
    dom = guest_factory(disks=2)
    originals = (dom.disk("vda").source, dom.disk("vdb").source)
    _sh(dom, _SEQ_LOOP)
    deadline = time.monotonic() + 60
    while _seqs(dom)[1] < 20:
        assert time.monotonic() < deadline, "the guest's write loop does not run"
        time.sleep(0.5)

    c0, c1 = tmp_path / "vda.copy.qcow2", tmp_path / "vdb.copy.qcow2"
    result = statecapture.consistent_copy(dom, {"vda": c0, "vdb": c1})
    assert isinstance(result, ConsistentCopy)
    assert dict(result.copies) == {"vda": c0, "vdb": c1}
    assert not result.pivoted
    assert dom.state is DomainState.RUNNING
    assert (dom.disk("vda").source, dom.disk("vdb").source) == originals
    assert dom.block_jobs() == ()
    assert 0 < result.pause_seconds < 10
    print(f"consistent copy: sync {result.sync_seconds:.2f} s, pause {result.pause_seconds:.3f} s")

    a = int(_offline_cat(c0, "/seq", tmp_path))
    b = int(_offline_cat(c1, "/seq", tmp_path))
    assert b >= 20
    assert a - b in (0, 1), (a, b)  # vda is written first: at most one step ahead
    later = _seqs(dom)
    assert later[1] > b  # the guest kept writing after the copy
    print(f"copies hold vda={a} vdb={b}; the guest is at {later}")

    # Control: the same pattern does catch copies from different instants.
    s0, s1 = tmp_path / "s0.qcow2", tmp_path / "s1.qcow2"
    for disk, path in (("vda", s0), ("vdb", s1)):
        with dom.block_copy(disk, path) as job:
            job.wait_ready(timeout=120)
            job.abort()
        time.sleep(2)
    a2 = int(_offline_cat(s0, "/seq", tmp_path))
    b2 = int(_offline_cat(s1, "/seq", tmp_path))
    print(f"separate copies 2 s apart hold vda={a2} vdb={b2}")
    assert b2 - a2 >= 2

    # Fault: ending vdb's copy fails. The guest is resumed, every job ends, files go.
    f0, f1 = tmp_path / "f0.qcow2", tmp_path / "f1.qcow2"
    fault = statecapture.LibvirtError("injected fault", operation="block job abort")
    with (
        inject(
            dom, "block_job_abort", raises=fault, times=1, when=lambda disk, **_: disk == "vdb"
        ) as failed,
        pytest.raises(statecapture.LibvirtError, match="injected fault"),
    ):
        statecapture.consistent_copy(dom, {"vda": f0, "vdb": f1})
    assert failed.calls >= 1
    assert dom.state is DomainState.RUNNING
    assert dom.block_jobs() == ()
    assert not f0.exists() and not f1.exists()
    assert (dom.disk("vda").source, dom.disk("vdb").source) == originals

    # pivot=True moves both disks onto their copies at the same instant.
    p0, p1 = tmp_path / "p0.qcow2", tmp_path / "p1.qcow2"
    moved = statecapture.consistent_copy(dom, {"vda": p0, "vdb": p1}, pivot=True)
    assert moved.pivoted
    assert (dom.disk("vda").source, dom.disk("vdb").source) == (str(p0), str(p1))
    assert dom.state is DomainState.RUNNING
    assert _seqs(dom)[1] > later[1]
    for path in (c0, c1, p0, p1):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
