"""Progress of ``molmo-backend annotate``: done/total, tasks/s and ETA, as a tqdm bar on a terminal
or as a log line every 10 s elsewhere (a log file, a container).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Progress:
    """done/total with tasks/s and ETA: a tqdm bar on a terminal, else a log line every
    ``interval`` seconds (and one at the end)."""

    def __init__(
        self,
        total: int,
        mode: str = "auto",
        stream=None,
        interval: float = 10.0,
        pairs: Callable[[], int] | None = None,
    ):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.total = total
        self.done = 0
        self.interval = interval
        self.pairs = pairs or (lambda: 0)
        self._pairs0 = self.pairs()
        self.started = time.monotonic()
        self._last_log = self.started
        self.bar = None
        self._counts: dict = {}
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="task",
                file=self.stream,
                dynamic_ncols=True,
                smoothing=0.05,
                desc="annotate",
            )

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else None

    def advance(self, n: int, **counts) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self._postfix(counts)
        self.tick(force=self.done >= self.total, **counts)

    def tick(self, force: bool = False, **counts) -> None:
        now = time.monotonic()
        if self.bar is not None:
            self._postfix(counts or self._counts)
            return
        if self.mode != "log" or (not force and now - self._last_log < self.interval):
            return
        self._last_log = now
        eta = self.eta()
        log.info(
            "annotate progress",
            extra={
                "done": self.done,
                "total": self.total,
                "tasks_per_s": round(self.rate(), 3),
                "pairs": self.pairs() - self._pairs0,
                "eta_s": None if eta is None else round(eta, 1),
                **counts,
            },
        )

    def _postfix(self, counts: dict) -> None:
        self._counts = counts
        pairs = self.pairs() - self._pairs0
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix({"pairs/s": f"{pairs / elapsed:.1f}", **counts}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @contextmanager
    def logging_redirected(self):
        """Log lines printed above the bar instead of through it."""
        if self.bar is None:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            yield


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``1:02:05``, ``65`` -> ``1:05``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
