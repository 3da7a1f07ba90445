"""connect(), Connection, default URI rules, the event loop, events (fast tier)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import statecapture
from statecapture import DEFAULT_URI, EventKind, UsageError, XMLError, _adapter, resolve_uri


def test_default_uri_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """None → $LIBVIRT_DEFAULT_URI → test:///default; an explicit URI always wins."""
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert resolve_uri(None) == DEFAULT_URI == "test:///default"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///system")
    assert resolve_uri(None) == "qemu:///system"
    assert resolve_uri("test:///default") == "test:///default"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "   ")
    assert resolve_uri(None) == DEFAULT_URI
    with pytest.raises(UsageError):
        resolve_uri("")


def test_connect_default_opens_test_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no URI and no environment, connect() opens libvirt's test driver."""
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    with statecapture.connect() as conn:
        assert conn.uri == "test:///default"
        assert conn.driver.lower() == "test"
        assert "test" in [d.name for d in conn.domains()]


def test_connect_honours_environment(monkeypatch: pytest.MonkeyPatch, test_uri: str) -> None:
    """$LIBVIRT_DEFAULT_URI is used when no URI is passed."""
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", test_uri)
    with statecapture.connect() as conn:
        assert conn.uri == test_uri
        assert [d.name for d in conn.domains()] == ["alpha", "beta"]


def test_versions_report_daemon_and_library(test_conn: statecapture.Connection) -> None:
    """versions names the daemon's libvirt (the one that gates features) and the client's."""
    v = test_conn.versions
    assert v.daemon >= (1, 0)
    assert v.library >= (1, 0)
    assert v.driver.lower() == "test"
    assert str(v.daemon).count(".") == 2


def test_closed_connection_is_a_usage_error(test_uri: str) -> None:
    """Using a closed connection, or a handle made from it, raises UsageError."""
    conn = statecapture.connect(test_uri)
    dom = conn.domain("alpha")
    conn.close()
    conn.close()  # idempotent
    assert conn.closed
    with pytest.raises(UsageError, match="closed"):
        conn.domain("alpha")
    with pytest.raises(UsageError):
        conn.domains()
    with pytest.raises(UsageError):
        _ = dom.state
    with pytest.raises(UsageError), conn:
        pass


def test_unknown_domain_is_not_found(test_conn: statecapture.Connection) -> None:
    """Unknown names and UUIDs raise NotFoundError (a LookupError) with the name."""
    with pytest.raises(statecapture.NotFoundError, match="nosuch") as info:
        test_conn.domain("nosuch")
    assert isinstance(info.value, LookupError)
    with pytest.raises(statecapture.NotFoundError):
        test_conn.domain("00000000-0000-0000-0000-000000000000")
    with pytest.raises(UsageError):
        test_conn.domain("")


def test_lookup_by_uuid(test_conn: statecapture.Connection) -> None:
    """A domain can be found by UUID as well as by name."""
    alpha = test_conn.domain("alpha")
    assert test_conn.domain(alpha.uuid).name == "alpha"


def test_define_malformed_xml_changes_nothing(test_conn: statecapture.Connection) -> None:
    """Malformed XML raises XMLError with the line; no domain is defined."""
    before = [d.name for d in test_conn.domains()]
    with pytest.raises(XMLError) as info:
        test_conn.define("<domain type='test'>\n<name>gamma</name>\n<memory>1</memory>\n")
    assert info.value.line is not None
    assert [d.name for d in test_conn.domains()] == before


def test_define_and_undefine(test_conn: statecapture.Connection) -> None:
    """define() returns a Domain handle; undefine() removes it again."""
    beta = test_conn.domain("beta")
    xml = beta.definition.to_xml().replace("<name>beta</name>", "<name>gamma</name>")
    xml = xml.replace(beta.uuid, "11111111-2222-3333-4444-555555555555")
    dom = test_conn.define(xml)
    assert dom.name == "gamma" and dom.is_persistent and not dom.is_active
    dom.undefine()
    with pytest.raises(statecapture.NotFoundError):
        test_conn.domain("gamma")


def test_event_loop_started_once(test_uri: str) -> None:
    """Opening many connections registers libvirt's event loop exactly once, in one thread."""
    conns = [statecapture.connect(test_uri) for _ in range(3)]
    try:
        assert _adapter.event_loop_running()
        assert _adapter.event_loop_registrations() == 1
        assert not _adapter.ensure_event_loop()
        names = [t.name for t in threading.enumerate()]
        assert names.count("statecapture-libvirt-events") == 1
    finally:
        for c in conns:
            c.close()


