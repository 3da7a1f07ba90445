"""Inject libvirt failures and record libvirt calls, without monkeypatching anything.

Every :class:`~statecapture.Domain` and :class:`~statecapture.Connection` talks to libvirt
through its *port* (:attr:`Domain.port <statecapture.Domain.port>`, one typed method per
libvirt call, such as ``fs_freeze``, ``fs_thaw``, ``backup_begin``, ``snapshot_create``,
``set_metadata``; the full lists are :data:`DOMAIN_CALLS` and :data:`CONNECTION_CALLS`).
This module puts a pass-through in front of a handle's port, so a test can make one named
call fail, hang or be interrupted, and can see every call the library made:

.. code-block:: python

    from statecapture import LibvirtError
    from statecapture.testing.faults import inject, record

    boom = LibvirtError("filesystem thaw failed: injected", code=1)
    with inject(dom, "fs_thaw", raises=boom) as fault:
        ...                       # every thaw through dom fails
    assert fault.calls == 1

    with inject(dom, "fs_freeze", after=lambda: signal.raise_signal(signal.SIGINT)):
        ...                       # Ctrl-C right after the guest froze

    with record(dom) as log:
        statecapture.direct_backup(dom, out)
    assert log.between("fs_freeze", "fs_thaw") == ["backup_begin"]

Names: a domain call by its method name (``"fs_thaw"``), a connection call likewise
(``"restore"``; through a :class:`Domain` it is installed on the domain's connection), a
call on a snapshot or checkpoint object with its kind in front (``"checkpoint.delete"``,
``"snapshot.revert"``): those apply to the objects the intercepted port hands out. An
unknown name is a :class:`~statecapture.UsageError`. Installed on a
:class:`~statecapture.Connection`, domain-level faults and recorders also reach every
domain handle the connection makes while they are installed.

The pass-through stays in front of the port after the block (doing nothing), so an object
that kept the port keeps working; what a fault or recorder does ends with its block.
Thread safe: calls from any thread (the freeze watchdog, a backup's copy threads) go
through it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._adapter import VirCheckpoint, VirDomain, VirSnapshot
from .._domain import Domain
from .._ports import CheckpointObjectPort, ConnectionPort, DomainPort, SnapshotObjectPort
from ..errors import UsageError

if TYPE_CHECKING:
    from .._connection import Connection

__all__ = [
    "CONNECTION_CALLS",
    "DOMAIN_CALLS",
    "Call",
    "CallLog",
    "Fault",
    "inject",
    "record",
]


def _methods(protocol: type, prefix: str = "") -> frozenset[str]:
    found = set()
    for klass in protocol.__mro__:
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value) and not isinstance(value, type):
                found.add(prefix + name)
    return frozenset(found)


DOMAIN_CALLS: Final = (
    _methods(DomainPort)
    | _methods(SnapshotObjectPort, "snapshot.")
    | _methods(CheckpointObjectPort, "checkpoint.")
)
"""Every call name :func:`inject` and :func:`record` know on a domain's port (with the
``snapshot.``/``checkpoint.`` object calls)."""

CONNECTION_CALLS: Final = _methods(ConnectionPort)
"""Every call name on a connection's port."""


# --------------------------------------------------------------------------- values


