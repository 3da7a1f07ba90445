"""Snapshots: collection, handles, tree, revert, delete and the preflight hazards.

Fast tier on a private test-driver instance (internal snapshots only: the test driver has no
disk-only, external or metadata-less snapshots); real tier on embedded QEMU with the TCG
test guest (three boots for the whole file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import statecapture
from statecapture import (
    DomainState,
    GuestAgentError,
    InvalidStateError,
    NotFoundError,
    Snapshot,
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotKind,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    _qemuimg,
)
from statecapture._version import Version
from statecapture.testing import wait_agent
from tests._raw import daemon_version, raw_domain
from tests.schema import assert_valid

# ============================================================================ fast tier


def _names(snaps: tuple[Snapshot, ...]) -> list[str]:
    return [s.name for s in snaps]


def test_create_list_and_lookup(test_domain: statecapture.Domain) -> None:
    """create() returns a handle; list/[name]/in/len/iter/current see the new snapshot."""
    snaps = test_domain.snapshots
    assert len(snaps) == 0 and snaps.current is None and snaps.list() == ()
    s1 = snaps.create("s1", description="before the upgrade")
    assert isinstance(s1, Snapshot) and s1.name == "s1"
    assert s1.domain is test_domain
    assert "s1" in snaps and "nope" not in snaps and 42 not in snaps
    assert len(snaps) == 1
    assert snaps["s1"].name == "s1"
    assert _names(tuple(snaps)) == ["s1"]
    assert snaps.current is not None and snaps.current.name == "s1"
    assert s1.is_current and s1.has_metadata
    d = s1.definition
    assert d.name == "s1" and d.description == "before the upgrade"
    assert d.state == "running" and d.parent is None
    assert d.memory == SnapshotMemory(SnapshotMemoryMode.INTERNAL)
    assert d.domain is not None and d.domain.name == "alpha"
    assert s1.kind is SnapshotKind.INTERNAL
    assert_valid(d.to_xml(), "domainsnapshot")
    with pytest.raises(NotFoundError):
        snaps["nope"]
    with pytest.raises(UsageError):
        snaps[3]  # type: ignore[index]
    assert "<b>s1</b>" in s1._repr_html_()


def test_tree_parent_children_descendants(test_domain: statecapture.Domain) -> None:
    """Snapshots form a tree: each new one is a child of the current one."""
    snaps = test_domain.snapshots
    a = snaps.create("a")
    b = snaps.create("b")
    c = snaps.create("c")
    a.revert()
    d = snaps.create("d")
    assert b.parent is not None and b.parent.name == "a"
    assert c.parent is not None and c.parent.name == "b"
    assert a.parent is None
    assert sorted(_names(a.children)) == ["b", "d"]
    desc = _names(a.descendants())
    assert sorted(desc) == ["b", "c", "d"] and desc.index("b") < desc.index("c")
    assert _names(snaps.roots()) == ["a"]
    assert sorted(_names(snaps.list(leaves=True))) == ["c", "d"]
    assert sorted(_names(snaps.list(leaves=False))) == ["a", "b"]
    assert sorted(_names(snaps.list(external=False))) == ["a", "b", "c", "d"]
    assert snaps.list(external=True) == ()
    listed = _names(snaps.list())
    assert listed.index("a") < listed.index("b") < listed.index("c")  # parents first
    assert snaps.current is not None and snaps.current.name == d.name


def test_revert_states(test_domain: statecapture.Domain) -> None:
    """revert() makes the snapshot current; running/paused choose the state afterwards."""
    snaps = test_domain.snapshots
    s1 = snaps.create("s1")
    snaps.create("s2")
    s1.revert(paused=True)
    assert s1.is_current
    assert test_domain.state is DomainState.PAUSED
    s1.revert(running=True)
    assert test_domain.state is DomainState.RUNNING
    s1.revert()
    assert test_domain.state is DomainState.RUNNING  # the captured state
    with pytest.raises(UsageError):
        s1.revert(running=True, paused=True)


def test_delete_variants(test_domain: statecapture.Domain) -> None:
    """delete() removes one snapshot, its descendants, or only the descendants."""
    snaps = test_domain.snapshots
    a = snaps.create("a")
    b = snaps.create("b")
    snaps.create("c")
    b.delete()
    assert _names(snaps.list()) == ["a", "c"]  # c moved up to a
    assert _names(a.children) == ["c"]
    a.delete(children_only=True)
    assert _names(snaps.list()) == ["a"]
    snaps.create("x")
    a.delete(children=True)
    assert len(snaps) == 0
    with pytest.raises(NotFoundError):
        _ = a.definition
    with pytest.raises(UsageError):
        a.delete(children=True, children_only=True)


def test_redefine_restores_metadata(test_domain: statecapture.Domain) -> None:
    """A definition saved as XML can be registered again with redefine()."""
    snaps = test_domain.snapshots
    s1 = snaps.create("s1")
    saved = s1.definition
    s1.delete()
    assert "s1" not in snaps
    again = snaps.redefine(saved.to_xml(), current=True)
    assert again.definition == saved
    assert again.is_current
    with pytest.raises(statecapture.XMLError):
        snaps.redefine("<domainsnapshot>")
    with pytest.raises(UsageError):
        snaps.redefine(SnapshotXML(description="no name"))
    with pytest.raises(UsageError):
        snaps.redefine(42)  # type: ignore[arg-type]


def test_names_generated_and_checked(test_domain: statecapture.Domain) -> None:
    """Unnamed snapshots get the creation time; duplicate or bad names are refused first."""
    snaps = test_domain.snapshots
    before = int(time.time())
    first = snaps.create()
    second = snaps.create()
    assert int(first.name) >= before
    assert second.name != first.name and second.name.startswith(first.name.split("-")[0])
    with pytest.raises(UsageError, match="already has a snapshot"):
        snaps.create(first.name)
    for bad in ("", "a/b", ".", "..", "tab\there"):
        with pytest.raises(UsageError):
            snaps.create(bad)
    with pytest.raises(UsageError):
        snaps.create("x", description=3)  # type: ignore[arg-type]
    assert len(snaps) == 2


def test_shut_off_domain_snapshot(test_conn: statecapture.Connection) -> None:
    """A shut-off domain's snapshot has no memory; asking for memory is refused."""
    beta = test_conn.domain("beta")
    beta.destroy()
    snap = beta.snapshots.create("off")
    assert snap.kind is SnapshotKind.INTERNAL_DISK_ONLY
    assert snap.definition.state == "shutoff"
    with pytest.raises(InvalidStateError):
        beta.snapshots.create("mem", memory=SnapshotMemoryMode.INTERNAL)
    assert len(beta.snapshots) == 1


