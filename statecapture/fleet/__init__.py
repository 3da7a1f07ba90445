"""Fleets: back up, verify and prune many domains across many hosts, on Dask distributed.

Install with ``pip install 'statecapture[fleet]'`` (Dask is only needed with ``client=``).
Not re-exported at the package root: ``import statecapture`` never imports Dask.

::

    from statecapture import fleet

    hosts = [fleet.Host("hv1", "qemu:///system", repository="/backups/hv1"),
             fleet.Host("hv2", "qemu:///system", repository="/backups/hv2")]
    report = fleet.backup(hosts, select="web-*", per_host=2, client=dask_client)
    print(report.ok, report.totals())

See ``docs/fleet.md`` for the deployment (one Dask worker per hypervisor).
"""

from __future__ import annotations

from .inventory import LABELS_NS, Host, Selector, labels, set_labels
from .report import DomainResult, FleetProgress, FleetReport
from .run import backup, prune, verify

__all__ = [
    "LABELS_NS",
    "DomainResult",
    "FleetProgress",
    "FleetReport",
    "Host",
    "Selector",
    "backup",
    "labels",
    "prune",
    "set_labels",
    "verify",
]
