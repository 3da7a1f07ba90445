"""Freeze promises proven on real QEMU (in this process; the signal and interpreter-exit
promises, which need a process of their own, are in ``tests/test_qemu_signals.py``).

One TCG guest with one data disk (``/data``) serves the module; every test must leave it
thawed (the ``fg`` fixture checks qemu-ga's own view after each test).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import statecapture
from statecapture import FreezeExpiredError, FreezeScope, FreezeStatus, UsageError, fs_frozen
from statecapture._freeze.held import _Freeze, _held_freezes
from statecapture.testing import wait_agent
from statecapture.testing.faults import inject
from tests._proof import agent, guest_frozen, module_guest, raw, sh, spawn

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def fguest1(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[statecapture.Domain]:
    """One running guest (data disk ``/data``) with a connected agent, for the module."""
    tmp = tmp_path_factory.mktemp("qfreeze")
    with module_guest(qemu_conn, kit, tmp, "qfreeze") as (dom, _image):
        yield dom


@pytest.fixture
def fg(fguest1: statecapture.Domain) -> Iterator[statecapture.Domain]:
    """The module's guest; the test fails (and the guest is thawed) when left frozen."""
    yield fguest1
    assert _held_freezes() == [], "a FreezeScope left its freeze registered"
    assert not [t for t in threading.enumerate() if t.name.startswith("statecapture-freeze")]
    status = guest_frozen(fguest1)
    if status != "thawed":
        raw(fguest1).fsThaw(None, 0)
    assert status == "thawed", "the test left the guest frozen"


def _inside(scope: FreezeScope, body: Any) -> None:
    """Run ``body(scope)`` inside the scope's ``with`` block."""
    with scope:
        body(scope)


