"""Hosts, inventories and domain selection for :mod:`statecapture.fleet`."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, TypeAlias

import attrs
from lxml import etree

from ..errors import UsageError

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import MetadataPort
    from .._repository import Repository

__all__ = [
    "LABELS_NS",
    "Host",
    "Selector",
    "check_inventory",
    "labels",
    "matches",
    "set_labels",
]

LABELS_NS: Final = "urn:x-statecapture:labels:1"
"""The metadata namespace of the labels :func:`set_labels` stores in a domain's XML."""
_LABELS_KEY: Final = "sclabels"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _repository_path(value: object) -> Path:
    from .._repository import Repository

    if isinstance(value, Repository):
        return value.path
    if isinstance(value, str | os.PathLike):
        return Path(value).absolute()
    raise UsageError(f"repository must be a path or a Repository, not {type(value).__name__}")


def _frozen_labels(value: Mapping[str, str] | None) -> Mapping[str, str]:
    items = dict(value or {})
    for k, v in items.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise UsageError(f"labels must map str to str, got {k!r}: {v!r}")
    return MappingProxyType(items)


def _check_name(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise UsageError(
            f"host name {value!r} must be 1-63 characters of letters, digits, '.', '_', '-' "
            "(it names the Dask worker resource host:<name>)"
        )


def _check_uri(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or "://" not in value:
        raise UsageError(f"uri must be a libvirt URI such as qemu:///system, not {value!r}")


@attrs.frozen
class Host:
    """One hypervisor of a fleet: its name, its libvirt URI and its backup repository.

    ``name`` is also the Dask worker resource that pins tasks to the host's worker
    (``host:<name>``). ``uri`` is opened *by that worker*, so ``qemu:///system`` is the
    usual value; ``repository`` is a path on the host (local disk or a shared mount) or a
    :class:`~statecapture.Repository`; it must already exist (``Repository.create``).
    ``labels`` are free-form and reach a ``select`` callable through the host.

    ::

        Host("hv1", "qemu:///system", repository="/backups/hv1")
    """

    name: str = attrs.field(validator=_check_name)
    """The host's name (unique in an inventory)."""
    uri: str = attrs.field(validator=_check_uri)
    """The libvirt URI the host's worker opens."""
    repository: Path = attrs.field(converter=_repository_path)
    """The repository's directory, as seen on the host."""
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_labels)
    """Free-form labels (``{"rack": "b2"}``)."""

    @property
    def resource(self) -> str:
        """The Dask worker resource that names this host: ``host:<name>``."""
        return f"host:{self.name}"

    def __getstate__(self) -> dict[str, object]:
        return {"name": self.name, "uri": self.uri, "repository": str(self.repository),
                "labels": dict(self.labels)}  # fmt: skip

    def __setstate__(self, state: dict[str, object]) -> None:
        object.__setattr__(self, "name", state["name"])
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "repository", Path(str(state["repository"])))
        labels = state["labels"]
        assert isinstance(labels, dict)
        object.__setattr__(self, "labels", MappingProxyType(labels))


def check_inventory(inventory: Iterable[Host]) -> tuple[Host, ...]:
    """The inventory as a tuple; :class:`UsageError` for a non-host or a repeated name."""
    if isinstance(inventory, Host):
        raise UsageError("the inventory is a sequence of Host values, e.g. [Host(...)]")
    hosts = tuple(inventory)
    seen: set[str] = set()
    for h in hosts:
        if not isinstance(h, Host):
            raise UsageError(f"inventory entries must be Host values, got {type(h).__name__}")
        if h.name in seen:
            raise UsageError(f"the inventory names host {h.name!r} twice")
        seen.add(h.name)
    return hosts


Selector: TypeAlias = (
    str | Sequence[str] | Mapping[str, str] | Callable[[Host, "Domain"], bool] | None
)
"""How ``fleet.backup(select=...)`` picks domains: ``None`` (all), a name pattern
(``"web-*"``) or a list of them, a mapping of labels every one of which the domain carries
(:func:`set_labels`), or a callable ``select(host, domain) -> bool``."""


def check_selector(select: Selector) -> None:
    """:class:`UsageError` when ``select`` is none of the accepted forms."""
    if select is None or isinstance(select, str) or callable(select):
        return
    if isinstance(select, Mapping):
        _frozen_labels(select)
        return
    if isinstance(select, Sequence) and all(isinstance(p, str) for p in select):
        return
    raise UsageError(
        "select must be a name pattern, a list of patterns, a mapping of labels or a "
        f"callable (host, domain) -> bool, not {select!r}"
    )


def matches(select: Selector, host: Host, dom: Domain) -> bool:
    """Whether ``select`` picks ``dom`` (a domain on ``host``)."""
    if select is None:
        return True
    if isinstance(select, str):
        return fnmatch.fnmatchcase(dom.name, select)
    if isinstance(select, Mapping):
        have = labels(dom)
        return all(have.get(k) == v for k, v in select.items())
    if callable(select):
        return bool(select(host, dom))
    return any(fnmatch.fnmatchcase(dom.name, p) for p in select)


def labels(dom: Domain) -> Mapping[str, str]:
    """The labels stored on ``dom`` by :func:`set_labels` (empty when none)."""
    text = _port(dom).get_metadata(LABELS_NS)
    if text is None:
        return MappingProxyType({})
    root = etree.fromstring(text.encode())  # libvirt returns it without its namespace
    return MappingProxyType(
        {
            el.get("name", ""): el.text or ""
            for el in root
            if isinstance(el.tag, str) and etree.QName(el).localname == "label"
        }
    )


def set_labels(dom: Domain, values: Mapping[str, str]) -> None:
    """Store ``values`` as ``dom``'s labels (replacing earlier ones; ``{}`` removes them).

    They live in the domain's own XML (metadata namespace :data:`LABELS_NS`), live and
    persistent, so every host that runs the domain sees them.
    """
    items = _frozen_labels(values)
    if not items:
        _port(dom).set_metadata(LABELS_NS, _LABELS_KEY, None)
        return
    root = etree.Element(f"{{{LABELS_NS}}}labels", nsmap={None: LABELS_NS})  # type: ignore[dict-item]
    for k, v in sorted(items.items()):
        el = etree.SubElement(root, f"{{{LABELS_NS}}}label", name=k)
        el.text = v
    _port(dom).set_metadata(LABELS_NS, _LABELS_KEY, etree.tostring(root).decode())


def repository_of(host: Host) -> Repository:
    """Open the host's repository (on the host's worker)."""
    from .._repository import Repository

    return Repository(host.repository)


def _port(dom: Domain) -> MetadataPort:
    """The domain's port as this module uses it: ``MetadataPort`` (mypy checks it)."""
    return dom.port
