"""Pure, libvirt-free models of the XML documents statecapture handles.

Every model is a frozen value with ``from_xml()`` and ``to_xml()``; XML that statecapture
does not model survives a round trip. Parsing is hardened: no network access, no DTDs, no
entity expansion. Malformed input raises :class:`statecapture.XMLError` with the line.
"""

from ._base import parse, serialize
from ._domain import BackingSource, Disk, DomainXML

__all__ = [
    "parse",
    "serialize",
    "DomainXML",
    "Disk",
    "BackingSource",
]
