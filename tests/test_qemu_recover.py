"""``recover()`` promises proven on real QEMU: what it refuses, what it repairs, and what
it leaves alone. (The kill matrix in ``tests/test_recover.py`` covers killed runs.)

One TCG guest with one qcow2 data disk serves the module; each test leaves it on its
original image with no job, snapshot, checkpoint or journal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import statecapture
from statecapture._journal import JOURNAL_NS, JobRecord, JournalWriter, read_journal
from tests._proof import guest_frozen, module_guest, qemu_img, sh, write_known

pytestmark = pytest.mark.qemu


@attrs.frozen
class G:
    dom: statecapture.Domain
    image: str
    image_dir: Path


@pytest.fixture(scope="module")
def rguest(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[G]:
    """One running guest with one qcow2 data disk and an agent, shared by the module."""
    with module_guest(qemu_conn, kit, tmp_path_factory.mktemp("qrec"), "qrec") as (dom, image):
        yield G(dom, str(image), image.parent)


@pytest.fixture
def g(rguest: G) -> Iterator[G]:
    yield rguest
    dom = rguest.dom
    for definition in (dom.definition, dom.inactive_definition):
        assert {d.target: d.source for d in definition.disks} == {"vda": rguest.image}
    assert sorted(p.name for p in rguest.image_dir.iterdir()) == ["disk0.qcow2"]
    assert dom.block_jobs() == () and dom.active_backup() is None
    assert read_journal(dom) is None
    assert len(dom.checkpoints) == 0 and len(dom.snapshots) == 0


def _journal_of(
    dom: statecapture.Domain,
    sequence: str,
    facts: dict[str, str],
    pid: int,
    job: JobRecord | None = None,
) -> None:
    """Put a journal written by process ``pid`` into the domain's metadata (with the
    section of its backup job, as a direct backup's journal carries it)."""
    writer = JournalWriter.begin(dom, sequence, facts=facts, job=job)
    dom.set_metadata(JOURNAL_NS, "statecapture", attrs.evolve(writer.journal, pid=pid).to_xml())


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_refuses_while_the_writing_process_lives_unless_forced(g: G, tmp_path: Path) -> None:
    """A run whose process still lives on this host (a real pull backup job with its new
    checkpoint and a partial file, journalled by a live process) is not touched: recover()
    raises InvalidStateError and the job, checkpoint, file and journal stay. force=True
    then ends the job and removes the checkpoint, the file and the journal."""
    dom = g.dom
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    job = dom.backup(mode="pull", checkpoint="sc-live")
    try:
        partial = tmp_path / f".{dom.name}.vda.sc-live.qcow2.partial"
        partial.write_bytes(b"half")
        facts = {"mode": "pull", "checkpoint": "sc-live", "partial:vda": str(partial)}
        record = read_journal(dom)  # the job's own record: it becomes the run's section
        assert record is not None and record.job is not None
        _journal_of(dom, "direct_backup", facts, sleeper.pid, record.job)
        stored = dom.metadata(JOURNAL_NS)
        with pytest.raises(statecapture.InvalidStateError, match="still running"):
            statecapture.recover(dom)
        running = dom.active_backup()
        assert running is not None and running.checkpoint == "sc-live"
        assert "sc-live" in dom.checkpoints and partial.exists()
        assert dom.metadata(JOURNAL_NS) == stored
        report = statecapture.recover(dom, force=True)
        assert report.clean, str(report)
        assert dom.active_backup() is None and "sc-live" not in dom.checkpoints
        assert not partial.exists() and read_journal(dom) is None
    finally:
        sleeper.kill()
        sleeper.wait()
        job.end()  # nothing left to end: recover() did it
    assert job.state != "running"


def test_damaged_journal_is_reported_and_cleared(g: G, tmp_path: Path) -> None:
    """A damaged journal blocks every sequence (InvalidStateError, nothing changed);
    recover() reports it and clears it, and the next run works."""
    dom = g.dom
    dom.set_metadata(JOURNAL_NS, "statecapture", "<journal pid='x'/>")
    with pytest.raises(statecapture.InvalidStateError, match="damaged"):
        statecapture.direct_backup(dom, tmp_path)
    assert list(tmp_path.iterdir()) == [] and len(dom.checkpoints) == 0
    report = statecapture.recover(dom)
    assert report.clean and any("damaged" in f for f in report.found), str(report)
    assert dom.metadata(JOURNAL_NS) is None
    result = statecapture.direct_backup(dom, tmp_path, checkpoint=False)
    assert all(p.is_file() for p in result.files.values())


def test_foreign_overlay_is_left_alone(g: G) -> None:
    """An external snapshot the user made (its overlay not named like statecapture's, no
    journal): recover() finds nothing and does nothing; the disk stays on the overlay."""
    dom = g.dom
    snap = dom.snapshots.create("users", disk_only=True)
    overlay = f"{g.image}.users"
    try:
        report = statecapture.recover(dom)
        assert report.nothing_found and report.actions == (), str(report)
        assert dom.disk("vda").source == overlay and os.path.exists(overlay)
        assert dom.disk("vda").backing[0].source == g.image
    finally:
        snap.delete()  # merges it back (daemon >= 9.0)
    assert dom.disk("vda").source == g.image and not os.path.exists(overlay)


def test_overlay_on_an_unexpected_base_is_not_merged(g: G, tmp_path: Path) -> None:
    """A statecapture-named overlay whose backing file is not the journalled original is
    not merged: the report is not clean, the journal stays for a retry, the disk stays on
    the overlay. Once the journal names the right original, recover() merges it (the data
    the guest wrote on the overlay is then in the original) and removes it."""
    dom = g.dom
    overlay = g.image_dir / "disk0.qcow2.sc-0123456789ab.overlay.qcow2"
    dom.snapshots.create("tmp", disk_only=True, external={"vda": overlay}, metadata=False)
    assert dom.disk("vda").source == str(overlay)
    on_overlay = write_known(dom, "on-overlay")
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), "32M")
    facts = {"original:vda": str(other), "overlay:vda": str(overlay), "format:vda": "qcow2"}
    _journal_of(dom, "backup_via_temporary_snapshot", facts, _dead_pid())
    report = statecapture.recover(dom)
    assert not report.clean and any("not merging" in e for e in report.errors), str(report)
    assert read_journal(dom) is not None
    assert dom.disk("vda").source == str(overlay) and overlay.exists()
    assert dom.block_jobs() == ()
    facts["original:vda"] = g.image
    _journal_of(dom, "backup_via_temporary_snapshot", facts, _dead_pid())
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert dom.disk("vda").source == g.image and not overlay.exists()
    out = sh(dom, "sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /data/on-overlay")
    assert on_overlay in out
    assert guest_frozen(dom) == "thawed"


def test_foreign_block_job_is_left_alone(g: G, tmp_path: Path) -> None:
    """A block job that is not a sequence's (a block copy the user started) is reported by
    recover() and left running; the disk stays where it was."""
    dom = g.dom
    job = dom.block_copy("vda", tmp_path / "mirror.qcow2")
    try:
        report = statecapture.recover(dom)
        assert report.clean and report.actions == (), str(report)
        assert any("block job on vda" in f and "left alone" in f for f in report.found)
        assert [j.disk for j in dom.block_jobs()] == ["vda"]
        assert dom.disk("vda").source == g.image
    finally:
        job.abort()
