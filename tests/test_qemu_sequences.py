"""Sequence promises proven on real QEMU (``backup_via_temporary_snapshot``,
``direct_backup``). The SIGTERM rollback needs a process of its own: see
``tests/test_qemu_signals.py``.

One TCG guest with one qcow2 data disk serves most tests (each returns it to a clean state,
which ``_assert_clean`` checks on the real domain); the quiesce and non-file-disk tests boot
their own guest.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import libvirt
import pytest

import statecapture
from statecapture import (
    Consistency,
    FreezeExpiredError,
    InvalidStateError,
    UnsupportedError,
    _journal,
)
from statecapture._journal import JOURNAL_NS, JournalWriter, read_journal
from statecapture.testing import wait_agent
from statecapture.testing.faults import Fault, inject
from tests._proof import (
    file_md5_in_image,
    flush_disk,
    guest_frozen,
    module_guest,
    qemu_img,
    spawn,
    write_known,
)
from tests._raw import raw_domain

pytestmark = pytest.mark.qemu


@attrs.frozen
class G:
    dom: statecapture.Domain
    image: str
    image_dir: Path


@pytest.fixture(scope="module")
def sguest(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[G]:
    """One running guest with one qcow2 data disk and an agent, shared by the module."""
    with module_guest(qemu_conn, kit, tmp_path_factory.mktemp("qseq"), "qseq") as (dom, image):
        yield G(dom, str(image), image.parent)


@pytest.fixture
def g(sguest: G) -> Iterator[G]:
    _journal._fault_hook = None
    yield sguest
    _journal._fault_hook = None
    for cp in reversed(sguest.dom.checkpoints.list()):
        cp.delete()


def _assert_clean(g: G) -> None:
    """The domain runs on its original file with nothing of a sequence left."""
    dom = g.dom
    for definition in (dom.definition, dom.inactive_definition):
        assert {d.target: d.source for d in definition.disks} == {"vda": g.image}
        assert all(d.backing == () for d in definition.disks)
    assert sorted(p.name for p in g.image_dir.iterdir()) == ["disk0.qcow2"]
    assert dom.block_jobs() == ()
    assert dom.active_backup() is None
    assert read_journal(dom) is None
    assert guest_frozen(dom) == "thawed"


def _no_copy(images: Mapping[str, Path]) -> None:
    return None


@pytest.fixture
def freezes(g: G) -> Iterator[Fault]:
    """Counts the freeze calls through the guest's port (an observation, no fault)."""
    with inject(g.dom, "fs_freeze") as counter:
        yield counter


def _both(dom: statecapture.Domain, target: Path, **kw: Any) -> list[Any]:
    """Call each sequence; their outcomes (result or the exception raised)."""
    out: list[Any] = []
    for run in (
        lambda: statecapture.backup_via_temporary_snapshot(dom, _no_copy, **kw),
        lambda: statecapture.direct_backup(dom, target, **kw),
    ):
        try:
            out.append(run())
        except Exception as exc:
            out.append(exc)
    return out


# --------------------------------------------------------------------------- refusals


def test_refused_while_a_backup_or_block_job_runs(g: G, tmp_path: Path, freezes: Fault) -> None:
    """While a backup job or a block job (a block copy) runs, both sequences refuse with
    InvalidStateError and change nothing: the job (and its checkpoint) stays, no overlay,
    no file, no checkpoint, no sequence journal (only the job's own record), and the guest
    is never frozen."""
    dom = g.dom
    with dom.backup(mode="pull", checkpoint="foreign") as job:
        for outcome in _both(dom, tmp_path):
            assert isinstance(outcome, InvalidStateError), outcome
            assert "backup" in str(outcome) and "Nothing was changed" in str(outcome)
        running = dom.active_backup()
        assert running is not None and running.checkpoint == "foreign"
        assert [c.name for c in dom.checkpoints] == ["foreign"]
        assert list(tmp_path.iterdir()) == []
        record = read_journal(dom)  # the job's own record only: no sequence's was written
        assert record is not None and record.is_backup_job, record
        assert sorted(p.name for p in g.image_dir.iterdir()) == ["disk0.qcow2"]
    assert job.state == "failed" and len(dom.checkpoints) == 0
    assert read_journal(dom) is None

    copy = dom.block_copy("vda", tmp_path / "mirror.qcow2")
    try:
        for outcome in _both(dom, tmp_path):
            assert isinstance(outcome, InvalidStateError), outcome
            assert "block job running" in str(outcome)
        assert len(dom.checkpoints) == 0 and read_journal(dom) is None
        assert [p.name for p in tmp_path.iterdir()] == ["mirror.qcow2"]
        assert [j.disk for j in dom.block_jobs()] == ["vda"]
        assert dom.disk("vda").source == g.image and read_journal(dom) is None
        assert sorted(p.name for p in g.image_dir.iterdir()) == ["disk0.qcow2"]
    finally:
        copy.abort()
    (tmp_path / "mirror.qcow2").unlink(missing_ok=True)
    assert freezes.calls == 0
    _assert_clean(g)


