"""Child process of tests/test_qemu_signals.py; not a test module.

libvirt's embedded driver allows one root per process and the pytest process holds its own
(``qemu_conn``), so the scenarios that end a process (SIGTERM, interpreter exit, SIGKILL)
run on a separate root, every action in a fresh interpreter::

    python tests/_proof_child.py ROOT ACTION JSON-ARGS

Each action prints ``RESULT {json}`` lines on stdout (flushed, so the parent can act on
them — e.g. send SIGTERM once the child reports the guest frozen — before the child ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import statecapture
from statecapture import _journal
from statecapture.testing import agent_command, wait_agent
from statecapture.testing.faults import inject
from tests._proof import remove_domains

NAME = "scproof"


def emit(**data: Any) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def frozen(dom: statecapture.Domain) -> str:
    """qemu-ga's own view: "frozen" or "thawed"."""
    return str(agent_command(dom, {"execute": "guest-fsfreeze-status"}, timeout=10))


def domain(conn: statecapture.Connection) -> statecapture.Domain:
    dom = conn.domain(NAME)
    # A fresh process reconnects to the agent first: Domain.wait_for_agent waits until the
    # agent answers a command, not just until the channel reads "connected".
    dom.wait_for_agent(120)
    return dom


# --------------------------------------------------------------------------- life cycle


def setup(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    dom = conn.define(Path(args["xml"]).read_text())
    dom.start()
    emit(agent_after=wait_agent(dom, timeout=300))


def teardown(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    remove_domains(conn)
    emit(torn_down=True)


def state(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """The facts the parent asserts on after a scenario."""
    dom = domain(conn)
    emit(
        freeze=frozen(dom),
        journal=_journal.read_journal(dom) is not None,
        sources={d.target: d.source for d in dom.definition.disks},
        persistent={d.target: d.source for d in dom.inactive_definition.disks},
        backing=[d.target for d in dom.definition.disks if d.backing],
        block_jobs=[j.disk for j in dom.block_jobs()],
        backup_job=dom.active_backup() is not None,
        checkpoints=[c.name for c in dom.checkpoints],
    )


# --------------------------------------------------------------------------- freeze


def freeze_then_wait(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """Freeze and sleep in the block; the parent sends SIGTERM."""
    dom = domain(conn)
    with statecapture.fs_frozen(dom, max_frozen=300):
        emit(frozen=frozen(dom))
        time.sleep(300)
    emit(left_the_block=True)  # not reached: SIGTERM ends the block


def signal_during_call(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """SIGTERM to this process while the freeze (after it landed) or thaw call runs."""
    dom = domain(conn)

    def term() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the signal is surely pending now

    def frozen_then_term() -> None:
        emit(frozen_in_call=frozen(dom))
        term()

    if args["call"] == "freeze":
        with (
            inject(dom, "fs_freeze", after=frozen_then_term),
            statecapture.fs_frozen(dom, max_frozen=300),
        ):
            emit(entered=True)  # not reached: the held SIGTERM ends __enter__
    else:
        with contextlib.ExitStack() as stack, statecapture.fs_frozen(dom, max_frozen=300):
            emit(frozen=frozen(dom))
            stack.enter_context(inject(dom, "fs_thaw", before=term))
    emit(survived=True)  # not reached


def exit_with_a_hung_block(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """A daemon thread hangs inside fs_frozen(max_frozen=...); the main thread returns,
    without closing the connection, and the interpreter exits."""
    dom = domain(conn)
    inside = threading.Event()

    def hang() -> None:
        with statecapture.fs_frozen(dom, max_frozen=args["max_frozen"]):
            inside.set()
            time.sleep(3600)

    threading.Thread(target=hang, daemon=True).start()
    assert inside.wait(120)
    emit(frozen=frozen(dom), main_returns_at=time.time())


# --------------------------------------------------------------------------- sequences


def sequence_then_wait(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """Run a sequence that sleeps at ``args['at']``; the parent sends SIGTERM."""
    dom = domain(conn)

    def hook(name: str) -> None:
        if name == args["at"]:
            emit(at=name, freeze=frozen(dom))
            time.sleep(300)

    _journal._fault_hook = hook
    if args["sequence"] == "snapshot":
        statecapture.backup_via_temporary_snapshot(dom, lambda images: None, max_frozen=300)
    else:
        statecapture.direct_backup(
            dom, args["target_dir"], mode=args["mode"], checkpoint="sc-term", max_frozen=300
        )
    emit(completed=True)  # not reached


# --------------------------------------------------------------------------- backups


def push_then_die(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """Start a push job with a new checkpoint; once QEMU finished it (libvirt reports no
    job) but before this process called wait() or end(), SIGKILL this process."""
    from statecapture._backup import job_xml

    dom = conn.domain(NAME)
    job = dom.backup(mode="push", target_dir=args["target_dir"], checkpoint=args["checkpoint"])
    deadline = time.monotonic() + 120
    while job_xml(dom) is not None:
        assert time.monotonic() < deadline, "the push job never ended"
        time.sleep(0.05)
    # files: the final names; staged: where QEMU wrote them (moved by the next clean-up)
    emit(
        files=[str(p) for p in job.targets.values()],
        staged=[d.store for d in job.xml.backed_up if d.store],
    )
    os.kill(os.getpid(), signal.SIGKILL)


def next_backup(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """Wait for the dead run's job to end, then start (and end) the next backup job."""
    from statecapture._backup import job_xml

    dom = conn.domain(NAME)
    deadline = time.monotonic() + 120
    while job_xml(dom) is not None:
        assert time.monotonic() < deadline, "the dead run's push job never ended"
        time.sleep(0.1)
    before = [c.name for c in dom.checkpoints]
    with dom.backup(mode="pull"):
        pass  # Domain.backup() settles the dead run's record first
    after = [c.name for c in dom.checkpoints]
    extra: dict[str, Any] = {}
    if args.get("incremental_from") in after:
        inc = dom.backup(
            mode="push", target_dir=args["target_dir"], incremental_from=args["incremental_from"]
        )
        result = inc.wait()
        extra["incremental"] = [str(d.file) for d in result.disks] if result else None
    for name in reversed(after):
        dom.checkpoints[name].delete()
    emit(before=before, after=after, **extra)


ACTIONS = {
    f.__name__: f
    for f in (
        setup,
        teardown,
        state,
        freeze_then_wait,
        signal_during_call,
        exit_with_a_hung_block,
        sequence_then_wait,
        push_then_die,
        next_backup,
    )
}


def main() -> None:
    root, action, raw_args = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(raw_args)
    conn = statecapture.connect(f"qemu:///embed?root={root}")
    ACTIONS[action](conn, args)
    if not args.get("keep_open"):
        conn.close()  # domains outlive this process


if __name__ == "__main__":
    main()
