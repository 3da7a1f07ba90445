"""Filesystem freeze: ``fs_frozen``/``FreezeScope``, ``Domain.fs_info``/``wait_for_agent``.

Fast tier on the test driver (which simulates an agent that freezes ``/`` and ``/boot``);
real tier on one TCG guest with two data disks (``/data`` with the guest's own tick writer,
and ``/data1``), shared by the module's real tests, plus a guest without agent channel.
Fault injection (``statecapture.testing.faults`` on the domain's port) is used only to make a
call fail or to time a signal; every behaviour is also shown on real QEMU.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import statecapture
from statecapture import (
    CleanupError,
    EventKind,
    Filesystem,
    FreezeExpiredError,
    FreezeScope,
    FreezeStatus,
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    ThawError,
    UsageError,
    fs_frozen,
)
from statecapture._freeze.held import _held_freezes
from statecapture.testing import wait_agent
from statecapture.testing.faults import inject
from tests._raw import raw_domain

AGENT_TIMEOUT_MESSAGE = "Guest agent is not responding: Guest agent not available for now"


def _raw(dom: statecapture.Domain) -> Any:
    return raw_domain(dom)


def _inside(scope: FreezeScope, body: Any) -> None:
    """Run ``body(scope)`` inside the scope's ``with`` block."""
    with scope:
        body(scope)


def _wait_expired(scope: FreezeScope, limit: float = 5) -> float:
    """Poll (like a hung block would not) until the watchdog fired; the seconds waited."""
    start = time.monotonic()
    while not scope.expired and time.monotonic() - start < limit:
        time.sleep(0.01)
    return time.monotonic() - start


def _thaw_count(dom: statecapture.Domain) -> int:
    """Thaw through libvirt directly; how many filesystems were still frozen."""
    return int(_raw(dom).fsThaw(None, 0))


@pytest.fixture(autouse=True)
def _no_freeze_left_behind() -> Iterator[None]:
    yield
    assert _held_freezes() == [], "a FreezeScope left its freeze registered"
    assert not [t for t in threading.enumerate() if t.name.startswith("statecapture-freeze")]


# ============================================================================ fast tier


def test_fs_info_values(test_domain: statecapture.Domain) -> None:
    """fs_info() returns frozen Filesystem values sorted by mount point."""
    infos = test_domain.fs_info()
    assert infos == (
        Filesystem("/", "vda1", "ext4", ("vda",)),
        Filesystem("/boot", "vda2", "ext4", ("vda",)),
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        infos[0].mountpoint = "/x"  # type: ignore[misc]
    assert attrs.evolve(infos[0], mountpoint="/x").mountpoint == "/x"


def test_agent_connected_and_wait(test_conn: statecapture.Connection) -> None:
    """agent_connected reads the channel from the live XML; wait_for_agent checks the same."""
    alpha = test_conn.domain("alpha")
    assert alpha.agent_connected  # channel defined, the test driver reports no state
    assert 0 <= alpha.wait_for_agent(1) < 1
    beta = test_conn.domain("beta")  # no channel
    beta.destroy()
    assert not beta.agent_connected
    with pytest.raises(InvalidStateError):
        beta.wait_for_agent(1)
    beta.start()
    assert not beta.agent_connected
    with pytest.raises(GuestAgentError, match="no guest agent channel"):
        beta.wait_for_agent(1)
    for bad in (0, -1, float("nan"), "1", True):
        with pytest.raises(UsageError):
            alpha.wait_for_agent(bad)  # type: ignore[arg-type]


def test_wait_for_agent_waits_until_the_agent_answers(
    test_conn: statecapture.Connection,
) -> None:
    """The channel reading "connected" is not enough: wait_for_agent returns once the agent
    answers a command (guest-get-time) — here the first two answers are "agent is not
    connected" (code 86, what a freshly opened embedded driver reports) — while an agent
    that answers with an error (code 113: command disabled) counts as answering."""
    alpha = test_conn.domain("alpha")
    not_yet = GuestAgentError("Guest agent is not responding: not connected", code=86)
    with inject(alpha, "agent_time", raises=not_yet, times=2) as fault:
        waited = alpha.wait_for_agent(10)
    assert fault.calls == 3 and waited < 10
    disabled = GuestAgentError("guest-get-time has been disabled", code=113)
    with inject(alpha, "agent_time", raises=disabled) as fault:
        assert alpha.wait_for_agent(5) < 5
    assert fault.calls == 1
    with inject(alpha, "agent_time", raises=not_yet), pytest.raises(OperationTimeoutError):
        alpha.wait_for_agent(1.5)


def test_scope_lifecycle(test_domain: statecapture.Domain) -> None:
    """NEW -> FROZEN -> THAWED; frozen_filesystems from fs_info; frozen_for is measured."""
    scope = fs_frozen(test_domain, max_frozen=5)
    assert isinstance(scope, FreezeScope)
    assert scope.status is FreezeStatus.NEW and scope.frozen_for == 0.0
    with scope as entered:
        assert entered is scope
        assert scope.status is FreezeStatus.FROZEN
        assert [fs.mountpoint for fs in scope.frozen_filesystems] == ["/", "/boot"]
        assert scope.frozen_count == 2 and not scope.joined and not scope.expired
        time.sleep(0.05)
        assert scope.frozen_for >= 0.05
        assert "frozen" in repr(scope)
    assert scope.status is FreezeStatus.THAWED and not scope.expired
    held = scope.frozen_for
    assert 0.05 <= held < 1
    time.sleep(0.02)
    assert scope.frozen_for == held  # fixed once thawed
    assert _thaw_count(test_domain) == 0  # nothing left frozen


def test_subset_of_mountpoints(test_domain: statecapture.Domain) -> None:
    """Only the named mount points freeze; they are reported in the order asked."""
    with fs_frozen(test_domain, mountpoints=["/boot"]) as scope:
        assert [fs.mountpoint for fs in scope.frozen_filesystems] == ["/boot"]
        assert scope.frozen_count == 1
    assert scope.status is FreezeStatus.THAWED
    assert _thaw_count(test_domain) == 0


def test_single_use(test_domain: statecapture.Domain) -> None:
    """A scope can be used only once; exit without enter is a UsageError."""
    scope = fs_frozen(test_domain)
    with scope:
        pass
    with pytest.raises(UsageError, match="only once"), scope:
        pass
    with pytest.raises(UsageError):
        fs_frozen(test_domain).__exit__(None, None, None)
    with pytest.raises(UsageError, match="never entered"):
        fs_frozen(test_domain).thaw()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mountpoints": "/boot"}, "not one string"),
        ({"mountpoints": []}, "empty"),
        ({"mountpoints": ["/", ""]}, "non-empty string"),
        ({"mountpoints": [1]}, "non-empty string"),
        ({"mountpoints": 5}, "list of strings"),
        ({"max_frozen": 0}, "max_frozen"),
        ({"max_frozen": -1}, "max_frozen"),
        ({"max_frozen": float("inf")}, "max_frozen"),
        ({"max_frozen": float("nan")}, "max_frozen"),
        ({"max_frozen": True}, "max_frozen"),
        ({"max_frozen": "10"}, "max_frozen"),
        ({"agent_timeout": 0}, "agent_timeout"),
    ],
)
def test_bad_arguments(test_domain: statecapture.Domain, kwargs: Any, match: str) -> None:
    """Bad arguments raise UsageError when the scope is built, before anything changes."""
    with pytest.raises(UsageError, match=match):
        fs_frozen(test_domain, **kwargs)
    assert _thaw_count(test_domain) == 0


