"""The error hierarchy: mapping by libvirt code, families, pickling."""

from __future__ import annotations

import pickle

import libvirt
import pytest

import statecapture
from statecapture import _adapter, errors

# Every libvirt error code statecapture maps, with the class it must become.
MAPPED = {
    # not found
    libvirt.VIR_ERR_NO_DOMAIN: errors.NotFoundError,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: errors.NotFoundError,
    103: errors.NotFoundError,  # NO_DOMAIN_CHECKPOINT
    104: errors.NotFoundError,  # NO_DOMAIN_BACKUP
    libvirt.VIR_ERR_NO_STORAGE_POOL: errors.NotFoundError,
    libvirt.VIR_ERR_NO_STORAGE_VOL: errors.NotFoundError,
    libvirt.VIR_ERR_NO_NETWORK: errors.NotFoundError,
    libvirt.VIR_ERR_NO_SECRET: errors.NotFoundError,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA: errors.NotFoundError,
    99: errors.NotFoundError,  # DEVICE_MISSING
    # unsupported
    libvirt.VIR_ERR_NO_SUPPORT: errors.UnsupportedError,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: errors.UnsupportedError,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: errors.UnsupportedError,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: errors.UnsupportedError,
    libvirt.VIR_ERR_NO_CONNECT: errors.UnsupportedError,  # no driver for the URI
    # invalid state
    libvirt.VIR_ERR_OPERATION_INVALID: errors.InvalidStateError,
    libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY: errors.InvalidStateError,
    libvirt.VIR_ERR_BLOCK_COPY_ACTIVE: errors.InvalidStateError,
    libvirt.VIR_ERR_RESOURCE_BUSY: errors.InvalidStateError,
    libvirt.VIR_ERR_DOM_EXIST: errors.InvalidStateError,
    # guest agent (112, 113 are newer than this binding: literals)
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: errors.GuestAgentError,
    libvirt.VIR_ERR_AGENT_UNSYNCED: errors.GuestAgentError,
    112: errors.GuestAgentError,
    113: errors.GuestAgentError,
    # timeouts, checkpoints, connection
    libvirt.VIR_ERR_OPERATION_TIMEOUT: errors.OperationTimeoutError,
    109: errors.CheckpointInconsistentError,
    libvirt.VIR_ERR_INVALID_CONN: errors.ConnectionLostError,
    libvirt.VIR_ERR_RPC: errors.ConnectionLostError,
}


def _libvirt_error(code: int, message: str = "boom", domain: int = 0) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, 2, "", "", "", 0, 0)
    return exc


@pytest.mark.parametrize(
    "message",
    [
        "internal error: client socket is closed",
        "internal error: connection closed due to keepalive timeout",
        "End of file while reading data: Input/output error",
        "Cannot recv data: Connection reset by peer",
        "Cannot write data: Broken pipe",
    ],
)
@pytest.mark.parametrize("code", [1, 38])
def test_rpc_messages_of_a_lost_connection_are_connection_lost(code: int, message: str) -> None:
    """HAZARDS 22: a daemon restart arrives as a generic error of the RPC layer (code 1 or
    38, VIR_FROM_RPC); it is a ConnectionLostError, whatever the connection says."""
    err = _adapter.translate_error(
        _libvirt_error(code, message, libvirt.VIR_FROM_RPC), "get state", alive=lambda: True
    )
    assert type(err) is errors.ConnectionLostError
    assert err.code == code and err.libvirt_message == message


def test_generic_error_on_a_dead_connection_is_connection_lost() -> None:
    """Any generic (internal/system) error while virConnectIsAlive() is false is a loss;
    the same error on a live connection is not."""
    exc = _libvirt_error(1, "internal error: something odd", libvirt.VIR_FROM_QEMU)
    dead = _adapter.translate_error(exc, "x", alive=lambda: False)
    assert type(dead) is errors.ConnectionLostError
    live = _adapter.translate_error(exc, "x", alive=lambda: True)
    assert type(live) is errors.LibvirtError
    assert type(_adapter.translate_error(exc, "x")) is errors.LibvirtError


def test_failed_connect_and_unknown_scheme_are_not_connection_lost() -> None:
    """Nothing was connected: no driver for a URI scheme (VIR_ERR_NO_CONNECT) or no daemon
    at the socket is not a lost connection, even though the alive probe says 'dead'."""
    for exc in (
        _libvirt_error(5, "no connection driver available for bogus:///x", libvirt.VIR_FROM_NONE),
        _libvirt_error(
            38, "Failed to connect socket to '/nowhere': No such file", libvirt.VIR_FROM_RPC
        ),
    ):
        err = _adapter.translate_error(exc, "connect", alive=lambda: False)
        assert not isinstance(err, errors.ConnectionLostError), err
    assert errors.lookup(5) is errors.UnsupportedError
    with pytest.raises(errors.LibvirtError) as info:
        statecapture.connect("bogus:///x")
    assert not isinstance(info.value, errors.ConnectionLostError)


