"""The advisor: the guide as data, rules, ranking and rendering (fast tier on the test
driver), and every live blocker provoked on real QEMU (real tier)."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import libvirt
import pytest

import statecapture
from statecapture import (
    Advice,
    BlockerKind,
    Consistency,
    EventKind,
    Facet,
    Fit,
    Method,
    Needs,
    Storage,
    UsageError,
    advise,
)
from statecapture._advisor import GUIDE
from statecapture._journal import JOURNAL_NS
from tests._raw import raw_domain

APP = Consistency.APPLICATION
INTERNAL = (Method.INTERNAL_SNAPSHOT, Method.INTERNAL_DISK_SNAPSHOT)
BACKUPS = (Method.BACKUP_PUSH, Method.BACKUP_PULL, Method.DIRECT_BACKUP)


def kinds(advice: Advice, method: Method) -> set[BlockerKind]:
    return {b.kind for b in advice[method].blockers}


def snapshot_of(dom: statecapture.Domain) -> tuple[str, str, int, int]:
    raw = raw_domain(dom)
    return (
        raw.XMLDesc(0),
        dom.state.value,
        len(raw.listAllSnapshots(0)),
        len(raw.listAllCheckpoints(0)),
    )


def write_journal(dom: statecapture.Domain, sequence: str = "direct_backup") -> None:
    """Journal an unfinished sequence the way the lead's brief does, with raw libvirt."""
    raw = raw_domain(dom)
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.is_active else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    raw.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        f"<journal sequence='{sequence}'/>",
        "sc",
        JOURNAL_NS,
        flags,
    )


# ----------------------------------------------------------------------------- needs


