"""One GPU worker thread and a priority queue in front of it.

Every HTTP thread submits its (image, prompt) queries here and waits. The worker forms batches
across all waiting requests, up to ``max_batch`` queries and the engine's token budget (the cache
tokens that fit in the GPU memory free at that moment), opened tasks (INTERACTIVE) before bulk
work, so an annotator who opens a task is not stuck behind a 1000-task "Retrieve predictions".
Engines that can pause
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
from typing import Callable, Sequence

from .base import Answer, Engine, PointQuery

log = logging.getLogger(__name__)


class Priority(IntEnum):
    INTERACTIVE = 0  # one opened task, an interactive click: answer first
    BULK = 1  # "Retrieve predictions", the annotate command


#: the answer a query gets when its job was cancelled before the query ran
CANCELLED = "cancelled: nobody waits for this answer any more"


@dataclass(eq=False)
class Job:
    """One caller's queries in the scheduler; answers arrive as they finish.

    ``answers[i]`` is None until query ``i`` is answered. ``on_answer(i, answer)`` (optional) is
    called in the worker thread as each one arrives, so a caller can act on finished tasks before
    the whole job is done. :meth:`cancel` drops the queries not yet started (work nobody waits
    for is not computed)."""

    total: int
    priority: Priority
    on_answer: "Callable[[int, Answer], None] | None" = None
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
        """Queries of this job not yet started are dropped: they are answered with an error
        (``CANCELLED``) instead of being computed. Queries already running finish."""
        self.cancelled = True


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    query: PointQuery = field(compare=False)
    job: Job = field(compare=False)
    index: int = field(compare=False)


class SchedulerClosed(RuntimeError):
    pass


class Scheduler:
    """Runs one worker thread per :class:`Engine` (one per GPU replica), batching queries from
    all callers into whichever worker is free."""

    def __init__(self, engines: Engine | Sequence[Engine], max_batch: int | None = None,
                 progress_every: float = 10.0):
        self.engines = [engines] if isinstance(engines, Engine) else list(engines)
        if not self.engines:
            raise ValueError("a scheduler needs at least one engine")
        self.engine = self.engines[0]
        self.max_batch = max_batch or self.engine.max_batch
        self.progress_every = progress_every
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.stats = {"queries": 0, "batches": 0, "failed_batches": 0, "failed_queries": 0, "preemptions": 0,
                      "budget_cuts": 0, "cancelled": 0}
        self._stats_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._run, args=(engine,), name=f"gpu-worker-{i}", daemon=True)
            for i, engine in enumerate(self.engines)
        ]
        for worker in self._workers:
            worker.start()

    # -- callers -------------------------------------------------------------------------------
    def submit(self, queries: Sequence[PointQuery], priority: Priority = Priority.BULK) -> list[Answer]:
        """Answer ``queries`` in order; blocks the calling thread until all are done."""
        job = self.submit_async(queries, priority)
        job.wait()
        return job.answers

    def submit_async(self, queries: Sequence[PointQuery], priority: Priority = Priority.BULK,
                     on_answer: Callable[[int, Answer], None] | None = None) -> Job:
        """Queue ``queries`` and return at once; the :class:`Job` fills in as answers finish."""
        job = Job(total=len(queries), priority=priority, on_answer=on_answer)
        if not queries:
            job.finished.set()
            return job
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            for i, query in enumerate(queries):
                heapq.heappush(self._heap, _Item(int(priority), next(self._seq), query, job, i))
            self._cv.notify_all()  # every idle replica may take a batch
        return job

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for worker in self._workers:
            worker.join(timeout=10)

    # -- worker --------------------------------------------------------------------------------
    def _pop_batch(self, engine: Engine) -> list[_Item]:
        """Items of the first item's priority class, up to max_batch and while the batch's
        padded cache (rows x longest row) fits ``engine``'s token budget; at least one item
        (caller holds the lock)."""
        budget = self._ask(engine.token_budget)
        first = heapq.heappop(self._heap)
        if first.job.cancelled:
            return [first]  # answered CANCELLED by the caller, outside the lock
        batch, longest = [first], 0
        if budget is not None:
            longest = self._ask(engine.tokens_for, first.query) or 0
        # only the same priority class rides along: a bulk batch must not delay an opened task
        while (self._heap and len(batch) < self.max_batch and self._heap[0].priority == first.priority
               and not self._heap[0].job.cancelled):
            if budget is not None:
                row = max(longest, self._ask(engine.tokens_for, self._heap[0].query) or 0)
                if (len(batch) + 1) * row > budget:
                    self._count(budget_cuts=1)
                    log.debug("batch cut by the GPU memory budget",
                              extra={"rows": len(batch), "budget_tokens": budget, "row_tokens": row})
                    break
                longest = row
            batch.append(heapq.heappop(self._heap))
        return batch

    @staticmethod
    def _ask(method, *args):
        """An engine's budget or cost; None if it raises (the worker thread must never die here:
        every waiting request would hang), so the batch is formed by count alone."""
        try:
            return method(*args)
        except Exception as exc:  # noqa: BLE001
            log.warning("token budget unavailable, batching by count", extra={"error": repr(exc)[:300]})
            return None

    def _next_batch(self, engine: Engine) -> list[_Item] | None:
        with self._cv:
            while not self._heap and not self._closed:
                self._cv.wait()
            if self._closed and not self._heap:
                return None
            return self._pop_batch(engine)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self.stats[key] += value

    def _run(self, engine: Engine) -> None:
        while True:
            batch = self._next_batch(engine)
            if batch is None:
                return
            self._process(engine, batch, preemptible=batch[0].priority != Priority.INTERACTIVE)

    def _process(self, engine: Engine, batch: list[_Item], preemptible: bool = False) -> None:
        if batch[0].job.cancelled:
            self._count(cancelled=len(batch))
            for item in batch:
                self._deliver(item, Answer(text="", error=CANCELLED))
            return
        answers = self._answer(engine, batch, preemptible)
        self._count(batches=1, queries=len(batch))
        for item, answer in zip(batch, answers):
            self._deliver(item, answer)

    def _answer(self, engine: Engine, batch: list[_Item], preemptible: bool = False) -> list[Answer]:
        """Answers for ``batch``; a failing batch is split in halves until only the bad query fails."""
        try:
            queries = [item.query for item in batch]
            if preemptible and "between_steps" in inspect.signature(engine.generate).parameters:
                answers = engine.generate(queries, between_steps=lambda: self._serve_interactive(engine))
            else:
                answers = engine.generate(queries)
            if len(answers) != len(batch):
                raise RuntimeError(f"engine returned {len(answers)} answers for {len(batch)} queries")
            return answers
        except Exception as exc:  # noqa: BLE001 - any engine failure is contained here
            self._count(failed_batches=1)
            if len(batch) == 1:
                self._count(failed_queries=1)
                log.error("query failed", extra={"error": repr(exc)[:500]})
                return [Answer(text="", error=f"{type(exc).__name__}: {exc}"[:500])]
            log.warning(
                "batch failed, splitting and retrying",
                extra={"batch_size": len(batch), "error": repr(exc)[:500]},
            )
            mid = len(batch) // 2
            return self._answer(engine, batch[:mid], preemptible) + self._answer(engine, batch[mid:], preemptible)

    def _serve_interactive(self, engine: Engine) -> None:
        """Called by an engine between steps of a bulk batch: run waiting opened tasks now."""
        while True:
            with self._cv:
                if not self._heap or self._heap[0].priority != Priority.INTERACTIVE:
                    return
                batch = self._pop_batch(engine)  # the budget counts the running batch's memory
            self._count(preemptions=1)
            self._process(engine, batch)

    def _deliver(self, item: _Item, answer: Answer) -> None:
        job = item.job
        with self._stats_lock:  # several workers may finish parts of one job
            job.answers[item.index] = answer
            job.done_count += 1
            done = job.done_count
        if job.on_answer is not None:
            try:
                job.on_answer(item.index, answer)
            except Exception:  # noqa: BLE001 - a caller's callback must not kill the worker
                log.exception("on_answer callback failed")
        now = time.monotonic()
        if done == job.total:
            job.finished.set()
        elif job.total > self.max_batch and now - job.last_progress >= self.progress_every:
            job.last_progress = now
            rate = done / max(now - job.started, 1e-9)
            log.info(
                "bulk progress",
                extra={
                    "done": done, "total": job.total, "pairs_per_s": round(rate, 2),
                    "eta_s": round((job.total - done) / rate, 1),
                },
            )