@pytest.mark.parametrize(("code", "cls"), sorted(MAPPED.items()))
def test_every_mapped_code_translates(code: int, cls: type[errors.LibvirtError]) -> None:
    """Each mapped libvirt code becomes its statecapture class, keeping code and context."""
    err = _adapter.translate_error(_libvirt_error(code), "do thing", domain_name="vm1")
    assert type(err) is cls
    assert err.code == code
    assert err.operation == "do thing"
    assert err.domain_name == "vm1"
    assert err.libvirt_message == "boom"
    assert "vm1" in str(err)
    assert errors.lookup(code) is cls


def test_unknown_code_falls_back_to_libvirt_error() -> None:
    """A code statecapture does not know becomes a plain LibvirtError."""
    err = _adapter.translate_error(_libvirt_error(1), "x")
    assert type(err) is errors.LibvirtError
    assert errors.lookup(9999) is errors.LibvirtError


def test_agent_messages_become_guest_agent_errors() -> None:
    """'agent is not connected' arrives as OPERATION_INVALID but is a GuestAgentError."""
    err = _adapter.translate_error(
        _libvirt_error(55, "Guest agent is not responding: QEMU guest agent is not connected"), "x"
    )
    assert isinstance(err, errors.GuestAgentError)


def test_translated_context_raises_from_original() -> None:
    """`translated` raises the typed error with the libvirtError as __cause__."""
    original = _libvirt_error(42)
    with pytest.raises(errors.NotFoundError) as info, _adapter.translated("look up"):
        raise original
    assert info.value.__cause__ is original


def test_families_and_builtin_bases() -> None:
    """Errors also behave like the matching builtin exceptions."""
    assert issubclass(errors.NotFoundError, LookupError)
    assert issubclass(errors.OperationTimeoutError, TimeoutError)
    assert issubclass(errors.TargetExistsError, FileExistsError)
    assert issubclass(errors.UsageError, ValueError)
    assert not issubclass(errors.UsageError, errors.LibvirtError)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.StateCaptureError)


@pytest.mark.parametrize(
    "exc",
    [
        errors.NotFoundError("gone", code=42, operation="look up", domain_name="vm"),
        errors.CheckpointInconsistentError("bad", disk="vda", bitmap="c1", code=109),
        errors.XMLError("broken", line=3),
        errors.TargetExistsError("exists", path="/tmp/x"),
        errors.UsageError("closed"),
        errors.CleanupError("thaw failed"),
    ],
)
def test_errors_pickle(exc: errors.StateCaptureError) -> None:
    """Every error survives pickling with its attributes (crosses process boundaries)."""
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.__dict__ == exc.__dict__


def test_errors_are_reexported() -> None:
    """The hierarchy is reachable from the package root under the same objects."""
    for name in errors.__all__:
        if name != "lookup":
            assert getattr(statecapture, name) is getattr(errors, name)


def test_names_hint_lists_few_and_suggests_among_many() -> None:
    """Few names are listed in full (closest first as a guess); among many only the closest
    are named; none at all is said so."""
    from statecapture._hints import names_hint

    assert names_hint("c3", [], "checkpoint") == "there are no checkpoints"
    assert names_hint("c3", ["c2", "b1"], "checkpoint") == (
        "did you mean 'c2'? existing checkpoints: b1, c2"
    )
    many = [f"nightly-2026-12-{d:02d}" for d in range(1, 31)]
    hint = names_hint("nightly-2026-12-32", many, "checkpoint")
    assert hint.startswith("did you mean 'nightly-2026-12-")
    assert "(30 checkpoints exist)" in hint and "nightly-2026-12-01," not in hint
    assert names_hint("zzz", many, "snapshot") == "none of the 30 snapshots has a similar name"


def test_unknown_checkpoint_and_snapshot_errors_list_what_exists(
    test_domain: statecapture.Domain,
) -> None:
    """dom.checkpoints[name] / dom.snapshots[name] for an unknown name raise NotFoundError
    naming the ones that exist (the closest first), with libvirt's error as the cause."""
    test_domain.checkpoints.create("nightly-1")
    test_domain.checkpoints.create("nightly-2")
    with pytest.raises(errors.NotFoundError) as info:
        test_domain.checkpoints["nightly-3"]
    assert "existing checkpoints: nightly-1, nightly-2" in str(info.value)
    assert "did you mean" in str(info.value)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # hint survives
    with pytest.raises(errors.NotFoundError, match="there are no snapshots"):
        test_domain.snapshots["before-upgrade"]
    assert "nightly-3" not in test_domain.checkpoints  # __contains__ is unchanged


def test_undefine_refusal_names_the_flag(test_conn: statecapture.Connection) -> None:
    """When libvirt refuses to undefine a domain with snapshots, the error names the
    keyword argument that allows it; with it, the undefine succeeds."""
    dom = test_conn.domain("beta")
    dom.destroy()
    dom.snapshots.create("s1")
    with pytest.raises(errors.InvalidStateError, match=r"undefine\(snapshots_metadata=True\)"):
        dom.undefine()
    dom.undefine(snapshots_metadata=True)
    with pytest.raises(errors.NotFoundError):
        test_conn.domain("beta")
