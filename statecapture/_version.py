"""Version numbers as comparable values."""

from __future__ import annotations

import functools

import attrs

__all__ = ["Version", "Versions"]


@functools.total_ordering
@attrs.frozen(eq=False, order=False)
class Version:
    """A ``major.minor.micro`` version; compares with other versions and with tuples.

    >>> Version.from_int(9000000) >= (8, 4)
    True
    >>> str(Version(11, 10, 0))
    '11.10.0'
    """

    major: int
    minor: int = 0
    micro: int = 0

    @classmethod
    def from_int(cls, value: int) -> Version:
        """libvirt's ``major * 1_000_000 + minor * 1_000 + micro`` encoding."""
        return cls(value // 1_000_000, (value // 1_000) % 1_000, value % 1_000)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.micro)

    @staticmethod
    def _coerce(other: object) -> tuple[int, ...] | None:
        if isinstance(other, Version):
            return other.as_tuple()
        if isinstance(other, tuple) and all(isinstance(x, int) for x in other):
            return tuple(other) + (0,) * (3 - len(other))
        return None

    def __eq__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self.as_tuple() == o

    def __lt__(self, other: object) -> bool:
        o = self._coerce(other)
        if o is None:
            return NotImplemented
        return self.as_tuple() < o

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@attrs.frozen
class Versions:
    """The versions that decide what a connection can do.

    ``daemon`` is what matters for feature gates: the libvirt version of the daemon (or of the
    in-process driver for ``test://`` and ``qemu:///embed``), not of the client library.
    """

    library: Version
    """libvirt library loaded in this Python process (the client)."""
    daemon: Version
    """libvirt on the other end of the connection."""
    hypervisor: Version | None
    """The hypervisor (QEMU) version; ``None`` when the driver does not report one."""
    driver: str
    """The driver name libvirt reports: ``QEMU``, ``Test`` ..."""
