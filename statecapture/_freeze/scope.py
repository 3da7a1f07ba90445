""":func:`fs_frozen` and its single-use :class:`FreezeScope` (entering, joining, leaving,
explicit thaw), with :class:`FreezeStatus`.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from .._agent import AgentState, agent_state
from ..errors import (
    FreezeExpiredError,
    GuestAgentError,
    LibvirtError,
    NotFoundError,
    ThawError,
    UnsupportedError,
    UsageError,
)
from .agent import (
    Filesystem,
    _already_frozen,
    _port,
    _refused_while_frozen,
    check_seconds,
    fs_info,
)
from .held import (
    _AgentCall,
    _Freeze,
    _key,
    _may_have_frozen,
    _registry,
    _registry_lock,
    _unregister,
)
from .signals import _raise_system_exit, _SignalHold

if TYPE_CHECKING:
    from .._domain import Domain


class FreezeStatus(enum.Enum):
    """Where a :class:`FreezeScope` is in its life."""

    NEW = "new"
    """Created, not entered yet."""
    FROZEN = "frozen"
    """Inside the block; the filesystems are frozen."""
    THAWED = "thawed"
    """Thawed by the scope (on exit or by :meth:`FreezeScope.thaw`), within the budget."""
    EXPIRED = "expired"
    """The freeze ended before the block did: the watchdog thawed after ``max_frozen``, or
    something outside the scope thawed the guest. The capture may be crash-consistent only."""
    THAW_FAILED = "thaw-failed"
    """A thaw failed: the guest may still be frozen. Retry with :meth:`FreezeScope.thaw`."""
    RELEASED = "released"
    """A joined (nested) scope was left; the enclosing scope still holds the freeze."""
    FAILED = "failed"
    """Entering failed; nothing this scope did is left frozen."""


def _normalise_mountpoints(mountpoints: Iterable[str] | None) -> tuple[str, ...] | None:
    if mountpoints is None:
        return None
    if isinstance(mountpoints, str | bytes):
        raise UsageError(
            f"mountpoints must be a list of mount points, not one string ({mountpoints!r}); "
            f"write mountpoints=[{mountpoints!r}]"
        )
    try:
        items = list(mountpoints)
    except TypeError:
        raise UsageError(f"mountpoints must be a list of strings, got {mountpoints!r}") from None
    if not items:
        raise UsageError("mountpoints is empty; pass None to freeze every filesystem")
    for item in items:
        if not isinstance(item, str) or not item:
            raise UsageError(f"each mount point must be a non-empty string, got {item!r}")
    return tuple(dict.fromkeys(items))


@attrs.define(eq=False, repr=False)
class FreezeScope:
    """A single-use freeze of a domain's filesystems; build it with :func:`fs_frozen`.

    Use it as a context manager: the filesystems are frozen on entering the ``with`` block
    and always thawed on leaving it (see :func:`fs_frozen` for every guarantee)::

        with statecapture.fs_frozen(dom, max_frozen=5) as scope:
            ...                                  # take the capture
        print(scope.status, scope.frozen_for)
    """

    domain: Domain
    """The domain whose filesystems the scope freezes."""
    mountpoints: tuple[str, ...] | None
    """The mount points asked for; ``None`` means every filesystem the agent can freeze."""
    max_frozen: float
    """The freeze budget in seconds: the watchdog thaws once it is spent."""
    agent_timeout: float | None
    """The agent response timeout used for the freeze and the thaw; ``None``: libvirt's."""
    _freeze: _Freeze | None = attrs.field(default=None, init=False)
    _entered: bool = attrs.field(default=False, init=False)
    _exited: bool = attrs.field(default=False, init=False)
    _joined: bool = attrs.field(default=False, init=False)
    _joined_at: float | None = attrs.field(default=None, init=False)
    _exited_at: float | None = attrs.field(default=None, init=False)
    _filesystems: tuple[Filesystem, ...] = attrs.field(default=(), init=False)
    _failed: FreezeStatus | None = attrs.field(default=None, init=False)
    _outcome: FreezeStatus | None = attrs.field(default=None, init=False)
    _sigterm_previous: Any = attrs.field(default=None, init=False)
    _sigterm_installed: bool = attrs.field(default=False, init=False)

    # ------------------------------------------------------------------ reporting
    @property
    def status(self) -> FreezeStatus:
        """Where the scope is now (:class:`FreezeStatus`)."""
        if not self._entered:
            return FreezeStatus.NEW
        freeze = self._freeze
        if self._failed is not None:
            if self._failed is FreezeStatus.THAW_FAILED and freeze and not freeze.held:
                return FreezeStatus.FAILED  # a later thaw() got through
            return self._failed
        if freeze is None:  # pragma: no cover - entered without failure always has one
            return FreezeStatus.FAILED
        if self._joined:
            if self._outcome is not None:
                return self._outcome
            if freeze.held:
                return FreezeStatus.THAW_FAILED if freeze.expired else FreezeStatus.FROZEN
            return FreezeStatus.EXPIRED
        if freeze.held:
            return FreezeStatus.THAW_FAILED if freeze.thaw_error else FreezeStatus.FROZEN
        return FreezeStatus.EXPIRED if freeze.expired else FreezeStatus.THAWED

    @property
    def expired(self) -> bool:
        """Whether the freeze ended before the block did (watchdog, or thawed from outside)."""
        freeze = self._freeze
        if freeze is None:
            return False
        if self._joined:
            if self._outcome is not None:
                return self._outcome is FreezeStatus.EXPIRED
            return freeze.expired or not freeze.held
        return freeze.expired

    @property
    def joined(self) -> bool:
        """Whether this scope joined the freeze of an enclosing scope instead of freezing."""
        return self._joined

    @property
    def frozen_filesystems(self) -> tuple[Filesystem, ...]:
        """The filesystems this scope froze (or, when joined, relies on), as the agent
        reported them before the freeze (the agent refuses to list them while frozen)."""
        return self._filesystems

    @property
    def frozen_count(self) -> int:
        """How many filesystems the freeze call reported frozen (0 before it ran)."""
        return self._freeze.frozen_count if self._freeze is not None else 0

    @property
    def frozen_for(self) -> float:
        """Seconds the filesystems may have been frozen — the bound a guest owner cares
        about: from the start of the freeze call to the return of the thaw call, or to now
        while frozen (for a joined scope: while it was inside the shared freeze)."""
        freeze = self._freeze
        if freeze is None or freeze.frozen_at is None:
            return 0.0
        now = time.monotonic()
        end = freeze.thawed_at if freeze.thawed_at is not None else now
        if not self._joined:
            start = freeze.freeze_called_at
            return max(0.0, end - (start if start is not None else freeze.frozen_at))
        assert self._joined_at is not None
        if self._exited_at is not None:
            end = min(end, self._exited_at)
        return max(0.0, end - self._joined_at)

    @property
    def frozen_inner(self) -> float:
        """Seconds between the return of the freeze call and the start of the thaw call
        (or now while frozen): the time the block itself held the guest frozen — the
        narrower figure, without the agent's freeze and thaw work (0.0 for a joined scope:
        see :attr:`frozen_for`)."""
        freeze = self._freeze
        if freeze is None or freeze.frozen_at is None or self._joined:
            return 0.0
        end = freeze.thaw_called_at if freeze.thaw_called_at is not None else time.monotonic()
        return max(0.0, end - freeze.frozen_at)

    @property
    def thaw_error(self) -> ThawError | None:
        """The last thaw failure while the guest may still be frozen, else ``None``."""
        return self._freeze.thaw_error if self._freeze is not None else None

    def __repr__(self) -> str:
        extra = " joined" if self._joined else ""
        return (
            f"<FreezeScope {self.domain.name!r} {self.status.value}{extra} "
            f"mountpoints={list(self.mountpoints) if self.mountpoints else 'all'} "
            f"frozen_for={self.frozen_for:.3f}s max_frozen={self.max_frozen}s>"
        )

    # ------------------------------------------------------------------ entering
    def __enter__(self) -> FreezeScope:
        if self._entered:
            raise UsageError("a FreezeScope can be used only once; call fs_frozen() again")
        self._entered = True
        dom = self.domain
        key = _key(dom)
        with _registry_lock:
            existing = _registry.get(key)
            if existing is None:
                freeze = _Freeze(dom, self.max_frozen, self.mountpoints, self.agent_timeout)
                _registry[key] = freeze
        if existing is not None:
            return self._join(existing)
        self._freeze = freeze
        try:
            self._freeze_now(freeze)
        except BaseException:
            _unregister(freeze)
            if self._failed is None:
                self._failed = FreezeStatus.FAILED
            raise
        return self

    def _join(self, outer: _Freeze) -> FreezeScope:
        dom = self.domain
        try:
            if outer.thread_id != threading.get_ident():
                raise UsageError(
                    f"domain {dom.name!r} is frozen by an fs_frozen scope in another thread "
                    "of this process; freeze it from one thread at a time"
                )
            if not outer.held or outer.expired:
                raise UsageError(
                    f"domain {dom.name!r} has an enclosing fs_frozen scope whose freeze has "
                    "ended already; leave that scope before freezing again"
                )
            covered = {fs.mountpoint for fs in outer.filesystems}
            if self.mountpoints is None:
                if outer.mountpoints is not None:
                    raise UsageError(
                        f"the enclosing fs_frozen scope froze only {list(outer.mountpoints)} "
                        f"of {dom.name!r}; a nested scope asking for every filesystem cannot "
                        "join it"
                    )
                mine = outer.filesystems
            else:
                allowed = set(outer.mountpoints) if outer.mountpoints is not None else covered
                missing = [m for m in self.mountpoints if m not in allowed]
                if missing and (outer.mountpoints is not None or covered):
                    raise UsageError(
                        f"the enclosing fs_frozen scope on {dom.name!r} did not freeze "
                        f"{missing}; a nested scope can only join for filesystems it froze"
                    )
                known = {fs.mountpoint: fs for fs in outer.filesystems}
                mine = tuple(known.get(m, Filesystem(m)) for m in self.mountpoints)
        except BaseException:
            self._failed = FreezeStatus.FAILED
            raise
        self._freeze = outer
        self._joined = True
        self._joined_at = time.monotonic()
        self._filesystems = mine
        outer.joined.append(self)
        outer.lower_deadline(self._joined_at + self.max_frozen)
        return self

    def _probe(self) -> tuple[Filesystem, ...]:
        """Check the agent and list what will freeze, before changing anything."""
        dom = self.domain
        if agent_state(dom) is AgentState.DISCONNECTED:
            raise GuestAgentError(
                f"the guest agent of {dom.name!r} is not connected (yet): nothing was frozen; "
                "after a boot, wait for it with Domain.wait_for_agent()",
                operation="filesystem freeze",
                domain_name=dom.name,
            )
        try:
            filesystems: tuple[Filesystem, ...] | None
            if self.agent_timeout is None:
                filesystems = fs_info(dom)
            else:
                probe = _AgentCall(lambda: fs_info(dom), f"statecapture-fsinfo-{dom.name}")
                filesystems = probe.result(self.agent_timeout, "guest filesystem info", dom)
        except LibvirtError as exc:
            # An agent without (or blocking) guest-get-fsinfo can still freeze; anything
            # more specific (agent gone, domain stopped, already frozen) is a refusal.
            if type(exc) is not LibvirtError and not isinstance(exc, UnsupportedError):
                raise
            filesystems = None
        if self.mountpoints is None:
            return filesystems or ()
        if filesystems is None:
            return tuple(Filesystem(m) for m in self.mountpoints)
        by_mountpoint = {fs.mountpoint: fs for fs in filesystems}
        missing = [m for m in self.mountpoints if m not in by_mountpoint]
        if missing:
            known = ", ".join(by_mountpoint) or "none"
            raise NotFoundError(
                f"domain {dom.name!r} has no filesystem mounted at {', '.join(missing)} "
                f"(mounted: {known}); nothing was frozen",
                operation="filesystem freeze",
                domain_name=dom.name,
            )
        return tuple(by_mountpoint[m] for m in self.mountpoints)

    def _freeze_now(self, freeze: _Freeze) -> None:
        dom = self.domain
        with ExitStack() as undo:
            dom._require_active("filesystem freeze")
            freeze.filesystems = self._filesystems = self._probe()
            freeze.start_watchdog()
            undo.callback(freeze.stop_and_join_watchdog)
            hold = _SignalHold()
            undo.callback(hold.release)  # on failure: restore handlers, re-deliver signals
            targets = list(self.mountpoints) if self.mountpoints is not None else None
            started = freeze.freeze_called_at = time.monotonic()
            try:
                if self.agent_timeout is None:
                    freeze.frozen_count = _port(dom).fs_freeze(targets)
                else:
                    call = _AgentCall(
                        lambda: _port(dom).fs_freeze(targets), f"statecapture-freeze-{dom.name}"
                    )
                    freeze.pending_freeze = call
                    freeze.frozen_count = call.result(self.agent_timeout, "filesystem freeze", dom)
            except BaseException as exc:
                freeze.frozen_at = time.monotonic()
                if _may_have_frozen(exc):
                    self._thaw_after_failed_freeze(freeze, exc, until=started + self.max_frozen)
                elif isinstance(exc, LibvirtError) and _refused_while_frozen(exc):
                    raise _already_frozen(dom, exc, "filesystem freeze") from exc
                raise
            freeze.frozen_at = time.monotonic()
            freeze.held = True
            freeze.arm_watchdog()
            undo.pop_all()
        # SIGTERM ends the block like an exception, so its exit thaws; only the main thread
        # can install handlers, and a handler the application set stays in charge.
        replace: dict[int, Any] = {}
        if hold.saved_handler(signal.SIGTERM) is signal.SIG_DFL:
            self._sigterm_previous = signal.SIG_DFL
            self._sigterm_installed = True
            replace[signal.SIGTERM] = _raise_system_exit
        try:
            # Restores the handlers and delivers a Ctrl-C or SIGTERM that arrived during
            # the freeze call: it must not leave the guest frozen behind a failed __enter__.
            hold.release(replace)
        except BaseException as signalled:
            self._undo_sigterm_handler()
            freeze.stop_watchdog()
            error = freeze.thaw("scope", until=time.monotonic() + self.max_frozen)
            freeze.join_watchdog()
            if error is not None:
                self._failed = FreezeStatus.THAW_FAILED
                signalled.add_note(f"statecapture: thawing after the signal failed: {error}")
            raise

    def _thaw_after_failed_freeze(self, freeze: _Freeze, exc: BaseException, until: float) -> None:
        freeze.held = True  # the guest may be frozen (or freeze when its agent wakes up)
        freeze.count_unknown = True
        pending = freeze.pending_freeze
        if pending is not None:
            # The freeze call still runs (agent_timeout passed): a thaw sent now would only
            # queue behind it, so wait for it within the budget, then thaw what it froze.
            pending.done.wait(max(0.0, until - time.monotonic()))
        error = freeze.thaw("scope", until=max(until, time.monotonic()))
        if error is None:
            count = freeze.thawed_count or 0
            if count:
                exc.add_note(
                    f"statecapture: the freeze happened in the guest anyway and was undone "
                    f"({count} filesystem(s) thawed); libvirt before 11.2 reports an agent "
                    "timeout as 'agent unresponsive'"
                )
            else:
                exc.add_note(
                    "statecapture: a thaw was sent in case the freeze happened in the guest "
                    "anyway; nothing was frozen"
                )
            return
        self._failed = FreezeStatus.THAW_FAILED
        exc.add_note(
            f"statecapture: the freeze may have happened in the guest (or may still, when its "
            f"agent wakes up) and thawing failed: {error}; call Domain.fs_thaw() once the "
            "agent answers"
        )

    def _undo_sigterm_handler(self) -> None:
        if self._sigterm_installed:
            self._sigterm_installed = False
            if signal.getsignal(signal.SIGTERM) is _raise_system_exit:
                signal.signal(signal.SIGTERM, self._sigterm_previous)

    # ------------------------------------------------------------------ leaving
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered or self._exited or self._failed is not None:
            raise UsageError("FreezeScope.__exit__ without a matching successful __enter__")
        if self._joined:
            self._exit_joined(exc)
            return
        hold = _SignalHold()
        outcome: BaseException | None = None
        try:
            outcome = self._exit_owner(exc)
        finally:
            replace: dict[int, Any] = {}
            if self._sigterm_installed:
                self._sigterm_installed = False
                # Only put back the previous handler if nobody replaced ours meanwhile.
                if hold.saved_handler(signal.SIGTERM) is _raise_system_exit:
                    replace[signal.SIGTERM] = self._sigterm_previous
            try:
                hold.release(replace)
            except BaseException as signalled:
                if outcome is not None:
                    signalled.add_note(f"statecapture: leaving the freeze block: {outcome!r}")
                raise
        if outcome is not None:
            raise outcome

    def _exit_owner(self, exc: BaseException | None) -> BaseException | None:
        freeze = self._freeze
        assert freeze is not None
        self._exited = True
        freeze.stop_watchdog()
        until = (freeze.frozen_at or time.monotonic()) + self.max_frozen
        error = freeze.thaw("scope", until=max(until, time.monotonic()))
        freeze.join_watchdog()
        self._exited_at = time.monotonic()
        _unregister(freeze)
        problems: list[BaseException] = []
        if error is not None:
            problems.append(error)
        misnested = [s for s in freeze.joined if not s._exited]
        if misnested:
            problems.append(
                UsageError(
                    f"the fs_frozen scope on {self.domain.name!r} was left before "
                    f"{len(misnested)} scope(s) nested in it; it thawed anyway"
                )
            )
        if error is None and freeze.expired:
            problems.append(self._expired_error(freeze))
        if exc is not None:
            for problem in problems:
                exc.add_note(f"statecapture: {type(problem).__name__}: {problem}")
            return None
        if not problems:
            return None
        first = problems[0]
        for problem in problems[1:]:
            first.add_note(f"statecapture: also {type(problem).__name__}: {problem}")
        return first

    def _expired_error(self, freeze: _Freeze) -> FreezeExpiredError:
        name = self.domain.name
        if freeze.ended == "external" and not freeze.deadline_passed:
            reason = "external"
            message = (
                f"the filesystems of {name!r} were thawed by something else while the block "
                f"ran (the thaw found {freeze.thawed_count} of {freeze.frozen_count} still "
                "frozen); what the block captured may be crash-consistent only"
            )
        else:
            reason = "watchdog"
            message = (
                f"the block outlived the freeze budget of {self.max_frozen} s on {name!r}; the "
                f"watchdog thawed the guest after {self.frozen_for:.2f} s, so what the block "
                "captured after that may be crash-consistent only"
            )
        return FreezeExpiredError(
            message,
            domain_name=name,
            reason=reason,
            max_frozen=self.max_frozen,
            frozen_for=self.frozen_for,
        )

    def _exit_joined(self, exc: BaseException | None) -> None:
        freeze = self._freeze
        assert freeze is not None
        self._exited = True
        self._exited_at = time.monotonic()
        problem: BaseException | None = None
        # It joined a held, unexpired freeze: any end or expiry now happened while inside.
        lost = freeze.expired or not freeze.held
        self._outcome = FreezeStatus.EXPIRED if lost else FreezeStatus.RELEASED
        if lost and freeze.ended == "scope":
            problem = UsageError(
                f"the enclosing fs_frozen scope on {self.domain.name!r} was left before this "
                "nested one; the guest was thawed while this block ran"
            )
        elif lost:
            problem = self._expired_error(freeze)
        if problem is None:
            return
        if exc is not None:
            exc.add_note(f"statecapture: {type(problem).__name__}: {problem}")
            return
        raise problem

    # ------------------------------------------------------------------ explicit thaw
    def thaw(self) -> None:
        """Thaw now: end the freeze early inside the block, or retry after a ThawError.

        Idempotent: does nothing once thawed. Raises :class:`~statecapture.ThawError` when
        the thaw fails, and :class:`~statecapture.UsageError` on a scope that was never
        entered, whose freeze failed, that joined an enclosing scope's freeze, or while
        scopes nested in this one are still inside their blocks.
        """
        freeze = self._freeze
        if not self._entered or freeze is None:
            raise UsageError("thaw() on a FreezeScope that was never entered")
        if self._joined:
            raise UsageError(
                "this scope joined an enclosing fs_frozen scope; only that scope thaws"
            )
        if not freeze.held:
            return
        if any(not s._exited for s in freeze.joined):
            raise UsageError("thaw() while fs_frozen scopes nested in this one are still open")
        freeze.stop_watchdog()
        until = (freeze.frozen_at or time.monotonic()) + self.max_frozen
        error = freeze.thaw("scope", until=max(until, time.monotonic()))
        freeze.join_watchdog()
        if error is not None:
            raise error