def test_refusals_before_any_change(test_conn: statecapture.Connection) -> None:
    """Unknown mount point, stopped domain, unsupported agent timeout: typed, nothing frozen."""
    alpha = test_conn.domain("alpha")
    with pytest.raises(UsageError, match="Domain"):
        fs_frozen("alpha")  # type: ignore[arg-type]
    scope = fs_frozen(alpha, mountpoints=["/", "/nope"])
    with pytest.raises(NotFoundError, match="/nope"), scope:
        pytest.fail("entered")
    assert scope.status is FreezeStatus.FAILED
    assert _thaw_count(alpha) == 0
    beta = test_conn.domain("beta")
    beta.destroy()
    with pytest.raises(InvalidStateError), fs_frozen(beta):
        pytest.fail("entered")


def test_exception_in_block_thaws(test_domain: statecapture.Domain) -> None:
    """The block's own exception propagates unchanged and the guest is thawed."""
    error = ValueError("boom")
    scope = fs_frozen(test_domain)
    with pytest.raises(ValueError) as info, scope:
        raise error
    assert info.value is error and not getattr(error, "__notes__", None)
    assert scope.status is FreezeStatus.THAWED
    assert _thaw_count(test_domain) == 0


def test_keyboard_interrupt_in_block_thaws(test_domain: statecapture.Domain) -> None:
    """A Ctrl-C (a real SIGINT) inside the block thaws on the way out."""
    scope = fs_frozen(test_domain)
    with pytest.raises(KeyboardInterrupt):
        _inside(scope, lambda _s: signal.raise_signal(signal.SIGINT))
    assert scope.status is FreezeStatus.THAWED
    assert _thaw_count(test_domain) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_freeze_call_is_held_then_undone(test_domain: statecapture.Domain) -> None:
    """A SIGINT that arrives while the freeze call blocks is held; the freeze is then undone
    and KeyboardInterrupt raised from the with statement (nothing left frozen)."""
    # Ctrl-C while libvirt waits for the agent
    sigint = inject(test_domain, "fs_freeze", before=lambda: signal.raise_signal(signal.SIGINT))
    scope = fs_frozen(test_domain)
    with sigint, pytest.raises(KeyboardInterrupt), scope:
        pytest.fail("entered")
    assert scope.status is FreezeStatus.FAILED
    assert _thaw_count(test_domain) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_during_thaw_call_is_delivered_after(test_domain: statecapture.Domain) -> None:
    """A SIGINT during the exit's thaw call does not cut the thaw short; it follows it."""
    scope = fs_frozen(test_domain)
    sigint = inject(test_domain, "fs_thaw", before=lambda: signal.raise_signal(signal.SIGINT))
    with sigint, pytest.raises(KeyboardInterrupt), scope:
        pass
    assert scope.status is FreezeStatus.THAWED
    assert _thaw_count(test_domain) == 0


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    """SIGTERM at its default action for the test (whatever the runner installed), restored
    afterwards: the SIGTERM tests always run instead of skipping under such a runner."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("default_sigterm")
def test_sigterm_in_block_thaws_and_exits(test_domain: statecapture.Domain) -> None:
    """SIGTERM inside the block becomes SystemExit(143) there; the exit path thaws and the
    default handler is back afterwards."""
    scope = fs_frozen(test_domain)
    with pytest.raises(SystemExit) as info:
        _inside(scope, _terminate_self)
    assert info.value.code == 143
    assert scope.status is FreezeStatus.THAWED
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert _thaw_count(test_domain) == 0


def _terminate_self(_scope: FreezeScope) -> None:
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # or we would die
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    pytest.fail("SIGTERM did not interrupt the block")


@pytest.mark.usefixtures("default_sigterm")
@pytest.mark.parametrize("call", ["fs_freeze", "fs_thaw"])
def test_sigterm_during_freeze_or_thaw_call_is_held(
    test_domain: statecapture.Domain, call: str
) -> None:
    """A SIGTERM during the freeze or the thaw call is held until the guest is thawed, then
    raised as SystemExit(143); the default action is back afterwards."""

    def sigterm() -> None:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            pytest.fail("SIGTERM is not held during the call")  # instead of dying
        signal.raise_signal(signal.SIGTERM)

    scope = fs_frozen(test_domain)
    with inject(test_domain, call, before=sigterm), pytest.raises(SystemExit) as info:
        _inside(scope, lambda _s: None)
    assert info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert scope.status is (FreezeStatus.FAILED if call == "fs_freeze" else FreezeStatus.THAWED)
    assert _thaw_count(test_domain) == 0


def test_application_sigterm_handler_stays_in_charge(test_domain: statecapture.Domain) -> None:
    """A SIGTERM handler the application installed is not replaced; if it raises, the exit
    thaws all the same."""

    class Stop(Exception):
        pass

    def handler(_signum: int, _frame: object) -> None:
        raise Stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:

        def body(_scope: FreezeScope) -> None:
            assert signal.getsignal(signal.SIGTERM) is handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        with pytest.raises(Stop):
            _inside(fs_frozen(test_domain), body)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _thaw_count(test_domain) == 0


def test_sigterm_to_another_process_thaws(tmp_path: Path) -> None:
    """A process killed by SIGTERM inside the block thaws first, then exits with 143."""
    script = textwrap.dedent(
        """
        import atexit, time, statecapture
        from tests._raw import raw_domain
        conn = statecapture.connect("test:///default")
        dom = conn.domain("test")
        raw = raw_domain(dom)
        atexit.register(lambda: print("left frozen:", raw.fsThaw(None, 0), flush=True))
        with statecapture.fs_frozen(dom, max_frozen=60):
            print("frozen", flush=True)
            time.sleep(60)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "frozen"
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 143
    assert "left frozen: 0" in out