@attrs.frozen
class Call:
    """One call made through an intercepted port."""

    name: str
    """The call's name (``"fs_thaw"``, ``"checkpoint.delete"``)."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    thread: int
    """``threading.get_ident()`` of the calling thread."""
    started: float
    """``time.perf_counter()`` when the call was made."""
    ended: float
    """``time.perf_counter()`` when it returned or raised."""
    error: BaseException | None
    """What it raised, or ``None``."""

    @property
    def seconds(self) -> float:
        """How long the call took."""
        return self.ended - self.started


@attrs.define(eq=False)
class CallLog:
    """The calls :func:`record` saw, in the order they ended (see :attr:`calls`)."""

    calls: list[Call] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def _add(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def clear(self) -> None:
        """Forget the calls seen so far (recording goes on)."""
        with self._lock:
            self.calls.clear()

    def names(self, *, thread: int | None = None) -> list[str]:
        """The calls' names in the order they started (of one ``thread`` if given)."""
        return [c.name for c in self.of(thread)]

    def of(self, thread: int | None) -> list[Call]:
        """The calls (of one ``thread``, or all), in the order they started."""
        with self._lock:
            found = [c for c in self.calls if thread is None or c.thread == thread]
        return sorted(found, key=lambda c: c.started)

    def between(self, first: str, last: str, *, thread: int | None = None) -> list[str]:
        """Names of the calls that started after each ``first`` call returned and before
        the next ``last`` call started (``thread``: only that thread's calls count), e.g.
        ``log.between("fs_freeze", "fs_thaw")``: what ran while the guest was frozen."""
        inside: list[str] = []
        opened: float | None = None
        everything = self.of(None)
        for c in everything:
            if c.name == first:
                opened = c.ended
            elif c.name == last and opened is not None:
                inside.extend(
                    o.name
                    for o in everything
                    if o.name not in (first, last)
                    and opened <= o.started < c.started
                    and (thread is None or o.thread == thread)
                )
                opened = None
        return inside

    def named(self, name: str) -> list[Call]:
        """The calls called ``name``, in the order they started."""
        return [c for c in self.of(None) if c.name == name]


