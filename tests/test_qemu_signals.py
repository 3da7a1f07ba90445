"""Promises about processes that end — SIGTERM, interpreter exit, SIGKILL — proven on real
QEMU with the process really ending.

libvirt's embedded driver allows one root per process, and the pytest process holds its own
(``qemu_conn``), so these scenarios use a separate root that this process never opens: every
action there runs in a fresh child interpreter (``tests/_proof_child.py``), and the facts
after the child ended (is the guest frozen? is the journal gone? ...) are read by another
child. One guest serves the module; each test returns it to a clean state and checks that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "_proof_child.py"


def _results(stdout: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT ") :]))
    return out


class Env:
    """The separate embed root, its guest and the child-process runner."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        self.images = work / "images"
        self.target = work / "target"
        self.tmp = Path(os.path.join("/tmp", f"scpt-{os.getpid()}"))  # short: NBD sockets
        for d in (self.images, self.target, self.tmp):
            d.mkdir()
        self.originals: dict[str, str] = {}
        self.checked = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONPATH=str(REPO))
        env.pop("LIBVIRT_DEFAULT_URI", None)
        return env

    def argv(self, action: str, args: dict[str, Any]) -> list[str]:
        return [sys.executable, str(CHILD), str(self.root), action, json.dumps(args)]

    def run(
        self, action: str, args: dict[str, Any] | None = None, *, rc: int = 0
    ) -> dict[str, Any]:
        """Run one action to its end; its results (the exit status must be ``rc``)."""
        done = subprocess.run(
            self.argv(action, args or {}),
            capture_output=True,
            text=True,
            timeout=420,
            env=self.env(),
            cwd=REPO,
            check=False,
        )
        if done.returncode != rc:
            tail = "\n".join(done.stderr.splitlines()[-30:])
            raise AssertionError(
                f"child {action} exited {done.returncode} (expected {rc}); "
                f"stdout: {done.stdout[-2000:]}\nstderr: {tail}"
            )
        if os.environ.get("SC_PROOF_DEBUG"):
            print(f"--- {action} stderr:\n{done.stderr[-4000:]}")
        return _results(done.stdout)

    def terminate_when(
        self, action: str, args: dict[str, Any], key: str
    ) -> tuple[int, dict[str, Any]]:
        """Start ``action``; once it reports ``key``, SIGTERM it. (exit status, results)."""
        with subprocess.Popen(
            self.argv(action, args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=REPO,
        ) as child:
            assert child.stdout is not None
            seen: dict[str, Any] = {}
            deadline = time.monotonic() + 300
            for line in child.stdout:
                seen.update(_results(line))
                if key in seen:
                    child.send_signal(signal.SIGTERM)
                    break
                assert time.monotonic() < deadline
            out, err = child.communicate(timeout=300)
            seen.update(_results(out))
            if key not in seen:
                raise AssertionError(f"child {action} never reported {key!r}: {err[-3000:]}")
            return child.returncode, seen

    def assert_clean(self) -> dict[str, Any]:
        """The guest is thawed, on its original image, with nothing of a run left."""
        self.checked = True
        st = self.run("state")
        assert st["freeze"] == "thawed", st
        assert st["sources"] == st["persistent"] == self.originals, st
        assert st["backing"] == [] and st["block_jobs"] == [] and not st["backup_job"], st
        assert not st["journal"] and st["checkpoints"] == [], st
        assert sorted(p.name for p in self.images.iterdir()) == ["disk0.qcow2"]
        assert list(self.target.iterdir()) == []
        assert list(self.tmp.iterdir()) == []
        return st


def _qemu_pids_under(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"qemu-system" in cmdline and str(root).encode() in cmdline:
                    pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def env(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A guest with one data disk in its own embed root, driven only by child processes."""
    from statecapture.testing.kit import domain_xml, make_data_disk
    from tests._isolation import make_embed_root

    root = make_embed_root("scp-")
    e = Env(root, tmp_path_factory.mktemp("signals"))
    try:
        image = make_data_disk(e.images / "disk0.qcow2", size_mib=32)
        e.originals = {"vda": str(image)}
        xml = domain_xml("scproof", kit, [image], log_path=e.work / "console.log")
        (e.work / "domain.xml").write_text(xml)
        e.run("setup", {"xml": str(e.work / "domain.xml")})
        yield e
    finally:
        with contextlib.suppress(Exception):
            e.run("teardown")
        for pid in _qemu_pids_under(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(e.tmp, ignore_errors=True)


@pytest.fixture
def e(env: Env) -> Iterator[Env]:
    env.checked = False
    yield env
    if not env.checked:  # the test failed before its own check
        env.assert_clean()


# --------------------------------------------------------------------------- freeze


def test_sigterm_in_the_block_thaws_then_exits_143(e: Env) -> None:
    """A process SIGTERMed while it sleeps in an fs_frozen block thaws the guest on its way
    out and then exits with status 143, without running the rest of its code."""
    code, seen = e.terminate_when("freeze_then_wait", {}, "frozen")
    assert seen["frozen"] == "frozen"
    assert code == 143 and "left_the_block" not in seen
    e.assert_clean()


@pytest.mark.parametrize("call", ["freeze", "thaw"])
def test_sigterm_during_the_freeze_or_thaw_call_is_held(e: Env, call: str) -> None:
    """SIGTERM that arrives while the freeze call runs (after the guest froze) or while the
    thaw call runs (before it reached the guest) is held until the call returned: the
    guest ends thawed and the process exits with 143 (without the hold, the first would die
    at once leaving the guest frozen, the second would skip the thaw)."""
    seen = e.run("signal_during_call", {"call": call}, rc=143)
    if call == "freeze":
        assert seen["frozen_in_call"] == "frozen" and "entered" not in seen
    else:
        assert seen["frozen"] == "frozen" and "survived" not in seen
    e.assert_clean()


def test_watchdog_thaws_when_the_interpreter_exits(e: Env) -> None:
    """A process whose main thread returns while a (daemon) worker thread hangs in an
    fs_frozen block does not leave the guest frozen: the interpreter waits for the
    watchdog (not a daemon), which thaws after max_frozen, then exits normally."""
    seen = e.run("exit_with_a_hung_block", {"max_frozen": 3, "keep_open": True})
    ended = time.time()
    assert seen["frozen"] == "frozen"
    print(f"\ninterpreter exit waited {ended - seen['main_returns_at']:.1f} s for the thaw")
    e.assert_clean()


# --------------------------------------------------------------------------- sequences


@pytest.mark.parametrize(
    ("sequence", "mode", "at"),
    [("snapshot", "", "in:snapshot:frozen"), ("direct", "pull", "in:begin:captured")],
)
def test_sigterm_during_a_sequence_rolls_back(e: Env, sequence: str, mode: str, at: str) -> None:
    """A SIGTERM while a sequence holds the guest frozen (after the snapshot call, or after
    the backup job started with its checkpoint) rolls the run back before the process
    exits with 143: guest thawed, overlay merged and removed, job ended, checkpoint,
    files, scratch and journal gone."""
    args = {"sequence": sequence, "mode": mode, "at": at, "target_dir": str(e.target)}
    code, seen = e.terminate_when("sequence_then_wait", args, "at")
    assert seen["freeze"] == "frozen"
    assert code == 143 and "completed" not in seen
    e.assert_clean()


# --------------------------------------------------------------------------- backups


def test_dead_push_run_with_all_targets_counts_as_completed(e: Env) -> None:
    """A process SIGKILLed after its push job finished but before it called wait() (its
    record of the run stays in the domain's metadata): the next Domain.backup() counts
    the run completed when every target file is there —
    its checkpoint stays and an incremental backup from it works — and as undelivered
    when a target is missing (its checkpoint is then removed, so no incremental can build
    on it)."""
    started = e.run("push_then_die", {"target_dir": str(e.target), "checkpoint": "k1"}, rc=-9)
    files = [Path(f) for f in started["files"]]
    nxt = e.run("next_backup", {"target_dir": str(e.target), "incremental_from": "k1"})
    assert nxt["before"] == ["k1"] and nxt["after"] == ["k1"], nxt
    assert nxt["incremental"] and all(Path(f).is_file() for f in nxt["incremental"])
    assert all(f.is_file() for f in files)  # moved from staging to the final names
    assert sorted(p.name for p in e.target.iterdir() if p.name.startswith(".")) == []
    for f in e.target.iterdir():
        f.unlink()

    started = e.run("push_then_die", {"target_dir": str(e.target), "checkpoint": "k2"}, rc=-9)
    assert all(Path(f).is_file() for f in started["staged"])  # not moved yet: nobody waited
    for f in started["staged"]:
        Path(f).unlink()  # the run's target is gone
    nxt = e.run("next_backup", {"target_dir": str(e.target)})
    assert nxt["before"] == ["k2"] and nxt["after"] == [], nxt
    e.assert_clean()
