"""Reading the crash records of an older statecapture (before the one record type).

Until the sequences and the plain backup jobs shared one record (:mod:`statecapture._journal`,
``urn:x-statecapture:journal:2``), two records described a run:

* the sequences' journal, ``<journal sequence=… run=… host=… pid=… started=…>`` with
  ``<fact key value/>`` and ``<step …/>`` children, in ``urn:x-statecapture:journal:1``;
* a backup job's record, ``<backup mode=… label=… started=… checkpoint=… created=…
  incremental=… delivered=…>`` with ``<file path/>`` and ``<dir path/>`` children, in
  ``urn:x-statecapture:backup:1`` (a direct backup's job kept one beside its journal).

A user who upgrades while such a record is left (a crash, a kill, a lost connection) must
still be able to recover: :func:`legacy_journal` returns them as one :class:`Journal` —
the journal's facts and steps with the job record as its :attr:`Journal.job`, or a plain
backup job's record alone — marked ``legacy=True``. :func:`~statecapture.recover` repairs it
like a current record; :func:`clear_legacy` removes both old elements. Nothing writes these
formats any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import attrs
from lxml import etree

from ._journal import OP_BACKUP, JobRecord, Journal

if TYPE_CHECKING:
    from ._domain import Domain
    from ._ports import MetadataPort

__all__ = [
    "LEGACY_BACKUP_NS",
    "LEGACY_JOURNAL_NS",
    "LEGACY_NAMESPACES",
    "clear_legacy",
    "legacy_journal",
    "legacy_namespaces",
]

LEGACY_JOURNAL_NS: Final = "urn:x-statecapture:journal:1"
"""Where statecapture before the one record type kept a sequence's journal."""
LEGACY_BACKUP_NS: Final = "urn:x-statecapture:backup:1"
"""Where statecapture before the one record type kept a backup job's record."""
LEGACY_NAMESPACES: Final = (LEGACY_JOURNAL_NS, LEGACY_BACKUP_NS)


def legacy_journal(stored: Mapping[str, etree._Element]) -> Journal | None:
    """An older statecapture's record(s) among ``stored`` (the elements of the domain's
    metadata by namespace, :func:`~statecapture._journal.record_elements`) as one
    :class:`Journal`, or ``None``.

    Raises :class:`XMLError` when one of them is damaged (``recover()`` then reports and
    clears it).
    """
    journal_el = stored.get(LEGACY_JOURNAL_NS)
    backup_el = stored.get(LEGACY_BACKUP_NS)
    if journal_el is None and backup_el is None:
        return None
    job = JobRecord.from_element(backup_el) if backup_el is not None else None
    if journal_el is not None:
        journal = Journal.from_element(journal_el)
        return attrs.evolve(journal, job=job, legacy=True)
    assert job is not None
    return Journal(
        sequence=OP_BACKUP,
        run_id=f"legacy-{job.label}",
        host="",
        pid=0,
        started_at=job.started,
        job=job,
        legacy=True,
    )


def legacy_namespaces(journal: Journal) -> tuple[str, ...]:
    """The old elements a legacy ``journal`` was read from: the sequences' journal unless it
    is a plain job's record alone, the job record when it has a job."""
    found = () if journal.is_backup_job else (LEGACY_JOURNAL_NS,)
    return found + ((LEGACY_BACKUP_NS,) if journal.job is not None else ())


def clear_legacy(dom: Domain, namespaces: Iterable[str]) -> bool:
    """Remove an older statecapture's record elements under ``namespaces`` (the ones a read
    found there) from ``dom``; whether there was one."""
    found = False
    for namespace in namespaces:
        _port(dom).set_metadata(namespace, "statecapture", None)
        found = True
    return found


def _port(dom: Domain) -> MetadataPort:
    """The domain's port as this module uses it: ``MetadataPort`` (mypy checks it)."""
    return dom.port
