"""A caller's queries in the scheduler (:class:`Job`), and the two ways work ends unanswered.

A Job is the one object an HTTP thread and a GPU worker share: the worker fills ``answers`` in as
queries finish and sets ``finished`` when the last one does; the caller waits on it, or cancels it
when nobody waits any more (Label Studio gave up, the client hung up): each such query is answered
``CANCELLED``. Work that reaches a closed scheduler is refused with :class:`SchedulerClosed`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from molmo_backend.engine.base import Answer
from molmo_backend.engine.queue import Priority
from molmo_backend.errors import Unavailable

#: the answer a query gets when its job was cancelled before the query ended
CANCELLED = "cancelled: nobody waits for this answer any more"


class SchedulerClosed(Unavailable, RuntimeError):
    """Work submitted to a scheduler that has been closed (the server shutting down): HTTP 503,
    so a client retries against the restarted server instead of reading it as a bug."""


@dataclass(eq=False)
class Job:
    """One caller's queries in the scheduler; answers arrive as they finish.

    ``answers[i]`` is None until query ``i`` is answered. ``on_answer(i, answer)`` (optional) is
    called in the worker thread as each one arrives, so a caller can act on finished tasks before
    the whole job is done. :meth:`cancel` drops the queries not yet answered (work nobody waits
    for is not computed)."""

    total: int
    priority: Priority
    on_answer: Callable[[int, Answer], None] | None = None
    answers: list = field(default_factory=list)
    done_count: int = 0
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.answers = [None] * self.total

    def wait(self, timeout: float | None = None) -> bool:
        """True once every query is answered (or cancelled); False if ``timeout`` passed first."""
        return self.finished.wait(timeout)

    def cancel(self) -> None:
        """Queries of this job not yet answered are dropped: waiting ones are never started and
        running ones leave their slots at the next step; each is answered ``CANCELLED``."""
        self.cancelled = True
