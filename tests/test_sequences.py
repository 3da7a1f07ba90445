"""The guide's two sequences as single calls: backup_via_temporary_snapshot, direct_backup.

Fast tier (test driver): every refusal happens before anything changes. The test driver has
neither block commit nor backup jobs, so there the sequences must say so up front.

Real tier (embedded QEMU, one TCG guest with two data disks shared by the module): both
sequences end with the domain on its original files and nothing left behind; the data the
guest wrote before and during a run is in the original images afterwards (read back with
the guest's page cache dropped); an exception from ``copy``, a ``KeyboardInterrupt``, or a
fault injected at any step boundary rolls everything back in process. What a *killed*
process leaves is covered by the kill matrix in test_recover.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import statecapture
from statecapture import Consistency, SequenceResult, StepTiming, UsageError, _journal
from statecapture._journal import JOURNAL_NS, JournalWriter, read_journal
from statecapture.testing import wait_agent
from statecapture.testing.faults import inject
from tests._raw import raw_domain


@pytest.fixture(autouse=True)
def _no_hook() -> Iterator[None]:
    yield
    _journal._fault_hook = None


def _orphan_journal(dom: statecapture.Domain) -> None:
    writer = JournalWriter.begin(dom, "direct_backup")
    dead = attrs.evolve(writer.journal, pid=999_999_999)
    dom.set_metadata(JOURNAL_NS, "statecapture", dead.to_xml())


def _no_copy(images: Mapping[str, Path]) -> None:
    raise AssertionError("copy must not be called")


# ----------------------------------------------------------------------------- fast tier


def test_snapshot_sequence_needs_block_commit(test_domain: statecapture.Domain) -> None:
    """The test driver has no block commit: refused up front, nothing changed."""
    before = test_domain.xml()
    with pytest.raises(statecapture.UnsupportedError, match="virDomainBlockCommit"):
        statecapture.backup_via_temporary_snapshot(test_domain, _no_copy, quiesce=False)
    assert test_domain.xml() == before
    assert read_journal(test_domain) is None


def test_direct_backup_needs_backup_jobs(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """The test driver has no backup jobs: refused up front, nothing changed."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(statecapture.UnsupportedError, match="Nothing was changed"):
        statecapture.direct_backup(test_domain, out, quiesce=False)
    assert read_journal(test_domain) is None
    assert list(out.iterdir()) == []
    assert len(test_domain.checkpoints) == 0


