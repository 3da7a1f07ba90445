"""The one rule for "is this connection's host this host?".

A domain's file paths (disk images, save images, snapshot overlays) name files on the host
the driver runs on. statecapture inspects, checks or creates such files itself only when that
host is this one. The rule, applied to the connection URI:

* a URI without a host part is local: ``test:///default``, ``qemu:///system``,
  ``qemu:///session``, ``qemu:///embed?root=…``, ``qemu+unix:///system`` (a UNIX socket, also
  with ``?socket=…``), and ``qemu+ssh:///system`` / ``qemu+tcp:///system`` (libvirt then
  connects to ``localhost``);
* a URI that names a host is remote, even ``localhost`` (a forwarded port or an ssh alias can
  lead anywhere): ``qemu+ssh://host/system``, ``qemu+tcp://localhost/system``;
* ``qemu+ext:///…`` is remote: the external command can lead anywhere.

When unsure the answer is "remote": statecapture then leaves the files to the daemon and
requires absolute paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["is_local_uri", "writes_host_files"]


def is_local_uri(uri: str) -> bool:
    """Whether file paths of the driver behind ``uri`` name files on this host."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2].lower()
    if transport == "ext":
        return False
    return not parts.hostname


def writes_host_files(conn: Connection) -> bool:
    """Whether the driver creates real files on this host (not remote, not ``test:///``)."""
    return is_local_uri(conn.uri) and conn.driver.lower() != "test"
