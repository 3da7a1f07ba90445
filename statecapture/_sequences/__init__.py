"""The two sequences of libvirt's *domain state capture* guide, as single calls.

The guide ends with two ways to capture the disks of a running guest and leave it running
on its original disk files:

1. **Backup via temporary snapshot** (:func:`backup_via_temporary_snapshot`)::

       freeze → disk-only external snapshot → thaw → copy the frozen images
       → active commit per disk → READY event → pivot per disk → remove the overlays

2. **Direct backup** (:func:`direct_backup`)::

       freeze → backup begin (with a new checkpoint) → thaw
       → wait (push) or download over NBD (pull) → end the job

and warns that an interruption of the first leaves the domain tied to a temporary overlay
that needs manual clean-up. Here each sequence cleans up after itself:

* everything that can be refused is refused before anything changes (domain not running,
  no guest agent for ``quiesce=True``, an unfinished earlier run, a file in the way ...);
* every undo is registered on a :class:`contextlib.ExitStack` as soon as there is something
  to undo; any exception — ``KeyboardInterrupt`` included — undoes in reverse order, and a
  failing undo never masks the error that caused it (it is attached as a note);
* each step is journalled in the domain's own metadata before it starts and after it ends
  (:mod:`statecapture._journal`), so after a ``SIGKILL``, a power cut or a lost connection
  :func:`statecapture.recover` — from any process — finds the run and undoes it.

The undo of the temporary snapshot is *state-driven* (:func:`merge_overlay`): it looks at
what the domain runs on now and finishes whatever is left (commit, READY, pivot, remove),
so the same code serves the in-process rollback and :func:`~statecapture.recover`.
"""

from .direct import direct_backup, discard_backup
from .run import SEQ_DIRECT, SEQ_SNAPSHOT, Run, RunStatus, SequenceResult, StepTiming
from .temporary import OVERLAY_RE, backup_via_temporary_snapshot, merge_overlay

__all__ = [
    "OVERLAY_RE",
    "SEQ_DIRECT",
    "SEQ_SNAPSHOT",
    "Run",
    "RunStatus",
    "SequenceResult",
    "StepTiming",
    "backup_via_temporary_snapshot",
    "direct_backup",
    "discard_backup",
    "merge_overlay",
]
