"""Capability probes: does the driver implement an API? Never changes anything.

An API that has no read-only counterpart is called with a flag bit no libvirt API defines
(:data:`PROBE_FLAG`): every driver entry point validates its flags first (``virCheckFlags``)
and answers ``INVALID_ARG`` "unsupported flags", while a driver that lacks the API answers
with an unsupported error (:func:`~.translate.is_unsupported`) before reaching any driver
code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import libvirt

from .. import errors
from .._ports import ProbeAnswer
from .translate import is_flag_rejection, lacks_api, translate_error

__all__ = ["PROBE_FLAG", "connection_calls", "domain_calls", "probe"]

PROBE_FLAG: Final = 1 << 30
_PROBE_PATH: Final = "/nonexistent/statecapture-capability-probe"

Calls = dict[str, tuple[str, Callable[[], object]]]


def connection_calls(raw: Any) -> Calls:
    """feature → (libvirt API, the probe call) for the connection-level APIs."""
    bad, path = PROBE_FLAG, _PROBE_PATH
    return {
        "restore": ("virDomainRestoreFlags", lambda: raw.restoreFlags(path, None, bad)),
        "restore_params": ("virDomainRestoreParams", lambda: raw.restoreParams({}, bad)),
    }


def domain_calls(d: Any) -> Calls:
    """feature → (libvirt API, the probe call) for the domain-level APIs."""
    bad, path = PROBE_FLAG, _PROBE_PATH
    disk_xml = f"<disk type='file'><source file='{path}'/></disk>"
    return {
        "managed_save": ("virDomainManagedSave", lambda: d.managedSave(bad)),
        "save": ("virDomainSaveFlags", lambda: d.saveFlags(path, None, bad)),
        "save_params": ("virDomainSaveParams", lambda: d.saveParams({}, bad)),
        "snapshot": (
            "virDomainSnapshotCreateXML",
            lambda: d.snapshotCreateXML("<domainsnapshot/>", bad),
        ),
        "fs_freeze": ("virDomainFSFreeze", lambda: d.fsFreeze(None, bad)),
        "block_copy": ("virDomainBlockCopy", lambda: d.blockCopy("vda", disk_xml, None, bad)),
        "block_commit": (
            "virDomainBlockCommit",
            lambda: d.blockCommit("vda", None, None, 0, bad),
        ),
        "checkpoint": (
            "virDomainCheckpointCreateXML",
            lambda: d.checkpointCreateXML("<domaincheckpoint/>", bad),
        ),
        "backup": ("virDomainBackupBegin", lambda: d.backupBegin("<domainbackup/>", None, bad)),
    }


def probe(api: str, fn: Callable[[], object], alive: Callable[[], bool]) -> ProbeAnswer:
    """Make the probe call: implemented (the driver rejected the probe flag or answered
    from inside), not implemented (an unsupported error other than the flag rejection),
    or cannot tell (``OPERATION_DENIED``: a read-only connection). Raises only when the
    connection is gone."""
    try:
        fn()
    except libvirt.libvirtError as exc:
        err = translate_error(exc, "capability probe", alive=alive)
        message = err.libvirt_message or str(exc)
        if isinstance(err, errors.ConnectionLostError):
            raise err from exc
        if err.code == libvirt.VIR_ERR_OPERATION_DENIED:
            return ProbeAnswer(None, f"{api} not probed: {message}")
        if lacks_api(err):
            if "unknown procedure" in message.lower():
                return ProbeAnswer(False, f"the daemon does not know {api}")
            return ProbeAnswer(False, f"{api} not supported")
        if is_flag_rejection(err.code, message) and "in function " in message:
            function = message.rpartition("in function ")[2].strip()
            return ProbeAnswer(True, f"{api} implemented ({function} rejected the probe flag)")
        return ProbeAnswer(True, f"{api} implemented (the driver answered: {message})")
    # Never seen: a driver that ignored an undefined flag and did the work.
    return ProbeAnswer(True, f"{api} implemented (the probe call succeeded)")