def test_quiesce_without_agent_refused(test_domain: statecapture.Domain) -> None:
    """quiesce=True without a connected agent raises GuestAgentError before libvirt acts."""
    with pytest.raises(GuestAgentError, match="not connected"):
        test_domain.snapshots.create("q", quiesce=True)
    assert len(test_domain.snapshots) == 0


def test_checkpoint_blocks_internal_snapshot(test_domain: statecapture.Domain) -> None:
    """An internal snapshot is refused while checkpoints (dirty bitmaps) exist."""
    raw_domain(test_domain).checkpointCreateXML(
        "<domaincheckpoint><name>c1</name></domaincheckpoint>", 0
    )
    with pytest.raises(UnsupportedError, match="c1") as info:
        test_domain.snapshots.create("s1")
    assert "Device has active dirty bitmaps" in str(info.value)
    assert "Nothing was changed" in str(info.value)
    assert len(test_domain.snapshots) == 0
    assert test_domain.state is DomainState.RUNNING


def test_external_revert_refused_before_9_9(test_domain: statecapture.Domain) -> None:
    """Reverting to an external snapshot on a daemon older than 9.9 changes nothing."""
    assert test_domain.connection.versions.daemon < (9, 9)
    snaps = test_domain.snapshots
    internal = snaps.create("i1")
    ext = snaps.redefine(
        SnapshotXML(
            name="x1",
            state="disk-snapshot",
            creation_time=int(time.time()),
            parent="i1",
            memory=SnapshotMemory(SnapshotMemoryMode.NO),
            disks=(SnapshotDisk("vda", SnapshotDiskMode.EXTERNAL, "/images/alpha.x1", "qcow2"),),
            domain=test_domain.definition,
        )
    )
    assert ext.kind is SnapshotKind.EXTERNAL_DISK_ONLY
    assert _names(snaps.list(external=True)) == ["x1"]
    with pytest.raises(UnsupportedError, match=r"9\.9") as info:
        ext.revert()
    assert info.value.code is None  # refused by statecapture, libvirt was not asked
    assert internal.is_current and test_domain.state is DomainState.RUNNING


