"""What the caller wants from a capture: :class:`Needs` (with :class:`Consistency` and
:class:`Storage`), validated on construction."""

from __future__ import annotations

import enum

import attrs

from ..errors import UsageError

__all__ = ["Consistency", "Needs", "Storage"]


class Consistency(enum.Enum):
    """How consistent captured disk state must be."""

    CRASH = "crash"
    """Like a power cut: what was on disk at one instant (journaling filesystems cope)."""
    APPLICATION = "application"
    """Quiesced: the guest flushed and froze its filesystems (needs the guest agent), or
    memory is captured together with the disks."""


class Storage(enum.Enum):
    """Where the domain's storage (and the captured state) lives."""

    LOCAL = "local"
    REMOTE = "remote"
    """Network or shared storage: latency and bandwidth matter."""


def _bad_enum(cls: type[enum.Enum], value: object) -> UsageError:
    allowed = ", ".join(repr(m.value) for m in cls)
    return UsageError(f"{cls.__name__} must be one of {allowed}, got {value!r}")


def _to_consistency(value: Consistency | str) -> Consistency:
    try:
        return value if isinstance(value, Consistency) else Consistency(value)
    except ValueError:
        raise _bad_enum(Consistency, value) from None


def _to_storage(value: Storage | str) -> Storage:
    try:
        return value if isinstance(value, Storage) else Storage(value)
    except ValueError:
        raise _bad_enum(Storage, value) from None


def _check_bool(_inst: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"Needs.{attribute.name} must be True or False, got {value!r}")


def _check_downtime(
    _inst: object, _attribute: attrs.Attribute[float | None], value: object
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"Needs.max_downtime must be None or seconds >= 0, got {value!r}")


@attrs.frozen
class Needs:
    """What the caller wants from a capture. Change one with :func:`attrs.evolve`.

    The defaults describe a crash-consistent copy of the disks, local storage, any downtime.
    """

    memory: bool = attrs.field(default=False, validator=_check_bool)
    """Memory state wanted (resume the guest exactly where it was)."""
    disks: bool = attrs.field(default=True, validator=_check_bool)
    """Disk state wanted."""
    consistency: Consistency = attrs.field(
        default=Consistency.CRASH,
        converter=_to_consistency,
    )
    """Crash- or application-consistent disk state."""
    incremental: bool = attrs.field(default=False, validator=_check_bool)
    """Repeated captures should copy only what changed since the last one."""
    max_downtime: float | None = attrs.field(default=None, validator=_check_downtime)
    """Longest acceptable guest downtime (paused, stopped or I/O frozen) in seconds;
    ``None``: any."""
    keep_definition: bool = attrs.field(default=False, validator=_check_bool)
    """The domain definition must stay unchanged (no overlays swapped in, even briefly)."""
    third_party_access: bool = attrs.field(default=False, validator=_check_bool)
    """Another tool must read the captured data (e.g. a backup product over NBD)."""
    storage: Storage = attrs.field(
        default=Storage.LOCAL,
        converter=_to_storage,
    )
    """Whether storage is local or remote (network latency becomes a factor)."""

    def __attrs_post_init__(self) -> None:
        if not (self.memory or self.disks):
            raise UsageError("Needs must want memory state, disk state, or both")
        if self.incremental and not self.disks:
            raise UsageError("incremental captures are of disk state: set disks=True")

    def describe(self) -> str:
        """The needs as one readable line."""
        parts = []
        if self.memory and self.disks:
            parts.append("memory and disk state")
        elif self.memory:
            parts.append("memory state")
        else:
            parts.append("disk state")
        parts.append(f"{self.consistency.value}-consistent")
        if self.incremental:
            parts.append("incremental")
        if self.max_downtime is not None:
            parts.append(f"downtime ≤ {self.max_downtime:g} s")
        if self.keep_definition:
            parts.append("definition unchanged")
        if self.third_party_access:
            parts.append("third-party access")
        parts.append(f"{self.storage.value} storage")
        return ", ".join(parts)
