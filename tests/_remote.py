"""A private ``libvirtd`` and a loopback ``sshd`` for the qemu+ssh:// tests (not a test module).

Everything lives in one temporary directory ``base`` and every process is killed at the end:

* ``libvirtd`` runs as the system daemon (root), in a private mount namespace where ``/etc``
  and ``/var`` are overlays whose writable layers are in ``base`` (so its ``qemu.conf`` —
  ``user = "root"``, no cgroups, no virtlogd — and its state never touch the machine's
  ``/etc`` or ``/var``) and ``/run/libvirt`` is a private tmpfs. Its sockets are in
  ``base/sock`` (``unix_sock_dir``), reachable from outside the namespace.
* ``sshd`` listens on ``127.0.0.1:<free port>`` only, with a host key generated for the
  run; root may log in with a generated key only (no password, no PAM). Its privilege
  separation directory ``/run/sshd`` exists only inside its own private mount namespace
  (``/run`` is an overlay there).
* The client side: the URI names the socket (``socket=``), the key (``keyfile=``), ``nc``
  as the remote proxy (``proxy=netcat``), and an ``ssh`` wrapper (``command=``) that checks
  the host key against a ``known_hosts`` file in ``base`` — real verification, nothing
  written to ``~/.ssh``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = "/usr/sbin/sshd"
LIBVIRTD = "/usr/sbin/libvirtd"


def available() -> str | None:
    """Why the remote tests cannot run here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root (a system libvirtd and an sshd with root login)"
    for tool in (SSHD, LIBVIRTD, "ssh", "ssh-keygen", "nc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-deps.sh installs it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what}: {path} did not appear in {timeout} s")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on 127.0.0.1:{port} in {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


QEMU_CONF = """\
# the private libvirtd of statecapture's remote tests
user = "root"
group = "root"
stdio_handler = "file"
remember_owner = 0
cgroup_controllers = [ ]
security_driver = "none"
"""


@contextlib.contextmanager
def libvirtd(base: Path) -> Iterator[Path]:
    """Run a private system ``libvirtd``; yields its read-write socket path."""
    for d in ("etc-up", "etc-work", "var-up", "var-work", "sock"):
        (base / d).mkdir(mode=0o700)
    conf = base / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{base / "sock"}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        f'log_outputs = "3:file:{base / "libvirtd.log"}"\n'
    )
    script = (
        "set -e\n"
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={base}/etc-up,"
        f"workdir={base}/etc-work /etc\n"
        f"mount -t overlay overlay -o lowerdir=/var,upperdir={base}/var-up,"
        f"workdir={base}/var-work /var\n"
        "mount -t tmpfs -o mode=0755 tmpfs /run/libvirt\n"
        "mkdir -p /etc/libvirt\n"
        f"cat > /etc/libvirt/qemu.conf <<'EOF'\n{QEMU_CONF}EOF\n"
        f"exec {LIBVIRTD} --config {conf}\n"
    )
    log = open(base / "libvirtd.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sock = base / "sock" / "libvirt-sock"
    try:
        _wait_for(sock, proc, "libvirtd", 60)
        yield sock
    finally:
        _stop(proc)
        log.close()
        _kill_guests(base)


def _kill_guests(base: Path) -> None:
    """Safety net: QEMU processes outlive the daemon; kill any whose command line names a
    file under ``base`` (the tests' guests keep their disks there)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"qemu-system" in cmd[0] and any(str(base).encode() in a for a in cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@contextlib.contextmanager
def sshd(base: Path) -> Iterator[tuple[int, Path, Path]]:
    """Run ``sshd`` on a loopback port; yields ``(port, client key, ssh wrapper)``."""
    d = base / "ssh"
    d.mkdir(mode=0o700)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True
    )
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = _free_port()
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "AllowTcpForwarding no\n"
        "X11Forwarding no\n"
        "PrintMotd no\n"
    )
    wrapper = d / "ssh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec ssh -o UserKnownHostsFile={d / 'known_hosts'} -o GlobalKnownHostsFile=/dev/null "
        '-o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes "$@"\n'
    )
    wrapper.chmod(0o700)
    for sub in ("run-up", "run-work"):
        (d / sub).mkdir(mode=0o700)
    script = (
        "set -e\n"
        f"mount -t overlay overlay -o lowerdir=/run,upperdir={d}/run-up,workdir={d}/run-work /run\n"
        "mkdir -p /run/sshd\n"
        f"exec {SSHD} -D -e -f {d / 'sshd_config'}\n"
    )
    log = open(base / "sshd.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_port(port, proc, 30)
        yield port, d / "id", wrapper
    finally:
        _stop(proc)
        log.close()


def ssh_uri(port: int, key: Path, wrapper: Path, sock: Path) -> str:
    """The ``qemu+ssh://`` URI of the private daemon through the loopback sshd."""
    return (
        f"qemu+ssh://root@127.0.0.1:{port}/system?socket={sock}&keyfile={key}"
        f"&command={wrapper}&proxy=netcat&netcat=nc&no_tty=1"
    )