def test_event_loop_registered_before_first_open() -> None:
    """In a fresh interpreter the loop is running before the first connection is open."""
    code = (
        "import statecapture, statecapture._adapter as a\n"
        "assert not a.event_loop_running()\n"
        "c = statecapture.connect('test:///default')\n"
        "assert a.event_loop_running() and a.event_loop_registrations() == 1\n"
        "c2 = statecapture.connect('test:///default')\n"
        "assert a.event_loop_registrations() == 1\n"
        "c.close(); c2.close(); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_events_are_dispatched_to_subscribers(test_conn: statecapture.Connection) -> None:
    """Lifecycle events reach subscribers for the domain they asked about."""
    alpha = test_conn.domain("alpha")
    seen: list[str] = []
    with test_conn.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=alpha.uuid) as exp:
        sub = test_conn.subscribe(
            lambda e: seen.append(e.detail["event"]), kind=EventKind.LIFECYCLE, domain=alpha
        )
        alpha.suspend()
        event = exp.wait(10)
        assert event.detail["event"] == "suspended"
        assert event.domain_name == "alpha"
        alpha.resume()
        assert exp.wait(10).detail["event"] == "resumed"
        sub.cancel()
    assert seen[:2] == ["suspended", "resumed"]


def test_failing_subscriber_does_not_stop_others(
    test_conn: statecapture.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that raises is logged (with its traceback); the other subscribers still
    get the event."""
    alpha = test_conn.domain("alpha")
    caplog.set_level(logging.ERROR, logger="statecapture.events")

    def broken(_e: statecapture.Event) -> None:
        raise RuntimeError("subscriber bug")

    with (
        test_conn.subscribe(broken, domain=alpha),
        test_conn.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=alpha.uuid) as exp,
    ):
        alpha.suspend()
        assert exp.wait(10).detail["event"] == "suspended"
        alpha.resume()
    failures = [r for r in caplog.records if r.name == "statecapture.events"]
    assert failures, "the subscriber's failure was not logged"
    assert all(r.levelno == logging.ERROR for r in failures)
    assert "event subscriber" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], RuntimeError)
    assert str(failures[0].exc_info[1]) == "subscriber bug"


def test_unclosed_connection_warns(test_uri: str) -> None:
    """A connection dropped without close() emits a ResourceWarning (and does no I/O)."""
    conn = statecapture.connect(test_uri)
    with pytest.warns(ResourceWarning):
        conn.__del__()
    conn.close()


def _private_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A libvirtd of our own, run as an unprivileged user, with its socket under ``tmp``
    (a directory that user can reach: pytest's tmp_path sits below a 0700 directory)."""
    libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not os.path.exists(libvirtd):
        pytest.skip("needs root, setpriv and libvirtd to run a private daemon")
    home = tmp / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    proc = subprocess.Popen(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", libvirtd, "--timeout", "60"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = home / "run" / "libvirt" / "libvirt-sock"
    deadline = time.monotonic() + 120
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.skip("the private libvirtd did not start")
        time.sleep(0.1)
    return proc, f"test+unix:///default?socket={sock}"


def test_daemon_going_away_is_connection_lost() -> None:
    """HAZARDS 22: when the daemon behind a connection exits (a restart), every later call
    raises ConnectionLostError — not a generic LibvirtError ("client socket is closed")."""
    # Under /tmp itself: the daemon runs as nobody and must reach its socket directory.
    top = Path(tempfile.mkdtemp(prefix="sc-lvd-", dir="/tmp"))
    top.chmod(0o711)
    try:
        _lose_connection(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _lose_connection(top: Path) -> None:
    proc, uri = _private_daemon(top)
    try:
        conn = statecapture.connect(uri)
        try:
            dom = conn.domain("test")
            assert dom.is_active
            proc.terminate()
            proc.wait(timeout=60)
            deadline = time.monotonic() + 60
            while conn.is_alive and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(statecapture.ConnectionLostError) as info:
                _ = dom.state
            assert "socket is closed" in (info.value.libvirt_message or "")
            with pytest.raises(statecapture.ConnectionLostError):
                conn.domains()
            with pytest.raises(statecapture.ConnectionLostError):
                dom.definition  # noqa: B018
        finally:
            conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_unknown_uri_scheme_is_unsupported_not_connection_lost(tmp_path: Path) -> None:
    """A URI no libvirt driver handles raises UnsupportedError naming the URI: no connection
    existed, so it is not a ConnectionLostError (libvirt reports it as NO_CONNECT)."""
    uri = f"bogus:///embed?root={tmp_path}"
    with pytest.raises(statecapture.UnsupportedError, match="no libvirt driver handles") as info:
        statecapture.connect(uri)
    assert not isinstance(info.value, statecapture.ConnectionLostError)
    assert uri in str(info.value)
    assert info.value.code == 5  # VIR_ERR_NO_CONNECT
    assert "no connection driver available" in (info.value.libvirt_message or "")


def test_unknown_domain_error_lists_what_exists(test_conn: statecapture.Connection) -> None:
    """NotFoundError for an unknown domain lists the domains that exist and suggests the
    closest name."""
    with pytest.raises(statecapture.NotFoundError) as info:
        test_conn.domain("alpah")
    message = str(info.value)
    assert "did you mean 'alpha'?" in message
    assert "existing domains: alpha, beta" in message