@attrs.define(eq=False)
class Fault:
    """What :func:`inject` does to one named call; counts the calls it saw."""

    call: str
    """The port call's name (``"fs_thaw"``, ``"checkpoint.delete"``)."""
    raises: BaseException | Callable[[], BaseException] | None = None
    """Raised instead of the call (an exception, or a class or factory making one)."""
    before: Callable[[], object] | None = None
    """Run before the call (or before raising)."""
    after: Callable[[], object] | None = None
    """Run after the real call returned; may raise."""
    delay: float = 0.0
    """Seconds to wait before the call."""
    times: int | None = None
    """Act on the first ``times`` matching calls only (``None``: all)."""
    when: Callable[..., bool] | None = None
    """A call matches only when this, given the call's arguments, is true."""
    calls: int = 0
    """How many calls matched so far (each one the fault acted on, up to ``times``)."""
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def _arm(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if self.when is not None and not self.when(*args, **kwargs):
            return False
        with self._lock:
            self.calls += 1
            return self.times is None or self.calls <= self.times

    def _enter(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.before is not None:
            self.before()
        if isinstance(self.raises, BaseException):
            raise self.raises
        if self.raises is not None:
            raise self.raises()  # an exception class, or a factory

    def _exit(self) -> None:
        if self.after is not None:
            self.after()


# --------------------------------------------------------------------------- the pass-through


class _Interceptor:
    """Stands in for a port: every attribute comes from the real port; calls go through
    the installed faults and recorders (its own and its parent's)."""

    def __init__(self, real: object, kind: str, parent: _Interceptor | None = None) -> None:
        self._real = real
        self._kind = kind  # "connection", "domain", "snapshot" or "checkpoint"
        self._parent = parent
        self._faults: tuple[Fault, ...] = ()
        self._logs: tuple[CallLog, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<intercepted {self._real!r}>"

    def _all(self) -> tuple[tuple[Fault, ...], tuple[CallLog, ...]]:
        faults, logs = self._faults, self._logs
        if self._parent is not None:
            pf, pl = self._parent._all()
            faults += tuple(f for f in pf if f not in faults)
            logs += tuple(g for g in pl if g not in logs)
        return faults, logs

    def _change(self, fault: Fault | None = None, log: CallLog | None = None, *, add: bool) -> None:
        with self._lock:
            if fault is not None:
                self._faults = (
                    (*self._faults, fault)
                    if add
                    else tuple(f for f in self._faults if f is not fault)
                )
            if log is not None:
                self._logs = (
                    (*self._logs, log) if add else tuple(g for g in self._logs if g is not log)
                )

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name.startswith("_") or not callable(attr):
            return attr
        qualified = name if self._kind in ("domain", "connection") else f"{self._kind}.{name}"

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._dispatch(qualified, attr, args, kwargs)

        return call

    def _dispatch(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        faults, logs = self._all()
        acting = [f for f in faults if f.call == name and f._arm(args, kwargs)]
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            for fault in acting:
                fault._enter()
            result = fn(*args, **kwargs)
            for fault in acting:
                fault._exit()
            return self._wrap(result)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if logs:
                done = Call(
                    name,
                    args,
                    kwargs,
                    threading.get_ident(),
                    started,
                    time.perf_counter(),
                    error,
                )
                for log in logs:
                    log._add(done)

    def _wrap(self, result: object) -> Any:
        if isinstance(result, list):
            return [self._wrap(r) for r in result]
        kind = {VirDomain: "domain", VirSnapshot: "snapshot", VirCheckpoint: "checkpoint"}.get(
            type(result)
        )
        return result if kind is None else _Interceptor(result, kind, self)


_install_lock = threading.Lock()


def _interceptor(handle: Domain | Connection) -> _Interceptor:
    """The pass-through in front of ``handle``'s port (put there on first use)."""
    with _install_lock:
        port = handle._port
        if isinstance(port, _Interceptor):
            return port
        kind = "domain" if isinstance(handle, Domain) else "connection"
        interceptor = _Interceptor(port, kind)
        handle._port = interceptor  # it stands in for the port (any attribute is the port's)
        return interceptor


def _where(target: Domain | Connection, call: str) -> _Interceptor:
    if call in CONNECTION_CALLS:
        return _interceptor(target.connection if isinstance(target, Domain) else target)
    if call in DOMAIN_CALLS:
        return _interceptor(target)
    raise UsageError(
        f"unknown port call {call!r}: a domain call (one of statecapture.testing.faults."
        "DOMAIN_CALLS, e.g. 'fs_thaw', 'checkpoint.delete') or a connection call "
        "(CONNECTION_CALLS, e.g. 'restore')"
    )


@contextlib.contextmanager
def inject(
    target: Domain | Connection,
    call: str,
    *,
    raises: BaseException | Callable[[], BaseException] | None = None,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
    delay: float = 0.0,
    times: int | None = None,
    when: Callable[..., bool] | None = None,
) -> Iterator[Fault]:
    """Within the block, the port call ``call`` of ``target`` misbehaves as asked.

    A call matches when ``when`` (given the call's own arguments) is true, or always
    without ``when``. For each matching call (the first ``times`` only, when given): wait
    ``delay`` seconds, run ``before()``, then raise ``raises`` (an exception, or a class
    or factory to call for a fresh one) instead of making the call; otherwise make the
    real call and then run ``after()`` (which may raise: the call happened, its caller
    sees the error). Yields
    the :class:`Fault`, whose ``calls`` counts the matching calls (with no effect asked
    for, it only counts). Faults of one name nest; each ends with its block.
    """
    if times is not None and times < 0:
        raise UsageError("times must be >= 0")
    fault = Fault(call, raises, before, after, float(delay), times, when)
    where = _where(target, call)
    where._change(fault, add=True)
    try:
        yield fault
    finally:
        where._change(fault, add=False)


@contextlib.contextmanager
def record(target: Domain | Connection) -> Iterator[CallLog]:
    """Within the block, every call through ``target``'s port — and its connection's, for a
    :class:`~statecapture.Domain` — is logged in the yielded :class:`CallLog` (name,
    arguments, thread, start and end times, error)."""
    log = CallLog()
    places = [_interceptor(target)]
    if isinstance(target, Domain):
        places.append(_interceptor(target.connection))
    for place in places:
        place._change(log=log, add=True)
    try:
        yield log
    finally:
        for place in places:
            place._change(log=log, add=False)
