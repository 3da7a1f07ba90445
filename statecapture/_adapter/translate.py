"""libvirtError → statecapture errors, in one place; flag and constant helpers.

Three rules decide what a libvirt error means, each written once:

* :func:`is_unsupported` — "this driver or daemon cannot do that" (an
  :class:`~statecapture.UnsupportedError`): one of the codes that class maps, a flag the
  driver rejects as ``INVALID_ARG`` "unsupported flags", or an RPC "unknown procedure" (a
  daemon older than the API). Probes and capability reads catch the translated
  :class:`~statecapture.UnsupportedError` instead of comparing codes themselves;
* :func:`is_connection_loss` — the connection to libvirt is gone;
* :func:`translate_error` — the class and message of the statecapture error for one
  ``libvirtError``; :func:`translated` and :func:`call` apply it to a block or a call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import libvirt

from .. import errors

__all__ = [
    "call",
    "client_library_version",
    "is_connection_loss",
    "is_flag_rejection",
    "is_unsupported",
    "lacks_api",
    "listing",
    "translate_error",
    "translated",
]

T = TypeVar("T")


def _flags(*choices: tuple[object, int]) -> int:
    """OR together the flags whose condition is true: ``_flags((paused, START_PAUSED), ...)``."""
    flags = 0
    for wanted, flag in choices:
        if wanted:
            flags |= flag
    return flags


def _const(name: str, value: int) -> int:
    """A libvirt constant, or its documented value when this binding predates it."""
    got = getattr(libvirt, name, value)
    return int(got)


# Connection loss (HAZARDS 22). libvirt reports a daemon that went away mostly as a generic
# error of the RPC layer: "client socket is closed" is VIR_ERR_INTERNAL_ERROR (1) and "End of
# file while reading data" VIR_ERR_SYSTEM_ERROR (38), both from VIR_FROM_RPC; only some paths
# use VIR_ERR_INVALID_CONN (6) or VIR_ERR_RPC (39). VIR_ERR_NO_CONNECT (5) is *not* a loss:
# it is what an unknown URI scheme ("no connection driver available") reports, and a failed
# connect ("Failed to connect socket", 38) is not a loss either — nothing was connected.
_FROM_RPC: Final = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_LOSS_CODES_FROM_RPC: Final = frozenset({1, 38})  # INTERNAL_ERROR, SYSTEM_ERROR
_LOSS_MESSAGES: Final = (
    "client socket is closed",
    "connection closed",
    "end of file while reading data",
    "cannot recv data",
    "cannot write data",
)


def is_connection_loss(
    code: int | None,
    error_domain: int | None,
    message: str,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Whether a libvirt error means the connection to libvirt is gone.

    The one place that decides it: the connection codes (``VIR_ERR_INVALID_CONN``,
    ``VIR_ERR_RPC``) unless :func:`is_unsupported` says the daemon lacks the API; a generic
    error of the RPC layer whose message is one of the known ones ("client socket is
    closed", "connection closed", "End of file while reading data", "Cannot recv/write
    data"); or any generic error (internal, system) while ``alive()`` —
    ``virConnectIsAlive`` of the connection it came from — says the connection is dead.
    """
    if code in errors.ConnectionLostError.codes:
        return not is_unsupported(code, message)
    if code not in _LOSS_CODES_FROM_RPC:
        return False
    lowered = message.lower()
    if "failed to connect" in lowered or "no connection driver" in lowered:
        return False  # never connected: not a loss
    if error_domain in _FROM_RPC and any(m in lowered for m in _LOSS_MESSAGES):
        return True
    if alive is not None:
        try:
            return not alive()
        except Exception:
            return False
    return False


def is_unsupported(code: int | None, message: str) -> bool:
    """THE rule for "this driver or daemon cannot do that".

    One of the codes :class:`~statecapture.UnsupportedError` maps (``NO_SUPPORT``,
    ``OPERATION_UNSUPPORTED``, ``ARGUMENT_UNSUPPORTED``, ``CONFIG_UNSUPPORTED``,
    ``NO_CONNECT``); ``INVALID_ARG`` "unsupported flags" (drivers reject flags they do not
    implement that way: a capability gap, not a bad argument); or an RPC error "unknown
    procedure" (the daemon is older than the API).
    """
    if code in errors.UnsupportedError.codes or is_flag_rejection(code, message):
        return True
    return code == 39 and "unknown procedure" in message.lower()  # VIR_ERR_RPC


