"""One GPU worker thread and a priority queue in front of it.

Every HTTP thread submits its (image, prompt) queries here and waits. The worker forms batches
across all waiting requests, opened tasks (INTERACTIVE) before bulk work, so an annotator who
opens a task is not stuck behind a 1000-task "Retrieve predictions". Engines that can pause
(``between_steps``) let an opened task run between two steps of a running bulk batch, so it
waits for one decode step, not for the whole batch. A batch that fails (GPU out
of memory, a bad input) is split in halves and retried, down to single queries, so one bad query
costs only its own answer.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Sequence

from .base import Answer, Engine, PointQuery

log = logging.getLogger(__name__)


class Priority(IntEnum):
    INTERACTIVE = 0  # one opened task, an interactive click: answer first
    BULK = 1  # "Retrieve predictions", the annotate command


@dataclass(eq=False)
class _Job:
    total: int
    priority: Priority
    answers: list = field(default_factory=list)
    done_count: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.answers = [None] * self.total


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    query: PointQuery = field(compare=False)
    job: _Job = field(compare=False)
    index: int = field(compare=False)


class SchedulerClosed(RuntimeError):
    pass


class Scheduler:
    """Runs an :class:`Engine` on one worker thread, batching queries from all callers."""

    def __init__(self, engine: Engine, max_batch: int | None = None, progress_every: float = 10.0):
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        self.progress_every = progress_every
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.stats = {"queries": 0, "batches": 0, "failed_batches": 0, "failed_queries": 0, "preemptions": 0}
        self._preemptible = "between_steps" in inspect.signature(engine.generate).parameters
        self._worker = threading.Thread(target=self._run, name="gpu-worker", daemon=True)
        self._worker.start()

    # -- callers -------------------------------------------------------------------------------
    def submit(self, queries: Sequence[PointQuery], priority: Priority = Priority.BULK) -> list[Answer]:
        """Answer ``queries`` in order; blocks the calling thread until all are done."""
        if not queries:
            return []
        job = _Job(total=len(queries), priority=priority)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            for i, query in enumerate(queries):
                heapq.heappush(self._heap, _Item(int(priority), next(self._seq), query, job, i))
            self._cv.notify()
        job.finished.wait()
        return job.answers

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=10)

    # -- worker --------------------------------------------------------------------------------
    def _pop_batch(self) -> list[_Item]:
        """Up to max_batch items of the first item's priority class (caller holds the lock)."""
        first = heapq.heappop(self._heap)
        batch = [first]
        # only the same priority class rides along: a bulk batch must not delay an opened task
        while self._heap and len(batch) < self.max_batch and self._heap[0].priority == first.priority:
            batch.append(heapq.heappop(self._heap))
        return batch

    def _next_batch(self) -> list[_Item] | None:
        with self._cv:
            while not self._heap and not self._closed:
                self._cv.wait()
            if self._closed and not self._heap:
                return None
            return self._pop_batch()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._process(batch, preemptible=batch[0].priority != Priority.INTERACTIVE)

    def _process(self, batch: list[_Item], preemptible: bool = False) -> None:
        answers = self._answer(batch, preemptible)
        self.stats["batches"] += 1
        self.stats["queries"] += len(batch)
        for item, answer in zip(batch, answers):
            self._deliver(item, answer)

    def _serve_interactive(self) -> None:
        """Called by the engine between steps of a bulk batch: run waiting opened tasks now."""
        while True:
            with self._cv:
                if not self._heap or self._heap[0].priority != Priority.INTERACTIVE:
                    return
                batch = self._pop_batch()
            self.stats["preemptions"] += 1
            self._process(batch)

    def _answer(self, batch: list[_Item], preemptible: bool = False) -> list[Answer]:
        """Answers for ``batch``; a failing batch is split in halves until only the bad query fails."""
        try:
            queries = [item.query for item in batch]
            if preemptible and self._preemptible:
                answers = self.engine.generate(queries, between_steps=self._serve_interactive)
            else:
                answers = self.engine.generate(queries)
            if len(answers) != len(batch):
                raise RuntimeError(f"engine returned {len(answers)} answers for {len(batch)} queries")
            return answers
        except Exception as exc:  # noqa: BLE001 - any engine failure is contained here
            self.stats["failed_batches"] += 1
            if len(batch) == 1:
                self.stats["failed_queries"] += 1
                log.error("query failed", extra={"error": repr(exc)[:500]})
                return [Answer(text="", error=f"{type(exc).__name__}: {exc}"[:500])]
            log.warning(
                "batch failed, splitting and retrying",
                extra={"batch_size": len(batch), "error": repr(exc)[:500]},
            )
            mid = len(batch) // 2
            return self._answer(batch[:mid], preemptible) + self._answer(batch[mid:], preemptible)

    def _deliver(self, item: _Item, answer: Answer) -> None:
        job = item.job
        job.answers[item.index] = answer
        job.done_count += 1
        now = time.monotonic()
        if job.done_count == job.total:
            job.finished.set()
        elif job.total > self.max_batch and now - job.last_progress >= self.progress_every:
            job.last_progress = now
            rate = job.done_count / max(now - job.started, 1e-9)
            log.info(
                "bulk progress",
                extra={
                    "done": job.done_count, "total": job.total, "pairs_per_s": round(rate, 2),
                    "eta_s": round((job.total - job.done_count) / rate, 1),
                },
            )
