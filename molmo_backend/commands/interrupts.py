"""SIGINT/SIGTERM during ``molmo-backend annotate``: the first signal stops starting chunks and
lets the chunks in flight finish and be written; a second one abandons them (:class:`Abandon`)
without writing anything of them. A write already under way is never cut in half.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Abandon(KeyboardInterrupt):
    """The second interrupt: drop the chunks in flight."""


class Interrupts:
    """SIGINT/SIGTERM while annotating: the first asks to stop after the chunks in flight, the
    second abandons them. Installed only in the main thread (signals are delivered there)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.abandoned = False
        self._writing = False
        self._old: dict[int, Any] = {}

    @property
    def stop_requested(self) -> bool:
        return self.signum is not None

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """What the first signal does (tests call it directly)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "interrupted: finishing and writing the chunks in flight, then stopping; "
                "interrupt again to abandon them"
            )
            return
        self.abandoned = True
        if not self._writing:  # a write in progress completes; the loop stops right after it
            raise Abandon()

    @contextmanager
    def writing(self):
        """No Abandon raised inside: a write request is never cut in half on our side (the caller
        checks ``abandoned`` after it)."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