def test_quiesce_without_agent_is_refused(
    test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """quiesce=True on a domain without a guest agent fails before any change."""
    beta = test_conn.domain("beta")  # running, no agent channel
    assert beta.is_active and not beta.agent_connected
    with pytest.raises(statecapture.GuestAgentError, match="Nothing was changed"):
        statecapture.backup_via_temporary_snapshot(beta, _no_copy)
    with pytest.raises(statecapture.GuestAgentError, match="quiesce='best-effort'"):
        statecapture.direct_backup(beta, tmp_path)
    assert read_journal(beta) is None


def test_unfinished_run_is_refused(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """A journal left by an interrupted run blocks both sequences until recover()."""
    _orphan_journal(test_domain)
    stored = test_domain.metadata(JOURNAL_NS)
    with pytest.raises(statecapture.InvalidStateError, match=r"recover\(dom\)"):
        statecapture.backup_via_temporary_snapshot(test_domain, _no_copy)
    with pytest.raises(statecapture.InvalidStateError, match=r"recover\(dom\)"):
        statecapture.direct_backup(test_domain, tmp_path)
    assert test_domain.metadata(JOURNAL_NS) == stored


def test_stopped_domain_is_refused(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """Both sequences need a running domain."""
    test_domain.destroy()
    with pytest.raises(statecapture.InvalidStateError, match="running"):
        statecapture.backup_via_temporary_snapshot(test_domain, _no_copy)
    with pytest.raises(statecapture.InvalidStateError, match="running"):
        statecapture.direct_backup(test_domain, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quiesce": "yes"}, "quiesce"),
        ({"quiesce": 1}, "quiesce"),
        ({"max_frozen": 0}, "max_frozen"),
        ({"max_frozen": math.nan}, "max_frozen"),
        ({"max_frozen": True}, "max_frozen"),
        ({"overlay_dir": "/nonexistent/dir"}, "overlay_dir"),
    ],
)
def test_snapshot_sequence_bad_arguments(
    test_domain: statecapture.Domain, kwargs: dict[str, Any], match: str
) -> None:
    """Bad arguments are UsageErrors, raised before anything is looked at."""
    with pytest.raises(statecapture.UsageError, match=match):
        statecapture.backup_via_temporary_snapshot(test_domain, _no_copy, **kwargs)
    with pytest.raises(statecapture.UsageError, match="copy"):
        statecapture.backup_via_temporary_snapshot(test_domain, None)  # type: ignore[arg-type]
    with pytest.raises(statecapture.UsageError, match="Domain"):
        statecapture.backup_via_temporary_snapshot("alpha", _no_copy)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "sideways"}, "mode"),
        ({"checkpoint": 3}, "checkpoint"),
        ({"checkpoint": ".hidden"}, "not valid"),
        ({"quiesce": None}, "quiesce"),
        ({"max_frozen": -1}, "max_frozen"),
    ],
)
def test_direct_backup_bad_arguments(
    test_domain: statecapture.Domain, tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    """Bad arguments are UsageErrors, raised before anything changes."""
    with pytest.raises(statecapture.UsageError, match=match):
        statecapture.direct_backup(test_domain, tmp_path, **{"quiesce": False, **kwargs})
    with pytest.raises(statecapture.UsageError, match="not a directory"):
        statecapture.direct_backup(test_domain, tmp_path / "missing")


def test_result_values() -> None:
    """SequenceResult and StepTiming are frozen values; str() tells the story."""
    result = SequenceResult(
        sequence="direct_backup",
        files={"vda": Path("/b/vda.qcow2")},
        frozen_for=0.125,
        quiesced=True,
        consistency=Consistency.APPLICATION,
        guest_pause=None,
        steps=(StepTiming("begin", 0.5), StepTiming("transfer", 1.5)),
        checkpoint="c1",
        notes=("n",),
    )
    assert result.duration == 2.0
    assert result.step("transfer").seconds == 1.5
    with pytest.raises(statecapture.NotFoundError):
        result.step("copy")
    with pytest.raises(AttributeError):
        result.frozen_for = 1.0  # type: ignore[misc]
    text = str(result)
    assert "application-consistent" in text and "125 ms" in text and "c1" in text


# ----------------------------------------------------------------------------- real tier


def _sh(dom: statecapture.Domain, script: str, timeout: float = 60) -> str:
    from statecapture.testing import guest_exec

    code, out, err = guest_exec(dom, ["sh", "-c", script], timeout=timeout)
    assert code == 0, f"{script}: {err.decode()}"
    return out.decode()


def _md5s(text: str) -> list[str]:
    return re.findall(r"\b[0-9a-f]{32}\b", text)


def _write_known(dom: statecapture.Domain, name: str, blocks: int = 16) -> str:
    out = _sh(
        dom,
        f"dd if=/dev/urandom of=/data/{name} bs=64k count={blocks} 2>/dev/null; sync; "
        f"md5sum /data/{name}",
    )
    return _md5s(out)[0]


def _md5_from_disk(dom: statecapture.Domain, *names: str) -> list[str]:
    """md5 of guest files as read from the disk (page cache dropped first)."""
    files = " ".join(f"/data/{n}" for n in names)
    return _md5s(_sh(dom, f"sync; echo 3 > /proc/sys/vm/drop_caches; md5sum {files}"))


@attrs.frozen
class SeqGuest:
    dom: statecapture.Domain
    originals: dict[str, str]
    image_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def seq_guest(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeqGuest]:
    """One running guest with two qcow2 data disks and an agent, shared by the module."""
    from statecapture.testing.kit import domain_xml, make_data_disk

    tmp = tmp_path_factory.mktemp("seq")
    image_dir = tmp / "images"
    image_dir.mkdir()
    name = f"sc-seq-{os.getpid()}"
    images = [make_data_disk(image_dir / f"disk{i}.qcow2") for i in range(2)]
    xml = domain_xml(name, kit, images, log_path=tmp / "console.log", disk_formats=["qcow2"] * 2)
    dom = qemu_conn.define(xml)
    try:
        dom.start()
        wait_agent(dom, timeout=300)
        yield SeqGuest(dom, {"vda": str(images[0]), "vdb": str(images[1])}, image_dir, tmp)
    finally:
        raw = raw_domain(dom)
        with contextlib.suppress(Exception):
            raw.abortJob()
        with contextlib.suppress(Exception):
            raw.fsThaw(None, 0)
        with contextlib.suppress(Exception):
            dom.destroy()
        with contextlib.suppress(Exception):
            dom.undefine(snapshots_metadata=True, checkpoints_metadata=True)


def _assert_clean(g: SeqGuest) -> None:
    """The domain runs on its original files, and nothing of a sequence is left."""
    dom = g.dom
    for definition in (dom.definition, dom.inactive_definition):
        assert {d.target: d.source for d in definition.disks} == g.originals
        assert all(d.backing == () for d in definition.disks)
    assert sorted(p.name for p in g.image_dir.iterdir()) == ["disk0.qcow2", "disk1.qcow2"]
    assert dom.block_jobs() == ()
    assert dom.active_backup() is None
    assert read_journal(dom) is None
    assert dom.fs_freeze_status() == "thawed"


def _copier(dest: Path) -> Any:
    def copy(images: Mapping[str, Path]) -> dict[str, Path]:
        out = {}
        for disk, path in images.items():
            target = dest / f"{disk}.qcow2"
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "qcow2", str(path), str(target)], check=True
            )
            out[disk] = target
        return out

    return copy


