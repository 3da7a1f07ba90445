"""statecapture: safe, composable and explainable capture of libvirt domain state.

The whole public API lives in this one namespace (plus :mod:`statecapture.xml` for the pure
XML models and :mod:`statecapture.errors` for the error hierarchy, both re-exported here).
"""

from ._connection import DEFAULT_URI, Connection, connect, resolve_uri
from ._domain import Domain
from ._enums import DomainState, ShutdownMode
from ._events import Event, EventKind, Subscription
from ._version import Version, Versions
from .errors import (
    CheckpointInconsistentError,
    CleanupError,
    ConnectionLostError,
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    OperationTimeoutError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from .xml import BackingSource, Disk, DomainXML

# -- memory state (managed save, save/restore) imports
# -- snapshot imports
# -- freeze imports
# -- block job imports
# -- checkpoint and backup imports
# -- sequence and recovery imports
# -- advisor imports

__version__ = "0.1.0.dev0"

__all__ = [
    # connections and domains
    "connect",
    "resolve_uri",
    "DEFAULT_URI",
    "Connection",
    "Domain",
    "DomainState",
    "ShutdownMode",
    "Version",
    "Versions",
    # events
    "Event",
    "EventKind",
    "Subscription",
    # XML values
    "DomainXML",
    "Disk",
    "BackingSource",
    # errors
    "StateCaptureError",
    "LibvirtError",
    "NotFoundError",
    "UnsupportedError",
    "InvalidStateError",
    "GuestAgentError",
    "OperationTimeoutError",
    "CheckpointInconsistentError",
    "ConnectionLostError",
    "XMLError",
    "CleanupError",
    "UsageError",
    "TargetExistsError",
    # -- memory state names
    # -- snapshot names
    # -- freeze names
    # -- block job names
    # -- checkpoint and backup names
    # -- sequence and recovery names
    # -- advisor names
]
