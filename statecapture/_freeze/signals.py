"""Signals around a freeze: held while a freeze or thaw call runs, SIGTERM turned into
``SystemExit(143)`` inside the block.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Final

#: Exit status of a process that SIGTERM stopped inside a freeze block (128 + 15, as a shell
#: reports a process killed by SIGTERM).
_SIGTERM_EXIT: Final = 128 + int(signal.SIGTERM)

# --------------------------------------------------------------------------- signals


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _SignalHold:
    """Hold SIGINT and SIGTERM while a freeze or thaw call runs (main thread only).

    Like trio's KeyboardInterrupt protection: a signal that arrives between "the guest is
    frozen" and "the scope knows it" must not leave the guest frozen. Held signals are
    re-delivered, to the handlers in place before, by :meth:`release`.
    """

    _SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._saved: dict[int, Any] = {}
        if not _in_main_thread():
            return
        for signum in self._SIGNALS:
            previous = signal.getsignal(signum)
            if previous is None:  # installed outside Python: cannot be restored, leave it
                continue
            self._saved[signum] = previous
            signal.signal(signum, self._hold)

    def saved_handler(self, signum: int) -> Any:
        """The handler that was in place before the hold (``None`` when not held)."""
        return self._saved.get(signum)

    def _hold(self, signum: int, _frame: FrameType | None) -> None:
        self.pending.append(signum)

    def release(self, replace: dict[int, Any] | None = None) -> None:
        """Restore the handlers (or ``replace`` ones), then re-deliver held signals.

        A held signal whose handler was the default action is raised as the exception
        Python code can clean up after (``KeyboardInterrupt``, ``SystemExit(143)``) rather
        than killing the process at once; an ignored one is dropped.
        """
        saved, self._saved = self._saved, {}
        for signum, previous in saved.items():
            signal.signal(signum, (replace or {}).get(signum, previous))
        pending, self.pending = self.pending, []
        for signum in dict.fromkeys(pending):
            previous = saved[signum]
            if previous is signal.SIG_IGN:
                continue
            if previous is signal.SIG_DFL or previous is _raise_system_exit:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(_SIGTERM_EXIT)
            signal.raise_signal(signum)  # runs that Python handler now (raises KI ...)


def _raise_system_exit(_signum: int, _frame: FrameType | None) -> None:
    """The SIGTERM handler inside a freeze block: end the block like an exception."""
    raise SystemExit(_SIGTERM_EXIT)
