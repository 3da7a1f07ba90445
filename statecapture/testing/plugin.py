"""The pytest plugin of :mod:`statecapture.testing` (opt-in).

Enable it in a ``conftest.py`` (or a test module) with::

    pytest_plugins = ["statecapture.testing"]

or on the command line with ``-p statecapture.testing``. It is not registered as an
auto-loaded ``pytest11`` entry point on purpose: installing statecapture must not add
fixtures, markers or an embedded QEMU root to every test run on the machine.

Fixtures:
    ``sc_hypervisor`` (session): an open :class:`~statecapture.testing.EmbeddedHypervisor`
    (libvirt allows one embedded root per process, so it is shared by the session).
    ``sc_guest_factory``: ``factory(**options)`` boots a
    :class:`~statecapture.testing.TestGuest` (options of
    :meth:`~statecapture.testing.TestGuest.boot`), disks and console log in ``tmp_path``;
    every guest is closed after the test.
    ``sc_guest``: one running guest with one qcow2 data disk and a connected agent.

Marker:
    ``@pytest.mark.requires_qemu`` skips the test, with the exact reason and remedy, when
    this machine cannot run the guest (see
    :func:`~statecapture.testing.environment_problem`). The fixtures skip the same way.
    Set ``STATECAPTURE_REQUIRE_QEMU=1`` (e.g. in CI) to turn those skips into errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .guest import TestGuest
from .hypervisor import EmbeddedHypervisor
from .kit import environment_problem

__all__ = [
    "MARKER",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "sc_guest",
    "sc_guest_factory",
    "sc_hypervisor",
    "skip_reason",
]

#: The marker name.
MARKER = "requires_qemu"

_UNSET = object()
_reason: Any = _UNSET


def skip_reason() -> str | None:
    """Why tests needing a real guest are skipped here (``None``: they run). Cached."""
    global _reason
    if _reason is _UNSET:
        problem = environment_problem()
        _reason = None if problem is None else f"statecapture.testing: {problem}"
    return _reason  # type: ignore[no-any-return]


def _skip_or_fail() -> None:
    reason = skip_reason()
    if reason is None:
        return
    if os.environ.get("STATECAPTURE_REQUIRE_QEMU") == "1":
        pytest.fail(f"{reason} (STATECAPTURE_REQUIRE_QEMU=1)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``requires_qemu`` marker."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}: needs a real QEMU guest (statecapture.testing); skipped with the reason "
        "when this machine cannot run one",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``requires_qemu`` tests with the exact reason when QEMU cannot run here."""
    marked = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if not marked:
        return
    reason = skip_reason()
    if reason is None or os.environ.get("STATECAPTURE_REQUIRE_QEMU") == "1":
        return  # the fixtures fail loudly in the second case
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def sc_hypervisor() -> Iterator[EmbeddedHypervisor]:
    """An embedded QEMU root for the whole session; everything in it is removed at the end."""
    _skip_or_fail()
    with EmbeddedHypervisor() as hv:
        yield hv


@pytest.fixture
def sc_guest_factory(
    sc_hypervisor: EmbeddedHypervisor, tmp_path: Path
) -> Iterator[Callable[..., TestGuest]]:
    """``factory(**options)`` boots a test guest (options of ``TestGuest.boot``); all are
    closed after the test. Disks and console logs go to ``tmp_path`` unless ``workdir=``."""
    made: list[TestGuest] = []

    def factory(**options: Any) -> TestGuest:
        options.setdefault("workdir", tmp_path)
        guest = sc_hypervisor.guest(**options)
        made.append(guest)
        return guest

    try:
        yield factory
    finally:
        for guest in made:
            guest.close()


@pytest.fixture
def sc_guest(sc_guest_factory: Callable[..., TestGuest]) -> TestGuest:
    """One running test guest: one 64 MiB qcow2 data disk at ``/data``, agent answering."""
    return sc_guest_factory()
