"""One freeze of one domain held by this process (:class:`_Freeze`): its bounded agent calls,
thaw retries, watchdog thread, and the registry that lets nested scopes join it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from ..errors import (
    ConnectionLostError,
    GuestAgentError,
    OperationTimeoutError,
    StateCaptureError,
    ThawError,
)
from .agent import Filesystem, _port

if TYPE_CHECKING:
    from .._domain import Domain
    from .scope import FreezeScope

#: Pauses between thaw attempts while the agent does not answer (the last one repeats).
_BACKOFF: Final = (0.1, 0.2, 0.5, 1.0)


# --------------------------------------------------------------------------- one freeze


def _may_have_frozen(exc: BaseException) -> bool:
    """Whether a failed freeze call may still have frozen (or may yet freeze) the guest."""
    if isinstance(exc, OperationTimeoutError | ConnectionLostError):
        return True
    if isinstance(exc, GuestAgentError):
        message = (exc.libvirt_message or str(exc)).lower()
        return not ("not connected" in message or "not configured" in message)
    # Any other libvirt error is a refusal (qemu-ga undoes a partial freeze itself); never
    # thaw after one: "frozen state" means someone else holds the freeze.
    return not isinstance(exc, StateCaptureError)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, GuestAgentError | OperationTimeoutError)


class _AgentCallPending(OperationTimeoutError):
    """A guest-agent call did not return within the scope's client-side ``agent_timeout``."""


_T = TypeVar("_T")