def _guest_file_in_image(image: Path, name: str, work: Path) -> str:
    """md5 of ``/name`` inside the ext4 filesystem of a qcow2 image (read on the host)."""
    raw = work / f"{image.name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        out = subprocess.run(
            ["debugfs", "-R", f"cat /{name}", str(raw)], check=True, capture_output=True
        ).stdout
    finally:
        raw.unlink()
    import hashlib

    return hashlib.md5(out).hexdigest()


@pytest.mark.qemu
def test_temporary_snapshot_round_trip(seq_guest: SeqGuest, tmp_path: Path) -> None:
    """The whole first sequence: the copy sees frozen images holding what the guest wrote
    before the run, the journal is visible while it runs, and afterwards the domain runs
    on its original files with what it wrote during the copy merged in; overlays are gone."""
    g = seq_guest
    dom = g.dom
    known = _write_known(dom, "known")
    seen: dict[str, Any] = {}
    copy = _copier(tmp_path)

    def observing_copy(images: Mapping[str, Path]) -> dict[str, Path]:
        seen["images"] = dict(images)
        seen["journal"] = read_journal(dom)
        seen["live"] = {d.target: d.source for d in dom.definition.disks}
        seen["during"] = _write_known(dom, "during", blocks=8)
        with pytest.raises(TypeError):
            images["vda"] = Path("/elsewhere")  # type: ignore[index]
        return copy(images)

    result = statecapture.backup_via_temporary_snapshot(dom, observing_copy)

    assert seen["images"] == {k: Path(v) for k, v in g.originals.items()}
    journal = seen["journal"]
    assert journal.sequence == "backup_via_temporary_snapshot"
    assert journal.current_step.name == "copy" and journal.current_step.status == "started"
    overlays = journal.facts_with_prefix("overlay")
    assert seen["live"] == overlays
    for disk, overlay in overlays.items():
        assert overlay == f"{g.originals[disk]}.sc-{journal.run_id[:12]}.overlay.qcow2"
    _assert_clean(g)
    assert _md5_from_disk(dom, "known", "during") == [known, seen["during"]]
    assert _guest_file_in_image(result.files["vda"], "known", tmp_path) == known

    assert result.sequence == "backup_via_temporary_snapshot"
    assert result.files == {"vda": tmp_path / "vda.qcow2", "vdb": tmp_path / "vdb.qcow2"}
    assert result.quiesced and result.consistency is Consistency.APPLICATION
    assert result.frozen_for is not None and 0 < result.frozen_for < 10
    assert result.guest_pause is None
    assert [s.name for s in result.steps] == ["snapshot", "copy", "commit", "pivot", "remove"]
    assert result.checkpoint is None and result.notes == ()


