"""Shared fixtures: the fast tier (libvirt's test driver) and the real tier (embedded QEMU).

Fast tier
    ``test_conn`` opens a *private* test-driver instance (``test:///<tmp>/node.xml``): each
    test gets its own state, unlike ``test:///default`` which is shared process-wide.
    ``test_domain`` is a running, persistent domain ``alpha`` with one qcow2 disk ``vda``
    and a guest-agent channel.

Real tier (tests marked ``qemu``)
    One embedded QEMU root per pytest process (libvirt allows one per process), opened once
    as ``qemu_conn`` (``statecapture.testing.EmbeddedHypervisor``). ``guest_factory`` boots the
    tiny test guest built from Debian packages (``statecapture.testing``) under TCG, waits
    for its agent, and always destroys and undefines it — together with snapshot/checkpoint
    metadata and block/backup jobs — afterwards.
    Set ``STATECAPTURE_SKIP_QEMU=1`` to skip that tier on a machine without QEMU. Under
    ``CI=true`` the session refuses that variable (usage error) and fails when any test is
    skipped (CI installs every dependency); it prints ``statecapture real tier: ran N,
    skipped M``, which ``.ci/run`` checks.

Isolation (every run)
    ``tempfile``'s directory is a private directory for the session (pytest's own ``tmp_path``
    tree stays where it was). At session end the run FAILS (exit status 1) when that
    directory is not empty, when a tracked directory (embed roots ...) still exists, when a
    domain a fixture made is still defined, or when a ``qemu-system``/``qemu-nbd`` process
    started by this session still runs (``tests/_isolation.py``).

Hypothesis
    Profile ``dev`` (the default) and ``ci`` (more examples; selected when ``CI=true``, or
    with ``--hypothesis-profile=ci``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import statecapture
from tests import _isolation as isolation

settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

TEST_NODE_XML = """<node>
<domain type='test'>
  <name>alpha</name>
  <uuid>b17b8f4e-843d-4007-8ae3-070cc145c820</uuid>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/statecapture-test/alpha.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/statecapture-test/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
<domain type='test'>
  <name>beta</name>
  <uuid>3f0c7b4e-2a1d-4c55-9e4b-6f1f0e0a9b01</uuid>
  <memory unit='KiB'>524288</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/statecapture-test/beta.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
