"""Child process of the peak-memory benchmark: copy one NBD export, report peak memory.

``python -m benchmarks._memchild SOCKET EXPORT DEST`` runs the pull data path that
``BackupJob.download`` runs for one disk (``statecapture._nbd.copy_export``) into the new
qcow2 image ``DEST`` and prints one JSON object with peak resident set sizes in KiB:

* ``peak_kib``: this process (``VmHWM`` of ``/proc/self/status``: the high-water mark of the
  address space since ``exec``), and ``baseline_kib``, the same right after the imports;
* ``children_peak_kib``: the largest ``VmHWM`` seen for a child process (``qemu-img
  convert`` or ``qemu-nbd`` writing the image, ``qemu-img create``), sampled every 20 ms
  while the copy runs;
* ``ru_maxrss_kib`` / ``ru_maxrss_children_kib``: what ``getrusage`` says, for the record.
  On Linux ``ru_maxrss`` survives ``execve`` (the parent's high-water mark at ``fork`` is
  folded in), so a child forked from the large benchmark process reports the parent's size,
  not its own: that is why the peaks above come from ``VmHWM``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
from pathlib import Path


def _hwm_kib(pid: int | str) -> int:
    """``VmHWM`` of a process in KiB (0 when it is gone or has no address space)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from ``/proc/*/stat``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.02):
            for child in _children(me):
                self.peak = max(self.peak, _hwm_kib(child))


def main(argv: list[str]) -> int:
    """Copy the export, print the peaks as JSON."""
    socket, export, dest = argv
    from statecapture import _nbd

    baseline = _hwm_kib("self")
    target = Path(dest)
    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    sampler = _Sampler()
    sampler.start()
    try:
        stats = _nbd.copy_export(_nbd.ExportSource(socket, export), target, backing=None)
    finally:
        sampler.stop.set()
        sampler.join()
    print(
        json.dumps(
            {
                "baseline_kib": baseline,
                "peak_kib": _hwm_kib("self"),
                "children_peak_kib": sampler.peak,
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "ru_maxrss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                "bytes": stats.bytes_written,
                "size": stats.size,
                "seconds": stats.duration,
                "client": stats.client,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
