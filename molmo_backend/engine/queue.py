"""The waiting queries, in priority classes, first come first served within a class.

The scheduler's workers take from here under the scheduler's lock; this class only orders. An
item of a cancelled job stays where it is until it reaches the head, where it is handed out
like any other and answered ``CANCELLED`` without running (so every query still gets one
answer, and cancelling costs nothing but a flag).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import islice

from molmo_backend.engine.base import PointQuery


class Priority(IntEnum):
    INTERACTIVE = 0  # one opened task, an interactive click: answer first
    BULK = 1  # "Retrieve predictions", the annotate command


@dataclass(eq=False)
class Item:
    """One waiting query: which job it belongs to, and where its answer goes."""

    query: PointQuery
    job: object  #: the scheduler's Job; the queue only compares it by identity
    index: int
    enqueued: float = field(default_factory=time.monotonic)
    #: CPU-side preparation started ahead of the GPU (engine.prepare), or None
    prepared: Future | None = None

    @property
    def image_key(self):
        key = self.query.image_key
        return key if key is not None else id(self.query.image)


class RequestQueue:
    """Per-priority FIFO queues of :class:`Item`."""

    def __init__(self):
        self._classes: dict[Priority, deque[Item]] = {p: deque() for p in Priority}

    def push(self, items: list[Item], priority: Priority) -> None:
        self._classes[priority].extend(items)

    def push_front(self, items: list[Item], priority: Priority) -> None:
        """Put ``items`` back at the head of their class, in their order (rows an engine handed
        back go first again)."""
        self._classes[priority].extendleft(reversed(items))

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def waiting(self, priority: Priority) -> int:
        return len(self._classes[priority])

    def head_priority(self) -> Priority | None:
        """The most urgent class with anything waiting."""
        return next((p for p in Priority if self._classes[p]), None)

    def peek(self, priority: Priority, count: int) -> Iterator[Item]:
        """The first ``count`` items of a class, without taking them."""
        return islice(self._classes[priority], count)

    def pop(self, priority: Priority) -> Item:
        return self._classes[priority].popleft()

    def pop_image_group(self, priority: Priority, most: int | None = None) -> list[Item]:
        """The head item and the items right behind it that show the same image for the same
        job: one image prefill serves them all (a task's labels are queued together); at most
        ``most`` of them."""
        queue = self._classes[priority]
        first = queue.popleft()
        group = [first]
        while (
            queue
            and (most is None or len(group) < most)
            and queue[0].job is first.job
            and queue[0].image_key == first.image_key
        ):
            group.append(queue.popleft())
        return group

    def head_group_size(self, priority: Priority) -> int:
        """How many items :meth:`pop_image_group` would take now (0 when the class is empty)."""
        queue = self._classes[priority]
        if not queue:
            return 0
        first, size = queue[0], 1
        for item in islice(queue, 1, None):
            if item.job is not first.job or item.image_key != first.image_key:
                break
            size += 1
        return size