def test_external_delete_gate(test_domain: statecapture.Domain) -> None:
    """Deleting external snapshot data needs a 9.0 daemon; metadata-only is always allowed."""
    conn = test_domain.connection
    snaps = test_domain.snapshots
    ext = snaps.redefine(
        SnapshotXML(
            name="x1",
            state="disk-snapshot",
            creation_time=int(time.time()),
            memory=SnapshotMemory(SnapshotMemoryMode.NO),
            disks=(SnapshotDisk("vda", SnapshotDiskMode.EXTERNAL, "/images/alpha.x1", "qcow2"),),
            domain=test_domain.definition,
        )
    )
    # Simulate an 8.x daemon (the gate reads the daemon's version, never the client's).
    with daemon_version(conn, Version(8, 10, 0)):
        with pytest.raises(UnsupportedError, match=r"9\.0"):
            ext.delete()
        assert "x1" in snaps
    ext.delete()
    assert "x1" not in snaps


def test_driver_limits_are_unsupported_errors(test_domain: statecapture.Domain) -> None:
    """Options the test driver lacks raise UnsupportedError and create nothing."""
    snaps = test_domain.snapshots
    with pytest.raises(UnsupportedError):
        snaps.create("d", disk_only=True)
    with pytest.raises(UnsupportedError):
        snaps.create("m", metadata=False)
    s = snaps.create("s")
    with pytest.raises(UnsupportedError):
        s.delete(metadata_only=True)
    assert _names(snaps.list()) == ["s"]


