"""Functions the fleet tests run *inside* Dask worker processes (not a test module).

Each worker process stands for one host and opens its own embedded QEMU root (libvirt
allows one per process), so guests are booted, inspected and removed here, through the
same per-process connection the fleet tasks use.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import statecapture
from statecapture import _journal
from statecapture.fleet import run as fleet_run
from statecapture.testing import wait_agent
from tests._raw import raw_domain


def conn(uri: str) -> statecapture.Connection:
    return fleet_run._connection(uri)


def boot(uri: str, tmp: str, names: list[str]) -> list[str]:
    """Define and start one test guest per name (one qcow2 data disk, agent); wait for
    every agent."""
    from statecapture.testing.kit import domain_xml, ensure_kit, make_data_disk

    kit = ensure_kit()
    c = conn(uri)
    doms = []
    for name in names:
        disk = make_data_disk(Path(tmp) / f"{name}.qcow2", size_mib=32)
        dom = c.define(domain_xml(name, kit, [disk], log_path=Path(tmp) / f"{name}.log"))
        dom.start()
        doms.append(dom)
    for dom in doms:
        wait_agent(dom, timeout=300)
    return [d.uuid for d in doms]


def teardown(uri: str) -> list[str]:
    """Destroy and undefine every domain of this worker's root; the names removed."""
    c = conn(uri)
    out = []
    for dom in c.domains():
        vir = raw_domain(dom)
        with contextlib.suppress(Exception):
            vir.abortJob()
        with contextlib.suppress(Exception):
            vir.agentSetResponseTimeout(5, 0)
        with contextlib.suppress(Exception):
            vir.fsThaw()
        with contextlib.suppress(Exception):
            if dom.is_active:
                dom.destroy()
        with contextlib.suppress(Exception):
            for cp in vir.listAllCheckpoints(0):
                cp.delete(2)  # metadata only
        with contextlib.suppress(Exception):
            dom.undefine(managed_save=True, snapshots_metadata=True, checkpoints_metadata=True)
        out.append(dom.name)
    c.close()
    fleet_run._conns.clear()
    return out


def state(uri: str, name: str) -> dict[str, Any]:
    """What is left on a domain: a backup job, a journal, frozen filesystems, checkpoints."""
    from statecapture.testing import agent_command

    dom = conn(uri).domain(name)
    wait_agent(dom, timeout=300)
    return {
        "job": dom.active_backup() is not None,
        "journal": _journal.read_journal(dom) is not None,
        "frozen": agent_command(dom, {"execute": "guest-fsfreeze-status"}),
        "checkpoints": sorted(c.name for c in dom.checkpoints.list()),
        "pid": os.getpid(),
    }


def install_fault(victim: str, boundary_prefix: str, action: str) -> int:
    """Make this worker fail the fleet task on domain ``victim`` at the first boundary
    starting with ``boundary_prefix``: ``raise`` an error, or ``kill`` the process
    (SIGKILL). Returns the worker's pid."""

    def hook(name: str) -> None:
        if getattr(fleet_run._current, "domain", None) != victim:
            return
        if not name.startswith(boundary_prefix):
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        raise RuntimeError(f"injected fault at {name}")

    _journal._fault_hook = hook
    return os.getpid()


def clear_fault() -> None:
    _journal._fault_hook = None