</node>
"""


# ----------------------------------------------------------------------------- fast tier


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    """URI of a private test-driver instance with domains ``alpha`` (running) and ``beta``."""
    node = tmp_path / "node.xml"
    node.write_text(TEST_NODE_XML)
    return f"test://{node}"


@pytest.fixture
def test_conn(test_uri: str) -> Iterator[statecapture.Connection]:
    with statecapture.connect(test_uri) as conn:
        yield conn


@pytest.fixture
def test_domain(test_conn: statecapture.Connection) -> statecapture.Domain:
    return test_conn.domain("alpha")


# ----------------------------------------------------------------------------- real tier


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _qemu_skip_reason() -> str | None:
    if os.environ.get("STATECAPTURE_SKIP_QEMU") == "1":
        return "STATECAPTURE_SKIP_QEMU=1"
    return None


_SESSION_TMP: list[Path] = []  # the private tempfile directory of this session
_REAL_TIER = {"ran": 0, "skipped": 0}
_SKIPPED: list[str] = []  # node ids of every skipped test (CI installs everything: none may skip)


def pytest_configure(config: pytest.Config) -> None:
    if _in_ci() and _qemu_skip_reason() is not None:
        raise pytest.UsageError(
            "CI=true with STATECAPTURE_SKIP_QEMU=1: CI must run the real QEMU tier; "
            "unset STATECAPTURE_SKIP_QEMU"
        )
    if _SESSION_TMP:
        return
    # pytest's tmp_path tree stays in the system temporary directory; everything else made
    # through tempfile (by statecapture or the tests) goes to a private directory that must
    # be empty at session end.
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    private = Path(tempfile.mkdtemp(prefix="sc-t-", dir=tempfile.gettempdir()))
    _SESSION_TMP.append(private)
    os.environ["TMPDIR"] = str(private)
    tempfile.tempdir = str(private)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _qemu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _SKIPPED.append(report.nodeid)
    if "qemu" not in report.keywords:
        return
    if report.skipped:
        _REAL_TIER["skipped"] += 1
    elif report.when == "call":
        _REAL_TIER["ran"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when the session left anything behind (or, in CI, skipped real tests)."""
    lines: list[str] = []
    if _SESSION_TMP:
        private = _SESSION_TMP[0]
        left = sorted(private.iterdir()) if private.is_dir() else []
        lines.extend(f"{p} left in the session's temporary directory" for p in left)
        if not left:
            with contextlib.suppress(OSError):
                private.rmdir()
    lines.extend(isolation.problems(search=_SESSION_TMP))
    summary = f"statecapture real tier: ran {_REAL_TIER['ran']}, skipped {_REAL_TIER['skipped']}"
    if _in_ci() and _SKIPPED:
        lines.append(f"CI=true: tests were skipped ({summary}): {', '.join(_SKIPPED[:10])}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(summary)
        for line in lines:
            reporter.write_line(f"SESSION CHECK FAILED: {line}", red=True, bold=True)
    if lines and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def kit() -> Any:
    """The test guest's kernel and initramfs, built once from Debian packages and cached."""
    from statecapture.testing import GuestKit

    return GuestKit.ensure()


@pytest.fixture(scope="session")
def qemu_hypervisor(kit: Any) -> Iterator[Any]:
    """The session's :class:`statecapture.testing.EmbeddedHypervisor` (one root per process,
    under /tmp itself: socket paths below it must stay short). On close every domain in it
    is destroyed and undefined and the root is removed; what could not be removed is
    recorded for the session-end isolation check."""
    from statecapture.testing import EmbeddedHypervisor

    hv = EmbeddedHypervisor(kit=kit).open()
    isolation.track(hv.root)
    try:
        yield hv
    finally:
        try:
            hv.close()
        except statecapture.CleanupError as exc:
            isolation.record_leak(f"embedded hypervisor {hv.root}: {exc}")


@pytest.fixture(scope="session")
def qemu_root(qemu_hypervisor: Any) -> Path:
    """The embedded QEMU driver's root directory (one per pytest process)."""
    return Path(qemu_hypervisor.root)


@pytest.fixture(scope="session")
def qemu_uri(qemu_hypervisor: Any) -> str:
    return str(qemu_hypervisor.uri)


@pytest.fixture(scope="session")
def qemu_conn(qemu_hypervisor: Any) -> statecapture.Connection:
    conn: statecapture.Connection = qemu_hypervisor.connection
    return conn


GuestFactory = Callable[..., statecapture.Domain]


@pytest.fixture
def guest_factory(qemu_hypervisor: Any, tmp_path: Path) -> Iterator[GuestFactory]:
    """Boot test guests: ``guest_factory(disks=1, agent=True, fmt="qcow2", size_mib=64)``.

    Each guest is persistent, runs under TCG, has ``disks`` ext4 data disks (``vda`` mounted
    at ``/data`` in the guest, ``vdb`` at ``/data1`` ...), writes a tick line to
    ``/data/ticks`` every 0.1 s, and (with ``agent=True``) answers the guest agent before the
    factory returns. Everything made is destroyed and undefined afterwards
    (:class:`statecapture.testing.TestGuest` underneath; disks and console logs in
    ``tmp_path``); a guest still defined after that is recorded as a leak.
    """
    made: list[Any] = []
    counter = [0]

    def factory(
        *,
        disks: int = 1,
        agent: bool = True,
        fmt: str = "qcow2",
        size_mib: int = 64,
        start: bool = True,
        name: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> statecapture.Domain:
        counter[0] += 1
        name = name or f"sc-{os.getpid()}-{counter[0]}-{tmp_path.name[-12:]}"
        test_guest = qemu_hypervisor.guest(
            name=name,
            disks=disks,
            agent=agent,
            fmt=fmt,
            size_mib=size_mib,
            start=start,
            files=files,
            workdir=tmp_path,
        )
        made.append(test_guest)
        domain: statecapture.Domain = test_guest.domain
        return domain

    yield factory
    for test_guest in made:
        try:
            test_guest.close()
        except statecapture.CleanupError as exc:
            isolation.record_leak(str(exc))


@pytest.fixture
def guest(guest_factory: GuestFactory) -> statecapture.Domain:
    """One running test guest with one qcow2 data disk and a connected agent."""
    return guest_factory()