def test_argument_checks(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """Contradicting or wrong arguments are UsageErrors raised before anything changes."""
    snaps = test_domain.snapshots
    with pytest.raises(UsageError, match="no memory"):
        snaps.create("a", disk_only=True, memory=SnapshotMemoryMode.INTERNAL)
    with pytest.raises(UsageError, match="internal memory"):
        snaps.create("a", external=True, memory=SnapshotMemoryMode.INTERNAL)
    with pytest.raises(UsageError, match="no disk vdz"):
        snaps.create("a", external={"vdz": "/x/y"})
    with pytest.raises(UsageError, match="absolute"):
        snaps.create("a", external={"vda": "relative.qcow2"})
    with pytest.raises(UsageError, match="absolute"):
        snaps.create("a", memory="relative.mem")
    with pytest.raises(UsageError, match="cdrom"):
        snaps.create("a", external={"sda": "/x/y"})
    with pytest.raises(UsageError, match="no disk to snapshot"):
        snaps.create("a", external={"vda": None})
    with pytest.raises(UsageError, match="share a path"):
        snaps.create("a", external=True, memory="/var/lib/statecapture-test/alpha.qcow2.a")
    with pytest.raises(UsageError):
        snaps.create("a", memory=3)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        snaps.create("a", external="yes")  # type: ignore[arg-type]
    existing = tmp_path / "exists.qcow2"
    existing.write_bytes(b"keep me")
    with pytest.raises(TargetExistsError) as info:
        snaps.create("a", external={"vda": existing})
    assert info.value.path == str(existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(TargetExistsError):
        snaps.create("a", external={"vda": tmp_path / "new.qcow2"}, memory=existing)
    assert len(snaps) == 0


def test_external_plan(test_domain: statecapture.Domain) -> None:
    """External snapshots name overlays <image>.<name>, skip cdroms, and validate."""
    plan = test_domain.snapshots._plan(
        "s1", disk_only=False, memory=None, external=True, description="x"
    )
    assert not plan.internal and not plan.disk_only_flag
    vda, sda = plan.xml.disks
    assert vda == SnapshotDisk(
        "vda", SnapshotDiskMode.EXTERNAL, "/var/lib/statecapture-test/alpha.qcow2.s1", "qcow2"
    )
    assert sda == SnapshotDisk("sda", SnapshotDiskMode.NO)
    assert plan.xml.memory == SnapshotMemory(
        SnapshotMemoryMode.EXTERNAL, "/var/lib/statecapture-test/alpha.s1.memory"
    )
    assert plan.new_files == (vda.source, plan.xml.memory.file)
    assert_valid(plan.xml.to_xml(), "domainsnapshot")
    disk_only = test_domain.snapshots._plan(
        "s2", disk_only=True, memory=None, external={"vda": "/o/vda.s2"}, description=None
    )
    assert disk_only.disk_only_flag
    assert disk_only.xml.memory == SnapshotMemory(SnapshotMemoryMode.NO)
    assert disk_only.xml.disks[0].source == "/o/vda.s2"
    assert_valid(disk_only.xml.to_xml(), "domainsnapshot")
    internal = test_domain.snapshots._plan(
        "s3", disk_only=False, memory=None, external=False, description=None
    )
    assert internal.internal and internal.new_files == ()
    assert_valid(internal.xml.to_xml(), "domainsnapshot")


def test_domain_property_is_a_collection(test_domain: statecapture.Domain) -> None:
    """dom.snapshots is a SnapshotCollection bound to the domain."""
    assert isinstance(test_domain.snapshots, statecapture.SnapshotCollection)
    assert test_domain.snapshots.domain is test_domain


# ---------------------------------------------------------------------------- qemu-img helper


def test_qemuimg_reports_bitmaps(tmp_path: Path) -> None:
    """persistent_bitmaps() lists a qcow2 image's bitmaps; raw images have none."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    img = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    assert _qemuimg.persistent_bitmaps(str(img)) == ()
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "stale"], check=True)
    assert _qemuimg.persistent_bitmaps(str(img)) == ("stale",)
    raw = tmp_path / "r.img"
    raw.write_bytes(b"\0" * 4096)
    assert _qemuimg.persistent_bitmaps(str(raw)) == ()
    with pytest.raises(statecapture.StateCaptureError, match="failed"):
        _qemuimg.image_info(str(tmp_path / "missing.qcow2"))


def test_qemuimg_missing_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without qemu-img on PATH the helper raises UnsupportedError naming the package."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnsupportedError, match="qemu-utils"):
        _qemuimg.image_info("/dev/null")


# ============================================================================ real tier


def _counter(dom: statecapture.Domain) -> int:
    from statecapture.testing import read_guest_file

    lines = read_guest_file(dom, "/data/ticks").decode().split("\n")
    last = [ln for ln in lines if ln.strip()][-1]
    return int(last.split()[0])


def _wait_counter(dom: statecapture.Domain, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        value = _counter(dom)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def _guest_sh(dom: statecapture.Domain, script: str) -> int:
    from statecapture.testing import guest_exec

    code, _out, _err = guest_exec(dom, ["sh", "-c", script], timeout=30)
    return code


@pytest.mark.qemu
def test_internal_snapshots_tree_revert_and_bitmap_hazard_on_qemu(guest_factory) -> None:
    """Internal snapshots with memory on QEMU: a three-level tree, revert brings back disk
    and memory (the guest's tick counter goes back), delete with children; once a checkpoint
    exists, internal create and revert are refused with nothing changed."""

    dom = guest_factory()
    snaps = dom.snapshots
    c_before = _wait_counter(dom, 5)
    t0 = time.monotonic()
    s1 = snaps.create("s1", description="first")
    create_s = time.monotonic() - t0
    c_after = _counter(dom)
    assert c_after >= c_before  # the guest continued
    assert s1.kind is SnapshotKind.INTERNAL and s1.definition.state == "running"
    assert _guest_sh(dom, "echo after-s1 > /data/marker && sync") == 0
    s2 = snaps.create("s2")
    s3 = snaps.create("s3")
    assert s3.parent is not None and s3.parent.name == "s2"
    assert s2.parent is not None and s2.parent.name == "s1"
    assert _names(s1.descendants()) == ["s2", "s3"]
    assert _names(snaps.roots()) == ["s1"] and s3.is_current
    c_pre = _wait_counter(dom, c_after + 60)
    assert c_pre >= c_after + 60
    t0 = time.monotonic()
    s1.revert(paused=True)
    revert_s = time.monotonic() - t0
    assert dom.state is DomainState.PAUSED and s1.is_current
    dom.resume()
    wait_agent(dom, timeout=60)
    c_post = _counter(dom)
    assert c_post < c_pre  # memory went back to s1
    assert c_post <= c_after + 40
    assert _guest_sh(dom, "test -e /data/marker") != 0  # the disk went back too
    s4 = snaps.create("s4")
    assert sorted(_names(s1.children)) == ["s2", "s4"]
    assert sorted(_names(snaps.list(leaves=True))) == ["s3", "s4"]
    s2.delete(children=True)
    assert _names(snaps.list()) == ["s1", "s4"]
    saved = s4.definition
    s4.delete(metadata_only=True)  # libvirt forgets it; the data stays in the qcow2
    assert "s4" not in snaps
    assert snaps.current is not None and snaps.current.name == "s1"  # the parent took over
    s4 = snaps.redefine(saved, current=True)
    assert s4.is_current and s4.definition == saved and s4.kind is SnapshotKind.INTERNAL
    print(f"\ninternal create {create_s:.2f} s, revert {revert_s:.2f} s")

    # A checkpoint keeps a persistent dirty bitmap: internal create/revert are refused.
    raw_domain(dom).checkpointCreateXML("<domaincheckpoint><name>c1</name></domaincheckpoint>", 0)
    with pytest.raises(UnsupportedError, match="c1"):
        snaps.create("s5")
    assert "s5" not in snaps and len(snaps) == 2
    c_mid = _counter(dom)
    with pytest.raises(UnsupportedError, match="dirty bitmaps"):
        s1.revert()
    assert dom.state is DomainState.RUNNING
    assert s4.is_current
    assert _wait_counter(dom, c_mid + 3) >= c_mid + 3  # still running, not reverted


@pytest.mark.qemu
def test_external_snapshots_on_qemu(guest_factory, tmp_path: Path) -> None:
    """External disk-only (quiesced) and with-memory snapshots on QEMU: overlays and memory
    files are created owner-only, the guest keeps running; reverting to them is refused on a
    daemon older than 9.9; deleting them merges data back (daemon >= 9.0)."""
    dom = guest_factory()
    snaps = dom.snapshots
    base = dom.disk("vda").source
    assert base is not None
    t0 = time.monotonic()
    x1 = snaps.create("x1", disk_only=True, quiesce=True)
    disk_only_s = time.monotonic() - t0
    assert x1.kind is SnapshotKind.EXTERNAL_DISK_ONLY
    assert x1.definition.state == "disk-snapshot"
    ov1 = f"{base}.x1"
    assert dom.disk("vda").source == ov1
    assert os.stat(ov1).st_mode & 0o777 == 0o600
    assert _guest_sh(dom, "echo on-x1 > /data/m1 && sync") == 0
    t0 = time.monotonic()
    x2 = snaps.create("x2", external=True)
    with_memory_s = time.monotonic() - t0
    assert x2.kind is SnapshotKind.EXTERNAL
    mem2 = x2.definition.memory
    assert mem2 is not None and mem2.file == os.path.join(
        os.path.dirname(base), f"{dom.name}.x2.memory"
    )
    assert os.stat(mem2.file).st_mode & 0o777 == 0o600
    assert os.stat(f"{ov1}.x2").st_mode & 0o777 == 0o600
    assert dom.state is DomainState.RUNNING
    ov3 = tmp_path / "custom-x3.qcow2"
    mem3 = tmp_path / "x3.mem"
    x3 = snaps.create("x3", external={"vda": ov3}, memory=mem3, live=True)
    assert dom.disk("vda").source == str(ov3)
    assert x3.definition.memory == SnapshotMemory(SnapshotMemoryMode.EXTERNAL, str(mem3))
    assert [s.name for s in snaps.list(external=True)] == ["x1", "x2", "x3"]
    assert [s.name for s in snaps.list(disk_only=True)] == ["x1"]
    assert [s.name for s in snaps.list(disk_only=False)] == ["x2", "x3"]
    assert _guest_sh(dom, "echo on-x3 > /data/m3 && sync") == 0
    print(f"\nexternal disk-only {disk_only_s:.2f} s, with memory {with_memory_s:.2f} s")

    daemon = dom.connection.versions.daemon
    if daemon < (9, 9):
        chain = dom.disk("vda").chain
        with pytest.raises(UnsupportedError, match=r"9\.9"):
            x1.revert()
        assert dom.state is DomainState.RUNNING
        assert x3.is_current and dom.disk("vda").chain == chain
    else:  # pragma: no cover - newer daemons than the CI's
        x2.revert()
        assert x2.is_current

    # libvirt 9.0 cannot delete external snapshots with their children: refused, unchanged.
    with pytest.raises(UnsupportedError) as info:
        x1.delete(children=True)
    assert any("leaves first" in n for n in getattr(info.value, "__notes__", []))
    assert len(snaps) == 3

    x2.delete()  # a middle layer: merged into its child's backing chain
    assert not os.path.exists(f"{ov1}.x2")
    x3.delete()  # the active layer: committed down
    x1.delete()
    assert len(snaps) == 0
    assert dom.disk("vda").source == base
    assert not os.path.exists(ov1) and not ov3.exists()
    assert dom.state is DomainState.RUNNING
    assert _guest_sh(dom, "grep -q on-x1 /data/m1 && grep -q on-x3 /data/m3") == 0

    # metadata=False: libvirt forgets the snapshot at once; the overlay is the caller's.
    untracked = snaps.create("nm", disk_only=True, metadata=False)
    assert "nm" not in snaps and not untracked.has_metadata
    assert untracked.definition.disks[0].source == f"{base}.nm"
    assert dom.disk("vda").source == f"{base}.nm"
    assert os.stat(f"{base}.nm").st_mode & 0o777 == 0o600


@pytest.mark.qemu
def test_preflight_hazards_on_qemu(guest_factory, tmp_path: Path) -> None:
    """Each hazard is refused with nothing changed (domain running, no file created, no
    snapshot): bitmaps left in a qcow2 by a metadata-only checkpoint delete block internal
    snapshots; quiesce without an agent; existing or unwritable targets. External snapshots
    stay possible on the bitmap disk."""
    dom = guest_factory(agent=False, start=False)
    image = dom.disk("vda").source
    assert image is not None
    # What a metadata-only checkpoint delete leaves behind: a bitmap libvirt no longer knows.
    subprocess.run(["qemu-img", "bitmap", "--add", image, "stale"], check=True)
    dom.start()
    snaps = dom.snapshots
    folder = Path(image).parent
    taken = (folder / f"{Path(image).name}.taken").resolve()
    taken.write_bytes(b"not yours")
    listing = sorted(os.listdir(folder))

    def unchanged() -> None:
        assert dom.state is DomainState.RUNNING
        assert len(snaps) == 0
        assert sorted(os.listdir(folder)) == listing
        assert dom.disk("vda").source == image

    with pytest.raises(UnsupportedError, match="stale") as info:
        snaps.create("int")
    assert "Device has active dirty bitmaps" in str(info.value)
    unchanged()
    with pytest.raises(GuestAgentError):
        snaps.create("q", disk_only=True, quiesce=True)
    unchanged()
    with pytest.raises(TargetExistsError):
        snaps.create("taken", disk_only=True)
    assert taken.read_bytes() == b"not yours"
    unchanged()
    with pytest.raises(TargetExistsError):
        snaps.create("mem", external=True, memory=taken)
    unchanged()
    with pytest.raises(UsageError, match="does not exist"):
        snaps.create("nodir", external={"vda": tmp_path / "no-such-dir" / "o.qcow2"})
    with pytest.raises(UsageError, match="does not exist"):
        snaps.create("notdir", external={"vda": taken / "o.qcow2"})
    unchanged()
    # A dangling symlink at the overlay or memory-file name: refused, left alone, nothing
    # created where it points; a directory others can rename entries in is refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    link = folder / f"{Path(image).name}.planted"
    link.symlink_to(outside / "overlay")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    listing = sorted(os.listdir(folder))
    with pytest.raises(TargetExistsError):
        snaps.create("planted", disk_only=True)
    with pytest.raises(TargetExistsError):
        snaps.create("mem2", external=True, memory=link)
    assert os.readlink(link) == str(outside / "overlay") and list(outside.iterdir()) == []
    unchanged()
    with pytest.raises(UsageError, match="not sticky"):
        snaps.create("shared", external={"vda": shared / "o.qcow2"}, disk_only=True)
    assert list(shared.iterdir()) == []
    unchanged()
    # The bitmap does not block external snapshots.
    ok = snaps.create("ok", disk_only=True)
    assert ok.kind is SnapshotKind.EXTERNAL_DISK_ONLY
    assert dom.state is DomainState.RUNNING