def test_watchdog_thaws_a_hung_block(test_domain: statecapture.Domain) -> None:
    """Once max_frozen has passed, the watchdog thaws although the block still runs; the
    scope reports expired and leaving raises FreezeExpiredError."""

    def hung(scope: FreezeScope) -> None:
        _wait_expired(scope)
        assert scope.expired and scope.status is FreezeStatus.EXPIRED
        assert _thaw_count(test_domain) == 0  # already thawed while the block runs

    scope = fs_frozen(test_domain, max_frozen=0.3)
    with pytest.raises(FreezeExpiredError) as info:
        _inside(scope, hung)
    assert 0.3 <= scope.frozen_for < 1.3
    err = info.value
    assert (err.reason, err.max_frozen, err.domain_name) == ("watchdog", 0.3, "alpha")
    assert err.frozen_for == pytest.approx(scope.frozen_for, abs=0.05)
    assert scope.status is FreezeStatus.EXPIRED


def test_expired_shows_only_once_the_watchdog_thawed(test_domain: statecapture.Domain) -> None:
    """With a slow thaw call (injected delay), expired/EXPIRED appear only after it ended."""

    def hung(scope: FreezeScope) -> None:
        _wait_expired(scope)
        assert scope.status is FreezeStatus.EXPIRED
        assert _thaw_count(test_domain) == 0

    slow_thaw = inject(test_domain, "fs_thaw", delay=0.3)
    with slow_thaw, pytest.raises(FreezeExpiredError):
        _inside(fs_frozen(test_domain, max_frozen=0.1), hung)