def test_needs_defaults_and_conversion() -> None:
    """Needs defaults to crash-consistent disks; strings convert to the enums."""
    needs = Needs()
    assert (needs.memory, needs.disks, needs.consistency) == (False, True, Consistency.CRASH)
    assert needs.storage is Storage.LOCAL and needs.max_downtime is None
    converted = Needs(consistency="application", storage="remote", max_downtime=1)
    assert converted.consistency is APP and converted.storage is Storage.REMOTE
    assert attrs.evolve(needs, incremental=True).incremental
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        needs.memory = True  # type: ignore[misc]
    assert "downtime ≤ 1 s" in converted.describe()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": False, "disks": False},
        {"memory": True, "disks": False, "incremental": True},
        {"max_downtime": -1},
        {"max_downtime": "1"},
        {"max_downtime": True},
        {"consistency": "perfect"},
        {"storage": "cloud"},
        {"memory": 1},
    ],
)
def test_bad_needs_are_usage_errors(kwargs: dict[str, object]) -> None:
    """Needs that cannot be met by anything, or are mistyped, are refused at once."""
    with pytest.raises(UsageError):
        Needs(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the guide


def test_guide_covers_every_method_and_facet() -> None:
    """The guide table has a row per method and a statement per facet: knowledge is data."""
    assert set(GUIDE) == set(Method)
    for method, row in GUIDE.items():
        assert set(row.facets) == set(Facet), method
        assert all(text.strip() for _fit, text in row.facets.values()), method
        assert row.summary and row.apis


# ----------------------------------------------------------------------------- advise (fast)


def test_advise_ranks_every_method(test_domain: statecapture.Domain) -> None:
    """All 13 methods come back ranked 1..13: usable ones first, then by unmet needs, then
    by downtime; each has one verdict per facet."""
    advice = advise(test_domain, Needs(consistency=APP))
    assert len(advice) == len(Method) and {m.method for m in advice} == set(Method)
    assert [m.rank for m in advice] == list(range(1, len(Method) + 1))
    keys = [(not m.usable, len(m.unmet)) for m in advice]
    assert keys == sorted(keys)
    for m in advice:
        assert [v.facet for v in m.verdicts] == list(Facet)
    assert advice.best is advice.methods[0] and advice.best.usable
    assert advice.usable == tuple(m for m in advice if m.usable)
    # The test driver has no backup, block copy or block commit: probed, reported.
    for method in (*BACKUPS, Method.BLOCK_COPY, Method.TEMPORARY_SNAPSHOT_BACKUP):
        assert BlockerKind.UNSUPPORTED in kinds(advice, method), method
    assert "virDomainBackupBegin not supported" in str(advice[Method.BACKUP_PULL].blockers[0])


def test_verdicts_follow_the_needs(test_domain: statecapture.Domain) -> None:
    """A facet the caller did not ask about is n/a; asked facets are judged."""
    plain = advise(test_domain)
    assert plain[Method.BACKUP_PULL].verdict(Facet.THIRD_PARTY).fit is Fit.NEUTRAL
    assert plain[Method.MANAGED_SAVE].verdict(Facet.DURATION).fit is Fit.NEUTRAL
    picky = advise(
        test_domain,
        Needs(
            consistency=APP,
            incremental=True,
            max_downtime=1.0,
            keep_definition=True,
            third_party_access=True,
            storage=Storage.REMOTE,
        ),
    )
    pull = picky[Method.BACKUP_PULL]
    assert pull.verdict(Facet.THIRD_PARTY).fit is Fit.GOOD
    assert "NBD" in pull.verdict(Facet.THIRD_PARTY).statement
    assert pull.verdict(Facet.INCREMENTAL).fit is Fit.GOOD
    assert pull.verdict(Facet.DEFINITION_IMPACT).fit is Fit.GOOD
    assert pull.unmet == ()
    temp = picky[Method.TEMPORARY_SNAPSHOT_BACKUP]
    assert temp.verdict(Facet.DEFINITION_IMPACT).fit is Fit.POOR
    assert Facet.INCREMENTAL in temp.unmet
    # alpha has 1 GiB: saving and restoring it stops the guest for seconds.
    managed = picky[Method.MANAGED_SAVE]
    assert managed.downtime > 1.0 and managed.verdict(Facet.DURATION).fit is Fit.POOR
    assert "more than the 1 s allowed" in managed.verdict(Facet.DURATION).statement
    assert picky[Method.FREEZE_THAW].verdict(Facet.AMOUNT_OF_STATE).fit is Fit.POOR
    assert picky[Method.CHECKPOINT].verdict(Facet.AMOUNT_OF_STATE).fit is Fit.POOR
    assert picky[Method.INTERNAL_SNAPSHOT].verdict(Facet.LOCALITY).fit is Fit.POOR


def test_memory_needs_rank_memory_methods_first(test_domain: statecapture.Domain) -> None:
    """Wanting memory and disks puts the methods that capture both ahead of disk-only ones."""
    advice = advise(test_domain, Needs(memory=True, disks=True))
    usable_unmet_free = [m.method for m in advice if m.usable and not m.unmet]
    assert usable_unmet_free[0] in (Method.INTERNAL_SNAPSHOT, Method.EXTERNAL_SNAPSHOT)
    assert Method.EXTERNAL_DISK_SNAPSHOT not in usable_unmet_free
    assert advice[Method.SAVE].verdict(Facet.AMOUNT_OF_STATE).fit is Fit.PARTIAL
    assert "copy the disks" in " ".join(advice[Method.SAVE].notes)


def test_domain_without_agent_and_shut_off(test_conn: statecapture.Connection) -> None:
    """beta (raw disk, no agent channel): running, the quiesced methods are blocked by the
    missing agent; shut off, the running-only methods are blocked by its state."""
    beta = test_conn.domain("beta")
    on = advise(beta, Needs(consistency=APP))
    assert on.facts.agent == "no channel"
    for method in (Method.FREEZE_THAW, Method.EXTERNAL_DISK_SNAPSHOT, *BACKUPS):
        assert BlockerKind.AGENT in kinds(on, method), method
    assert "no guest-agent channel" in str(on[Method.FREEZE_THAW].blockers[0])
    assert on[Method.EXTERNAL_SNAPSHOT].usable  # memory makes it consistent without the agent
    crash = advise(beta)
    assert BlockerKind.AGENT not in kinds(crash, Method.EXTERNAL_DISK_SNAPSHOT)
    assert BlockerKind.AGENT in kinds(crash, Method.FREEZE_THAW)
    beta.destroy()
    off = advise(beta, Needs(consistency=APP))
    assert off.facts.state is statecapture.DomainState.SHUTOFF
    for method in (Method.MANAGED_SAVE, Method.SAVE, Method.FREEZE_THAW, *BACKUPS):
        assert BlockerKind.DOMAIN_STATE in kinds(off, method), method
    assert BlockerKind.DOMAIN_STATE in kinds(off, Method.CHECKPOINT)
    with pytest.raises(libvirt.libvirtError, match="inactive domain"):  # the driver agrees
        raw_domain(beta).checkpointCreateXML("<domaincheckpoint/>", 0)
    assert BlockerKind.AGENT not in kinds(off, Method.EXTERNAL_DISK_SNAPSHOT)
    assert off[Method.EXTERNAL_DISK_SNAPSHOT].usable
    assert off[Method.EXTERNAL_DISK_SNAPSHOT].verdict(Facet.QUIESCING).fit is Fit.GOOD
    assert all(m.downtime == 0 for m in off)


def test_checkpoints_block_internal_snapshots(test_domain: statecapture.Domain) -> None:
    """A checkpoint (dirty bitmaps) blocks internal snapshots: they could not be reverted."""
    raw = raw_domain(test_domain)
    raw.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)
    advice = advise(test_domain)
    assert advice.facts.checkpoints == ("cp1",)
    for method in INTERNAL:
        assert BlockerKind.DIRTY_BITMAPS in kinds(advice, method), method
    assert "checkpoints cp1" in str(advice[Method.INTERNAL_SNAPSHOT].blockers[-1])
    assert BlockerKind.DIRTY_BITMAPS not in kinds(advice, Method.EXTERNAL_SNAPSHOT)


