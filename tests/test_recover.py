"""recover(): the fast tier on libvirt's test driver, and the kill matrix on real QEMU.

Kill matrix: each sequence runs in a child process that SIGKILLs itself at one step
boundary (or in the middle of the copy / the download); a fresh child process then calls
``recover()`` and checks that the domain runs on its original disk files (live and
persistent definition), that no block or backup job runs, that the guest is not frozen,
that no overlay, scratch or backup file is left, that the guest's data is intact (a file
written before the run, the tick file's earlier content, a file written on the temporary
overlay during the copy — all read back with the guest's page cache dropped), that a
following ``direct_backup`` succeeds and that a second ``recover()`` is a no-op.

libvirt's embedded driver allows one root per process and the pytest process holds its own
(``qemu_conn``), so the kill matrix uses a separate root that this process never opens:
every action there runs in a child (``tests/_kill_child.py``). One guest serves the whole
matrix — recovering it to a clean state after every kill is exactly what is proven — and
after every case a ``reset`` child restores and verifies that clean state (agent timeout
included), failing the case that left anything behind, so no case runs on another's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import statecapture
from statecapture._journal import JOURNAL_NS, JournalWriter, read_journal
from statecapture.testing.faults import inject
from tests import _isolation as isolation
from tests._raw import raw_domain

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The PID of a process that has exited (for journals 'left by a killed process')."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


def _orphan_journal(dom: statecapture.Domain, sequence: str, facts: dict[str, str]) -> None:
    """A journal as a killed process leaves it: written by another (now dead) PID."""
    writer = JournalWriter.begin(dom, sequence, facts=facts)
    journal = writer.journal
    import attrs

    dead = attrs.evolve(journal, pid=_dead_pid())
    dom.set_metadata(JOURNAL_NS, "statecapture", dead.to_xml())


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------- fast tier


def test_recover_on_a_clean_domain_is_a_no_op(test_domain: statecapture.Domain) -> None:
    """recover() on a domain with nothing left behind finds nothing and changes nothing."""
    before = test_domain.xml()
    for _ in range(2):
        report = statecapture.recover(test_domain)
        assert report.clean and report.nothing_found
        assert report.found == report.actions == report.errors == ()
    assert test_domain.xml() == before
    assert "found:  nothing" in str(report)


def test_recover_thaws_what_the_journal_says_may_be_frozen(
    test_domain: statecapture.Domain,
) -> None:
    """A journal saying 'frozen' makes recover() thaw the guest, then clear the journal."""
    assert raw_domain(test_domain).fsFreeze(None, 0) > 0  # the test driver freezes two filesystems
    _orphan_journal(test_domain, "direct_backup", {"frozen": "1"})
    report = statecapture.recover(test_domain)
    assert report.clean, str(report)
    assert any("freeze may be in effect" in f for f in report.found)
    assert any(a.startswith("thawed") and "(2 thawed)" in a for a in report.actions)
    assert "cleared the journal" in report.actions
    assert read_journal(test_domain) is None
    assert test_domain.fs_thaw() == 0  # nothing frozen any more


def test_recover_refuses_while_the_journalling_process_runs(
    test_domain: statecapture.Domain,
) -> None:
    """A run whose process still lives on this host is not undone under its feet, unless
    force=True."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writer = JournalWriter.begin(test_domain, "direct_backup")
        import attrs

        live = attrs.evolve(writer.journal, pid=sleeper.pid)
        test_domain.set_metadata(JOURNAL_NS, "statecapture", live.to_xml())
        with pytest.raises(statecapture.InvalidStateError, match="still running"):
            statecapture.recover(test_domain)
        assert read_journal(test_domain) is not None
        report = statecapture.recover(test_domain, force=True)
        assert report.clean and read_journal(test_domain) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_recover_clears_a_damaged_journal(test_domain: statecapture.Domain) -> None:
    """A damaged journal is reported and removed (it would block every sequence)."""
    test_domain.set_metadata(JOURNAL_NS, "statecapture", "<journal pid='x'/>")
    report = statecapture.recover(test_domain)
    assert report.clean
    assert any("damaged" in f for f in report.found)
    assert test_domain.metadata(JOURNAL_NS) is None