@pytest.mark.qemu
@pytest.mark.parametrize("exc", [ValueError("copy failed"), KeyboardInterrupt()])
def test_copy_failure_rolls_back(seq_guest: SeqGuest, exc: BaseException) -> None:
    """An exception from copy — KeyboardInterrupt too — merges the overlays back before it
    propagates, unchanged but for a note saying what was rolled back; the journal is
    cleared."""
    known = _write_known(seq_guest.dom, "known")

    def failing_copy(images: Mapping[str, Path]) -> None:
        _write_known(seq_guest.dom, "during", blocks=4)
        raise exc

    with pytest.raises(type(exc)) as caught:
        statecapture.backup_via_temporary_snapshot(seq_guest.dom, failing_copy)
    assert caught.value is exc
    (note,) = exc.__notes__  # the undo succeeded: one note says what it did, no failure
    assert f"rolled back after {type(exc).__name__}" in note
    assert "merged" in note and "removed" in note
    _assert_clean(seq_guest)
    assert _md5_from_disk(seq_guest.dom, "known")[0] == known


# A representative subset (inside the freeze, between the disks' commits and pivots, after
# the last step); test_recover.py kills the process at every boundary.
SNAPSHOT_BOUNDARIES = [
    "in:snapshot:frozen",
    "in:snapshot:captured",
    "done:copy",
    "in:commit:vda",
    "in:pivot:vda",
    "done:remove",
]


@pytest.mark.qemu
@pytest.mark.parametrize("boundary", SNAPSHOT_BOUNDARIES)
def test_temporary_snapshot_rolls_back_at_every_boundary(
    seq_guest: SeqGuest, boundary: str, tmp_path: Path
) -> None:
    """A KeyboardInterrupt at any step boundary (also inside the freeze, between commits
    and between pivots) is undone in process: thawed, merged back, journal cleared."""

    def interrupt(name: str) -> None:
        if name == boundary:
            raise KeyboardInterrupt(name)

    _journal._fault_hook = interrupt
    with pytest.raises(KeyboardInterrupt, match=boundary):
        statecapture.backup_via_temporary_snapshot(seq_guest.dom, _copier(tmp_path))
    _journal._fault_hook = None
    _assert_clean(seq_guest)


@pytest.mark.qemu
def test_existing_overlay_is_refused(seq_guest: SeqGuest, tmp_path: Path, monkeypatch: Any) -> None:
    """A file where an overlay would go is never overwritten: refused before any change."""
    monkeypatch.setattr(_journal, "new_run_id", lambda: "0123456789ab" + "0" * 20)
    blocker = tmp_path / "disk1.qcow2.sc-0123456789ab.overlay.qcow2"
    blocker.write_bytes(b"mine")
    with pytest.raises(statecapture.TargetExistsError) as caught:
        statecapture.backup_via_temporary_snapshot(seq_guest.dom, _no_copy, overlay_dir=tmp_path)
    assert caught.value.path == str(blocker)
    assert blocker.read_bytes() == b"mine"
    _assert_clean(seq_guest)


