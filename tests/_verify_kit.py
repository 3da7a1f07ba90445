"""End-to-end check of the guest kit under libvirt's embedded QEMU driver.

Run from the repository root (as root)::

    python -m tests._verify_kit [--keep] [--cache-dir DIR]

Builds (or reuses) the kit, boots a guest with one 64 MiB data disk in a
throw-away ``qemu:///embed`` root and checks, in order: the agent comes up,
``/data/ticks`` grows, fsfreeze stalls it and thaw resumes it, a disk-only
external snapshot + active block commit with pivot, a push backup, a
managed-save/restore that continues the tick counter, a hot-plugged second
disk showing up at /data1, and agent and ACPI shutdown.  The domain is always
destroyed and undefined.  Prints timings and a closing
"verify_kit: N passed, N failed" line (required failures only); exit status 0 when every
required check passed (push backup, managed save, hotplug and the shutdown
checks are reported but optional).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from statecapture._adapter import ensure_event_loop
from statecapture.testing.kit import (
    default_cache_dir,
    domain_xml,
    ensure_kit,
    make_data_disk,
    prepare_embed_root,
)
from tests._isolation import make_embed_root

# This smoke check drives libvirt directly (no statecapture handle), so it carries its own
# raw-``virDomain`` agent helpers: failures raise libvirt.libvirtError, a command still
# running raises TimeoutError.


def agent_command(dom: libvirt.virDomain, command: dict[str, Any], timeout: int = 10) -> Any:
    """Send one agent command (QMP-style dict) and return its ``"return"`` member."""
    import json

    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), max(1, int(timeout)), 0)
    return json.loads(reply)["return"]


def wait_agent(dom: libvirt.virDomain, timeout: float = 60) -> float:
    """Poll ``guest-ping`` until the agent answers; return the seconds waited."""
    start = time.monotonic()
    while True:
        try:
            agent_command(dom, {"execute": "guest-ping"}, timeout=5)
            return time.monotonic() - start
        except libvirt.libvirtError:
            if not dom.isActive():
                raise RuntimeError(f"{dom.name()} stopped while waiting for its agent") from None
            if time.monotonic() - start >= timeout:
                raise TimeoutError(f"the agent of {dom.name()} did not answer") from None
        time.sleep(0.2)


def guest_exec(
    dom: libvirt.virDomain, argv: list[str], timeout: float = 10
) -> tuple[int, bytes, bytes]:
    """Run *argv* in the guest; ``(exit code, stdout, stderr)``; TimeoutError if still running."""
    import base64

    args = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    pid = agent_command(dom, {"execute": "guest-exec", "arguments": args})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = agent_command(dom, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if st.get("exited"):
            code = int(st["exitcode"]) if "exitcode" in st else -int(st.get("signal", 0))
            out = base64.b64decode(st.get("out-data", ""))
            return code, out, base64.b64decode(st.get("err-data", ""))
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest command {argv!r} still running after {timeout:g} s")
        time.sleep(0.05)


def open_embed(root: Path) -> libvirt.virConnect:
    """Start the event loop, write qemu.conf and open ``qemu:///embed?root=<root>`` raw."""
    ensure_event_loop()
    root = Path(root).absolute()
    prepare_embed_root(root)
    return libvirt.open(f"qemu:///embed?root={root}")


DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


@dataclass
class Tick:
    counter: int
    epoch: float
    uptime: float