def test_test_driver_refuses_checkpoint_with_snapshots(test_domain: statecapture.Domain) -> None:
    """The test driver's own rule (no checkpoint while snapshots exist) is reported for it
    only (HAZARDS 13), and it matches what the driver does."""
    raw = raw_domain(test_domain)
    raw.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    advice = advise(test_domain)
    assert BlockerKind.UNSUPPORTED in kinds(advice, Method.CHECKPOINT)
    with pytest.raises(libvirt.libvirtError):
        raw.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)


def test_unfinished_sequence_blocks_disk_methods(test_domain: statecapture.Domain) -> None:
    """A journal under the statecapture namespace is an unfinished sequence: every method
    that touches disks is blocked until it is recovered; memory-only ones are not."""
    write_journal(test_domain, "backup_via_temporary_snapshot")
    advice = advise(test_domain)
    assert advice.facts.journal == "backup_via_temporary_snapshot"
    for method in Method:
        blocked = BlockerKind.UNFINISHED_SEQUENCE in kinds(advice, method)
        expected = method not in (Method.MANAGED_SAVE, Method.SAVE, Method.FREEZE_THAW)
        assert blocked is expected, method
    assert "backup_via_temporary_snapshot" in str(
        advice[Method.DIRECT_BACKUP].blockers[0]
    ) and JOURNAL_NS in str(advice[Method.DIRECT_BACKUP].blockers[0])


def test_advise_changes_nothing(test_conn: statecapture.Connection) -> None:
    """advise() only reads: XML, state, snapshots and checkpoints are unchanged."""
    for name in ("alpha", "beta"):
        dom = test_conn.domain(name)
        before = snapshot_of(dom)
        advise(dom, Needs(memory=True, consistency=APP, incremental=True))
        assert snapshot_of(dom) == before


def test_rendering(test_domain: statecapture.Domain) -> None:
    """explain() reads in a terminal; the HTML view is a table with a row per method."""
    advice = advise(test_domain, Needs(consistency=APP, incremental=True))
    text = advice.explain()
    assert str(advice) == text
    assert text.startswith("Advice for domain 'alpha' (TEST driver")
    assert "Needs: disk state, application-consistent, incremental" in text
    for method in Method:
        assert method.value in text
    assert "↳ [unsupported]" in text and "Details:" in text
    assert advice.methods[0].explain() in text
    full = advice.explain(details=len(Method))
    assert full.count("     APIs: ") == len(advice.usable)
    html = advice._repr_html_()
    assert html.count("<tr>") == len(Method) + 1
    assert "<caption>Needs: disk state" in html and "<script" not in html