@pytest.mark.qemu
def test_direct_backup_push_then_incremental_then_pull(seq_guest: SeqGuest, tmp_path: Path) -> None:
    """Push full, push incremental from its checkpoint, then pull: images are written,
    checkpoints chain, the definition never changes and nothing is left running."""
    dom = seq_guest.dom
    push, pull = tmp_path / "push", tmp_path / "pull"
    push.mkdir()
    pull.mkdir()
    known = _write_known(dom, "known")
    full = statecapture.direct_backup(dom, push)
    _write_known(dom, "more", blocks=4)
    inc = statecapture.direct_backup(dom, push, incremental_from=full.checkpoint)
    pulled = statecapture.direct_backup(dom, pull, mode="pull", checkpoint="sc-pulled")
    try:
        for result in (full, inc, pulled):
            assert result.sequence == "direct_backup"
            assert result.quiesced and result.consistency is Consistency.APPLICATION
            assert result.frozen_for is not None and 0 < result.frozen_for < 10
            assert [s.name for s in result.steps] == ["begin", "transfer", "end"]
            assert set(result.files) == {"vda", "vdb"}
            for path in result.files.values():
                assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
                subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
        assert full.checkpoint is not None and full.checkpoint.startswith("sc-")
        assert pulled.checkpoint == "sc-pulled"
        names = [c.name for c in dom.checkpoints.list()]
        assert names == [full.checkpoint, inc.checkpoint, "sc-pulled"]
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(inc.files["vda"])],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert full.files["vda"].name in info  # the incremental layer sits on the full one
        assert _guest_file_in_image(pulled.files["vda"], "known", tmp_path) == known
        _assert_clean(seq_guest)
    finally:
        for cp in reversed(dom.checkpoints.list()):
            cp.delete()


