"""Helpers shared by the real-QEMU proof modules (tests/test_qemu_*.py); not a test module.

Guest facts are read through the guest agent (``qemu-ga``), domain facts through the raw
libvirt domain or statecapture's public API, so a test asserts on the real state.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import statecapture
from tests._raw import raw_domain


def raw(dom: statecapture.Domain) -> Any:
    """The domain's :class:`libvirt.virDomain`."""
    return raw_domain(dom)


@contextlib.contextmanager
def module_guest(
    conn: statecapture.Connection, kit: Any, tmp: Path, tag: str
) -> Iterator[tuple[statecapture.Domain, Path]]:
    """One running guest with one 32 MiB qcow2 data disk (``tmp/images/disk0.qcow2``) and a
    connected agent, shared by a module's tests; yields it and its image. Afterwards it is
    destroyed and undefined whatever a test left (a job, a freeze, a long agent timeout,
    snapshot and checkpoint metadata)."""
    from statecapture.testing import wait_agent
    from statecapture.testing.kit import domain_xml, make_data_disk

    image_dir = tmp / "images"
    image_dir.mkdir()
    image = make_data_disk(image_dir / "disk0.qcow2", size_mib=32)
    dom = conn.define(
        domain_xml(f"sc-{os.getpid()}-{tag}", kit, [image], log_path=tmp / "console.log")
    )
    try:
        dom.start()
        wait_agent(dom, timeout=180)
        yield dom, image
    finally:
        for undo in (
            lambda: raw(dom).agentSetResponseTimeout(5, 0),
            lambda: raw(dom).abortJob(),
            lambda: raw(dom).fsThaw(None, 0),
            dom.destroy,
            lambda: dom.undefine(snapshots_metadata=True, checkpoints_metadata=True),
        ):
            with contextlib.suppress(Exception):
                undo()


def remove_domains(conn: statecapture.Connection) -> None:
    """Destroy and undefine every domain of ``conn``, whatever a run left (a job, a freeze,
    snapshot and checkpoint metadata); a child process's teardown."""
    for dom in conn.domains():
        raw_dom = raw(dom)
        with contextlib.suppress(Exception):
            raw_dom.abortJob()
        with contextlib.suppress(Exception):
            raw_dom.fsThaw(None, 0)
        for _ in range(20):
            try:
                if dom.is_active:
                    dom.destroy()
                break
            except statecapture.StateCaptureError:
                time.sleep(0.5)
        with contextlib.suppress(statecapture.StateCaptureError):
            dom.undefine(snapshots_metadata=True, checkpoints_metadata=True)


def agent(dom: statecapture.Domain, command: str, timeout: int = 10, **arguments: Any) -> Any:
    """One guest-agent command; its ``return`` member."""
    from statecapture.testing import agent_command

    payload: dict[str, Any] = {"execute": command}
    if arguments:
        payload["arguments"] = arguments
    return agent_command(dom, payload, timeout=timeout)


def guest_frozen(dom: statecapture.Domain) -> str:
    """qemu-ga's own view, ``"frozen"`` or ``"thawed"`` (answered even while frozen)."""
    return str(agent(dom, "guest-fsfreeze-status"))


def spawn(dom: statecapture.Domain, script: str) -> None:
    """Start a shell script in the guest without waiting for it."""
    agent(dom, "guest-exec", path="sh", arg=["-c", script])


def sh(dom: statecapture.Domain, script: str, timeout: float = 60) -> str:
    """Run a shell script in the guest; its stdout (fails the test on a non-zero exit)."""
    from statecapture.testing import guest_exec

    code, out, err = guest_exec(dom, ["sh", "-c", script], timeout=timeout)
    assert code == 0, f"{script}: {err.decode()}"
    return out.decode()


def md5s(text: str) -> list[str]:
    return re.findall(r"\b[0-9a-f]{32}\b", text)


def write_known(dom: statecapture.Domain, name: str, blocks: int = 8) -> str:
    """Write ``/data/<name>`` (random, ``blocks`` x 64 KiB) in the guest, synced; its md5."""
    out = sh(
        dom,
        f"dd if=/dev/urandom of=/data/{name} bs=64k count={blocks} 2>/dev/null; sync; "
        f"md5sum /data/{name}",
    )
    return md5s(out)[0]


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def file_md5_in_image(image: Path | str, name: str, tmp: Path) -> str:
    """md5 of ``/<name>`` in the ext4 filesystem of a (qcow2 or raw) image, read on the host."""
    flat = tmp / f"flat-{os.getpid()}-{abs(hash((str(image), name)))}.raw"
    qemu_img("convert", "-U", "-O", "raw", str(image), str(flat))
    out = tmp / f"{flat.name}.{name}"
    try:
        subprocess.run(
            ["debugfs", "-R", f"dump /{name} {out}", str(flat)], check=True, capture_output=True
        )
        import hashlib

        return hashlib.md5(out.read_bytes()).hexdigest()
    finally:
        flat.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def flush_disk(dom: statecapture.Domain, target: str) -> None:
    """Make QEMU write its cached qcow2 metadata of ``target`` (HAZARDS 15)."""
    import libvirt_qemu
    from lxml import etree

    root = etree.fromstring(dom.xml().encode())
    for disk in root.iter("disk"):
        t, alias = disk.find("target"), disk.find("alias")
        if t is not None and alias is not None and t.get("dev") == target:
            libvirt_qemu.qemuMonitorCommand(raw(dom), f'qemu-io -d {alias.get("name")} "flush"', 1)
            return
    raise AssertionError(f"no live alias for disk {target}")


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (created) for the block; unmounted after."""
    path.mkdir(exist_ok=True)
    opts = ",".join(("size=4m", "mode=0700", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