def test_unfinished_journal_refuses_a_new_run(g: G, tmp_path: Path) -> None:
    """A journal left by a dead process (as after a SIGKILL) makes both sequences refuse
    with InvalidStateError naming recover(), before any change (the journal is untouched,
    no overlay, file or checkpoint); after recover() the next run works."""
    dom = g.dom
    done = subprocess.run(
        ["python3", "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    writer = JournalWriter.begin(dom, "direct_backup", facts={"target_dir": str(tmp_path)})
    dead = attrs.evolve(writer.journal, pid=int(done.stdout))
    dom.set_metadata(JOURNAL_NS, "statecapture", dead.to_xml())
    stored = dom.metadata(JOURNAL_NS)
    for outcome in _both(dom, tmp_path):
        assert isinstance(outcome, InvalidStateError), outcome
        assert "recover(dom)" in str(outcome) and "Nothing was changed" in str(outcome)
    assert dom.metadata(JOURNAL_NS) == stored
    assert list(tmp_path.iterdir()) == [] and len(dom.checkpoints) == 0
    assert sorted(p.name for p in g.image_dir.iterdir()) == ["disk0.qcow2"]
    assert statecapture.recover(dom).clean
    result = statecapture.direct_backup(dom, tmp_path, checkpoint=False)
    assert set(result.files) == {"vda"}
    _assert_clean(g)


def test_non_file_disk_is_unsupported(guest_factory: Any, tmp_path: Path) -> None:
    """A domain with a block-device disk (a loop device): backup_via_temporary_snapshot
    raises UnsupportedError before any change (no overlay next to the file disk, the
    definition and the journal untouched)."""
    from statecapture.testing.kit import make_data_disk

    dom = guest_factory(start=False, agent=False, size_mib=16)
    raw_image = make_data_disk(tmp_path / "blockdisk.raw", size_mib=16, fmt="raw")
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(raw_image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        xml = dom.xml(inactive=True)
        block = (
            f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{loop}'/><target dev='vdb' bus='virtio'/></disk>"
        )
        dom = dom.connection.define(xml.replace("</devices>", block + "</devices>", 1))
        dom.start()
        file_disk = dom.disk("vda").source
        assert file_disk is not None and dom.disk("vdb").type == "block"
        listing = sorted(os.listdir(Path(file_disk).parent))
        before = dom.xml()
        with pytest.raises(UnsupportedError, match="not a local file"):
            statecapture.backup_via_temporary_snapshot(dom, _no_copy, quiesce=False)
        assert sorted(os.listdir(Path(file_disk).parent)) == listing
        assert dom.xml() == before
        assert read_journal(dom) is None and dom.block_jobs() == ()
        dom.destroy()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


# --------------------------------------------------------------------------- quiesce


def test_quiesce_false_never_freezes(g: G, tmp_path: Path, freezes: Fault) -> None:
    """quiesce=False: no freeze is ever sent to the guest (the guest agent reports
    'thawed' at the capture, and no freeze call reaches libvirt); the results say
    crash-consistent."""
    at_capture: list[str] = []

    def look(name: str) -> None:
        if name.endswith(":captured"):
            at_capture.append(guest_frozen(g.dom))

    _journal._fault_hook = look
    results = _both(g.dom, tmp_path, quiesce=False)
    _journal._fault_hook = None
    for result in results:
        assert isinstance(result, statecapture.SequenceResult), result
        assert not result.quiesced and result.consistency is Consistency.CRASH
        assert result.frozen_for is None
    assert at_capture == ["thawed", "thawed"] and freezes.calls == 0
    _assert_clean(g)


def _restart_agent_without_freeze(dom: statecapture.Domain) -> None:
    """Replace the guest's qemu-ga with one that refuses guest-fsfreeze-freeze (``-b``)."""
    events = dom.connection.events
    with events.expect(
        lambda e: e.detail.get("connected") is False,
        kind=statecapture.EventKind.AGENT_LIFECYCLE,
        domain_uuid=dom.uuid,
    ) as gone:
        spawn(
            dom,
            "sleep 0.5; p=$(pidof qemu-ga); pp=$(awk '/^PPid/{print $2}' /proc/$p/status); "
            "kill -STOP $pp; kill $p; sleep 1; "
            "LD_LIBRARY_PATH=/lib/x86_64-linux-gnu /usr/sbin/qemu-ga -d -m virtio-serial "
            "-p /dev/virtio-ports/org.qemu.guest_agent.0 -f /run/qemu-ga2.pid "
            "-t /run/qemu-ga -l /run/qemu-ga2.log "
            "-b guest-fsfreeze-freeze,guest-fsfreeze-freeze-list",
        )
        gone.wait(60, what="agent disconnect")
    dom.wait_for_agent(120)
    wait_agent(dom, timeout=120)


def test_best_effort_when_the_agents_freeze_fails(guest_factory: Any, tmp_path: Path) -> None:
    """The agent answers but its freeze fails (qemu-ga restarted in the guest with the
    freeze commands disabled): quiesce=True fails with nothing left behind;
    quiesce='best-effort' captures crash-consistent, says why in the notes, and ends
    clean, for both sequences."""
    dom = guest_factory(size_mib=16)
    image = dom.disk("vda").source
    assert image is not None
    folder = Path(image).parent
    target = tmp_path / "out"
    target.mkdir()
    listing = sorted(os.listdir(folder))
    _restart_agent_without_freeze(dom)
    with pytest.raises(libvirt.libvirtError, match="disabled"):
        raw_domain(dom).fsFreeze(None, 0)  # the agent really refuses to freeze
    assert guest_frozen(dom) == "thawed"
    for outcome in _both(dom, target):
        assert isinstance(outcome, statecapture.LibvirtError), outcome
        assert "disabled" in str(outcome)
    assert list(target.iterdir()) == [] and len(dom.checkpoints) == 0
    assert read_journal(dom) is None and sorted(os.listdir(folder)) == listing
    copied: list[dict[str, Path]] = []
    snap = statecapture.backup_via_temporary_snapshot(
        dom, lambda images: copied.append(dict(images)), quiesce="best-effort"
    )
    direct = statecapture.direct_backup(dom, target, quiesce="best-effort", checkpoint=False)
    for result in (snap, direct):
        assert not result.quiesced and result.consistency is Consistency.CRASH
        assert result.frozen_for is None
        assert any("freezing the guest's filesystems failed" in n for n in result.notes)
    assert copied == [{"vda": Path(image)}]
    assert all(p.is_file() for p in direct.files.values())
    assert dom.disk("vda").source == image and sorted(os.listdir(folder)) == listing
    assert read_journal(dom) is None and guest_frozen(dom) == "thawed"


# --------------------------------------------------------------------------- rollbacks


def test_expired_freeze_rolls_back(g: G, tmp_path: Path) -> None:
    """When the freeze budget runs out before the capture is confirmed (the capture step
    held past max_frozen; the watchdog really thaws the guest meanwhile), quiesce=True
    raises FreezeExpiredError after undoing everything: overlay merged back, backup job
    ended, its checkpoint and files removed, journal cleared."""
    dom = g.dom
    thawed_while_held: list[str] = []

    def hold(name: str) -> None:
        if name.endswith(":frozen"):
            time.sleep(3)  # well past max_frozen=0.5: the watchdog thaws
            thawed_while_held.append(guest_frozen(dom))

    _journal._fault_hook = hold
    with pytest.raises(FreezeExpiredError) as snap_info:
        statecapture.backup_via_temporary_snapshot(dom, _no_copy, max_frozen=0.5)
    _assert_clean(g)
    with pytest.raises(FreezeExpiredError) as direct_info:
        statecapture.direct_backup(dom, tmp_path, max_frozen=0.5, checkpoint="expiring")
    _journal._fault_hook = None
    assert snap_info.value.reason == direct_info.value.reason == "watchdog"
    assert thawed_while_held == ["thawed", "thawed"]
    assert list(tmp_path.iterdir()) == [] and "expiring" not in dom.checkpoints
    _assert_clean(g)


# --------------------------------------------------------------------------- data


def test_incremental_direct_backup_restores_byte_for_byte(g: G, tmp_path: Path) -> None:
    """A push full + incremental direct_backup, restored with restore_disk(), equals the
    guest's disk at the incremental's capture instant byte for byte (the reference is
    read while the guest is still frozen for the capture, QEMU's cached metadata flushed
    first: HAZARDS 15); a file written through the agent between the runs is in it."""
    dom = g.dom
    out = tmp_path / "backups"
    out.mkdir()
    write_known(dom, "before-full")
    full = statecapture.direct_backup(dom, out, checkpoint="full")
    known = write_known(dom, "between", blocks=16)
    reference = tmp_path / "reference.raw"

    def take_reference(name: str) -> None:
        if name == "in:begin:captured":  # the job started; the guest is still frozen
            assert guest_frozen(dom) == "frozen"
            flush_disk(dom, "vda")
            qemu_img("convert", "-U", "-O", "raw", g.image, str(reference))

    _journal._fault_hook = take_reference
    inc = statecapture.direct_backup(
        dom, out, incremental_from="full", checkpoint="inc", max_frozen=120
    )
    _journal._fault_hook = None
    assert reference.is_file()
    info = qemu_img("info", "--output=json", str(inc.files["vda"]))
    assert full.files["vda"].name in info  # a layer over the full backup ...
    assert os.path.getsize(inc.files["vda"]) < os.path.getsize(full.files["vda"])
    restored = statecapture.restore_disk(
        [full.files["vda"], inc.files["vda"]], tmp_path / "restored.raw", format="raw"
    )
    assert filecmp.cmp(restored, reference, shallow=False)  # ... that restores exactly
    assert file_md5_in_image(restored, "between", tmp_path) == known
    _assert_clean(g)