def is_flag_rejection(code: int | None, message: str) -> bool:
    """A driver's ``INVALID_ARG`` "unsupported flags": the API is there, an option is not."""
    return code == 8 and "unsupported flag" in message.lower()  # VIR_ERR_INVALID_ARG


def lacks_api(error: errors.LibvirtError) -> bool:
    """Whether a translated error says the driver or daemon lacks the API itself — an
    :class:`~statecapture.UnsupportedError` other than a flag rejection (then the API is
    there and only an option is missing)."""
    message = error.libvirt_message or ""
    return isinstance(error, errors.UnsupportedError) and not is_flag_rejection(error.code, message)


def _is_agent_trouble(message: str) -> bool:
    # "agent unresponsive", "guest agent is not configured/connected" are operation-invalid
    # (55) or argument-unsupported (74) on some paths: recognise them by text too.
    lowered = message.lower()
    return "agent" in lowered and (
        "not connected" in lowered
        or "not configured" in lowered
        or "not responding" in lowered
        or "unresponsive" in lowered
        or "agent is not" in lowered
    )


def translate_error(
    exc: libvirt.libvirtError,
    operation: str,
    *,
    domain_name: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> errors.LibvirtError:
    """Map one ``libvirtError`` to a statecapture error (not raised).

    ``alive`` (the connection's ``isAlive``) lets a generic error be recognised as a lost
    connection (:func:`is_connection_loss`).
    """
    code = exc.get_error_code()
    code = int(code) if code is not None else None
    err_domain = exc.get_error_domain()
    err_domain = int(err_domain) if err_domain is not None else None
    message = exc.get_error_message() or str(exc)
    cls = errors.lookup(code) if code is not None else errors.LibvirtError
    if is_connection_loss(code, err_domain, message, alive):
        cls = errors.ConnectionLostError
    if cls is not errors.GuestAgentError and _is_agent_trouble(message):
        cls = errors.GuestAgentError
    where = f" on domain {domain_name!r}" if domain_name else ""
    text = f"{operation}{where} failed: {message}"
    if is_unsupported(code, message) and cls is not errors.GuestAgentError:
        cls = errors.UnsupportedError
        if is_flag_rejection(code, message):
            text = (
                f"{operation}{where} failed: this driver does not support the option asked"
                f" for ({message})"
            )
    return cls(
        text,
        code=code,
        operation=operation,
        domain_name=domain_name,
        libvirt_message=message,
    )


@contextlib.contextmanager
def translated(
    operation: str,
    *,
    domain_name: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Run the block, translating any ``libvirtError`` into the statecapture hierarchy."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_error(exc, operation, domain_name=domain_name, alive=alive) from exc


def call(
    operation: str,
    fn: Callable[..., T],
    *args: object,
    domain_name: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> T:
    """``fn(*args)`` with any ``libvirtError`` translated."""
    with translated(operation, domain_name=domain_name, alive=alive):
        return fn(*args)


def client_library_version() -> int:
    """The version of the libvirt library loaded in this process (``major*1e6+minor*1e3+micro``)."""
    return int(libvirt.getVersion())


_LISTING_TRIES: Final = 10


def listing(
    operation: str,
    fn: Callable[..., Any],
    *args: object,
    domain_name: str | None,
    alive: Callable[[], bool] | None = None,
) -> list[Any]:
    """Call a libvirt listing API, retrying libvirt 9.0's spurious answer to a listing that
    raced a concurrent delete ("name in virGetDomainCheckpoint must not be NULL", HAZARDS
    21): the list is taken again after a short pause. statecapture's own checkpoint
    changes hold the domain's lock, as do its listings; this covers other clients."""
    for attempt in range(_LISTING_TRIES):
        try:
            return list(fn(*args))
        except libvirt.libvirtError as exc:
            message = exc.get_error_message() or ""
            if (
                attempt < _LISTING_TRIES - 1
                and exc.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
                and "must not be NULL" in message
            ):
                time.sleep(0.01 * (attempt + 1))
                continue
            raise translate_error(exc, operation, domain_name=domain_name, alive=alive) from exc
    raise AssertionError("unreachable")  # pragma: no cover