class _AgentCall(Generic[_T]):
    """One guest-agent call run in a helper thread, so the caller waits at most a limit.

    ``agent_timeout`` is enforced here, on the client side, and never by changing the
    domain's agent response timeout (``virDomainAgentSetResponseTimeout``): that setting is
    shared by every client of the domain, outlives the process, and libvirt offers no call
    to read its current value, so it could not be put back (HAZARDS 23). A libvirt call
    cannot be cancelled: when the limit passes, the call keeps running and may still land
    (a freeze queued behind a hung agent freezes when the agent wakes up).
    """

    def __init__(self, fn: Callable[[], _T], name: str) -> None:
        self.done = threading.Event()
        self.value: _T | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], _T]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc
        finally:
            self.done.set()

    def result(self, limit: float, what: str, dom: Domain) -> _T:
        """The call's value (or its error) once it returns within ``limit`` seconds."""
        if not self.done.wait(max(0.0, limit)):
            raise _AgentCallPending(
                f"{what} on domain {dom.name!r}: the guest agent did not answer within "
                f"{limit:g} s (statecapture's agent_timeout; the call may still complete)",
                operation=what,
                domain_name=dom.name,
            )
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class _Freeze:
    """One freeze of one domain held by this process, shared by the scopes that joined it."""

    def __init__(
        self,
        dom: Domain,
        max_frozen: float,
        mountpoints: tuple[str, ...] | None,
        agent_timeout: float | None = None,
    ) -> None:
        self.dom = dom
        self.agent_timeout = agent_timeout
        self.pending_freeze: _AgentCall[int] | None = None
        self.pending_thaw: _AgentCall[int] | None = None
        self.key = _key(dom)
        self.thread_id = threading.get_ident()
        self.mountpoints = mountpoints
        self.max_frozen = max_frozen
        self.filesystems: tuple[Filesystem, ...] = ()
        self.lock = threading.Lock()  # serialises thaws and their bookkeeping
        self.cond = threading.Condition()  # wakes the watchdog: new deadline or stop
        self.deadline = math.inf
        self.stopped = False
        self.watchdog: threading.Thread | None = None
        self.freeze_called_at: float | None = None  # just before the freeze call
        self.frozen_at: float | None = None  # the freeze call returned
        self.thaw_called_at: float | None = None  # the successful thaw call started
        self.thawed_at: float | None = None  # the thaw call returned
        self.frozen_count = 0
        self.thawed_count: int | None = None
        self.held = False  # the guest is (or may be) frozen by this freeze
        self.ended: str | None = None  # "scope", "watchdog" or "external" once thawed
        self.deadline_passed = False
        self.count_unknown = False  # a thaw attempt failed: its effect is not known
        self.thaw_error: ThawError | None = None
        self.joined: list[FreezeScope] = []

    # ---- thawing
    def thaw_once(self, reason: str) -> ThawError | None:
        """One thaw attempt unless already thawed; the error it met, if any."""
        with self.lock:
            if not self.held:
                return None
            called = time.monotonic()
            try:
                count = self._thaw_call()
            except Exception as exc:  # libvirt's refusal, a closed connection ...: report it
                self.count_unknown = True
                error = ThawError(
                    f"thawing the filesystems of {self.dom.name!r} failed; the guest may still "
                    f"be frozen (retry with FreezeScope.thaw() or Domain.fs_thaw()): {exc}",
                    domain_name=self.dom.name,
                )
                error.__cause__ = exc
                self.thaw_error = error
                return error
            self.thawed_at = time.monotonic()
            self.thaw_called_at = called
            self.thawed_count = count
            self.held = False
            self.thaw_error = None
            if not self.count_unknown and count < self.frozen_count:
                self.ended = "external"
            else:
                self.ended = reason
            _unregister(self)
            return None

    def _thaw_call(self) -> int:
        """``fs_thaw``, bounded by ``agent_timeout`` when set; a thaw still pending from an
        earlier attempt is waited for rather than queued again."""
        if self.agent_timeout is None:
            return _port(self.dom).fs_thaw()
        call = self.pending_thaw
        if call is None:
            call = _AgentCall(_port(self.dom).fs_thaw, f"statecapture-thaw-{self.dom.name}")
            self.pending_thaw = call
        try:
            return call.result(self.agent_timeout, "filesystem thaw", self.dom)
        finally:
            if call.done.is_set():
                self.pending_thaw = None

    def thaw(self, reason: str, *, until: float) -> ThawError | None:
        """Thaw, retrying while the agent does not answer and ``until`` is not reached."""
        attempt = 0
        while True:
            error = self.thaw_once(reason)
            if error is None:
                return None
            pause = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
            attempt += 1
            if not _retryable(error.__cause__ or error) or time.monotonic() + pause > until:
                return error
            time.sleep(pause)

    # ---- watchdog
    def start_watchdog(self) -> None:
        """Start the (unarmed) watchdog thread, before the freeze: its start-up then does
        not count against the frozen time."""
        # Not a daemon — explicitly: a thread inherits the daemon flag of the thread that
        # starts it, and an interpreter shutting down must wait for it to thaw the guest
        # even when the block runs (and hangs) in a daemon thread.
        thread = threading.Thread(
            target=self._watch,
            name=f"statecapture-freeze-watchdog-{self.dom.name}",
            daemon=False,
        )
        thread.start()
        self.watchdog = thread

    def arm_watchdog(self) -> None:
        """Start counting the budget from the end of the freeze call."""
        assert self.frozen_at is not None
        self.lower_deadline(self.frozen_at + self.max_frozen)

    def stop_and_join_watchdog(self) -> None:
        self.stop_watchdog()
        self.join_watchdog()

    def lower_deadline(self, deadline: float) -> None:
        with self.cond:
            if deadline < self.deadline:
                self.deadline = deadline
                self.cond.notify_all()

    def stop_watchdog(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def join_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog is not threading.current_thread():
            self.watchdog.join()

    def _watch(self) -> None:
        with self.cond:
            while not self.stopped:
                if self.deadline == math.inf:  # not armed yet
                    self.cond.wait()
                    continue
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            if self.stopped:
                return
        error = self.thaw_once("watchdog")
        # Only now: "expired" must not show before the thaw was at least attempted.
        self.deadline_passed = True
        # Keep trying until the thaw gets through or the block ends (its exit tries again).
        attempt = 0
        while error is not None:
            pause = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
            attempt += 1
            with self.cond:
                if self.cond.wait_for(self._is_stopped, pause):
                    return
            error = self.thaw_once("watchdog")

    def _is_stopped(self) -> bool:
        return self.stopped

    @property
    def expired(self) -> bool:
        return self.deadline_passed or self.ended in ("watchdog", "external")


# --------------------------------------------------------------------------- registry

_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], _Freeze] = {}


def _key(dom: Domain) -> tuple[str, str]:
    return (dom.connection.uri, dom.uuid)


def _unregister(freeze: _Freeze) -> None:
    with _registry_lock:
        if _registry.get(freeze.key) is freeze:
            del _registry[freeze.key]


# --------------------------------------------------------------------------- the scope


#: For tests: the freezes this process holds now.
def _held_freezes() -> list[_Freeze]:
    with _registry_lock:
        return list(_registry.values())