def test_recover_removes_what_an_unfinished_direct_backup_made(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """The checkpoint and the (partial) files an interrupted direct_backup journalled are
    removed; files it did not journal are not touched."""
    test_domain.checkpoints.create("sc-run")
    made = tmp_path / "alpha.vda.sc-run.qcow2"
    partial = tmp_path / ".alpha.vda.sc-run.qcow2.partial"
    mine = tmp_path / "unrelated.qcow2"
    for f in (made, partial, mine):
        f.write_bytes(b"x")
    _orphan_journal(
        test_domain,
        "direct_backup",
        {"checkpoint": "sc-run", "file:vda": str(made), "partial:vda": str(partial)},
    )
    report = statecapture.recover(test_domain)
    assert report.clean, str(report)
    assert "sc-run" not in test_domain.checkpoints
    assert not made.exists() and not partial.exists() and mine.exists()
    assert any("deleted the checkpoint 'sc-run'" in a for a in report.actions)
    again = statecapture.recover(test_domain)
    assert again.nothing_found and again.actions == ()


def _shut_off_on_overlay(
    conn: statecapture.Connection, tmp_path: Path, overlay_name: str
) -> tuple[statecapture.Domain, Path, Path]:
    """Domain 'beta' shut off, defined on a qcow2 overlay over ``base`` (as after a crash)."""
    base = tmp_path / "beta.qcow2"
    overlay = tmp_path / overlay_name
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(overlay)],
        check=True,
        capture_output=True,
    )
    beta = conn.domain("beta")
    beta.destroy()
    xml = beta.xml(inactive=True)
    xml = xml.replace(
        "<source file='/var/lib/statecapture-test/beta.img'/>",
        f"<source file='{overlay}'/><backingStore type='file'><format type='qcow2'/>"
        f"<source file='{base}'/></backingStore>",
    ).replace("type='raw'", "type='qcow2'")
    conn.define(xml)
    return conn.domain("beta"), base, overlay


def _reads_pattern(image: Path) -> bool:
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 64k", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


@pytest.mark.parametrize("journalled", [True, False], ids=["journal", "by-name"])
def test_recover_merges_the_overlay_of_a_shut_off_domain(
    test_conn: statecapture.Connection, tmp_path: Path, journalled: bool
) -> None:
    """A domain left on a temporary overlay and then shut off (power cut): recover() commits
    the overlay into the original with qemu-img, points the definition back at the
    original and removes the overlay — from the journal, or recognised by its name."""
    dom, base, overlay = _shut_off_on_overlay(
        test_conn, tmp_path, "beta.qcow2.sc-0123456789ab.overlay.qcow2"
    )
    if journalled:
        _orphan_journal(
            dom,
            "backup_via_temporary_snapshot",
            {"original:vda": str(base), "overlay:vda": str(overlay), "format:vda": "qcow2"},
        )
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert any("qemu-img commit" in a for a in report.actions)
    disk = dom.inactive_definition.disk("vda")
    assert (disk.source, disk.format, disk.backing) == (str(base), "qcow2", ())
    assert not overlay.exists()
    assert _reads_pattern(base)  # what the guest wrote on the overlay is in the original
    assert read_journal(dom) is None
    again = statecapture.recover(dom)
    assert again.nothing_found


