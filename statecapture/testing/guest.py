"""Test guests: the kit booted on an :class:`~statecapture.testing.EmbeddedHypervisor`.

A :class:`TestGuest` owns one persistent domain, its data disks and its console log. Its
methods reach the guest through qemu-guest-agent (``guest-exec``, ``guest-file-*``), so
a test can write data in the guest, back it up with statecapture, and compare.

While a filesystem is frozen qemu-ga refuses everything but ``guest-ping``,
``guest-info``, ``guest-sync*``, ``guest-fsfreeze-status`` and ``guest-fsfreeze-thaw``, so
:meth:`TestGuest.exec` and the file methods fail with
:class:`~statecapture.GuestAgentError` until the guest is thawed.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs
from lxml import etree

from .._domain import Domain
from .._ports import GuestPort
from ..errors import (
    CleanupError,
    GuestAgentError,
    GuestBootError,
    LibvirtError,
    OperationTimeoutError,
    StateCaptureError,
    TargetExistsError,
    UsageError,
)
from .kit import AGENT_CHANNEL, _detect_format, make_data_disk

if TYPE_CHECKING:  # pragma: no cover
    from .hypervisor import EmbeddedHypervisor

__all__ = [
    "TestGuest",
    "agent_command",
    "guest_exec",
    "read_guest_file",
    "write_guest_file",
]

# Largest chunk asked for per guest-file-read.
_READ_CHUNK = 1 << 20
# Largest chunk sent per guest-file-write: qemu-ga parses JSON slowly under TCG, and
# qemu-ga 7.2 hangs on a guest-file-write payload above ~128 KiB.
_WRITE_CHUNK = 48 << 10
# How much of the console log a boot error carries.
_CONSOLE_TAIL = 4000

_names = itertools.count(1)


# --------------------------------------------------------------------------- agent helpers
# They take the domain's port (GuestPort); TestGuest and the Domain helpers below are the
# public face.


def agent_channel_state(vir: GuestPort) -> str | None:
    """State of the agent channel in the live XML: ``"connected"``, ``"disconnected"``,
    or ``None`` when libvirt does not report it."""
    try:
        root = etree.fromstring(vir.xml_desc().encode())
    except StateCaptureError:  # a vanished domain simply has no connected agent
        return "disconnected"
    for tgt in root.iterfind("./devices/channel/target"):
        if tgt.get("name") == AGENT_CHANNEL:
            return tgt.get("state")
    return "disconnected"


def wait_for_agent(vir: GuestPort, timeout: float) -> float:
    """Poll ``guest-ping`` until the agent answers; return the seconds waited.

    Pings only once the live XML shows the channel connected. Raises
    :class:`~statecapture.GuestBootError` (``timed_out`` True) after *timeout* seconds and
    (``timed_out`` False) when the domain stops meanwhile.
    """
    start = time.monotonic()
    deadline = start + timeout
    last: Exception | None = None
    while True:
        if agent_channel_state(vir) in ("connected", None):
            try:
                vir.agent_command({"execute": "guest-ping"}, timeout=5)
                return time.monotonic() - start
            except GuestAgentError as exc:
                last = exc
        elif not vir.is_active():
            raise GuestBootError(
                f"domain {vir.name} stopped while waiting for its guest agent",
                domain_name=vir.name,
                timed_out=False,
                remedy="read the guest's console log (attached) for the kernel's last words",
            )
        if time.monotonic() >= deadline:
            raise GuestBootError(
                f"the guest agent of {vir.name} did not answer within {timeout:g} s",
                domain_name=vir.name,
                timed_out=True,
                remedy="give the boot more time (TCG guests boot in 6-50 s on a busy host) "
                "and read the console log (attached)",
            ) from last
        time.sleep(0.1)


def run_in_guest(
    vir: GuestPort, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60
) -> tuple[int, bytes, bytes]:
    """Run *argv* in the guest through ``guest-exec``; ``(exit code, stdout, stderr)``.

    A process killed by signal N yields exit code ``-N``. Raises
    :class:`~statecapture.OperationTimeoutError` when it is still running after *timeout*
    seconds (it is left running in the guest).
    """
    if not argv:
        raise UsageError("argv must not be empty")
    per_call = max(5, min(int(timeout), 30))
    arguments: dict[str, Any] = {
        "path": argv[0],
        "arg": list(argv[1:]),
        "capture-output": True,
    }
    if input is not None:
        arguments["input-data"] = base64.b64encode(input).decode()
    res = vir.agent_command({"execute": "guest-exec", "arguments": arguments}, timeout=per_call)
    pid = res["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = vir.agent_command(
            {"execute": "guest-exec-status", "arguments": {"pid": pid}}, timeout=per_call
        )
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", ""))
            err = base64.b64decode(st.get("err-data", ""))
            if "exitcode" in st:
                code = int(st["exitcode"])
            else:
                code = -int(st.get("signal", 0))
            return code, out, err
        if time.monotonic() >= deadline:
            raise OperationTimeoutError(
                f"guest command {list(argv)!r} (pid {pid}) still running after {timeout:g} s",
                operation="guest-exec",
                domain_name=vir.name,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def read_guest(vir: GuestPort, path: str, *, timeout: int = 10) -> bytes:
    """A whole guest file via ``guest-file-open/read/close`` (~2 MB/s under TCG)."""
    handle = vir.agent_command(
        {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}, timeout=timeout
    )
    chunks: list[bytes] = []
    try:
        while True:
            r = vir.agent_command(
                {
                    "execute": "guest-file-read",
                    "arguments": {"handle": handle, "count": _READ_CHUNK},
                },
                timeout=timeout,
            )
            chunks.append(base64.b64decode(r.get("buf-b64", "")))
            if r.get("eof") or not r.get("count"):
                break
    finally:
        vir.agent_command(
            {"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout=timeout
        )
    return b"".join(chunks)


def write_guest(vir: GuestPort, path: str, data: bytes, *, timeout: int = 10) -> None:
    """Create or truncate a guest file with *data* via ``guest-file-open/write/close``.

    Sent in 48 KiB chunks (~300 KB/s under TCG): put bulk data on a data disk with
    ``files=`` instead.
    """
    handle = vir.agent_command(
        {"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}, timeout=timeout
    )
    try:
        for i in range(0, len(data), _WRITE_CHUNK):
            chunk = base64.b64encode(data[i : i + _WRITE_CHUNK]).decode()
            vir.agent_command(
                {"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": chunk}},
                timeout=timeout,
            )
        vir.agent_command(
            {"execute": "guest-file-flush", "arguments": {"handle": handle}}, timeout=timeout
        )
    finally:
        vir.agent_command(
            {"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout=timeout
        )


def close_noting(close: Callable[[], object], exc: BaseException | None, what: str) -> None:
    """Run ``close``: its :class:`CleanupError` propagates, unless ``exc`` already does —
    then ``exc`` carries it as a note (a cleanup error never masks the original)."""
    try:
        close()
    except CleanupError as cleanup:
        if exc is None:
            raise
        exc.add_note(f"{what} also failed: {cleanup}")


def remove_domain(dom: Domain) -> None:
    """Stop everything a test may have left on the domain, then undefine it.

    Aborts a backup job and block jobs, thaws (with a short agent timeout: a dead agent
    behind a "connected" channel would block the thaw), destroys, drops snapshot and
    checkpoint metadata, undefines. Each step may fail on a half-dead guest without stopping
    the next; raises :class:`~statecapture.CleanupError` naming the failed steps only when
    the domain is still defined at the end.
    """
    vir = dom.port
    failures: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # best effort: the next step may still succeed
            failures.append(f"{what}: {exc}")

    targets: list[str] = []
    with contextlib.suppress(Exception):
        root = etree.fromstring(vir.xml_desc().encode())
        targets = [t.get("dev", "") for t in root.iterfind("./devices/disk/target")]
    if _safe_bool(vir.is_active):
        step("abort job", vir.backup_abort_job)
        for target in targets:
            step(f"abort block job {target}", functools.partial(vir.block_job_abort, target))
        step("agent timeout", lambda: vir.set_agent_timeout(5))
        step("thaw", vir.fs_thaw)
        step("destroy", vir.destroy)
    for snap in _safe_list(vir.snapshot_list):
        step("snapshot metadata", functools.partial(snap.delete, metadata_only=True))
    for cp in _safe_list(vir.list_checkpoints):
        step("checkpoint metadata", functools.partial(cp.delete, metadata_only=True))
    step(
        "undefine",
        lambda: vir.undefine(managed_save=True, snapshots_metadata=True, checkpoints_metadata=True),
    )
    try:
        still = vir.name in {d.name for d in dom.connection.port.list_domains()}
    except Exception as exc:
        still, failures = True, [*failures, f"list domains: {exc}"]
    if still:
        raise CleanupError(f"domain {vir.name} still defined after teardown: {failures}")


def _safe_bool(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False


def _safe_list(fn: Callable[[], list[Any]]) -> list[Any]:
    try:
        return list(fn())
    except Exception:
        return []


# --------------------------------------------------------------------------- on any Domain


def agent_command(domain: Domain, command: Mapping[str, Any], *, timeout: int = 10) -> Any:
    """Send one guest-agent command (a QMP-style dict such as ``{"execute": "guest-ping"}``)
    to *domain* and return its ``"return"`` member.

    For agent commands libvirt has no API for (libvirt marks the domain tainted with
    ``custom-ga-command``). Raises :class:`~statecapture.GuestAgentError` when the agent is
    missing, does not answer within *timeout* seconds, or answers with an error.
    """
    return domain.port.agent_command(dict(command), timeout=timeout)


def guest_exec(
    domain: Domain, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60
) -> tuple[int, bytes, bytes]:
    """Run *argv* in *domain*'s guest through its agent; ``(exit code, stdout, stderr)``.

    What :meth:`TestGuest.exec` does, for any running :class:`~statecapture.Domain` with a
    connected guest agent.
    """
    return run_in_guest(domain.port, argv, input=input, timeout=timeout)


def wait_agent(domain: Domain, *, timeout: float = 300) -> float:
    """Poll ``guest-ping`` on *domain* until its guest agent answers; the seconds waited.

    The test kit's variant of :meth:`Domain.wait_for_agent
    <statecapture.Domain.wait_for_agent>` (which also waits until a command goes through):
    it pings with ``guest-ping`` and raises the kit's boot error instead. Raises
    :class:`~statecapture.GuestBootError` (``timed_out`` True) after *timeout* seconds, and
    (``timed_out`` False) when the domain stops meanwhile.
    """
    return wait_for_agent(domain.port, timeout)


def read_guest_file(domain: Domain, path: str, *, timeout: int = 30) -> bytes:
    """A whole file of *domain*'s guest, read through its agent."""
    return read_guest(domain.port, path, timeout=timeout)


def write_guest_file(domain: Domain, path: str, data: bytes, *, timeout: int = 30) -> None:
    """Create or replace a file in *domain*'s guest with *data*, through its agent."""
    write_guest(domain.port, path, bytes(data), timeout=timeout)


# --------------------------------------------------------------------------- TestGuest


def _per_disk(value: Any, count: int, what: str) -> list[Any]:
    if isinstance(value, (str, int)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise UsageError(f"{what} has {len(values)} entries for {count} disks")
    return values


@attrs.define(eq=False)
class TestGuest:
    """A real test guest on an embedded QEMU root; destroyed and undefined on close.

    Boot one with :meth:`EmbeddedHypervisor.guest()
    <statecapture.testing.EmbeddedHypervisor.guest>` (or :meth:`boot`). The guest is the
    kit's busybox Linux under TCG with 256 MiB, one vCPU and ``disks`` ext4 data disks:
    ``vda`` is mounted at ``/data``, ``vdb`` at ``/data1`` ... . It appends a tick line to
    ``/data/ticks`` every 0.1 s (a live writer for consistency tests). With ``agent=True``
    qemu-ga answers before :meth:`boot` returns.

    Use it as a context manager (or call :meth:`close`): the domain is destroyed and
    undefined with its snapshot and checkpoint metadata, jobs are aborted, a frozen guest
    is thawed, and the guest's own work directory is removed.
    """

    __test__ = False  # not a pytest test class, despite the name

    hypervisor: EmbeddedHypervisor
    """The embedded hypervisor the guest runs on."""
    domain: Domain
    """The guest as a statecapture :class:`~statecapture.Domain`."""
    disk_paths: tuple[Path, ...]
    """The data disk images, in target order (``vda``, ``vdb`` ...)."""
    console_log_path: Path
    """The serial console log (kernel and init messages)."""
    workdir: Path
    """The directory holding the disks and the console log."""
    agent: bool = True
    """Whether the guest has a guest-agent channel."""
    _owns_workdir: bool = attrs.field(default=False, repr=False)
    _closed: bool = attrs.field(default=False, repr=False)

    @classmethod
    def boot(
        cls,
        hypervisor: EmbeddedHypervisor,
        *,
        name: str | None = None,
        disks: int = 1,
        size_mib: int | Sequence[int] = 64,
        fmt: str | Sequence[str] = "qcow2",
        agent: bool = True,
        start: bool = True,
        files: Mapping[str, bytes] | None = None,
        images: Sequence[str | os.PathLike[str]] | None = None,
        memory_mib: int = 256,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 300,
    ) -> TestGuest:
        """Define (and unless ``start=False``, boot) a test guest on *hypervisor*.

        Args:
            name: domain name (default ``sc-<pid>-<n>``).
            disks: how many ext4 data disks (0 to 26).
            size_mib: disk size in MiB (at least 8), one value or one per disk.
            fmt: ``"qcow2"`` or ``"raw"``, one value or one per disk.
            agent: give the guest a qemu-guest-agent channel (and wait for the agent).
            start: ``False`` leaves the guest defined and shut off.
            files: relative path -> content, written into the first disk's filesystem
                (fast bulk data; appears under ``/data`` in the guest).
            images: boot from these existing disk images instead of fresh ones (e.g. a
                restored backup: ``images=[restored]``); qcow2 or raw, detected from the
                file. They are used in place and never removed; ``disks``, ``size_mib``,
                ``fmt`` and ``files`` do not apply.
            workdir: directory for the disks and the console log (created files must not
                exist yet); default a fresh owner-only directory of the hypervisor's,
                removed on close.
            timeout: seconds to wait for the agent after start.

        Raises:
            UsageError: a bad option (before anything is created).
            TargetExistsError: a disk image or log in *workdir* exists already.
            GuestBootError: the agent did not answer in time or the guest stopped; the
                console log is attached and nothing is left defined.
        """
        given: list[Path] = []
        if images is not None:
            if files:
                raise UsageError("files= cannot be combined with images=")
            given = [Path(p).absolute() for p in images]
            for p in given:
                if not p.is_file():
                    raise UsageError(f"disk image {p} is not a file")
            disks = len(given)
            fmt = [_detect_format(p) for p in given]
            size_mib = 8
        if not 0 <= disks <= 26:
            raise UsageError("disks must be between 0 and 26")
        sizes = [int(s) for s in _per_disk(size_mib, disks, "size_mib")]
        formats = [str(f) for f in _per_disk(fmt, disks, "fmt")]
        for s in sizes:
            if s < 8:
                raise UsageError("size_mib must be at least 8")
        for f in formats:
            if f not in ("qcow2", "raw"):
                raise UsageError(f"fmt must be 'qcow2' or 'raw', not {f!r}")
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        conn = hypervisor.connection
        kit = hypervisor.kit
        if kit is None:  # pragma: no cover - an open hypervisor always has its kit
            raise UsageError("the EmbeddedHypervisor has no guest kit")
        name = name or f"sc-{os.getpid()}-{next(_names)}"
        owns = workdir is None
        with contextlib.ExitStack() as undo:
            if workdir is None:
                wd = hypervisor.workdir / name
                try:
                    wd.mkdir(mode=0o700)
                except FileExistsError as exc:
                    raise TargetExistsError(
                        f"work directory {wd} exists (guest name {name!r} in use?)", path=str(wd)
                    ) from exc
                undo.callback(shutil.rmtree, wd, ignore_errors=True)
            else:
                wd = Path(workdir).absolute()
            made = [] if given else [wd / f"{name}-disk{i}.{formats[i]}" for i in range(disks)]
            log = wd / f"{name}.console.log"
            for p in [*made, log]:
                if p.exists() or p.is_symlink():
                    raise TargetExistsError(f"{p} exists already", path=str(p))
            for i, path in enumerate(made):
                make_data_disk(
                    path,
                    size_mib=sizes[i],
                    fmt=formats[i],
                    files=dict(files) if (files and i == 0) else None,
                )
                if not owns:
                    undo.callback(path.unlink, missing_ok=True)
            disk_paths = given or made
            xml = kit.domain_xml(
                name,
                disk_paths,
                agent=agent,
                memory_mib=memory_mib,
                log_path=log,
                disk_formats=formats,
            )
            domain = conn.define(xml)
            guest = cls(
                hypervisor,
                domain,
                tuple(disk_paths),
                log,
                wd,
                agent,
                owns_workdir=owns,
            )

            def undo_guest(
                exc_type: type[BaseException] | None,
                exc: BaseException | None,
                tb: TracebackType | None,
            ) -> bool:
                close_noting(guest._remove, exc, f"removing test guest {name}")
                return False

            undo.push(undo_guest)
            if start:
                guest.start(timeout=timeout)
            hypervisor._adopt(guest)
            undo.pop_all()
        return guest

    # ---- lifecycle
    @property
    def name(self) -> str:
        """The domain name."""
        return self.domain.name

    def start(self, *, timeout: float = 300) -> None:
        """Start the (shut-off) guest and, with an agent, wait until it answers.

        Raises :class:`~statecapture.GuestBootError` with the console log attached when
        the agent does not answer within *timeout* seconds (the guest is left shut off).
        """
        self._check_open()
        self.domain.start()
        if self.agent:
            self.wait_agent(timeout=timeout)

    def wait_agent(self, *, timeout: float = 300) -> float:
        """Wait until the guest agent answers (after a start, restore or revert); seconds
        waited. Raises :class:`~statecapture.GuestBootError` (console log attached) and
        destroys the domain when it does not answer in time."""
        self._check_open()
        try:
            return wait_for_agent(self.domain.port, timeout)
        except GuestBootError as exc:
            with contextlib.suppress(Exception):
                if self.domain.is_active:
                    self.domain.destroy()
            raise GuestBootError(
                str(exc.args[0]) if exc.args else str(exc),
                domain_name=exc.domain_name,
                console_log=self.console_log()[-_CONSOLE_TAIL:],
                timed_out=exc.timed_out,
                remedy=exc.remedy,
            ) from exc.__cause__

    def console_log(self) -> str:
        """The guest's serial console output so far (empty when there is none yet)."""
        try:
            return self.console_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Destroy and undefine the guest (jobs aborted, thawed, metadata dropped), and
        remove its work directory when the hypervisor made it. Idempotent. Raises
        :class:`~statecapture.CleanupError` when the domain is still defined afterwards."""
        if self._closed:
            return
        self._closed = True
        try:
            self._remove()
        finally:
            self.hypervisor._forget(self)

    def detach(self) -> None:
        """Forget the guest without touching it: it keeps running (for ``up``)."""
        self._closed = True
        self.hypervisor._forget(self)

    def _remove(self) -> None:
        try:
            remove_domain(self.domain)
        finally:
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"test guest {self.name} is closed")

    def __enter__(self) -> TestGuest:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        close_noting(self.close, exc, f"closing test guest {self.name}")

    # ---- in the guest
    def exec(
        self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60
    ) -> tuple[int, bytes, bytes]:
        """Run *argv* in the guest through the agent; ``(exit code, stdout, stderr)``.

        ``argv[0]`` is looked up in the guest's ``PATH`` (busybox applets: ``sh``, ``dd``,
        ``sha256sum``, ``sync`` ...). *input* is fed to its stdin. A process killed by
        signal N yields exit code ``-N``. Raises
        :class:`~statecapture.OperationTimeoutError` after *timeout* seconds and
        :class:`~statecapture.GuestAgentError` when the agent cannot run it (e.g. while
        the guest is frozen).
        """
        self._check_open()
        return run_in_guest(self.domain.port, argv, input=input, timeout=timeout)

    def write(self, path: str, data: bytes) -> None:
        """Create or replace the guest file *path* with *data* (through the agent).

        Slow for bulk data (~300 KB/s under TCG); use ``files=`` at boot or ``exec`` with
        ``dd`` for more than a few MiB. Call :meth:`sync` before capturing.
        """
        self._check_open()
        write_guest(self.domain.port, path, bytes(data), timeout=30)

    def read(self, path: str) -> bytes:
        """The content of the guest file *path* (through the agent)."""
        self._check_open()
        return read_guest(self.domain.port, path, timeout=30)

    def sha256(self, path: str) -> str:
        """Hex SHA-256 of the guest file *path*, computed in the guest."""
        code, out, err = self.exec(["sha256sum", path], timeout=300)
        if code != 0:
            raise GuestAgentError(
                f"sha256sum {path} in {self.name} failed ({code}): {err.decode(errors='replace')}",
                operation="guest-exec",
                domain_name=self.name,
            )
        return out.split()[0].decode()

    def sync(self) -> None:
        """Flush the guest's page cache to its disks (``sync`` in the guest)."""
        code, _out, err = self.exec(["sync"], timeout=300)
        if code != 0:  # pragma: no cover - busybox sync does not fail
            raise GuestAgentError(
                f"sync in {self.name} failed: {err.decode(errors='replace')}",
                operation="guest-exec",
                domain_name=self.name,
            )

    def flush_host_images(self) -> None:
        """Make QEMU write its cached image state (qcow2 metadata) back to the disk files.

        QEMU keeps qcow2 L2 tables and refcounts in memory, so a process outside QEMU that
        reads a running guest's image (``qemu-img``, a checksum, an NBD export of the file)
        can see stale metadata. This flushes every disk through the QEMU monitor (HMP
        ``qemu-io libvirt-<n>-format "flush"``). For a byte-exact compare, :meth:`sync` first and
        keep the guest from writing (``guest.domain.suspend()``): the tick writer never
        stops on its own. A shut-off guest has nothing cached; nothing is done.
        """
        self._check_open()
        vir = self.domain.port
        if not vir.is_active():
            return
        root = etree.fromstring(vir.xml_desc().encode())
        for disk in root.iterfind("./devices/disk"):
            source = disk.find("source")
            index = source.get("index") if source is not None else None
            if not index:
                continue
            node = f"libvirt-{index}-format"  # libvirt's node name of the active layer
            out = vir.hmp_command(f'qemu-io {node} "flush"')
            if out.strip():
                raise LibvirtError(
                    f"flushing {node} of {self.name} failed: {out.strip()}",
                    operation="flush host images",
                    domain_name=self.name,
                )
