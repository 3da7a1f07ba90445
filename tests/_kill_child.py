"""Child process of the kill matrix (tests/test_recover.py); not a test module.

libvirt's embedded driver allows one root per process and the pytest process holds its own,
so every action on the kill-matrix root runs here, in a fresh interpreter::

    python tests/_kill_child.py ROOT ACTION JSON-ARGS

ACTION is ``setup`` (define + start the guest, wait for its agent), ``run`` (write a known
file in the guest, then run a sequence and SIGKILL this process at one boundary), ``check``
(``recover()`` from a fresh process, then verify everything the issue demands),
``reset`` (after each case: restore and verify the clean state), ``destroy`` (power cut),
``start`` or ``teardown``. Results are printed as one line
``RESULT {json}`` on stdout (``run`` prints its guest facts *before* it dies).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import statecapture
from statecapture import _journal
from statecapture.testing import guest_exec, wait_agent
from tests._proof import remove_domains
from tests._raw import raw_domain

NAME = "sckill"


def emit(**data: Any) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def sh(dom: statecapture.Domain, script: str, timeout: float = 60) -> str:
    code, out, err = guest_exec(dom, ["sh", "-c", script], timeout=timeout)
    if code != 0:
        raise RuntimeError(f"guest command failed ({code}): {script}: {err.decode()}")
    return out.decode()


def md5s(text: str) -> list[str]:
    return re.findall(r"\b[0-9a-f]{32}\b", text)


# --------------------------------------------------------------------------- actions


def setup(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    dom = conn.define(Path(args["xml"]).read_text())
    dom.start()
    waited = wait_agent(dom, timeout=300)
    emit(booted=True, agent_after=waited)


def start(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    dom = conn.domain(NAME)
    dom.start()
    waited = wait_agent(dom, timeout=300)
    emit(started=True, agent_after=waited)


def destroy(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    dom = conn.domain(NAME)
    for _ in range(20):  # the reconnect thread may still hold the domain right after connect
        try:
            dom.destroy()
            break
        except statecapture.InvalidStateError:
            if not dom.is_active:
                break
            time.sleep(0.5)
    emit(active=dom.is_active)


def teardown(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    remove_domains(conn)
    emit(torn_down=True)


def run(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """Write data the check must find, then run a sequence and die at ``args['kill']``."""
    dom = conn.domain(NAME)
    wait_agent(dom, timeout=120)  # a fresh process reconnects to the agent first
    out = sh(
        dom,
        "dd if=/dev/urandom of=/data/known bs=64k count=16 2>/dev/null; sync; "
        "md5sum /data/known; n=$(wc -c < /data/ticks); echo size $n; "
        "head -c $n /data/ticks | md5sum; rm -f /data/during",
    )
    known, ticks = md5s(out)
    size = int(re.search(r"size (\d+)", out).group(1))  # type: ignore[union-attr]
    emit(known=known, ticks_size=size, ticks_md5=ticks)
    kill = args["kill"]

    def hook(name: str) -> None:
        if name == kill:
            die()

    _journal._fault_hook = hook
    target = Path(args["target_dir"])
    if args["sequence"] == "snapshot":

        def copy(images: Any) -> None:
            # Data written while the guest runs on the overlays: the check finds it in the
            # original images after recover() merged them back.
            during = md5s(
                sh(
                    dom,
                    "dd if=/dev/urandom of=/data/during bs=64k count=8 2>/dev/null; sync; "
                    "md5sum /data/during",
                )
            )[0]
            emit(during=during)
            for disk, path in images.items():
                dest = target / f"{disk}.copy"
                if kill == "mid:copy":
                    with open(path, "rb") as src, open(dest, "wb") as dst:
                        dst.write(src.read(1 << 20))
                        dst.flush()
                    die()
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-O", "qcow2", str(path), str(dest)], check=True
                )

        statecapture.backup_via_temporary_snapshot(dom, copy)
    else:
        statecapture.direct_backup(
            dom, target, mode=args["mode"], checkpoint=args.get("checkpoint", True)
        )
    emit(completed=True)


def check(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """recover() from this fresh process, then verify the domain is whole and clean."""
    dom = conn.domain(NAME)
    problems: list[str] = []
    t0 = time.monotonic()
    report = statecapture.recover(dom)
    recover_s = time.monotonic() - t0
    if not report.clean:
        problems.append(f"recover not clean: {report}")
    if args.get("start") and not dom.is_active:
        dom.start()
    wait_agent(dom, timeout=300)
    originals: dict[str, str] = args["originals"]
    for label, definition in (("live", dom.definition), ("persistent", dom.inactive_definition)):
        sources = {d.target: d.source for d in definition.disks if d.device == "disk"}
        if sources != originals:
            problems.append(f"{label} disk sources {sources} != originals {originals}")
        for d in definition.disks:
            if d.backing:
                problems.append(f"{label} disk {d.target} still has a backing chain {d.backing}")
    if dom.block_jobs():
        problems.append(f"block jobs left: {dom.block_jobs()}")
    if dom.active_backup() is not None:
        problems.append("a backup job is left")
    if statecapture._journal.read_journal(dom) is not None:  # (an older format's too)
        problems.append("the crash record is left")
    status = dom.fs_freeze_status()
    if status != "thawed":
        problems.append(f"guest freeze status {status}")
    image_dir = Path(args["image_dir"])
    expected = set(args["image_files"])
    extra = sorted(p.name for p in image_dir.iterdir() if p.name not in expected)
    if extra:
        problems.append(f"files left next to the images: {extra}")
    target = Path(args["target_dir"])
    left = sorted(p.name for p in target.iterdir() if not p.name.endswith(".copy"))
    if left:
        problems.append(f"backup files left in the target dir: {left}")
    for p in target.iterdir():
        p.unlink()
    tmp = Path(os.environ["TMPDIR"])
    scratch = sorted(p.name for p in tmp.iterdir())
    if scratch:
        problems.append(f"scratch files/dirs left in TMPDIR: {scratch}")
    # -- guest data, read back from the disks (page cache dropped)
    facts = args["facts"]
    out = sh(
        dom,
        "sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /data/known; "
        f"head -c {facts['ticks_size']} /data/ticks | md5sum; "
        "[ -f /data/during ] && md5sum /data/during; echo size $(wc -c < /data/ticks)",
    )
    sums = md5s(out)
    size1 = int(re.search(r"size (\d+)", out).group(1))  # type: ignore[union-attr]
    if sums[0] != facts["known"]:
        problems.append("/data/known changed")
    if sums[1] != facts["ticks_md5"]:
        problems.append("the earlier content of /data/ticks changed")
    if "during" in facts and (len(sums) < 3 or sums[2] != facts["during"]):
        problems.append("/data/during (written on the overlay) is missing or changed")
    time.sleep(0.6)
    size2 = int(sh(dom, "wc -c < /data/ticks").strip())
    if not size2 > size1 > facts["ticks_size"]:
        problems.append(f"/data/ticks is not growing ({facts['ticks_size']}, {size1}, {size2})")
    # -- the next backup works
    after = Path(args["after_dir"])
    t1 = time.monotonic()
    try:
        result = statecapture.direct_backup(dom, after)
        backup_s = time.monotonic() - t1
        dom.checkpoints[result.checkpoint].delete()  # type: ignore[index]
        for f in result.files.values():
            f.unlink()
    except statecapture.StateCaptureError as exc:
        backup_s = time.monotonic() - t1
        problems.append(f"the following direct_backup failed: {exc!r}")
    again = statecapture.recover(dom)
    if again.found or again.actions:
        problems.append(f"a second recover() was not a no-op: {again}")
    if list(dom.checkpoints):
        problems.append(f"checkpoints left: {[c.name for c in dom.checkpoints]}")
    emit(
        problems=problems,
        report=str(report),
        found=list(report.found),
        actions=list(report.actions),
        recover_s=recover_s,
        backup_s=backup_s,
    )


def reset(conn: statecapture.Connection, args: dict[str, Any]) -> None:
    """After a kill-matrix case: bring the shared guest back to the clean state the next
    case starts from, and report everything that had to be repaired (a case that left any
    of it behind fails in its teardown, so no state leaks into the next case)."""
    dom = conn.domain(NAME)
    repaired: list[str] = []
    report = statecapture.recover(dom)
    if report.found or report.actions or not report.clean:
        repaired.append(f"recover() had work: {report}")
    if not dom.is_active:
        repaired.append("the guest was not running")
        dom.start()
    wait_agent(dom, timeout=300)
    raw_domain(dom).agentSetResponseTimeout(-1, 0)  # libvirt's default, whatever a case set
    if dom.fs_freeze_status() != "thawed":
        repaired.append("the guest was frozen")
        dom.fs_thaw()
    originals: dict[str, str] = args["originals"]
    for label, definition in (("live", dom.definition), ("persistent", dom.inactive_definition)):
        sources = {d.target: d.source for d in definition.disks if d.device == "disk"}
        if sources != originals:
            repaired.append(f"{label} disk sources {sources} != originals {originals}")
    if dom.block_jobs() or dom.active_backup() is not None:
        repaired.append("a block or backup job was running")
    if _journal.read_journal(dom) is not None:
        repaired.append("a crash record was left")
    for cp in reversed(dom.checkpoints.list()):
        repaired.append(f"checkpoint {cp.name} was left")
        cp.delete(metadata_only=True)
    for key in ("target_dir", "after_dir"):
        for f in sorted(Path(args[key]).iterdir()):
            repaired.append(f"{f} was left")
            f.unlink()
    expected = set(args["image_files"])
    extra = sorted(p.name for p in Path(args["image_dir"]).iterdir() if p.name not in expected)
    if extra:
        repaired.append(f"files left next to the images: {extra}")
    scratch = sorted(p.name for p in Path(os.environ["TMPDIR"]).iterdir())
    if scratch:
        repaired.append(f"scratch files/dirs left in TMPDIR: {scratch}")
    emit(repaired=repaired)


ACTIONS = {
    "reset": reset,
    "setup": setup,
    "start": start,
    "destroy": destroy,
    "teardown": teardown,
    "run": run,
    "check": check,
}


def main() -> None:
    root, action, raw_args = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = statecapture.connect(f"qemu:///embed?root={root}")
    try:
        ACTIONS[action](conn, json.loads(raw_args))
    finally:
        conn.close()  # domains outlive this process


if __name__ == "__main__":
    main()