def test_bad_arguments(test_domain: statecapture.Domain, test_uri: str) -> None:
    """Wrong argument types and closed connections are usage errors."""
    with pytest.raises(UsageError):
        advise("alpha", Needs())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        advise(test_domain, {"memory": True})  # type: ignore[arg-type]
    conn = statecapture.connect(test_uri)
    dom = conn.domain("alpha")
    conn.close()
    with pytest.raises(UsageError):
        advise(dom)


def test_local_uris_and_memory_units() -> None:
    """Images are inspected only for local URIs; memory sizes honour their unit."""
    from lxml import etree

    from statecapture._advisor import _is_local, _memory_mib

    assert _is_local("qemu:///system") and _is_local("qemu:///embed?root=/tmp/x")
    assert _is_local("qemu+unix:///system") and _is_local("test:///default")
    assert not _is_local("qemu+ssh://host/system") and not _is_local("qemu+tcp://h/system")
    assert _memory_mib(etree.fromstring("<domain><memory unit='GiB'>2</memory></domain>")) == 2048
    cur = (
        "<domain><memory>4194304</memory><currentMemory unit='KiB'>1048576</currentMemory></domain>"
    )
    assert _memory_mib(etree.fromstring(cur)) == 1024
    assert _memory_mib(etree.fromstring("<domain/>")) is None


# ----------------------------------------------------------------------------- real tier


def _wait_agent_state(dom: statecapture.Domain, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"name='org.qemu.guest_agent.0' state='{state}'" in raw_domain(dom).XMLDesc(0):
            return
        time.sleep(0.1)
    raise AssertionError(f"agent channel never became {state}")


@pytest.mark.qemu
def test_qemu_agent_guest_every_blocker(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """On a qcow2 guest with a connected agent an application-consistent incremental backup
    ranks a backup method first; then each live blocker is provoked and reported: a running
    backup job, a checkpoint's bitmaps, an unfinished sequence's journal, a disconnected
    agent, and (shut off) a stale persistent bitmap found inside the image by qemu-img."""
    raw = raw_domain(guest)
    needs = Needs(consistency=APP, incremental=True, max_downtime=1.0)

    # 1. All good: the backup family leads, nothing blocks it, and advise changed nothing.
    before = snapshot_of(guest)
    advice = advise(guest, needs)
    assert snapshot_of(guest) == before
    assert advice.facts.agent == "connected" and advice.facts.driver == "QEMU"
    top = [m.method for m in advice.methods[:3]]
    assert set(top) == set(BACKUPS), advice.explain()
    assert all(advice[m].usable and not advice[m].unmet for m in BACKUPS)
    pull = advise(guest, attrs.evolve(needs, third_party_access=True)).methods[0]
    assert pull.method in (Method.BACKUP_PULL, Method.DIRECT_BACKUP)
    assert not advice[Method.INTERNAL_SNAPSHOT].blockers  # nothing blocks it yet
    running_internal = advice[Method.INTERNAL_DISK_SNAPSHOT].blockers
    assert [b.kind for b in running_internal] == [BlockerKind.UNSUPPORTED]

    # 2. A running pull backup job blocks another backup and block jobs.
    sock = tmp_path / "nbd.sock"
    scratch = tmp_path / "scratch.qcow2"
    raw.backupBegin(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
        f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
        "</disks></domainbackup>",
        None,
        0,
    )
    try:
        during = advise(guest, needs)
        assert during.facts.backup_job
        for method in (*BACKUPS, Method.BLOCK_COPY, Method.TEMPORARY_SNAPSHOT_BACKUP):
            assert BlockerKind.JOB_RUNNING in kinds(during, method), method
        assert "a backup job is running" in during.capabilities.backup.reason
    finally:
        with qemu_conn.events.expect(
            kind=EventKind.JOB_COMPLETED, domain_uuid=guest.uuid
        ) as completed:
            raw.abortJob()
            completed.wait(30)

    # 3. A checkpoint: its dirty bitmaps block internal snapshots.
    raw.checkpointCreateXML("<domaincheckpoint><name>adv-cp</name></domaincheckpoint>", 0)
    with_cp = advise(guest, needs)
    for method in INTERNAL:
        assert BlockerKind.DIRTY_BITMAPS in kinds(with_cp, method), method
    assert with_cp[Method.BACKUP_PULL].usable

    # 4. An unfinished sequence journalled in the metadata blocks disk-touching methods.
    write_journal(guest)
    journalled = advise(guest, needs)
    assert journalled.facts.journal == "direct_backup"
    for method in (*BACKUPS, Method.TEMPORARY_SNAPSHOT_BACKUP, Method.CHECKPOINT):
        assert BlockerKind.UNFINISHED_SEQUENCE in kinds(journalled, method), method
    raw.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, JOURNAL_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    assert advise(guest, needs).facts.journal is None

    # 5. The agent goes away (its respawn loop stopped, qemu-ga killed): quiesced methods
    #    are blocked for application consistency, not for crash consistency.
    from statecapture.testing import agent_command

    script = (
        "sleep 0.5; p=$(pidof qemu-ga); pp=$(cut -d' ' -f4 /proc/$p/stat); kill -STOP $pp; kill $p"
    )
    raw.agentSetResponseTimeout(5, 0)  # cleanup must not wait forever on a dead agent
    agent_command(
        guest, {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script]}}
    )
    try:
        _wait_agent_state(guest, "disconnected")
        gone = advise(guest, needs)
        assert gone.facts.agent == "disconnected"
        for method in (Method.FREEZE_THAW, *BACKUPS, Method.TEMPORARY_SNAPSHOT_BACKUP):
            assert BlockerKind.AGENT in kinds(gone, method), method
        assert "not connected" in str(gone[Method.FREEZE_THAW].blockers[0])
        assert not kinds(advise(guest, Needs()), Method.BACKUP_PULL)
    finally:
        # 6. Shut off, checkpoint metadata dropped: the bitmap stays inside the qcow2
        #    (HAZARDS 3) and qemu-img finds it; running-only methods are blocked by state.
        guest.destroy()
    raw.checkpointLookupByName("adv-cp", 0).delete(
        libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    )
    off = advise(guest, needs)
    assert off.facts.checkpoints == () and off.facts.bitmaps == {"vda": ("adv-cp",)}
    blocker = next(
        b
        for b in off[Method.INTERNAL_DISK_SNAPSHOT].blockers
        if b.kind is BlockerKind.DIRTY_BITMAPS
    )
    assert "bitmaps adv-cp inside vda's image" in blocker.message
    for method in (Method.MANAGED_SAVE, Method.CHECKPOINT, *BACKUPS):
        assert BlockerKind.DOMAIN_STATE in kinds(off, method), method