def test_watchdog_expiry_is_a_note_when_the_block_raised(test_domain: statecapture.Domain) -> None:
    """When the block raised, its error propagates with the expiry as a note."""

    def body(scope: FreezeScope) -> None:
        _wait_expired(scope)
        raise KeyError("body")

    with pytest.raises(KeyError) as info:
        _inside(fs_frozen(test_domain, max_frozen=0.1), body)
    assert any("FreezeExpiredError" in note for note in info.value.__notes__)


def test_thaw_from_outside_is_reported(test_domain: statecapture.Domain) -> None:
    """A thaw that finds fewer filesystems frozen than were frozen means something else
    thawed the guest during the block: FreezeExpiredError(reason='external')."""
    scope = fs_frozen(test_domain)
    with pytest.raises(FreezeExpiredError) as info, scope:
        assert _thaw_count(test_domain) == 2  # another tool thaws
    assert info.value.reason == "external"
    assert scope.status is FreezeStatus.EXPIRED


def test_explicit_thaw_inside_block(test_domain: statecapture.Domain) -> None:
    """thaw() ends the freeze early; leaving the block then does nothing more."""
    with fs_frozen(test_domain) as scope:
        scope.thaw()
        assert scope.status is FreezeStatus.THAWED
        held = scope.frozen_for
        scope.thaw()  # idempotent
        assert _thaw_count(test_domain) == 0
    assert scope.status is FreezeStatus.THAWED and scope.frozen_for == held


def _internal_error() -> LibvirtError:
    return LibvirtError(
        "filesystem thaw on domain failed: internal error: injected",
        code=1,
        operation="filesystem thaw",
        libvirt_message="internal error: injected",
    )


def test_thaw_failure_raises_and_can_be_retried(test_domain: statecapture.Domain) -> None:
    """A failed thaw raises ThawError (a CleanupError, libvirt's error as cause); thaw()
    retries later."""
    scope = fs_frozen(test_domain)
    failing = inject(test_domain, "fs_thaw", raises=_internal_error())
    with failing, pytest.raises(ThawError) as info, scope:
        pass
    err = info.value
    assert isinstance(err, CleanupError) and isinstance(err.__cause__, LibvirtError)
    assert err.domain_name == "alpha" and "may still be frozen" in str(err)
    assert scope.status is FreezeStatus.THAW_FAILED and scope.thaw_error is err
    scope.thaw()
    assert scope.status is FreezeStatus.THAWED and scope.thaw_error is None
    assert _thaw_count(test_domain) == 0


def test_thaw_failure_is_a_note_when_the_block_raised(test_domain: statecapture.Domain) -> None:
    """The block's error wins; the thaw failure is attached as a note, and kept on the scope."""
    scope = fs_frozen(test_domain)
    failing = inject(test_domain, "fs_thaw", raises=_internal_error())
    with failing, pytest.raises(RuntimeError) as info, scope:
        raise RuntimeError("body")
    assert any("ThawError" in note for note in info.value.__notes__)
    assert isinstance(scope.thaw_error, ThawError)
    assert test_domain.fs_thaw() == 2  # the recovery tool
    scope.thaw()
    assert scope.status is FreezeStatus.THAWED


def test_closed_connection_makes_a_thaw_error(test_uri: str) -> None:
    """Closing the connection inside the block: the watchdog's and the exit's thaws fail
    as ThawError (cause: UsageError), without crashing the watchdog thread."""
    conn = statecapture.connect(test_uri)
    dom = conn.domain("alpha")

    def close_and_wait(scope: FreezeScope) -> None:
        conn.close()
        time.sleep(0.4)  # the watchdog (max_frozen=0.1) fails and retries meanwhile
        assert scope.status is FreezeStatus.THAW_FAILED and scope.expired

    scope = fs_frozen(dom, max_frozen=0.1)
    with pytest.raises(ThawError) as info:
        _inside(scope, close_and_wait)
    assert isinstance(info.value.__cause__, UsageError)
    assert scope.status is FreezeStatus.THAW_FAILED


def test_unresponsive_agent_thaw_is_retried(test_domain: statecapture.Domain) -> None:
    """'Agent unresponsive' on thaw is retried within the budget; the guest ends thawed."""
    unresponsive = GuestAgentError(
        AGENT_TIMEOUT_MESSAGE, code=86, libvirt_message=AGENT_TIMEOUT_MESSAGE
    )
    with (
        inject(test_domain, "fs_thaw", raises=unresponsive, times=2) as fault,
        fs_frozen(test_domain) as scope,
    ):
        pass
    assert fault.calls == 3
    assert scope.status is FreezeStatus.THAWED
    assert _thaw_count(test_domain) == 0


def test_ambiguous_freeze_failure_is_thawed(test_domain: statecapture.Domain) -> None:
    """libvirt < 11.2 reports an agent timeout as 'unresponsive' although the freeze may have
    happened: fs_frozen thaws anyway and says so in a note."""

    def time_out() -> None:  # after the freeze happened
        raise GuestAgentError(AGENT_TIMEOUT_MESSAGE, code=86, libvirt_message=AGENT_TIMEOUT_MESSAGE)

    scope = fs_frozen(test_domain)
    timing_out = inject(test_domain, "fs_freeze", after=time_out)
    with timing_out, pytest.raises(GuestAgentError) as info, scope:
        pytest.fail("entered")
    assert any("happened in the guest anyway" in n for n in info.value.__notes__)
    assert scope.status is FreezeStatus.FAILED
    assert _thaw_count(test_domain) == 0


