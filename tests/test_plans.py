"""Plans: an operation is worked out before anything changes, and inside a freeze only the
capture call runs.

Fast tier (test driver): a snapshot plan is a dry run and ``create(plan=)`` takes it;
``frozen_for`` covers the freeze and thaw calls themselves (a slow agent injected).

Real tier (embedded QEMU): a backup plan changes nothing, prints what it would do and is
executed by ``dom.backup(plan=)``; with every call through the domain's port recorded
(``statecapture.testing.faults.record``), exactly one libvirt call — the capture call —
runs between the freeze and the thaw in ``direct_backup``,
``backup_via_temporary_snapshot`` and ``fs_frozen`` + a planned snapshot, and
``frozen_for`` is at least the window measured from outside.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import statecapture
from statecapture import (
    BackupPlan,
    InvalidStateError,
    SnapshotPlan,
    UsageError,
)
from statecapture.testing.faults import CallLog, inject, record

# ----------------------------------------------------------------------------- fast tier


def test_snapshot_plan_is_a_dry_run_then_one_call(test_domain: statecapture.Domain) -> None:
    """snapshots.plan() checks and works out a snapshot without creating anything;
    str(plan) says what it would make; create(plan=) makes exactly that; mixing plan= with
    other arguments, or a plan of another domain, is a UsageError."""
    before = test_domain.xml()
    plan = test_domain.snapshots.plan("p1", description="planned")
    assert isinstance(plan, SnapshotPlan) and plan.name == "p1" and plan.internal
    assert "p1" in str(plan) and "internal" in str(plan) and "<pre>" in plan._repr_html_()
    assert "p1" not in test_domain.snapshots and test_domain.xml() == before
    with pytest.raises(UsageError, match="not both"):
        test_domain.snapshots.create("p2", plan=plan)
    with pytest.raises(UsageError, match="not both"):
        test_domain.snapshots.create(plan=plan, atomic=False)
    other = attrs.evolve(plan, domain_uuid="00000000-0000-0000-0000-000000000000")
    with pytest.raises(UsageError, match="plan is for domain"):
        test_domain.snapshots.create(plan=other)
    snap = test_domain.snapshots.create(plan=plan)
    assert snap.name == "p1" and snap.definition.description == "planned"
    with pytest.raises(UsageError, match="already has a snapshot"):
        test_domain.snapshots.plan("p1")


def test_frozen_for_covers_the_freeze_and_thaw_calls(
    test_domain: statecapture.Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """frozen_for runs from the start of the freeze call to the return of the thaw call —
    a slow agent (injected: each call takes 0.2 s) counts in full — while frozen_inner is the
    narrower window between the two calls."""
    monkeypatch.setattr(statecapture._freeze, "agent_connected", lambda dom: True)
    try:
        scope = statecapture.fs_frozen(test_domain, max_frozen=30)
        with (
            inject(test_domain, "fs_freeze", delay=0.2),
            inject(test_domain, "fs_thaw", after=lambda: time.sleep(0.2)),
            scope,
        ):
            pass
    except statecapture.GuestAgentError:
        pytest.skip("the test driver's domain has no agent channel here")
    assert scope.frozen_for >= 0.4
    assert scope.frozen_inner < 0.2 < scope.frozen_for - scope.frozen_inner


# ----------------------------------------------------------------------------- real tier


def _take(log: CallLog) -> tuple[list[str], float]:
    """What the log saw since the last take: the calls made in the main thread between the
    return of the freeze call and the start of the thaw call, and the window from the start
    of the freeze call to the return of the thaw call (both as seen through the port)."""
    inside = log.between("fs_freeze", "fs_thaw", thread=threading.get_ident())
    freezes, thaws = log.named("fs_freeze"), log.named("fs_thaw")
    assert len(freezes) == len(thaws) == 1, log.names()
    log.clear()
    return inside, thaws[0].ended - freezes[0].started


@pytest.fixture
def planned_guest(guest_factory: Any) -> Iterator[statecapture.Domain]:
    dom = guest_factory(disks=2)
    yield dom
    for cp in dom.checkpoints.list():
        cp.delete()


def _state(dom: statecapture.Domain, *dirs: Path) -> tuple[Any, ...]:
    return (
        dom.xml(),
        sorted(c.name for c in dom.checkpoints.list()),
        dom.active_backup(),
        [sorted(os.listdir(d)) for d in dirs],
    )


@pytest.mark.qemu
def test_backup_plan_is_a_dry_run_then_executes(
    planned_guest: statecapture.Domain, tmp_path: Path
) -> None:
    """dom.backup_plan() changes nothing — no checkpoint, file, directory, record or job —
    and prints the disks, file names, checkpoint and undo; dom.backup(plan=) then delivers
    exactly the planned files and checkpoint; the same plan cannot run twice."""
    dom = planned_guest
    out = tmp_path / "out"
    out.mkdir()
    before = _state(dom, out)
    plan = dom.backup_plan(mode="push", target_dir=out, checkpoint="pl1")
    pull = dom.backup_plan(mode="pull", incremental_from=None)
    assert isinstance(plan, BackupPlan) and plan.checkpoint == "pl1" and plan.label == "pl1"
    text = str(plan)
    for disk in ("vda", "vdb"):
        assert str(out / f"{dom.name}.{disk}.pl1.qcow2") in text
    assert "pl1" in text and "on failure" in text and "<table>" in plan._repr_html_()
    assert all(not p.exists() for p in (*plan.private_dirs, *pull.private_dirs))
    assert pull.socket is not None and not pull.socket.exists() and "NBD socket" in str(pull)
    assert _state(dom, out) == before
    with pytest.raises(UsageError, match="not both"):
        dom.backup(plan=plan, checkpoint="other")
    with dom.backup(plan=plan) as job:
        result = job.wait()
    assert {d.disk: d.file for d in result.disks} == plan.files
    assert all(f.is_file() for f in plan.files.values()) and "pl1" in dom.checkpoints
    assert sorted(os.listdir(out)) == sorted(p.name for p in plan.files.values())
    with pytest.raises(InvalidStateError, match="already has a checkpoint"):
        dom.backup(plan=plan)
    assert sorted(os.listdir(out)) == sorted(p.name for p in plan.files.values())
    inc = dom.backup_plan(mode="push", target_dir=out, incremental_from="pl1")
    assert {d.mode.value for d in inc.disks} == {"incremental"}


@pytest.mark.qemu
def test_only_the_capture_call_runs_inside_the_freeze(
    planned_guest: statecapture.Domain, tmp_path: Path
) -> None:
    """With every call through the domain's port recorded: between the return of the freeze
    call and the start of the thaw call exactly one libvirt call runs — virDomainBackupBegin
    in direct_backup (push and pull), the snapshot create in backup_via_temporary_snapshot
    and in fs_frozen + snapshots.create(plan=) — and frozen_for is at least the window
    measured from outside (inside the library's freeze and thaw calls)."""
    dom = planned_guest
    with record(dom) as log:
        push = statecapture.direct_backup(dom, _dir(tmp_path, "a"))
        inside, window = _take(log)
        assert inside == ["backup_begin"]
        assert push.frozen_for is not None and push.frozen_for >= window

        pull = statecapture.direct_backup(
            dom, tmp_path / "a", mode="pull", incremental_from=push.checkpoint
        )
        inside, window = _take(log)
        assert inside == ["backup_begin"]
        assert pull.frozen_for is not None and pull.frozen_for >= window

        def copy(images: Mapping[str, Path]) -> None:
            return None

        snap = statecapture.backup_via_temporary_snapshot(dom, copy)
        inside, window = _take(log)
        assert inside == ["snapshot_create"]
        assert snap.frozen_for is not None and snap.frozen_for >= window

        plan = dom.snapshots.plan("planned", disk_only=True, metadata=False)
        with statecapture.fs_frozen(dom) as scope:
            dom.snapshots.create(plan=plan)
        inside, window = _take(log)
    assert inside == ["snapshot_create"]
    assert scope.frozen_for >= window >= scope.frozen_inner
    print(
        f"frozen_for: direct push {push.frozen_for * 1000:.1f} ms, pull "
        f"{pull.frozen_for * 1000:.1f} ms, temporary snapshot {snap.frozen_for * 1000:.1f} "
        f"ms, fs_frozen + planned snapshot {scope.frozen_for * 1000:.1f} ms"
    )


def _dir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    return path


def test_backup_start_refuses_bad_input(test_domain: statecapture.Domain) -> None:
    """dom.backup_start() checks like dom.backup(): a plan= that is no BackupPlan is a
    UsageError, and a driver without backup jobs (the test driver) an UnsupportedError —
    both before anything changes."""
    before = test_domain.xml()
    with pytest.raises(UsageError, match="BackupPlan"):
        test_domain.backup_start(plan="nightly")  # type: ignore[arg-type]
    with pytest.raises(statecapture.UnsupportedError):
        test_domain.backup_start(mode="pull")
    assert test_domain.xml() == before


@pytest.mark.qemu
def test_backup_start_freezes_only_the_capture_call(
    planned_guest: statecapture.Domain, tmp_path: Path
) -> None:
    """dom.backup_start(plan) splits a backup around its capture call for the caller's own
    freeze: inside ``fs_frozen`` only virDomainBackupBegin runs; the job is read back after
    the thaw and delivers the planned files. begin() outside the block or twice is a
    UsageError; leaving the block without begin(), or by an exception after begin(), undoes
    everything (no job, record, checkpoint, file or private directory)."""
    dom = planned_guest
    out = _dir(tmp_path, "out")
    before = _state(dom, out)
    plan = dom.backup_plan(mode="push", target_dir=out, checkpoint="bs1")

    start = dom.backup_start(plan)
    assert "prepared" in repr(start)
    with pytest.raises(UsageError, match="inside its with block"):
        start.begin()
    with start:
        pass  # never begun: undone on leaving
    with pytest.raises(InvalidStateError, match="has not started"):
        _ = start.job
    # (libvirt leaves an empty <metadata/> where the record was)
    assert _state(dom, out)[1:] == before[1:] and "urn:x-statecapture" not in dom.xml()

    with pytest.raises(RuntimeError, match="after the capture"):
        _fail_after_the_capture(dom, plan)
    assert _state(dom, out)[1:] == before[1:] and "urn:x-statecapture" not in dom.xml()
    assert all(not p.exists() for p in plan.private_dirs)

    with record(dom) as log:
        with dom.backup_start(plan) as start:
            with statecapture.fs_frozen(dom):
                start.begin()
            with pytest.raises(UsageError, match="runs once"):
                start.begin()
        inside, _window = _take(log)
    assert inside == ["backup_begin"]
    with start.job as job:
        result = job.wait()
    assert {d.disk: d.file for d in result.disks} == plan.files
    assert all(f.is_file() for f in plan.files.values()) and "bs1" in dom.checkpoints


def _fail_after_the_capture(dom: statecapture.Domain, plan: BackupPlan) -> None:
    with dom.backup_start(plan) as start:
        with statecapture.fs_frozen(dom):
            start.begin()
        raise RuntimeError("after the capture")
