"""Which state-capture method fits: :func:`advise` ranks every method of libvirt's guide.

libvirt's "domain state capture" page compares the capture APIs along nine trade-off facets
(duration, amount of state, quiescing, quantity of files, impact to the guest definition,
third-party integration, full vs. incremental, local vs. remote, network latency) and ends
with two sequences. Its knowledge lives here as *data* (:data:`GUIDE`, loaded from
``guide.toml``: one row per method, one statement per facet, with the corrections from the
guide's review), and :func:`advise` combines it with what it finds on the live domain:

* what the driver and daemon can do (:meth:`Domain.capabilities`, probed),
* whether the guest agent is connected (the live XML's channel state),
* disk formats (raw images hold neither dirty bitmaps nor internal snapshots),
* dirty bitmaps (checkpoints, or persistent bitmaps inside a qcow2 image) that make an
  internal snapshot impossible to revert,
* an unfinished statecapture sequence journalled in the domain's metadata,
* running backup or block jobs.

Ranking: methods without blockers first, then by how many of the caller's needs they leave
unmet, then by the estimated guest downtime (in classes: none, under a second, seconds,
longer), then by how many needs they meet only partially, then methods the guide's review
discourages (block copy) after the others, then by the exact estimate.

The package's modules:

* ``needs``: what the caller wants (:class:`Needs`, :class:`Consistency`, :class:`Storage`);
* ``guide``: the vocabulary (:class:`Method`, :class:`Facet`, :class:`Fit`) and the guide's
  table, validated at import;
* ``facts``: :func:`gather_facts`, one read-only pass over the domain;
* ``rules``: downtime estimates, verdicts, one function per :class:`BlockerKind`;
* ``advice``: :class:`MethodAdvice`, :class:`Advice` and :func:`advise` (the ranking).
"""

from __future__ import annotations

# Private names re-exported for the tests (tests/test_advisor.py, tests/test_properties.py).
from .._capabilities import probe_domain as probe_domain
from .._host import is_local_uri
from .advice import Advice, MethodAdvice, advise
from .facts import DomainFacts
from .facts import _memory_mib as _memory_mib
from .facts import gather_facts as gather_facts
from .guide import GUIDE as GUIDE
from .guide import Facet, Fit, Method
from .guide import GuideError as GuideError
from .guide import load_guide as load_guide
from .needs import Consistency, Needs, Storage
from .rules import Blocker, BlockerKind, Verdict
from .rules import _blockers as _blockers
from .rules import _downtime as _downtime
from .rules import _verdicts as _verdicts

__all__ = [
    "Advice",
    "Blocker",
    "BlockerKind",
    "Consistency",
    "DomainFacts",
    "Facet",
    "Fit",
    "Method",
    "MethodAdvice",
    "Needs",
    "Storage",
    "Verdict",
    "advise",
]

_is_local = is_local_uri
"""The one host-locality rule (:mod:`statecapture._host`), under its old name."""