def test_refused_freeze_does_not_thaw_someone_elses_freeze(
    test_domain: statecapture.Domain,
) -> None:
    """A freeze the agent refused (e.g. 'frozen state': another tool froze) is not thawed."""
    assert _raw(test_domain).fsFreeze(None, 0) == 2  # another tool's freeze
    refused = LibvirtError(
        "filesystem freeze failed: agent is in frozen state",
        code=1,
        libvirt_message="Command guest-fsfreeze-freeze has been disabled: the agent is "
        "in frozen state",
    )
    with (
        inject(test_domain, "fs_freeze", raises=refused),
        pytest.raises(InvalidStateError, match="frozen already"),
        fs_frozen(test_domain),
    ):
        pytest.fail("entered")
    assert _thaw_count(test_domain) == 2  # the other tool's freeze was left alone


# ---------------------------------------------------------------------------- nesting


def test_nested_scope_joins_and_does_not_thaw(test_domain: statecapture.Domain) -> None:
    """An inner scope in the same thread joins the outer freeze: it freezes and thaws
    nothing; the outer's thaw still finds every filesystem frozen."""
    with fs_frozen(test_domain) as outer:
        with fs_frozen(test_domain, mountpoints=["/boot"]) as inner:
            assert inner.joined and inner.status is FreezeStatus.FROZEN
            assert [fs.mountpoint for fs in inner.frozen_filesystems] == ["/boot"]
            assert inner.frozen_filesystems[0].name == "vda2"
            with pytest.raises(UsageError, match="joined"):
                inner.thaw()
            with pytest.raises(UsageError, match="still open"):
                outer.thaw()
        assert inner.status is FreezeStatus.RELEASED and not inner.expired
        assert outer.status is FreezeStatus.FROZEN
        with fs_frozen(test_domain) as inner_all:
            assert inner_all.frozen_filesystems == outer.frozen_filesystems
    assert outer.status is FreezeStatus.THAWED  # not "external": the inner did not thaw
    assert _thaw_count(test_domain) == 0
    with fs_frozen(test_domain) as again:  # a new, independent freeze
        assert not again.joined


def test_nested_scope_must_be_covered(test_domain: statecapture.Domain) -> None:
    """A nested scope can only join for filesystems the enclosing scope froze."""
    with fs_frozen(test_domain, mountpoints=["/boot"]) as outer:
        with pytest.raises(UsageError, match="every filesystem"), fs_frozen(test_domain):
            pytest.fail("joined")
        with (
            pytest.raises(UsageError, match="did not freeze"),
            fs_frozen(test_domain, mountpoints=["/"]),
        ):
            pytest.fail("joined")
        assert outer.status is FreezeStatus.FROZEN
    assert _thaw_count(test_domain) == 0


def test_nested_budget_shortens_the_shared_freeze(test_domain: statecapture.Domain) -> None:
    """The freeze never outlasts any scope's budget: an inner max_frozen lowers the
    watchdog's deadline, and both scopes then report the expiry."""
    outer = fs_frozen(test_domain, max_frozen=30)
    inner = fs_frozen(test_domain, max_frozen=0.2)
    with pytest.raises(FreezeExpiredError):
        _inside(outer, lambda _o: _inside(inner, _wait_expired))
    assert inner.status is FreezeStatus.EXPIRED and outer.status is FreezeStatus.EXPIRED
    assert outer.frozen_for < 1.5


def test_other_thread_cannot_join(test_domain: statecapture.Domain) -> None:
    """Another thread of the process gets UsageError while the freeze is held; a scope used
    entirely in a worker thread works (without signal handling)."""
    caught: list[BaseException] = []

    def other() -> None:
        try:
            with fs_frozen(test_domain):
                pass
        except BaseException as exc:
            caught.append(exc)

    with fs_frozen(test_domain):
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    assert len(caught) == 1 and isinstance(caught[0], UsageError)
    assert "another thread" in str(caught[0])
    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert len(caught) == 1
    assert _thaw_count(test_domain) == 0


def test_misnested_exit_still_thaws(test_domain: statecapture.Domain) -> None:
    """Leaving the outer scope before the inner one thaws anyway and raises UsageError;
    the inner one then reports the misnesting too."""
    outer = fs_frozen(test_domain)
    inner = fs_frozen(test_domain)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(UsageError, match="left before"):
        outer.__exit__(None, None, None)
    assert _thaw_count(test_domain) == 0
    with pytest.raises(UsageError, match="enclosing"):
        inner.__exit__(None, None, None)
    assert inner.status is FreezeStatus.EXPIRED