def _wait(predicate: Any, limit: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < limit:
        time.sleep(0.02)
    return time.monotonic() - start


def test_thaw_from_outside_raises_freeze_expired_external(fg: statecapture.Domain) -> None:
    """Another libvirt client thawing the guest while the block runs is noticed: leaving the
    block raises FreezeExpiredError(reason='external') and the scope reports EXPIRED (not a
    silent THAWED: the capture may be crash-consistent only)."""

    def thaw_from_outside(scope: FreezeScope) -> None:
        assert guest_frozen(fg) == "frozen"
        assert raw(fg).fsThaw(None, 0) == scope.frozen_count >= 1  # another client thaws
        assert guest_frozen(fg) == "thawed"

    scope = fs_frozen(fg, max_frozen=60)
    with pytest.raises(FreezeExpiredError) as info:
        _inside(scope, thaw_from_outside)
    assert info.value.reason == "external"
    assert scope.status is FreezeStatus.EXPIRED and scope.expired
    assert scope.frozen_for < 60  # the watchdog had nothing to do with it


def test_exit_thaw_is_retried_while_the_agent_is_stopped(
    fg: statecapture.Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the guest agent really unresponsive at the block's exit (qemu-ga SIGSTOPped in
    the guest for 4 s, right after it froze), the thaw that times out after agent_timeout
    (on the client side) is retried until the agent wakes up; the scope ends THAWED without
    error. The thaw still pending in libvirt is waited for, never queued a second time: the
    adapter's thaw runs once.

    The stop is made by a script started in the guest before the freeze: it waits for
    qemu-ga's frozen-state marker (``/run/qemu-ga/qga.state.isfrozen``, made just before
    the freeze), lets the freeze's answer reach libvirt (1.5 s), stops qemu-ga, and
    continues it 4 s later. The spies only count: the scope's thaw attempts (and the error
    each met) and the adapter's thaw calls.
    """
    attempts: list[str] = []
    real_once = _Freeze.thaw_once

    def counting_once(self: _Freeze, reason: str) -> Any:
        error = real_once(self, reason)
        attempts.append("ok" if error is None else type(error.__cause__ or error).__name__)
        return error

    spawn(
        fg,
        "while [ ! -e /run/qemu-ga/qga.state.isfrozen ]; do sleep 0.05; done; "
        "sleep 1.5; p=$(pidof qemu-ga); kill -STOP $p; sleep 4; kill -CONT $p",
    )
    monkeypatch.setattr(_Freeze, "thaw_once", counting_once)
    try:
        with (
            inject(fg, "fs_thaw") as thaws,  # counts only
            fs_frozen(fg, agent_timeout=1, max_frozen=60) as scope,
        ):
            # Wait (bounded) until the agent no longer answers: qemu-ga is stopped.
            def stopped() -> bool:
                try:
                    agent(fg, "guest-ping", timeout=1)
                except Exception:
                    return True
                return False

            assert _wait(stopped, 20) < 20, "qemu-ga was never stopped"
        monkeypatch.undo()
        assert scope.status is FreezeStatus.THAWED
        assert attempts[-1] == "ok" and len(attempts) >= 2, attempts
        assert all(a == "_AgentCallPending" for a in attempts[:-1]), attempts
        assert thaws.calls == 1, thaws.calls
        assert scope.thaw_error is None

        wait_agent(fg, timeout=60)
        assert guest_frozen(fg) == "thawed"
        sh(fg, "echo after > /data/after-stop && sync")  # writes work again
    finally:
        raw(fg).agentSetResponseTimeout(-2, 0)  # back to a fresh domain's setting


def test_nested_budget_out_of_order_exit_and_other_thread(fg: statecapture.Domain) -> None:
    """On a real guest: a nested scope's shorter budget makes the watchdog thaw early (both
    scopes then report the expiry); leaving the enclosing scope before the nested one still
    thaws, and both exits raise UsageError; a scope entered from another thread is refused
    (UsageError) and leaves the owner's freeze in place."""
    # 1. nested budget
    inner = fs_frozen(fg, max_frozen=1.5)

    def hang_until_the_watchdog_thaws(outer: FreezeScope) -> None:
        assert inner.joined and guest_frozen(fg) == "frozen"
        assert _wait(lambda: outer.expired, 30) < 30
        assert guest_frozen(fg) == "thawed"  # the guest says so while the block runs

    def nested(outer: FreezeScope) -> None:
        with pytest.raises(FreezeExpiredError):
            _inside(inner, lambda _inner: hang_until_the_watchdog_thaws(outer))
        assert inner.status is FreezeStatus.EXPIRED

    outer = fs_frozen(fg, max_frozen=60)
    with pytest.raises(FreezeExpiredError) as outer_info:
        _inside(outer, nested)
    assert outer_info.value.reason == "watchdog"
    assert outer.status is FreezeStatus.EXPIRED and outer.frozen_for < 30

    # 2. out-of-order exits
    outer = fs_frozen(fg)
    inner = fs_frozen(fg, mountpoints=["/data"])
    outer.__enter__()
    inner.__enter__()
    assert inner.joined and guest_frozen(fg) == "frozen"
    with pytest.raises(UsageError, match="before 1 scope"):
        outer.__exit__(None, None, None)
    assert guest_frozen(fg) == "thawed"
    with pytest.raises(UsageError, match="was left before this nested one"):
        inner.__exit__(None, None, None)
    assert outer.status is FreezeStatus.THAWED and inner.status is FreezeStatus.EXPIRED

    # 3. another thread
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with fs_frozen(fg):
                errors.append(AssertionError("entered from another thread"))
        except BaseException as exc:
            errors.append(exc)

    with fs_frozen(fg) as owner:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(60)
        assert len(errors) == 1 and isinstance(errors[0], UsageError), errors
        assert "another thread" in str(errors[0])
        assert guest_frozen(fg) == "frozen" and owner.status is FreezeStatus.FROZEN
    assert owner.status is FreezeStatus.THAWED


def test_sigint_during_the_freeze_or_thaw_call_is_held(fg: statecapture.Domain) -> None:
    """A real SIGINT that lands while the freeze call runs (after the guest froze) or while
    the thaw call runs (before it reaches the guest) is held: the guest ends thawed, and
    the KeyboardInterrupt comes after."""
    seen: list[str] = []

    def sigint_after_the_freeze() -> None:
        seen.append(guest_frozen(fg))
        signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the guest froze

    scope = fs_frozen(fg)
    with (
        inject(fg, "fs_freeze", after=sigint_after_the_freeze),
        pytest.raises(KeyboardInterrupt),
        scope,
    ):
        pytest.fail("the block ran although Ctrl-C came during the freeze call")
    assert seen == ["frozen"] and guest_frozen(fg) == "thawed"

    with contextlib.ExitStack() as armed:

        def arm(_scope: FreezeScope) -> None:
            assert guest_frozen(fg) == "frozen"
            # Ctrl-C before the thaw reached the guest
            sigint = lambda: signal.raise_signal(signal.SIGINT)  # noqa: E731
            armed.enter_context(inject(fg, "fs_thaw", before=sigint))

        scope = fs_frozen(fg)
        with pytest.raises(KeyboardInterrupt):
            _inside(scope, arm)
    assert scope.status is FreezeStatus.THAWED
    assert guest_frozen(fg) == "thawed"