DIRECT_BOUNDARIES = [
    ("pull", "in:begin:captured"),
    ("pull", "mid:transfer"),
    ("pull", "done:end"),
    ("push", "done:transfer"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("mode", "boundary"), DIRECT_BOUNDARIES)
def test_direct_backup_rolls_back_at_every_boundary(
    seq_guest: SeqGuest, tmp_path: Path, mode: str, boundary: str
) -> None:
    """A KeyboardInterrupt at any boundary ends the job and removes the checkpoint and the
    (partial) images it made, in process; the journal is cleared, and a note on the
    KeyboardInterrupt says what was rolled back."""

    def interrupt(name: str) -> None:
        if name == boundary:
            raise KeyboardInterrupt(name)

    _journal._fault_hook = interrupt
    with pytest.raises(KeyboardInterrupt, match=boundary) as caught:
        statecapture.direct_backup(seq_guest.dom, tmp_path, mode=mode)
    _journal._fault_hook = None
    notes = "\n".join(caught.value.__notes__)
    assert "rolled back after KeyboardInterrupt" in notes
    assert "deleted the checkpoint" in notes
    assert list(tmp_path.iterdir()) == []
    assert len(seq_guest.dom.checkpoints) == 0
    _assert_clean(seq_guest)


@contextlib.contextmanager
def _read_only_dir(parent: Path) -> Iterator[Path]:
    """A read-only mount (tmpfs, ro): even root cannot create, or unlink, a file there."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = parent / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)
        ro.rmdir()


@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_direct_backup_into_read_only_dir_is_refused(
    seq_guest: SeqGuest, tmp_path: Path, mode: str
) -> None:
    """A target_dir nothing can be created in is a UsageError before anything changes: no
    freeze, no job, no checkpoint, no journal, no file (and no raw OSError)."""
    dom = seq_guest.dom
    with _read_only_dir(tmp_path) as ro:
        with pytest.raises(UsageError, match="not writable"):
            statecapture.direct_backup(dom, ro, mode=mode)
        assert list(ro.iterdir()) == []
    assert len(dom.checkpoints) == 0
    _assert_clean(seq_guest)


@pytest.mark.qemu
def test_plain_backup_into_read_only_dir_is_refused(seq_guest: SeqGuest, tmp_path: Path) -> None:
    """dom.backup(push) into a read-only target_dir and job.download() into a read-only
    dest_dir raise UsageError; the pull job can still be ended cleanly and leaves nothing."""
    dom = seq_guest.dom
    with _read_only_dir(tmp_path) as ro:
        with pytest.raises(UsageError, match="not writable"):
            dom.backup(mode="push", target_dir=ro, checkpoint="ro1")
        assert dom.active_backup() is None and len(dom.checkpoints) == 0
        with dom.backup(mode="pull", checkpoint="ro2") as job:
            with pytest.raises(UsageError, match="not writable"):
                job.download(ro)
            assert job.end() is None  # nothing delivered: checkpoint and files go
        assert list(ro.iterdir()) == []
    assert len(dom.checkpoints) == 0
    _assert_clean(seq_guest)


@pytest.mark.qemu
def test_quiesce_modes_without_agent(guest_factory: Any, tmp_path: Path) -> None:
    """Without a connected agent: quiesce=True fails before any change; 'best-effort' runs
    crash-consistent and says so; both sequences."""
    dom = guest_factory(disks=1, agent=False)  # runs at once; no agent will ever answer
    with pytest.raises(statecapture.GuestAgentError, match="Nothing was changed"):
        statecapture.backup_via_temporary_snapshot(dom, _no_copy)
    with pytest.raises(statecapture.GuestAgentError):
        statecapture.direct_backup(dom, tmp_path)
    assert read_journal(dom) is None and len(dom.checkpoints) == 0
    original = dom.disks[0].source
    overlay_dir = tmp_path / "overlays"
    overlay_dir.mkdir()
    snap = statecapture.backup_via_temporary_snapshot(
        dom, lambda images: None, quiesce="best-effort", overlay_dir=overlay_dir
    )
    direct = statecapture.direct_backup(dom, tmp_path, quiesce="best-effort", checkpoint=False)
    for result in (snap, direct):
        assert not result.quiesced and result.consistency is Consistency.CRASH
        assert result.frozen_for is None
        assert any("crash-consistent" in n for n in result.notes)
    assert dom.disks[0].source == original and list(overlay_dir.iterdir()) == []
    assert direct.checkpoint is None and all(p.is_file() for p in direct.files.values())
    assert read_journal(dom) is None


@pytest.mark.qemu
def test_frozen_window_holds_the_capture_call_only(seq_guest: SeqGuest, tmp_path: Path) -> None:
    """Nothing but the capture call runs while the guest is frozen: the journal is written
    before the freeze and after the thaw (it is byte-identical at both ends of the capture),
    and the freeze is journalled as possibly in effect for recover()."""
    dom = seq_guest.dom
    stored: dict[str, str | None] = {}

    def look(name: str) -> None:
        if name.startswith("in:"):
            stored[name] = dom.metadata(JOURNAL_NS)  # a read: no guest I/O
            if name.endswith(":frozen"):
                assert dom.fs_freeze_status() == "frozen"

    _journal._fault_hook = look
    snap = statecapture.backup_via_temporary_snapshot(dom, lambda images: None)
    direct = statecapture.direct_backup(dom, tmp_path, checkpoint=False)
    _journal._fault_hook = None
    for step in ("snapshot", "begin"):
        frozen, captured = stored[f"in:{step}:frozen"], stored[f"in:{step}:captured"]
        assert frozen is not None and frozen == captured
        journal = _journal.Journal.from_xml(frozen)
        assert journal.fact("frozen") == "1"
        assert journal.current_step is not None
        assert (journal.current_step.name, journal.current_step.status) == (step, "started")
    for result in (snap, direct):
        assert result.frozen_for is not None and 0 < result.frozen_for < 10
        print(f"{result.sequence}: frozen {result.frozen_for * 1000:.0f} ms")
    _assert_clean(seq_guest)


@pytest.mark.qemu
def test_thaw_failure_keeps_the_journal_for_recover(seq_guest: SeqGuest) -> None:
    """When the thaw fails (injected), the overlays are still merged back, but the journal
    is kept — the guest may be frozen — and recover() thaws the guest and clears it."""
    dom = seq_guest.dom
    broken = statecapture.GuestAgentError("injected: agent unresponsive", code=86)
    with (
        inject(dom, "fs_thaw", raises=broken),
        pytest.raises(statecapture.ThawError) as caught,
    ):
        statecapture.backup_via_temporary_snapshot(dom, lambda images: None, max_frozen=1)
    assert "recover(dom) thaws" in "\n".join(caught.value.__notes__)
    journal = read_journal(dom)
    assert journal is not None and journal.fact("frozen") == "1"
    assert dom.fs_freeze_status() == "frozen"
    assert {d.target: d.source for d in dom.definition.disks} == seq_guest.originals
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert any(a.startswith("thawed") for a in report.actions)
    _assert_clean(seq_guest)