def test_errors_pickle() -> None:
    """ThawError and FreezeExpiredError cross process boundaries with their attributes."""
    thaw = pickle.loads(pickle.dumps(ThawError("t", domain_name="d")))
    assert (str(thaw), thaw.domain_name) == ("t", "d")
    expired = pickle.loads(
        pickle.dumps(
            FreezeExpiredError("e", domain_name="d", reason="external", max_frozen=1, frozen_for=2)
        )
    )
    assert (expired.reason, expired.max_frozen, expired.frozen_for) == ("external", 1, 2)
    assert issubclass(ThawError, CleanupError)


# ============================================================================ real tier


def _agent(dom: statecapture.Domain, command: str, **arguments: Any) -> Any:
    from statecapture.testing import agent_command

    payload: dict[str, Any] = {"execute": command}
    if arguments:
        payload["arguments"] = arguments
    return agent_command(dom, payload, timeout=10)


def _guest_freeze_status(dom: statecapture.Domain) -> str:
    """qemu-ga's own view (guest-fsfreeze-status answers even while frozen)."""
    return str(_agent(dom, "guest-fsfreeze-status"))


def _spawn(dom: statecapture.Domain, script: str) -> None:
    """Start a shell script in the guest without waiting for it."""
    _agent(dom, "guest-exec", path="sh", arg=["-c", script])


def _ticks(dom: statecapture.Domain, path: str = "/data/ticks") -> list[tuple[int, float]]:
    """(counter, guest uptime) per line the guest's writer appended."""
    from statecapture.testing import read_guest_file

    rows = []
    for line in read_guest_file(dom, path).decode().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((int(parts[0]), float(parts[2])))
    return rows


def _max_gap(uptimes: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(uptimes)), default=0.0)


