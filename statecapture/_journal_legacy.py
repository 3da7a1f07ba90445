"""Reading the crash records of an older statecapture (before the one record type).

Until the sequences and the plain backup jobs shared one record (:mod:`statecapture._journal`,
``urn:x-statecapture:journal:2``), two records described a run:

* the sequences' journal, ``<journal sequence=… run=… host=… pid=… started=…>`` with
  ``<fact key value/>`` and ``<step …/>`` children, in ``urn:x-statecapture:journal:1``;
* a backup job's record, ``<backup mode=… label=… started=… checkpoint=… created=…
  incremental=… delivered=…>`` with ``<file path/>`` and ``<dir path/>`` children, in
  ``urn:x-statecapture:backup:1`` (a direct backup's job kept one beside its journal).

A user who upgrades while such a record is left (a crash, a kill, a lost connection) must
still be able to recover: :func:`read_legacy` returns them as one :class:`Journal` —
the journal's facts and steps with the job record as its :attr:`Journal.job`, or a plain
backup job's record alone — marked ``legacy=True``. :func:`~statecapture.recover` repairs it
like a current record; :func:`clear_legacy` removes both old elements. Nothing writes these
formats any more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from ._journal import OP_BACKUP, JobRecord, Journal
from .xml._base import parse

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = ["LEGACY_BACKUP_NS", "LEGACY_JOURNAL_NS", "clear_legacy", "read_legacy"]

LEGACY_JOURNAL_NS: Final = "urn:x-statecapture:journal:1"
"""Where statecapture before the one record type kept a sequence's journal."""
LEGACY_BACKUP_NS: Final = "urn:x-statecapture:backup:1"
"""Where statecapture before the one record type kept a backup job's record."""


def read_legacy(dom: Domain) -> Journal | None:
    """An older statecapture's record(s) on ``dom`` as one :class:`Journal`, or ``None``.

    Raises :class:`XMLError` when one of them is damaged (``recover()`` then reports and
    clears it).
    """
    journal_text = dom.port.get_metadata(LEGACY_JOURNAL_NS)
    backup_text = dom.port.get_metadata(LEGACY_BACKUP_NS)
    if journal_text is None and backup_text is None:
        return None
    job = JobRecord.from_element(parse(backup_text)) if backup_text is not None else None
    if journal_text is not None:
        journal = Journal.from_xml(journal_text)
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


def clear_legacy(dom: Domain) -> bool:
    """Remove an older statecapture's record elements from ``dom`` (idempotent); whether
    there was one."""
    found = False
    for namespace in (LEGACY_JOURNAL_NS, LEGACY_BACKUP_NS):
        if dom.port.get_metadata(namespace) is not None:
            dom.port.set_metadata(namespace, "statecapture", None)
            found = True
    return found
