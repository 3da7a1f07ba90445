"""Child process of the repository kill matrix (tests/test_repository.py); not a test module.

The embedded driver allows one root per process, so every action on the kill-matrix root
runs here::

    python tests/_repo_kill_child.py ROOT REPO ACTION JSON-ARGS

``setup`` defines and starts (paused: the QEMU process is what a backup needs) a domain
with one data disk; ``state`` restores every listed point (sha256 of each raw image),
verifies and checks the repository, and lists the domain's checkpoints; ``run`` dirties the
disk through QEMU, then runs ``backup`` or ``prune`` and SIGKILLs itself at one boundary;
``teardown`` removes the domain. Results: one line ``RESULT {json}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import statecapture
from statecapture import Repository, _journal
from tests._raw import raw_domain

NAME = "screpokill"


def emit(**data: Any) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _dirty(dom: statecapture.Domain, n: int) -> None:
    import libvirt_qemu
    from lxml import etree

    root = etree.fromstring(dom.definition.raw.encode())
    alias = next(d.find("alias").get("name") for d in root.iter("disk"))  # type: ignore[union-attr]
    pattern = 0x10 + n % 200
    off = (n % 24) * (1 << 20)
    libvirt_qemu.qemuMonitorCommand(
        raw_domain(dom), f'qemu-io -d {alias} "write -P {pattern} {off} 512k"', 1
    )


def main() -> None:
    root, repo_path, action = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    conn = statecapture.connect(f"qemu:///embed?root={root}")
    if action == "setup":
        from statecapture.testing.kit import domain_xml, ensure_kit, make_data_disk

        tmp = Path(args["tmp"])
        disk = make_data_disk(tmp / "k.qcow2", size_mib=32)
        dom = conn.define(
            domain_xml(NAME, ensure_kit(), [disk], agent=False, log_path=tmp / "k.log")
        )
        dom.start(paused=True)
        Repository.create(repo_path)
        emit(ok=True)
        return
    dom = conn.domain(NAME)
    if action == "state":
        repo = Repository(repo_path)
        shas = {}
        with tempfile.TemporaryDirectory(dir=args["tmp"]) as t:
            for i, p in enumerate(repo.points()):
                files = repo.restore(p, Path(t) / str(i), format="raw")
                shas[p.id] = _sha(files["vda"])
        report = repo.verify()
        check = repo.check()
        emit(
            shas=shas,
            verify_ok=report.ok,
            verify=str(report),
            check_ok=check.ok,
            check=str(check),
            broken=list(check.broken_points),
            checkpoints=[c.name for c in dom.checkpoints],
            referenced=[p.checkpoint for p in repo.points() if p.checkpoint],
            journal=_journal.read_journal(dom) is not None,
        )
        return
    if action == "run":
        repo = Repository(repo_path, lock_timeout=30)
        _dirty(dom, int(args["n"]))
        target = args["boundary"]

        def hook(name: str) -> None:
            if name == target:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        _journal._fault_hook = hook
        if args["what"] == "backup":
            repo.backup(dom, quiesce=False)
        else:
            repo.prune(dom, keep_last=1)
        _journal._fault_hook = None
        emit(reached=False)
        return
    if action == "teardown":
        for step in (
            lambda: raw_domain(dom).abortJob(),
            dom.destroy,
            lambda: dom.undefine(checkpoints_metadata=True),
        ):
            with contextlib.suppress(Exception):
                step()
        emit(ok=True)
        return
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