@pytest.fixture(scope="module")
def fguest(
    qemu_conn: statecapture.Connection, kit: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[statecapture.Domain]:
    """One running guest with two data disks (/data, /data1) and a connected agent, shared
    by this module's real tests (each must leave it thawed)."""
    from statecapture.testing.kit import domain_xml, make_data_disk

    tmp = tmp_path_factory.mktemp("freeze")
    images = [make_data_disk(tmp / f"disk{i}.qcow2", size_mib=32) for i in range(2)]
    xml = domain_xml(
        f"sc-freeze-{os.getpid()}",
        kit,
        images,
        log_path=tmp / "console.log",
        disk_formats=["qcow2", "qcow2"],
    )
    dom = qemu_conn.define(xml)
    try:
        dom.start()
        wait_agent(dom, timeout=120)
        yield dom
    finally:
        with contextlib.suppress(Exception):
            _raw(dom).fsThaw(None, 0)
        with contextlib.suppress(Exception):
            dom.destroy()
        with contextlib.suppress(Exception):
            dom.undefine()


@pytest.fixture
def guest2(fguest: statecapture.Domain) -> Iterator[statecapture.Domain]:
    """The shared guest, reset and verified after each test so no state leaks into the
    next: it runs, its agent is connected and answering (tests stop or kill qemu-ga), the
    agent response timeout is libvirt's default again (tests change it), and it is thawed
    (fails the test, after thawing, when it was left frozen)."""
    yield fguest
    assert fguest.is_active, "the test left the shared guest stopped"
    fguest.wait_for_agent(120)
    deadline = time.monotonic() + 60
    while True:  # qemu-ga may still be SIGSTOPped for a moment
        try:
            status = _guest_freeze_status(fguest)
            break
        except statecapture.LibvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    raw_domain(fguest).agentSetResponseTimeout(-1, 0)
    if status != "thawed":
        fguest.fs_thaw()
    assert status == "thawed", "the test left the guest frozen"
    assert fguest.block_jobs() == () and fguest.active_backup() is None


@pytest.mark.qemu
def test_qemu_writes_stall_while_frozen_and_resume(guest2: statecapture.Domain) -> None:
    """The guest's own tick writer on /data stalls for the whole freeze and resumes after;
    fs_info and frozen_filesystems describe the guest's real mounts."""
    dom = guest2
    assert dom.agent_connected
    infos = dom.fs_info()
    assert [(fs.mountpoint, fs.fstype, fs.disks) for fs in infos] == [
        ("/data", "ext4", ("vda",)),
        ("/data1", "ext4", ("vdb",)),
    ]
    before = _ticks(dom)
    with fs_frozen(dom, max_frozen=10) as scope:
        assert scope.frozen_filesystems == infos and scope.frozen_count == 2
        assert _guest_freeze_status(dom) == "frozen"
        with pytest.raises(InvalidStateError, match="frozen already"):
            dom.fs_info()  # the agent refuses guest-get-fsinfo while frozen
        time.sleep(3)
    assert scope.status is FreezeStatus.THAWED
    assert 3 <= scope.frozen_for < 4
    assert _guest_freeze_status(dom) == "thawed"
    deadline = time.monotonic() + 20
    while (after := _ticks(dom))[-1][0] < before[-1][0] + 10 and time.monotonic() < deadline:
        time.sleep(0.3)  # resumed: new lines keep coming
    assert after[-1][0] >= before[-1][0] + 10
    since = [up for n, up in after if n >= before[-1][0]]
    assert _max_gap(since) >= scope.frozen_for - 0.5  # stalled for the whole freeze


@pytest.mark.qemu
def test_qemu_subset_freezes_only_those(guest2: statecapture.Domain) -> None:
    """mountpoints=['/data1'] stalls writers on /data1 only; /data keeps being written."""
    dom = guest2
    _spawn(
        dom,
        'i=0; while [ $i -lt 80 ]; do read -r up _ </proc/uptime; echo "$i x $up" >>/data1/t;'
        " sync; sleep 0.1; i=$((i+1)); done",
    )
    time.sleep(1)
    with fs_frozen(dom, mountpoints=["/data1"]) as scope:
        assert [fs.mountpoint for fs in scope.frozen_filesystems] == ["/data1"]
        assert scope.frozen_count == 1
        time.sleep(2.5)
    assert scope.status is FreezeStatus.THAWED
    time.sleep(1.5)
    data1 = [up for _, up in _ticks(dom, "/data1/t")]
    data = [up for _, up in _ticks(dom)]
    window = [up for up in data if data1[0] <= up <= data1[-1]]
    assert _max_gap(data1) >= 2.0  # the /data1 writer stalled
    assert _max_gap(window) < 1.5  # the /data writer did not


@pytest.mark.qemu
@pytest.mark.usefixtures("default_sigterm")
def test_qemu_every_exit_path_thaws(guest2: statecapture.Domain) -> None:
    """Exception, KeyboardInterrupt (a real SIGINT) and SIGTERM inside the block all thaw."""
    dom = guest2

    def fail(_scope: FreezeScope) -> None:
        assert _guest_freeze_status(dom) == "frozen"
        raise ValueError("body")

    scope = fs_frozen(dom)
    with pytest.raises(ValueError):
        _inside(scope, fail)
    assert scope.status is FreezeStatus.THAWED and _guest_freeze_status(dom) == "thawed"
    scope = fs_frozen(dom)
    with pytest.raises(KeyboardInterrupt):
        _inside(scope, lambda _s: signal.raise_signal(signal.SIGINT))
    assert scope.status is FreezeStatus.THAWED and _guest_freeze_status(dom) == "thawed"
    scope = fs_frozen(dom)
    with pytest.raises(SystemExit):
        _inside(scope, _terminate_self)
    assert scope.status is FreezeStatus.THAWED and _guest_freeze_status(dom) == "thawed"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.qemu
def test_qemu_watchdog_thaws_hung_block(guest2: statecapture.Domain) -> None:
    """A hung block is thawed by the watchdog within max_frozen + 1 s (the guest itself says
    so while the block still runs); leaving raises FreezeExpiredError."""
    dom = guest2
    seen: list[float] = []

    def hung(scope: FreezeScope) -> None:
        seen.append(_wait_expired(scope, limit=10))
        assert _guest_freeze_status(dom) == "thawed"

    scope = fs_frozen(dom, max_frozen=1.5)
    with pytest.raises(FreezeExpiredError):
        _inside(scope, hung)
    assert seen[0] <= 1.5 + 1
    assert 1.5 <= scope.frozen_for <= 1.5 + 1
    assert scope.status is FreezeStatus.EXPIRED


@pytest.mark.qemu
def test_qemu_thaw_failure_surfaces_then_recovers(guest2: statecapture.Domain) -> None:
    """An (injected) thaw failure raises ThawError and the guest really stays frozen; the
    retry through thaw() then thaws it."""
    dom = guest2
    scope = fs_frozen(dom)
    with inject(dom, "fs_thaw", raises=_internal_error()), pytest.raises(ThawError), scope:
        pass
    assert scope.status is FreezeStatus.THAW_FAILED
    assert _guest_freeze_status(dom) == "frozen"
    scope.thaw()
    assert scope.status is FreezeStatus.THAWED
    assert _guest_freeze_status(dom) == "thawed"


@pytest.mark.qemu
def test_qemu_agent_timeout_freeze_that_lands_late_is_thawed(
    guest2: statecapture.Domain, qemu_root: Path
) -> None:
    """The agent hangs during the freeze: fs_frozen stops waiting after agent_timeout
    (OperationTimeoutError), the queued freeze runs in the guest when the agent wakes up,
    and fs_frozen thaws it, so the guest does not stay frozen. The domain's own agent
    timeout is never touched."""
    dom = guest2
    before = _domain_agent_timeout(dom, qemu_root)

    def agent_hangs() -> None:
        # Fault injection is only the timing: stop qemu-ga for 3 s right before the call.
        _spawn(dom, "kill -STOP $(pidof qemu-ga); sleep 3; kill -CONT $(pidof qemu-ga)")
        time.sleep(0.5)

    scope = fs_frozen(dom, agent_timeout=1, max_frozen=15)
    start = time.monotonic()
    with (
        inject(dom, "fs_freeze", before=agent_hangs),
        pytest.raises(OperationTimeoutError, match="did not answer within 1 s") as info,
        scope,
    ):
        pytest.fail("entered")
    elapsed = time.monotonic() - start
    notes = " ".join(info.value.__notes__)
    assert "happened in the guest anyway" in notes, notes
    assert scope.status is FreezeStatus.FAILED
    assert elapsed < 15
    assert _guest_freeze_status(dom) == "thawed"
    assert _domain_agent_timeout(dom, qemu_root) == before
    with fs_frozen(dom) as scope:
        pass
    assert scope.status is FreezeStatus.THAWED


def _domain_agent_timeout(dom: statecapture.Domain, root: Path) -> int:
    """The domain's agent response timeout as the QEMU driver keeps it: libvirt has no
    getter, so read the driver's status file in the embedded root (<agentTimeout>)."""
    text = (root / "run" / "qemu" / f"{dom.name}.xml").read_text()
    match = re.search(r"<agentTimeout>(-?\d+)</agentTimeout>", text)
    assert match is not None, "no <agentTimeout> in the status file"
    return int(match.group(1))


@pytest.mark.qemu
def test_qemu_agent_timeout_leaves_the_domain_setting_alone(
    guest2: statecapture.Domain, qemu_root: Path
) -> None:
    """HAZARDS 23: fs_frozen(agent_timeout=...) leaves the domain's agent timeout exactly as
    it was (another client's 7 s stays 7 s; a fresh domain's -2 'block' would stay -2),
    after a successful freeze and after a refused one."""
    dom = guest2
    _raw(dom).agentSetResponseTimeout(7, 0)
    try:
        assert _domain_agent_timeout(dom, qemu_root) == 7
        with fs_frozen(dom, agent_timeout=3) as scope:
            assert _guest_freeze_status(dom) == "frozen"
            assert _domain_agent_timeout(dom, qemu_root) == 7
        assert scope.status is FreezeStatus.THAWED
        assert _domain_agent_timeout(dom, qemu_root) == 7
        with pytest.raises(NotFoundError), fs_frozen(dom, mountpoints=["/nope"], agent_timeout=2):
            pytest.fail("entered")
        assert _domain_agent_timeout(dom, qemu_root) == 7
    finally:
        _raw(dom).agentSetResponseTimeout(-2, 0)  # the fixture's guest started with -2


@pytest.mark.qemu
def test_qemu_nested_and_foreign_freezes(guest2: statecapture.Domain) -> None:
    """A joined inner scope leaves the guest frozen for the outer one; a freeze made by
    someone else is refused (InvalidStateError) and left alone."""
    dom = guest2
    with fs_frozen(dom) as outer:
        with fs_frozen(dom, mountpoints=["/data"]) as inner:
            assert inner.joined
        assert _guest_freeze_status(dom) == "frozen"
    assert outer.status is FreezeStatus.THAWED
    assert _guest_freeze_status(dom) == "thawed"
    assert _raw(dom).fsFreeze(None, 0) == 2  # another tool freezes
    try:
        scope = fs_frozen(dom)
        with pytest.raises(InvalidStateError, match="frozen already"), scope:
            pytest.fail("entered")
        assert _guest_freeze_status(dom) == "frozen"  # not ours to thaw
    finally:
        assert dom.fs_thaw() == 2


@pytest.mark.qemu
def test_qemu_agent_disconnected_then_waited_for(guest2: statecapture.Domain) -> None:
    """With the agent gone, fs_frozen raises GuestAgentError before any change;
    wait_for_agent returns on the agent-lifecycle event when it is back."""
    dom = guest2
    # Stop the guest's agent-restart loop, kill qemu-ga, and let the loop go on after 4 s.
    script = (
        "p=$(pidof qemu-ga); pp=$(awk '/^PPid/{print $2}' /proc/$p/status); "
        "kill -STOP $pp; kill $p; sleep 4; kill -CONT $pp"
    )
    events = dom.connection.events
    with events.expect(
        lambda e: e.detail.get("connected") is False,
        kind=EventKind.AGENT_LIFECYCLE,
        domain_uuid=dom.uuid,
    ) as gone:
        _spawn(dom, script)
        gone.wait(10, what="agent disconnect")
    assert not dom.agent_connected
    scope = fs_frozen(dom)
    with pytest.raises(GuestAgentError, match="not connected"), scope:
        pytest.fail("entered")
    assert scope.status is FreezeStatus.FAILED
    waited = dom.wait_for_agent(60)
    assert 0 < waited < 60 and dom.agent_connected
    assert _guest_freeze_status(dom) == "thawed"  # nothing was frozen meanwhile
    with fs_frozen(dom) as scope:
        pass
    assert scope.status is FreezeStatus.THAWED


@pytest.mark.qemu
def test_qemu_no_agent_channel(guest_factory: Any) -> None:
    """A guest without agent channel: GuestAgentError before any change, everywhere."""
    dom = guest_factory(agent=False)
    assert not dom.agent_connected
    scope = fs_frozen(dom)
    with pytest.raises(GuestAgentError, match="not configured"), scope:
        pytest.fail("entered")
    assert scope.status is FreezeStatus.FAILED
    with pytest.raises(GuestAgentError, match="no guest agent channel"):
        dom.wait_for_agent(1)
    with pytest.raises(GuestAgentError):
        dom.fs_info()