@dataclass
class Report:
    timings: dict[str, float] = field(default_factory=dict)
    results: list[tuple[str, bool, bool, str]] = field(
        default_factory=list
    )  # name, ok, required, note

    def check(self, name: str, ok: bool, note: str = "", required: bool = True) -> bool:
        self.results.append((name, ok, required, note))
        mark = "PASS" if ok else ("FAIL" if required else "fail (optional)")
        print(f"[{mark}] {name}{': ' + note if note else ''}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, req, _ in self.results if req)


class Events:
    """Collects domain events of one domain into a queue."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self.q: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self.conn = conn
        self.ids: list[int] = []
        self.ids.append(
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._blockjob, None
            )
        )
        self.ids.append(
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._job_completed, None
            )
        )
        self.ids.append(
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
            )
        )

    def _blockjob(self, conn: Any, dom: Any, disk: str, typ: int, status: int, opaque: Any) -> None:
        self.q.put(("blockjob", (disk, typ, status)))

    def _job_completed(self, conn: Any, dom: Any, params: dict[str, Any], opaque: Any) -> None:
        self.q.put(("job_completed", (params,)))

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self.q.put(("lifecycle", (event, detail)))

    def drain(self) -> None:
        while not self.q.empty():
            self.q.get_nowait()

    def wait(self, kind: str, pred: Callable[..., bool], timeout: float) -> tuple[Any, ...] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                k, args = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if k == kind and pred(*args):
                return args

    def close(self) -> None:
        for i in self.ids:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(i)


def read_ticks(dom: libvirt.virDomain) -> list[Tick]:
    rc, out, err = guest_exec(dom, ["cat", "/data/ticks"], timeout=20)
    if rc != 0:
        raise RuntimeError(f"cat /data/ticks failed: rc={rc} {err!r}")
    ticks = []
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 3:
            ticks.append(Tick(int(parts[0]), float(parts[1]), float(parts[2])))
    return ticks


def disk_source(dom: libvirt.virDomain, target: str) -> str:
    root = ET.fromstring(dom.XMLDesc(0))
    for d in root.iterfind("./devices/disk"):
        t = d.find("target")
        s = d.find("source")
        if t is not None and t.get("dev") == target and s is not None:
            return s.get("file", "")
    return ""


def validate_schema(xml: str) -> str:
    """Validate with lxml's RelaxNG if lxml is importable (not a harness dependency)."""
    try:
        etree: Any = importlib.import_module("lxml.etree")
    except ImportError:
        return "lxml not installed, skipped (libvirt's VIR_DOMAIN_DEFINE_VALIDATE still ran)"
    rng = etree.RelaxNG(etree.parse(str(DOMAIN_SCHEMA)))
    doc = etree.fromstring(xml.encode())
    if not rng.validate(doc):
        raise RuntimeError(f"domain XML invalid: {rng.error_log}")
    return "valid per lxml RelaxNG"


def wait_ticks(dom: libvirt.virDomain, after: int, timeout: float = 10) -> list[Tick]:
    """Read ticks until the counter exceeds *after*."""
    deadline = time.monotonic() + timeout
    while True:
        ticks = read_ticks(dom)
        if ticks and ticks[-1].counter > after:
            return ticks
        if time.monotonic() > deadline:
            return ticks
        time.sleep(0.3)


def wait_state(dom: libvirt.virDomain, state: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if dom.state()[0] == state:
                return True
        except libvirt.libvirtError:
            pass
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> int:
    rep = Report()
    libvirt.registerErrorHandler(lambda *a: None, None)  # errors still raise

    t = time.monotonic()
    kit = ensure_kit(args.cache_dir)
    rep.timings["ensure_kit"] = time.monotonic() - t
    print(f"kit: {kit.kernel} {kit.initrd} ({rep.timings['ensure_kit']:.2f}s)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="sckit-", dir="/tmp"))
    root = make_embed_root()
    conn: libvirt.virConnect | None = None
    dom: libvirt.virDomain | None = None
    events: Events | None = None
    name = f"sc-verify-{os.getpid()}"
    try:
        conn = open_embed(root)
        disk = make_data_disk(tmp / "vda.qcow2", size_mib=64)
        log = tmp / "console.log"
        xml = domain_xml(name, kit, [disk], log_path=log)
        rep.check("domain XML schema", True, validate_schema(xml))
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        events = Events(conn, dom)

        # --- boot ------------------------------------------------------
        t = time.monotonic()
        dom.create()
        wait_agent(dom, 120)
        rep.timings["boot_to_agent"] = time.monotonic() - t
        rep.check("agent up", True, f"{rep.timings['boot_to_agent']:.2f}s after create()")

        ticks = wait_ticks(dom, 2)
        rep.check(
            "ticks grow",
            len(ticks) >= 2,
            f"{len(ticks)} lines, last {ticks[-1] if ticks else None}",
        )

        # --- freeze / thaw ------------------------------------------------
        # A tick line's uptime is read before its (blocked) write, so a freeze
        # of `hold` seconds shows as a gap of at least hold - one tick period.
        hold = 2.0
        before = read_ticks(dom)
        t = time.monotonic()
        nfrozen = dom.fsFreeze(None, 0)
        t_freeze = time.monotonic() - t
        frozen_status = libvirt_agent_status(dom)
        t_hold = time.monotonic()
        try:
            guest_exec(dom, ["true"])
            exec_while_frozen = "guest-exec allowed while frozen"
        except libvirt.libvirtError as e:
            exec_while_frozen = f"guest-exec refused while frozen ({e.get_error_message()[:60]})"
        time.sleep(max(0.0, hold - (time.monotonic() - t_hold)))
        t = time.monotonic()
        nthawed = dom.fsThaw(None, 0)
        t_thaw = time.monotonic() - t
        rep.timings["fsfreeze_call"] = t_freeze
        rep.timings["fsthaw_call"] = t_thaw
        rep.timings["freeze_thaw_round_trip"] = t_freeze + t_thaw
        after = wait_ticks(dom, before[-1].counter + 3)
        new = [x for x in after if x.counter > before[-1].counter]
        # The biggest uptime gap between consecutive lines written around the freeze.
        window = [x for x in after if x.counter >= before[-1].counter]
        gaps = [b.uptime - a.uptime for a, b in itertools.pairwise(window)]
        max_gap = max(gaps) if gaps else 0.0
        rep.check(
            "fsfreeze stalls ticks",
            nfrozen >= 1 and frozen_status == "frozen" and max_gap >= hold - 0.8,
            f"froze {nfrozen} fs (status {frozen_status}), max gap {max_gap:.2f}s for a {hold}s hold; "
            + exec_while_frozen,
        )
        rep.check(
            "fsthaw resumes ticks",
            nthawed >= 1 and len(new) >= 3,
            f"{len(new)} new lines after thaw",
        )

        # --- disk-only external snapshot + active commit with pivot ---------
        overlay = tmp / "vda.overlay.qcow2"
        snap_xml = (
            "<domainsnapshot><disks>"
            f"<disk name='vda' snapshot='external'><driver type='qcow2'/>"
            f"<source file='{overlay}'/></disk>"
            "</disks></domainsnapshot>"
        )
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        t = time.monotonic()
        dom.snapshotCreateXML(snap_xml, flags)
        rep.timings["snapshot_disk_only"] = time.monotonic() - t
        src = disk_source(dom, "vda")
        rep.check("disk-only external snapshot", src == str(overlay), f"vda now on {src}")
        c0 = read_ticks(dom)[-1].counter
        wait_ticks(dom, c0 + 3)

        events.drain()
        t = time.monotonic()
        dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
        ready = events.wait(
            "blockjob",
            lambda d, typ, st: (
                d == "vda"
                and st in (libvirt.VIR_DOMAIN_BLOCK_JOB_READY, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)
            ),
            60,
        )
        rep.timings["commit_to_ready"] = time.monotonic() - t
        commit_ok = ready is not None and ready[2] == libvirt.VIR_DOMAIN_BLOCK_JOB_READY
        if commit_ok:
            t = time.monotonic()
            dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            done = events.wait(
                "blockjob",
                lambda d, typ, st: d == "vda" and st != libvirt.VIR_DOMAIN_BLOCK_JOB_READY,
                60,
            )
            rep.timings["pivot"] = time.monotonic() - t
            src = disk_source(dom, "vda")
            commit_ok = (
                done is not None
                and done[2] == libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED
                and src == str(disk)
            )
            note = (
                f"READY after {rep.timings['commit_to_ready']:.2f}s, "
                f"pivot -> {blockjob_str(done)}, vda back on {src}"
            )
        else:
            note = f"no READY event (got {ready})"
            with_suppress(lambda: dom.blockJobAbort("vda", 0))
        rep.check("active block commit + pivot", commit_ok, note)
        c1 = read_ticks(dom)[-1].counter
        rep.check("ticks grow after pivot", wait_ticks(dom, c1 + 3)[-1].counter > c1 + 3)
        overlay.unlink(missing_ok=True)

        # --- push backup ----------------------------------------------------
        target = tmp / "backup-vda.qcow2"
        backup_xml = (
            "<domainbackup mode='push'><disks>"
            f"<disk name='vda' type='file'><target file='{target}'/><driver type='qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        try:
            events.drain()
            t = time.monotonic()
            dom.backupBegin(backup_xml, None, 0)
            got = events.wait("job_completed", lambda params: True, 60)
            rep.timings["push_backup"] = time.monotonic() - t
            ok = got is not None and bool(got[0].get("success"))
            note = f"{rep.timings['push_backup']:.2f}s, event {got[0] if got else None}"
            if ok:
                content, bnote = backup_ticks(target, tmp)
                ok = content is not None and len(content) > 0
                note += f"; backup has /ticks with {len(content or [])} lines"
                if bnote:
                    note += f" ({bnote})"
            rep.check("push backup", ok, note, required=False)
        except libvirt.libvirtError as e:
            rep.check("push backup", False, f"libvirt error: {e}", required=False)

        # --- managed save / restore continues the counter ------------------
        try:
            c2 = read_ticks(dom)[-1].counter
            t = time.monotonic()
            dom.managedSave(0)
            rep.timings["managed_save"] = time.monotonic() - t
            t = time.monotonic()
            dom.create()
            rep.timings["restore"] = time.monotonic() - t
            wait_agent(dom, 60)
            after = wait_ticks(dom, c2 + 3)
            seq = [x.counter for x in after]
            monotonic = all(b == a + 1 for a, b in itertools.pairwise(seq))
            ok = after[-1].counter > c2 and monotonic and seq[0] == 1
            rep.check(
                "managed save/restore continues counter",
                ok,
                f"save {rep.timings['managed_save']:.2f}s, restore {rep.timings['restore']:.2f}s, "
                f"counter {c2} -> {after[-1].counter}, gap-free: {monotonic}",
                required=False,
            )
        except libvirt.libvirtError as e:
            rep.check(
                "managed save/restore continues counter",
                False,
                f"libvirt error: {e}",
                required=False,
            )

        # --- hot-plugged second disk is mounted at /data1 -------------------
        try:
            hp = make_data_disk(tmp / "vdb.qcow2", size_mib=16, files={"hello.txt": b"hotplug\n"})
            hp_xml = (
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{hp}'/><target dev='vdb' bus='virtio'/></disk>"
            )
            t = time.monotonic()
            dom.attachDeviceFlags(hp_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            out = b""
            while time.monotonic() - t < 30:
                rc, out, _ = guest_exec(dom, ["cat", "/data1/hello.txt"])
                if rc == 0:
                    break
                time.sleep(0.3)
            rep.timings["hotplug_to_mounted"] = time.monotonic() - t
            ok = out == b"hotplug\n"
            t = time.monotonic()
            dom.detachDeviceFlags(hp_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            while time.monotonic() - t < 30 and disk_source(dom, "vdb"):
                time.sleep(0.2)
            rep.timings["hot_unplug"] = time.monotonic() - t
            gone = not disk_source(dom, "vdb")
            rep.check(
                "hotplug disk mounted at /data1, unplug",
                ok and gone,
                f"mounted after {rep.timings['hotplug_to_mounted']:.2f}s, "
                f"unplugged: {gone} after {rep.timings['hot_unplug']:.2f}s",
                required=False,
            )
        except libvirt.libvirtError as e:
            rep.check(
                "hotplug disk mounted at /data1, unplug",
                False,
                f"libvirt error: {e}",
                required=False,
            )

        # --- shutdown via agent, then via ACPI ------------------------------
        for label, flag in (
            ("agent shutdown", libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT),
            ("ACPI shutdown", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
        ):
            try:
                if not dom.isActive():
                    dom.create()
                wait_agent(dom, 60)
                t = time.monotonic()
                dom.shutdownFlags(flag)
                ok = wait_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, 30)
                rep.timings[label.replace(" ", "_")] = time.monotonic() - t
                rep.check(label, ok, f"shut off after {time.monotonic() - t:.2f}s", required=False)
            except libvirt.libvirtError as e:
                rep.check(label, False, f"libvirt error: {e}", required=False)
    except Exception as e:  # report and fall through to cleanup
        traceback.print_exc()
        rep.check("unexpected error", False, repr(e))
    finally:
        if events is not None:
            events.close()
        if dom is not None:
            with_suppress(lambda: dom.destroy() if dom.isActive() else None)
            with_suppress(
                lambda: dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                )
            )
        left: list[str] = []
        if conn is not None:
            left = [d.name() for d in conn.listAllDomains(0)]
            rep.check("cleanup: no domains left", not left, str(left))
            conn.close()
        if conn is None or not left:
            shutil.rmtree(root, ignore_errors=True)
        if not rep.ok or args.keep:
            print(f"console log / images kept in {tmp}")
            if (tmp / "console.log").exists():
                print("--- console.log (tail) ---")
                print((tmp / "console.log").read_text(errors="replace")[-3000:])
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n=== timings (s) ===")
    for k, v in rep.timings.items():
        print(f"{k:28s} {v:7.3f}")
    npass = sum(1 for _, ok, _, _ in rep.results if ok)
    nfail = sum(1 for _, ok, req, _ in rep.results if not ok and req)
    nopt = sum(1 for _, ok, req, _ in rep.results if not ok and not req)
    print(f"\noptional checks failed: {nopt}")
    print(f"verify_kit: {npass} passed, {nfail} failed")
    return 0 if rep.ok else 1


def libvirt_agent_status(dom: libvirt.virDomain) -> str:
    try:
        return str(agent_command(dom, {"execute": "guest-fsfreeze-status"}, timeout=5))
    except libvirt.libvirtError as e:
        return f"error: {e}"


def backup_ticks(image: Path, tmp: Path) -> tuple[list[str] | None, str]:
    """Read /ticks from an ext4 qcow2 image with qemu-img + debugfs (host side).

    Returns (lines or None, note).  QEMU may still hold the image's lock for a
    moment after VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, so retry for a few seconds
    before falling back to ``qemu-img -U`` (force share).
    """
    raw = tmp / "backup.raw"
    note = ""
    try:
        t = time.monotonic()
        while True:
            p = subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                capture_output=True,
                text=True,
            )
            if p.returncode == 0:
                if time.monotonic() - t > 0.05:
                    note = f"image lock released {time.monotonic() - t:.2f}s after the event"
                break
            if time.monotonic() - t > 5:
                note = f"image still locked after 5s ({p.stderr.strip()[:80]}); used -U"
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                    check=True,
                    capture_output=True,
                )
                break
            time.sleep(0.1)
        d = subprocess.run(
            ["debugfs", "-R", "cat /ticks", str(raw)], check=True, capture_output=True, text=True
        )
        return d.stdout.splitlines(), note
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"{note} {e}"
    finally:
        raw.unlink(missing_ok=True)


def blockjob_str(ev: tuple[Any, ...] | None) -> str:
    if ev is None:
        return "no event"
    disk, typ, status = ev
    types = {
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    }
    states = {
        libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "COMPLETED",
        libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "FAILED",
        libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "CANCELED",
        libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "READY",
    }
    return f"{disk} {types.get(typ, typ)} {states.get(status, status)}"


def with_suppress(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        fn()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help=f"kit cache (default {default_cache_dir()})"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (console log, images)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