def test_recover_leaves_a_foreign_overlay_alone(
    test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """Without a journal, only overlays named like statecapture's are merged."""
    dom, _base, overlay = _shut_off_on_overlay(test_conn, tmp_path, "beta.snap1")
    report = statecapture.recover(dom)
    assert report.nothing_found and report.actions == ()
    assert dom.inactive_definition.disk("vda").source == str(overlay)
    assert overlay.exists()


def test_recover_refuses_to_merge_into_an_unexpected_base(
    test_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """An overlay whose backing file is not the journalled original is not merged; the
    journal stays so recover() can be retried after a manual fix."""
    dom, _base, overlay = _shut_off_on_overlay(
        test_conn, tmp_path, "beta.qcow2.sc-0123456789ab.overlay.qcow2"
    )
    other = tmp_path / "other.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(other), "8M")
    _orphan_journal(
        dom,
        "backup_via_temporary_snapshot",
        {"original:vda": str(other), "overlay:vda": str(overlay)},
    )
    report = statecapture.recover(dom)
    assert not report.clean
    assert any("not merging" in e for e in report.errors)
    assert "NOT clean" in str(report)
    assert read_journal(dom) is not None
    assert overlay.exists() and dom.inactive_definition.disk("vda").source == str(overlay)


def test_recover_needs_a_domain() -> None:
    """recover() of something that is not a Domain is a usage error."""
    with pytest.raises(statecapture.UsageError):
        statecapture.recover("alpha")  # type: ignore[arg-type]


def test_report_value() -> None:
    """RecoveryReport is a frozen value whose str() tells the story."""
    report = statecapture.RecoveryReport("d", ("a frozen guest",), ("thawed",), (), True)
    with pytest.raises(AttributeError):
        report.clean = False  # type: ignore[misc]
    text = str(report)
    assert "clean" in text and "found:  a frozen guest" in text and "did:    thawed" in text


# ----------------------------------------------------------------------------- kill matrix

CHILD = REPO / "tests" / "_kill_child.py"

# (sequence, kill point, mode, extra args) — every boundary of both sequences.
MATRIX: list[tuple[str, str, str, dict[str, Any]]] = [
    *(
        ("snapshot", kill, "", {})
        for kill in (
            "start:snapshot",
            "in:snapshot:frozen",
            "in:snapshot:captured",
            "done:snapshot",
            "start:copy",
            "mid:copy",
            "done:copy",
            "start:commit",
            "in:commit:vda",
            "done:commit",
            "start:pivot",
            "in:pivot:vda",
            "done:pivot",
            "start:remove",
            "done:remove",
        )
    ),
    *(
        ("direct", kill, "pull", {})
        for kill in (
            "start:begin",
            "in:begin:frozen",
            "in:begin:captured",
            "done:begin",
            "start:transfer",
            "mid:transfer",
            "done:transfer",
            "start:end",
            "done:end",
        )
    ),
    *(
        ("direct", kill, "push", {})
        for kill in ("in:begin:captured", "start:transfer", "done:transfer")
    ),
    ("direct", "in:begin:captured", "push", {"checkpoint": False}),
    ("snapshot", "done:copy", "", {"power_cut": True}),
]


class KillEnv:
    """The separate embed root, its guest, and the child-process runner."""

    def __init__(self, root: Path, work: Path, kit: Any) -> None:
        self.root = root
        self.work = work
        self.images = work / "images"
        self.target = work / "target"
        self.after = work / "after"
        # short (NBD sockets); the session-end isolation check verifies it is removed
        self.tmp = isolation.track(tempfile.mkdtemp(prefix="sckt-", dir="/tmp"))
        for d in (self.images, self.target, self.after):
            d.mkdir()
        self.kit = kit
        self.originals: dict[str, str] = {}
        self.timings: list[tuple[str, float]] = []

    def child(self, action: str, args: dict[str, Any], *, killed: bool = False) -> dict[str, Any]:
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONPATH=str(REPO))
        env.pop("LIBVIRT_DEFAULT_URI", None)
        done = subprocess.run(
            [sys.executable, str(CHILD), str(self.root), action, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=420,
            env=env,
            cwd=REPO,
            check=False,
        )
        results: dict[str, Any] = {}
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                results.update(json.loads(line[len("RESULT ") :]))
        expected = -signal.SIGKILL if killed else 0
        if done.returncode != expected:
            tail = "\n".join(done.stderr.splitlines()[-30:])
            raise AssertionError(
                f"child {action} exited {done.returncode} (expected {expected}); "
                f"stdout: {done.stdout[-2000:]}\nstderr: {tail}"
            )
        return results


def _qemu_pids_under(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"qemu-system" in cmdline and str(root).encode() in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def kill_env(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillEnv]:
    """A guest with two data disks in its own embed root, driven only by child processes."""
    from statecapture.testing.kit import domain_xml, make_data_disk
    from tests._isolation import make_embed_root

    root = make_embed_root("sck-")
    env = KillEnv(root, tmp_path_factory.mktemp("kill"), kit)
    started = time.monotonic()
    try:
        images = [make_data_disk(env.images / f"disk{i}.qcow2") for i in range(2)]
        env.originals = {f"vd{chr(97 + i)}": str(p) for i, p in enumerate(images)}
        xml = domain_xml(
            "sckill", kit, images, log_path=env.work / "console.log", disk_formats=["qcow2"] * 2
        )
        (env.work / "domain.xml").write_text(xml)
        env.child("setup", {"xml": str(env.work / "domain.xml")})
        env.timings.append(("setup", time.monotonic() - started))
        yield env
    finally:
        with contextlib.suppress(Exception):
            env.child("teardown", {})
        for pid in _qemu_pids_under(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(env.tmp, ignore_errors=True)
        total = time.monotonic() - started
        lines = [f"{name:<40} {sec:6.1f} s" for name, sec in env.timings]
        summary = "\n".join([*lines, f"{'kill matrix total':<40} {total:6.1f} s"])
        # Timings of every kill point, for the record (pytest's base temp directory).
        (tmp_path_factory.getbasetemp() / "kill-matrix-timings.txt").write_text(summary + "\n")


@pytest.fixture
def kill_guest(kill_env: KillEnv) -> Iterator[KillEnv]:
    """The matrix's shared guest, reset after each case and verified: whatever a case left
    behind (a job, a checkpoint, a file, a frozen or stopped guest, a changed agent timeout)
    is repaired before the next case starts, and fails the case that left it."""
    yield kill_env
    result = kill_env.child(
        "reset",
        {
            "originals": kill_env.originals,
            "image_dir": str(kill_env.images),
            "image_files": sorted(Path(p).name for p in kill_env.originals.values()),
            "target_dir": str(kill_env.target),
            "after_dir": str(kill_env.after),
        },
    )
    assert result["repaired"] == [], "the case left state behind for the next one"


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("sequence", "kill", "mode", "extra"),
    MATRIX,
    ids=["-".join(filter(None, (s, m, k, *e))) for s, k, m, e in MATRIX],
)
def test_killed_sequence_is_recovered(
    kill_guest: KillEnv, sequence: str, kill: str, mode: str, extra: dict[str, Any]
) -> None:
    """SIGKILL at this boundary, then recover() from a fresh process: the domain is back on
    its original files with the guest's data intact, nothing is left behind, and the next
    direct_backup succeeds."""
    started = time.monotonic()
    args: dict[str, Any] = {
        "sequence": sequence,
        "kill": kill,
        "mode": mode,
        "target_dir": str(kill_guest.target),
    }
    if "checkpoint" in extra:
        args["checkpoint"] = extra["checkpoint"]
    facts = kill_guest.child("run", args, killed=True)
    assert "completed" not in facts
    assert {"known", "ticks_md5"} <= facts.keys()
    if extra.get("power_cut"):
        kill_guest.child("destroy", {})
    check = {
        "originals": kill_guest.originals,
        "image_dir": str(kill_guest.images),
        "image_files": sorted(Path(p).name for p in kill_guest.originals.values()),
        "target_dir": str(kill_guest.target),
        "after_dir": str(kill_guest.after),
        "facts": facts,
        "start": bool(extra.get("power_cut")),
    }
    result = kill_guest.child("check", check)
    kill_guest.timings.append((f"{sequence}-{mode}-{kill}", time.monotonic() - started))
    assert result["problems"] == [], result["report"]
    if kill.startswith(("in:snapshot:", "in:begin:")):
        assert any("frozen" in f for f in result["found"]), result["report"]
        assert any(a.startswith("thawed") for a in result["actions"]), result["report"]
    if sequence == "snapshot" and kill not in (
        "start:snapshot",
        "in:snapshot:frozen",
        "done:remove",
    ):
        assert any("merged" in a or "removed" in a for a in result["actions"]), result["report"]


# ----------------------------------------------------------------------------- plain backup runs


def _abandon(job: Any) -> None:
    """The process that ran ``job`` is gone: its handle is never used again."""
    job.adopted = True  # no ResourceWarning from a handle nobody ends


def _record_text(dom: statecapture.Domain) -> str | None:
    return dom.metadata(JOURNAL_NS)


@pytest.mark.qemu
def test_recover_after_a_failed_record_update_leaves_no_orphan_image(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """A lost connection right after a pull download linked its finished image into place
    (the backup record can no longer be written): recover() in a later run never reports
    clean while leaving an image tied to a checkpoint it deleted — the image and the
    checkpoint go together."""
    dom = guest
    dest = tmp_path / "pull"
    dest.mkdir()

    def once_the_image_exists(namespace_uri: str, *_args: object) -> bool:
        return namespace_uri == JOURNAL_NS and any(p.suffix == ".qcow2" for p in dest.iterdir())

    lost = statecapture.ConnectionLostError(
        "set metadata failed: internal error: client socket is closed",
        code=1,
        operation="set metadata",
    )
    job = dom.backup(mode="pull", checkpoint="r1")
    with (
        inject(dom, "set_metadata", raises=lost, when=once_the_image_exists),
        pytest.raises(statecapture.ConnectionLostError),
    ):
        job.download(dest)
    _abandon(job)
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    images = sorted(p.name for p in dest.iterdir())
    has_cp = "r1" in dom.checkpoints
    assert not has_cp and images == [], (str(report), images, has_cp)
    assert dom.active_backup() is None
    assert _record_text(dom) is None
    again = statecapture.recover(dom)
    assert again.nothing_found and again.clean


@pytest.mark.qemu
def test_recover_cleans_the_stale_record_of_a_job_that_ended_without_its_run(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """A backup job ends while its run is gone (a daemon restart ends running jobs; here
    the run's process "dies" and the job ends behind its back): recover() finds the stale
    record. A push job that completed delivered its images: they and its checkpoint stay.
    A job that never delivered (a pull job ended before its download): its checkpoint
    goes. Either way the record is cleared, and the next backup starts clean."""
    dom = guest
    out = tmp_path / "push"
    out.mkdir()
    events = dom.connection.events
    # 1. push: the job completes by itself, nobody is left to wait() for it
    with events.expect(kind=statecapture.EventKind.JOB_COMPLETED, domain_uuid=dom.uuid) as done:
        _abandon(dom.backup(mode="push", target_dir=out, checkpoint="s1"))
        done.wait(120, what="JOB_COMPLETED")
    _wait_no_job(dom)
    assert _record_text(dom) is not None  # the run never cleared it
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert any("record of a backup job" in f for f in report.found), str(report)
    assert _record_text(dom) is None
    assert "s1" in dom.checkpoints
    assert sorted(p.name for p in out.iterdir()) == [f"{dom.name}.vda.s1.qcow2"]
    # 2. pull: the job ends (abortJob, as a restart would) before anything was downloaded
    with events.expect(kind=statecapture.EventKind.JOB_COMPLETED, domain_uuid=dom.uuid) as done:
        job = dom.backup(mode="pull", checkpoint="s2", incremental_from="s1")
        _abandon(job)
        raw_domain(dom).abortJob()
        done.wait(120, what="JOB_COMPLETED")
    _wait_no_job(dom)
    assert _record_text(dom) is not None
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert "s2" not in dom.checkpoints and "s1" in dom.checkpoints, str(report)
    assert _record_text(dom) is None
    assert statecapture.recover(dom).nothing_found
    with dom.backup(mode="push", target_dir=out, checkpoint="s3", incremental_from="s1") as j:
        assert j.wait().disk("vda").file.exists()


@pytest.mark.qemu
def test_recover_keeps_a_completed_push_whose_run_died_while_moving_it(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """A push run records a target's final name, then moves the finished target out of its
    private staging directory. When its process dies after recording the name (the target
    still staged) or after the move (the staged name gone), the job had delivered: recover()
    keeps the checkpoint, the image ends up at its final name and no staging directory
    stays behind."""
    from statecapture._backup import final_path, publish

    dom = guest
    out = tmp_path / "push"
    out.mkdir()
    events = dom.connection.events
    for cp, moved in (("m1", False), ("m2", True)):
        with events.expect(kind=statecapture.EventKind.JOB_COMPLETED, domain_uuid=dom.uuid) as done:
            job = dom.backup(mode="push", target_dir=out, checkpoint=cp)
            _abandon(job)
            done.wait(120, what="JOB_COMPLETED")
        _wait_no_job(dom)
        staged = Path(job.xml.backed_up[0].store or "")
        final = final_path(staged)
        assert final == out / f"{dom.name}.vda.{cp}.qcow2" != staged
        job._add_files(final)  # the run recorded the final name, then died ...
        if moved:
            publish(staged, final)  # ... or died right after moving the target
        report = statecapture.recover(dom)
        assert report.clean, str(report)
        assert cp in dom.checkpoints, str(report)
        assert _record_text(dom) is None
        assert final.is_file() and not staged.exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in out.iterdir()) == [
        f"{dom.name}.vda.m1.qcow2",
        f"{dom.name}.vda.m2.qcow2",
    ]


def _wait_no_job(dom: statecapture.Domain) -> None:
    deadline = time.monotonic() + 120
    while dom.active_backup() is not None:
        assert time.monotonic() < deadline, "the backup job did not end"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- older records
# Records as statecapture wrote them before the one record type, written by hand: a user who
# upgrades while one is left must still be able to recover.

OLD_JOURNAL_NS = "urn:x-statecapture:journal:1"
OLD_BACKUP_NS = "urn:x-statecapture:backup:1"


def _old_journal(sequence: str, facts: dict[str, str], steps: str = "") -> str:
    from xml.sax.saxutils import quoteattr

    body = "".join(f"<fact key={quoteattr(k)} value={quoteattr(v)}/>" for k, v in facts.items())
    return (
        f"<journal sequence='{sequence}' run='{'ab' * 16}' host='{os.uname().nodename}' "
        f"pid='{_dead_pid()}' started='{time.time():.6f}'>{body}{steps}</journal>"
    )


def _old_record(
    mode: str,
    label: str,
    *,
    files: tuple[Path, ...] = (),
    dirs: tuple[Path, ...] = (),
    checkpoint: str | None = None,
    delivered: bool = False,
) -> str:
    attrs_ = f"mode='{mode}' label='{label}' started='{time.time()!r}'"
    if checkpoint is not None:
        attrs_ += f" checkpoint='{checkpoint}' created='yes'"
    if delivered:
        attrs_ += " delivered='yes'"
    children = "".join(f"<file path='{f}'/>" for f in files)
    children += "".join(f"<dir path='{d}'/>" for d in dirs)
    return f"<backup {attrs_}>{children}</backup>"


def test_recover_repairs_an_older_direct_backup_journal_and_job_record(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """A direct backup killed under an older statecapture left two records (its journal and
    its job's record): recover() reads both as one run, removes the checkpoint, the files
    and the private directory they name, and clears both old elements; a sequence is
    refused until then."""
    dom = test_domain
    dom.checkpoints.create("sc-old")
    made = tmp_path / "alpha.vda.sc-old.qcow2"
    partial = tmp_path / ".alpha.vda.sc-old.qcow2.partial"
    private = tmp_path / "sc-scratch-0123"
    private.mkdir()
    (private / "scratch").write_bytes(b"s")
    mine = tmp_path / "unrelated.qcow2"
    for f in (made, partial, mine):
        f.write_bytes(b"x")
    steps = f"<step name='begin' status='done' started='{time.time():.6f}'/>"
    dom.set_metadata(
        OLD_JOURNAL_NS,
        "statecapture",
        _old_journal("direct_backup", {"checkpoint": "sc-old", "file:vda": str(made)}, steps),
    )
    dom.set_metadata(
        OLD_BACKUP_NS,
        "scbackup",
        _old_record("pull", "sc-old", files=(partial,), dirs=(private,), checkpoint="sc-old"),
    )
    journal = read_journal(dom)
    assert journal is not None and journal.legacy and journal.sequence == "direct_backup"
    assert journal.job is not None and journal.job.files == (str(partial),)
    with pytest.raises(statecapture.InvalidStateError, match="recover"):
        statecapture.direct_backup(dom, tmp_path, quiesce=False)
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert any("older statecapture" in f for f in report.found), str(report)
    assert "sc-old" not in dom.checkpoints
    assert not made.exists() and not partial.exists() and not private.exists()
    assert mine.exists()
    assert dom.metadata(OLD_JOURNAL_NS) is None and dom.metadata(OLD_BACKUP_NS) is None
    assert read_journal(dom) is None
    again = statecapture.recover(dom)
    assert again.nothing_found and again.actions == ()


@pytest.mark.parametrize("delivered", [False, True], ids=["undelivered", "delivered"])
def test_recover_repairs_an_older_plain_backup_record(
    test_domain: statecapture.Domain, tmp_path: Path, delivered: bool
) -> None:
    """A plain backup job's record left by an older statecapture, its job ended since: a job
    that never delivered loses its checkpoint and files; a pull job that downloaded every
    disk keeps them. Either way its private directory and the old element go."""
    dom = test_domain
    dom.checkpoints.create("old-cp")
    image = tmp_path / "alpha.vda.old-cp.qcow2"
    image.write_bytes(b"x")
    private = tmp_path / "sc-nbd-0123"
    private.mkdir()
    dom.set_metadata(
        OLD_BACKUP_NS,
        "scbackup",
        _old_record(
            "pull",
            "old-cp",
            files=(image,),
            dirs=(private,),
            checkpoint="old-cp",
            delivered=delivered,
        ),
    )
    journal = read_journal(dom)
    assert journal is not None and journal.legacy and journal.is_backup_job
    report = statecapture.recover(dom)
    assert report.clean, str(report)
    assert any("record of a backup job" in f for f in report.found), str(report)
    assert ("old-cp" in dom.checkpoints) is delivered
    assert image.exists() is delivered
    assert not private.exists()
    assert dom.metadata(OLD_BACKUP_NS) is None and read_journal(dom) is None
    assert statecapture.recover(dom).nothing_found


def test_an_older_journal_adopted_by_a_writer_is_stored_in_the_current_format(
    test_domain: statecapture.Domain,
) -> None:
    """The first write of a writer that continues an older record stores it under the
    current namespace and removes the old elements (one record again)."""
    from statecapture._journal import JournalWriter

    dom = test_domain
    dom.set_metadata(OLD_JOURNAL_NS, "statecapture", _old_journal("direct_backup", {"a": "1"}))
    dom.set_metadata(OLD_BACKUP_NS, "scbackup", _old_record("push", "l1"))
    old = read_journal(dom)
    assert old is not None and old.legacy
    writer = JournalWriter.adopt(dom, old)
    writer.set_fact("b", "2")
    assert dom.metadata(OLD_JOURNAL_NS) is None and dom.metadata(OLD_BACKUP_NS) is None
    now = read_journal(dom)
    assert now is not None and not now.legacy
    assert now.run_id == old.run_id and dict(now.facts) == {"a": "1", "b": "2"}
    assert now.job is not None and now.job.label == "l1"
    writer.finish()
    assert read_journal(dom) is None
