"""statecapture benchmarks: the library against raw libvirt-python and the best external tools.

Run everything with ``nox -s bench`` (or ``python -m benchmarks`` from the repository root);
``python -m benchmarks --help`` lists the options. One table is printed, with every ratio
measured in the same run on the same guest, and the results go to
``benchmarks/results/<timestamp>.json``. ``docs/performance.md`` quotes a run.

One module per measurement (the numbers are the items of the issue):

1. :mod:`benchmarks.freeze` — frozen window of the backup sequences against raw calls
2. :mod:`benchmarks.overhead` — per-operation overhead on ``test:///default``
3. :mod:`benchmarks.scaling` — listing and walking 10/100/1000 snapshots and checkpoints
4. :mod:`benchmarks.throughput` — full pull backup against ``nbdcopy`` and ``qemu-img convert``
5. :mod:`benchmarks.incremental` — bytes copied per byte dirtied, time against a full backup
6. :mod:`benchmarks.pushpull` — push and pull backups of the same data
7. :mod:`benchmarks.memory` — peak memory of a pull download for two disk sizes
8. :mod:`benchmarks.repository` — backup repository: digest overhead, verify reads, listing
9. :mod:`benchmarks.fleet` — a fleet on two Dask workers: per-host parallelism, controller memory

Items 1 and 4-7 share one real guest (TCG, embedded QEMU driver) built with the test
kit in ``statecapture.testing``; items 2 and 3 need only libvirt's test driver. Nothing here is
part of the test suite: ``tests/test_benchmarks_smoke.py`` only runs the quick test-driver
part so the code keeps working.

Helpers: ``_common`` (rows, timing, the exponent fit), ``_report`` (machine description,
table, JSON), ``_guest`` (the shared guest), ``_tools`` (the external copiers),
``_memchild`` (the child process of item 7) and ``_render`` (``python -m
benchmarks._render RESULTS.json`` prints a results file as the Markdown table of the docs).
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULE_NAMES = (
    "freeze",
    "overhead",
    "scaling",
    "throughput",
    "incremental",
    "pushpull",
    "memory",
    "repository",
    "fleet",
)
"""Every benchmark module, in the order of the issue's items."""

__all__ = ["MODULE_NAMES", "modules"]


def modules() -> tuple[ModuleType, ...]:
    """The benchmark modules (imported on demand: importing the package loads no libvirt)."""
    return tuple(importlib.import_module(f"{__name__}.{name}") for name in MODULE_NAMES)