def fs_frozen(
    dom: Domain,
    *,
    mountpoints: Iterable[str] | None = None,
    max_frozen: float = 10.0,
    agent_timeout: float | None = None,
) -> FreezeScope:
    """Freeze ``dom``'s filesystems for the duration of a ``with`` block, then thaw.

    A capture taken inside the block (snapshot, backup start, block copy) is
    *application-consistent*: the guest flushed and froze its filesystems first. The returned
    :class:`FreezeScope` is single-use::

        with statecapture.fs_frozen(dom, max_frozen=5) as scope:
            take_the_capture()
        print(scope.frozen_for)

    Guarantees:

    * Before anything changes, the arguments are checked (:class:`UsageError`), the domain
      must run (:class:`InvalidStateError`), its agent must be connected
      (:class:`GuestAgentError`; see :meth:`Domain.wait_for_agent`) and ``mountpoints``
      mounted in the guest (:class:`NotFoundError`).
    * The filesystems are thawed on leaving the block, however it ends: return, exception,
      ``KeyboardInterrupt``, or ``SIGTERM`` (in the main thread, while SIGTERM has its default
      action, it is turned into ``SystemExit(143)`` inside the block, so the process still
      terminates, after the thaw; a handler the application installed stays in charge).
      Signals that arrive while the freeze or thaw call runs are held and delivered after.
    * A watchdog thaws once ``max_frozen`` seconds have passed since the freeze, even when the
      block hangs. The scope then reports :attr:`FreezeScope.expired`, and leaving the block
      raises :class:`FreezeExpiredError` unless the block raised (its error gets a note).
      The same happens when something else thawed the guest during the block.
    * A failed thaw raises :class:`ThawError` (a :class:`CleanupError`); when the block
      raised, its error propagates with the thaw failure as a note. While the agent does not
      answer, the thaw is retried until the budget is spent. The guest may then still be
      frozen: retry with :meth:`FreezeScope.thaw` or :meth:`Domain.fs_thaw`.
    * When the freeze call itself fails in a way that may still freeze the guest (libvirt
      before 11.2 reports an agent timeout as "agent unresponsive"), a thaw is sent anyway,
      and retried until it gets through or ``max_frozen`` is spent.

    Args:
        dom: a running domain with a connected guest agent.
        mountpoints: guest mount points to freeze (``["/data"]``); ``None`` freezes all.
        max_frozen: the freeze budget in seconds, enforced by the watchdog.
        agent_timeout: seconds statecapture waits for the agent's answer to the probe, the
            freeze and each thaw attempt; past it the call raises
            :class:`OperationTimeoutError` (a freeze that may still land is thawed as
            above). Enforced on the client side: the domain's own agent response timeout
            (``virDomainAgentSetResponseTimeout``, shared by every client) is never changed.
            ``None``: wait as long as the domain's setting says.

    Nesting: in the same thread, a scope on a domain that an enclosing scope of this process
    holds frozen joins that freeze (:attr:`FreezeScope.joined`): it freezes and thaws
    nothing, its ``mountpoints`` must be among those frozen, and its ``max_frozen`` can only
    shorten the shared budget. From another thread it raises :class:`UsageError`.
    """
    from .._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"fs_frozen() needs a statecapture Domain, got {type(dom).__name__}")
    budget = check_seconds("max_frozen", max_frozen)
    assert budget is not None
    timeout = check_seconds("agent_timeout", agent_timeout, allow_none=True)
    return FreezeScope(dom, _normalise_mountpoints(mountpoints), budget, timeout)
