"""The sequence journal (statecapture/_journal.py), on libvirt's test driver.

The journal is the crash-safety of the sequences: what it promises is proven here on the
domain's real libvirt metadata (the test driver implements virDomainSetMetadata for the live
and the persistent definition); the kill matrix in test_recover.py proves the whole story on
QEMU.
"""

from __future__ import annotations

import os

import pytest

import statecapture
from statecapture import _journal
from statecapture._journal import (
    JOURNAL_NS,
    Journal,
    JournalStep,
    JournalWriter,
    clear_journal,
    read_journal,
)


@pytest.fixture(autouse=True)
def _no_hook() -> object:
    yield
    _journal._fault_hook = None


def test_begin_writes_facts_and_identity(test_domain: statecapture.Domain) -> None:
    """One write stores the run's identity and its first facts where any reader finds them."""
    writer = JournalWriter.begin(test_domain, "direct_backup", facts={"checkpoint": "c1"})
    journal = read_journal(test_domain)
    assert journal == writer.journal
    assert journal is not None
    assert journal.sequence == "direct_backup"
    assert journal.pid == os.getpid()
    assert len(journal.run_id) == 32
    assert journal.fact("checkpoint") == "c1"
    assert journal.steps == ()
    # Stored in the domain's own XML under our namespace, live and persistent.
    assert JOURNAL_NS in test_domain.xml()
    assert JOURNAL_NS in test_domain.xml(inactive=True)


def test_step_is_journalled_before_and_after(test_domain: statecapture.Domain) -> None:
    """A step is 'started' in the domain while its body runs and 'done' after it."""
    writer = JournalWriter.begin(test_domain, "backup_via_temporary_snapshot")
    seen: list[str] = []
    _journal._fault_hook = seen.append
    with writer.step("copy"):
        inside = read_journal(test_domain)
        assert inside is not None and inside.current_step is not None
        assert (inside.current_step.name, inside.current_step.status) == ("copy", "started")
    after = read_journal(test_domain)
    assert after is not None
    step = after.step("copy")
    assert step is not None and step.status == "done" and step.ended_at is not None
    assert seen == ["start:copy", "done:copy"]
    assert [name for name, _s in writer.timings] == ["copy"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_failed_step_is_journalled_and_reraised(
    test_domain: statecapture.Domain, exc: BaseException
) -> None:
    """A step whose body raises (KeyboardInterrupt too) is stored as failed, with the error."""
    writer = JournalWriter.begin(test_domain, "direct_backup")
    with pytest.raises(type(exc)), writer.step("transfer"):
        raise exc
    journal = read_journal(test_domain)
    assert journal is not None
    step = journal.step("transfer")
    assert step is not None and step.status == "failed"
    assert step.error is not None and type(exc).__name__ in step.error


def test_staged_facts_go_out_with_the_next_step_write(test_domain: statecapture.Domain) -> None:
    """stage() costs no write; the next step write stores (or drops) the fact."""
    writer = JournalWriter.begin(test_domain, "direct_backup", facts={"frozen": "1"})
    writer.stage("frozen", None)
    writer.stage("label", "c1")
    stored = read_journal(test_domain)
    assert stored is not None and stored.fact("frozen") == "1"
    with writer.step("begin"):
        pass
    stored = read_journal(test_domain)
    assert stored is not None
    assert stored.fact("frozen") is None and stored.fact("label") == "c1"


def test_record_and_set_fact_write_through(test_domain: statecapture.Domain) -> None:
    """record()/set_fact() store at once; ``a__b`` names the fact ``a:b``."""
    writer = JournalWriter.begin(test_domain, "direct_backup")
    writer.record(file__vda="/b/vda.qcow2")
    writer.set_fact("overlay:vdb", "/x/vdb.overlay")
    stored = read_journal(test_domain)
    assert stored is not None
    assert stored.facts_with_prefix("file") == {"vda": "/b/vda.qcow2"}
    assert stored.fact("overlay:vdb") == "/x/vdb.overlay"
    writer.set_fact("overlay:vdb", None)
    stored = read_journal(test_domain)
    assert stored is not None and stored.fact("overlay:vdb") is None


def test_finish_and_clear_remove_the_journal(test_domain: statecapture.Domain) -> None:
    """finish() removes the journal; clear_journal() is idempotent."""
    writer = JournalWriter.begin(test_domain, "direct_backup")
    writer.finish()
    assert read_journal(test_domain) is None
    assert JOURNAL_NS not in test_domain.xml(inactive=True)
    clear_journal(test_domain)
    clear_journal(test_domain)
    assert read_journal(test_domain) is None


def test_a_second_run_takes_over_and_the_first_backs_off(test_domain: statecapture.Domain) -> None:
    """Two runs on one domain: the later journal wins and the earlier writer refuses to
    overwrite it."""
    first = JournalWriter.begin(test_domain, "direct_backup")
    second = JournalWriter.begin(test_domain, "direct_backup")
    with pytest.raises(statecapture.InvalidStateError, match="replaced this run's journal"):
        first.set_fact("x", "1")
    second.set_fact("x", "2")
    stored = read_journal(test_domain)
    assert stored is not None and stored.run_id == second.journal.run_id


def test_journal_xml_round_trip_and_damage() -> None:
    """The stored form round-trips; damaged XML raises XMLError, not a crash."""
    journal = Journal(
        sequence="direct_backup",
        run_id="ab" * 16,
        host="h",
        pid=42,
        started_at=1.5,
        steps=(JournalStep("begin", "done", 1.5, 2.5), JournalStep("transfer", "started", 3.0)),
        facts={"file:vda": "/a b/<&>.qcow2", "checkpoint": "c1"},
    )
    assert Journal.from_xml(journal.to_xml()) == journal
    assert "transfer" in journal.describe() and "pid 42" in journal.describe()
    with pytest.raises(statecapture.XMLError):
        Journal.from_xml("<other/>")
    with pytest.raises(statecapture.XMLError):
        Journal.from_xml("<journal pid='x'/>")
    with pytest.raises(statecapture.XMLError):
        Journal.from_xml("<journal")


def test_damaged_journal_in_the_domain_is_reported(test_domain: statecapture.Domain) -> None:
    """read_journal() raises XMLError for a damaged journal (recover() reports it)."""
    test_domain.set_metadata(JOURNAL_NS, "statecapture", "<journal pid='nope'/>")
    with pytest.raises(statecapture.XMLError):
        read_journal(test_domain)