@pytest.mark.qemu
def test_qemu_raw_disk_without_agent(guest_factory: object) -> None:
    """A raw-disk guest without an agent channel: checkpoints, internal snapshots and
    incremental backups are blocked by the disk format, quiesced methods by the agent, and
    a full crash-consistent backup stays usable."""
    dom = guest_factory(fmt="raw", agent=False)  # type: ignore[operator]
    advice = advise(dom, Needs(consistency=APP, incremental=True))
    assert advice.facts.agent == "no channel"
    assert [d.format for d in advice.facts.non_qcow2] == ["raw"]
    for method in (*INTERNAL, Method.CHECKPOINT, *BACKUPS):
        assert BlockerKind.NON_QCOW2_DISK in kinds(advice, method), method
    assert "vda is raw" in str(advice[Method.CHECKPOINT].blockers[0])
    for method in (Method.FREEZE_THAW, *BACKUPS, Method.EXTERNAL_DISK_SNAPSHOT):
        assert BlockerKind.AGENT in kinds(advice, method), method
    # What libvirt says agrees with the advice: a checkpoint of a raw disk is refused.
    with pytest.raises(libvirt.libvirtError, match="unsupported for storage type raw"):
        raw_domain(dom).checkpointCreateXML("<domaincheckpoint/>", 0)
    full = advise(dom)
    assert full[Method.BACKUP_PULL].usable and full[Method.BACKUP_PUSH].usable
    assert full.best is not None and full.best.method in BACKUPS
