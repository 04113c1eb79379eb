"""The GPU scheduler: one worker thread per engine replica, one queue in front of them all.

HTTP threads submit (image, prompt) queries and get a :class:`Job` back; the workers answer them,
opened tasks (INTERACTIVE) before bulk work, so an annotator who opens a task is not stuck behind
a 1000-task "Retrieve predictions".

For a :class:`StepEngine` (the in-process Molmo2 engine) the worker runs continuous batching and
owns the loop, the way TGI's router and vLLM's scheduler do; each iteration:

1. rows whose job was cancelled leave their slots;
2. waiting rows join: opened tasks first, into slots of their own, at once; bulk rows when enough
   bulk slots are free (so a prefill chunk is big enough to run efficiently) and no opened task
   is decoding, up to a per-step prefill token budget. A distinct image is prefilled once for
   all the labels asked of it;
3. one step: the joining rows' prefill and one token of the running rows in one packed forward
   (:meth:`StepEngine.step`: decoding rows ride along with a prefill instead of waiting for it),
   or, when nothing joins, one decode step. Only the opened tasks' rows step while any is
   running or joining (bulk rows wait in their slots);
4. rows that ended (end token, the new-token cap) leave at once and their answers are delivered.

The engine never calls back into the scheduler, so no batch can run inside another one. For a
plain :class:`Engine` (remote, Molmo v1, ``generate()``) the worker forms whole batches up to
``max_batch`` queries and the engine's token budget. Either way a failing prefill or batch is
split in halves and retried, down to one image or query, so one bad input costs only its own
answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Histogram

from molmo_backend.engine.admission import PREFILL_TOKENS_PER_STEP, admit, ask
from molmo_backend.engine.base import Answer, Engine, PointQuery, Row, StepEngine
from molmo_backend.engine.job import CANCELLED, Job, SchedulerClosed
from molmo_backend.engine.queue import Item, Priority, RequestQueue

log = logging.getLogger(__name__)

__all__ = ["CANCELLED", "Job", "Priority", "Scheduler", "SchedulerClosed"]

#: images whose CPU-side preparation runs ahead of the GPU, per worker
PREPARE_AHEAD = 32
#: threads preparing them, per worker (four ran the vision tower ahead into the packed steps: an
#: H100's realistic job 37.6 pairs/s against 39.1 with two, bench/RESULTS.md)
PREPARE_WORKERS = 2
#: pairs/s is measured over the answers of this many recent seconds
RATE_WINDOW_S = 60.0
#: seconds from a query's submit to its answer: opened tasks take about 0.65 s on an H200
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class Scheduler:
    """Runs one worker thread per engine (one per GPU replica), all fed from one queue."""

    def __init__(
        self,
        engines: Engine | Sequence[Engine],
        max_batch: int | None = None,
        progress_every: float = 10.0,
        prefill_tokens: int = PREFILL_TOKENS_PER_STEP,
        packed_steps: bool = True,
    ):
        self.engines = [engines] if isinstance(engines, Engine) else list(engines)
        if not self.engines:
            raise ValueError("a scheduler needs at least one engine")
        self.engine = self.engines[0]
        self.max_batch = max_batch or self.engine.max_batch
        self.progress_every = progress_every
        self.prefill_tokens = prefill_tokens
        #: admit rows and step the running ones in one forward (False: apart, for benchmarks)
        self.packed_steps = packed_steps
        self._queue = RequestQueue()
        self._cv = threading.Condition()
        self._closed = False
        self._running: dict[int, int] = {}  # engine index -> rows in its slots
        self.stats = {
            "queries": 0,
            "batches": 0,
            "failed_batches": 0,
            "failed_queries": 0,
            "budget_cuts": 0,
            "cancelled": 0,
            "truncated": 0,
            "prefills": 0,
            "decode_steps": 0,
            "bulk_paused_steps": 0,
            "requeued": 0,
        }
        self._stats_lock = threading.Lock()
        #: submit-to-answer seconds of each query, by priority (exported by /metrics)
        self.pair_latency = Histogram(
            "molmo_pair_latency_seconds",
            "Seconds from a query's submit to its answer",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self._answered_at: deque[float] = deque(maxlen=100_000)
        #: called by a step worker with ("prefill" | "decode", engine index) after each prefill and
        #: decode step (tests use it to act at an exact step; never set in production)
        self.on_step: Callable[[str, int], None] | None = None
        self._workers = [
            threading.Thread(
                target=self._run_steps if engine.stepwise else self._run_batches,
                args=(i, engine),
                name=f"gpu-worker-{i}",
                daemon=True,
            )
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

    def submit_async(
        self,
        queries: Sequence[PointQuery],
        priority: Priority = Priority.BULK,
        on_answer: Callable[[int, Answer], None] | None = None,
    ) -> Job:
        """Queue ``queries`` and return at once; the :class:`Job` fills in as answers finish."""
        priority = Priority(priority)
        job = Job(total=len(queries), priority=priority, on_answer=on_answer)
        if not queries:
            job.finished.set()
            return job
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            self._queue.push([Item(q, job, i) for i, q in enumerate(queries)], priority)
            self._cv.notify_all()  # every idle replica may take work
        return job

    def pending(self, priority: Priority | None = None) -> int:
        """Queries waiting (not yet admitted), of one class or all."""
        with self._cv:
            return len(self._queue) if priority is None else self._queue.waiting(priority)

    def running(self) -> int:
        """Rows in the engines' cache slots now (step engines only)."""
        with self._cv:
            return sum(self._running.values())

    def pairs_per_second(self, window: float = RATE_WINDOW_S) -> float:
        """Queries answered per second over the last ``window`` seconds."""
        since, recent = time.monotonic() - window, 0
        with self._stats_lock:
            for answered in reversed(self._answered_at):  # newest first
                if answered < since:
                    break
                recent += 1
        return recent / window

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for worker in self._workers:
            worker.join(timeout=10)

    # -- shared by both loops ------------------------------------------------------------------
    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self.stats[key] += value

    def _deliver(self, item: Item, answer: Answer) -> None:
        job = item.job
        if answer.truncated:
            self._count(truncated=1)
        now = time.monotonic()
        with self._stats_lock:  # several workers may finish parts of one job
            job.answers[item.index] = answer
            job.done_count += 1
            done = job.done_count
            self._answered_at.append(now)
        self.pair_latency.labels(job.priority.name.lower()).observe(now - item.enqueued)
        if job.on_answer is not None:
            try:
                job.on_answer(item.index, answer)
            except Exception:  # noqa: BLE001 - a caller's callback must not kill the worker
                log.exception("on_answer callback failed")
        if done == job.total:
            job.finished.set()
        elif job.total > self.max_batch and now - job.last_progress >= self.progress_every:
            job.last_progress = now
            rate = done / max(now - job.started, 1e-9)
            log.info(
                "bulk progress",
                extra={
                    "done": done,
                    "total": job.total,
                    "pairs_per_s": round(rate, 2),
                    "eta_s": round((job.total - done) / rate, 1),
                },
            )

    def _drop(self, items: Sequence[Item]) -> None:
        self._count(cancelled=len(items))
        for item in items:
            self._deliver(item, Answer(text="", error=CANCELLED))

    @staticmethod
    def _failure(exc: BaseException) -> Answer:
        return Answer(text="", error=f"{type(exc).__name__}: {exc}"[:500])

    # -- plain engines: whole batches ----------------------------------------------------------
    def _run_batches(self, index: int, engine: Engine) -> None:
        while True:
            with self._cv:
                while not len(self._queue) and not self._closed:
                    self._cv.wait()
                if self._closed and not len(self._queue):
                    return
                batch = self._pop_batch(engine)
            if batch[0].job.cancelled:
                self._drop(batch)
                continue
            answers = self._answer(engine, batch)
            self._count(batches=1, queries=len(batch))
            for item, answer in zip(batch, answers):
                self._deliver(item, answer)

    def _pop_batch(self, engine: Engine) -> list[Item]:
        """Items of the most urgent class, up to max_batch and while the batch's padded cache
        (rows x longest row) fits ``engine``'s token budget; at least one item. A cancelled
        head item goes alone (it is dropped, not computed). Caller holds the lock."""
        priority = self._queue.head_priority()
        budget = ask(engine.token_budget)
        first = self._queue.pop(priority)
        batch, longest = [first], 0
        if first.job.cancelled:
            return batch
        if budget is not None:
            longest = ask(engine.tokens_for, first.query) or 0
        # only the same priority class rides along: a bulk batch must not delay an opened task
        while len(batch) < self.max_batch and self._queue.waiting(priority):
            head = next(self._queue.peek(priority, 1))
            if head.job.cancelled:
                break
            if budget is not None:
                row = max(longest, ask(engine.tokens_for, head.query) or 0)
                if (len(batch) + 1) * row > budget:
                    self._count(budget_cuts=1)
                    log.debug(
                        "batch cut by the GPU memory budget",
                        extra={"rows": len(batch), "budget_tokens": budget, "row_tokens": row},
                    )
                    break
                longest = row
            batch.append(self._queue.pop(priority))
        return batch

    def _answer(self, engine: Engine, batch: list[Item]) -> list[Answer]:
        """Answers for ``batch``; a failing batch is split in halves until only the bad query fails."""
        try:
            answers = engine.generate([item.query for item in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"engine returned {len(answers)} answers for {len(batch)} queries")
            return answers
        except Exception as exc:  # noqa: BLE001 - any engine failure is contained here
            self._count(failed_batches=1)
            if len(batch) == 1:
                self._count(failed_queries=1)
                log.error("query failed", extra={"error": repr(exc)[:500]})
                return [self._failure(exc)]
            log.warning(
                "batch failed, splitting and retrying",
                extra={"batch_size": len(batch), "error": repr(exc)[:500]},
            )
            mid = len(batch) // 2
            return self._answer(engine, batch[:mid]) + self._answer(engine, batch[mid:])

    # -- step engines: continuous batching -----------------------------------------------------
    def _run_steps(self, index: int, engine: StepEngine) -> None:
        running: list[Row] = []
        preparer = ThreadPoolExecutor(max_workers=PREPARE_WORKERS, thread_name_prefix=f"prepare-{index}")
        try:
            while True:
                with self._cv:
                    while not len(self._queue) and not running and not self._closed:
                        self._cv.wait()
                    if self._closed and not running:
                        self._drop_all_waiting()
                        return
                    groups, dropped = admit(self._queue, engine, running, self.prefill_tokens)
                    self._prepare_ahead(engine, preparer)
                self._drop(dropped)
                running = [row for row in running if not self._evict_if_cancelled(engine, row)]
                if groups:
                    running = self._admit_with_step(engine, groups, running)
                    self._hook("prefill", index)
                elif running:
                    self._decode(engine, self._stepping(running))
                    running = self._finish(engine, running)
                    self._hook("decode", index)
                with self._cv:
                    self._running[index] = len(running)
        finally:
            preparer.shutdown(wait=False, cancel_futures=True)

    def _hook(self, event: str, index: int) -> None:
        if self.on_step is not None:
            self.on_step(event, index)

    def _prepare_ahead(self, engine: StepEngine, preparer: ThreadPoolExecutor) -> None:
        """Start the preparation of the next waiting images (caller holds the lock): once per
        image of a job, shared by the queries (labels) that show it."""
        for priority in Priority:
            started: dict = {}
            for item in self._queue.peek(priority, PREPARE_AHEAD):
                key = (id(item.job), item.image_key)
                if item.prepared is None and not item.job.cancelled:
                    item.prepared = started.get(key) or preparer.submit(engine.prepare, item.query)
                if item.prepared is not None:
                    started.setdefault(key, item.prepared)

    def _stepping(self, running: list[Row], admitted: Sequence[Row] = ()) -> list[Row]:
        """The running rows that take a token now: only the opened tasks' while any is running
        or joining (bulk rows wait in their slots, so the opened task's steps stay small; such a
        step is counted in ``bulk_paused_steps``). Called once per step."""
        if any(row.interactive for row in running) or any(row.interactive for row in admitted):
            stepping = [row for row in running if row.interactive]
            if len(stepping) < len(running):
                self._count(bulk_paused_steps=1)
            return stepping
        return running

    def _admit_with_step(self, engine: StepEngine, groups: list[list[Row]], running: list[Row]) -> list[Row]:
        """Admit ``groups`` while the running rows that step now take their next token, in one
        forward where the engine can (:meth:`StepEngine.step`). If that fails, the groups are
        prefilled apart (its halves next, split and retried down to the bad image) and the
        running rows decoded apart, so one bad image still costs only its own rows. Returns the
        rows running after."""
        admitted = [row for group in groups for row in group]
        stepping = self._stepping(running, admitted)
        parts = [groups]
        if self.packed_steps:
            try:
                engine.step(admitted, stepping)
                self._count(prefills=1, queries=len(admitted), decode_steps=1 if stepping else 0)
                return self._finish(engine, running + admitted)  # a first token may end a row
            except Exception as exc:  # noqa: BLE001 - contained: retried apart below
                self._count(failed_batches=1)
                log.warning(
                    "packed step failed: prefilling and decoding apart",
                    extra={"images": len(groups), "decoding": len(stepping), "error": repr(exc)[:500]},
                )
                if len(groups) > 1:  # one image alone is retried alone: the decoding rows may be at fault
                    parts = [groups[: len(groups) // 2], groups[len(groups) // 2 :]]
        admitted = [row for part in parts for row in self._prefill(engine, part)]
        if stepping:
            self._decode(engine, stepping)
        return self._finish(engine, running + admitted)

    def _prefill(self, engine: StepEngine, groups: list[list[Row]]) -> list[Row]:
        """Prefill image groups; a failing set is split in halves, down to one image, whose rows
        then get the error. Returns the rows admitted."""
        rows = [row for group in groups for row in group]
        try:
            engine.prefill(rows)
            self._count(prefills=1, queries=len(rows))
            return rows
        except Exception as exc:  # noqa: BLE001 - any engine failure is contained here
            self._count(failed_batches=1)
            if len(groups) == 1:
                self._count(failed_queries=len(rows), queries=len(rows))
                log.error("query failed", extra={"error": repr(exc)[:500], "rows": len(rows)})
                for row in rows:
                    self._deliver(row.ticket, self._failure(exc))
                return []
            log.warning(
                "prefill failed, splitting and retrying",
                extra={"images": len(groups), "error": repr(exc)[:500]},
            )
            mid = len(groups) // 2
            return self._prefill(engine, groups[:mid]) + self._prefill(engine, groups[mid:])

    def _decode(self, engine: StepEngine, rows: list[Row]) -> None:
        try:
            engine.decode(rows)
            self._count(decode_steps=1)
        except Exception as exc:  # noqa: BLE001 - a broken step ends its rows, not the worker
            log.exception("decode step failed", extra={"rows": len(rows)})
            self._count(failed_batches=1, failed_queries=len(rows))
            for row in rows:
                row.finished, row.error = True, exc

    def _finish(self, engine: StepEngine, running: list[Row]) -> list[Row]:
        """Deliver the rows that ended and free their slots; put the rows the engine handed back
        (``requeue``: its cache memory ran short) at the head of the queue again; the rest keep
        running."""
        requeued = [row for row in running if row.requeue]
        if requeued:
            running = [row for row in running if not row.requeue]
            self._count(requeued=len(requeued))
            with self._cv:
                for interactive in (True, False):
                    items = [row.ticket for row in requeued if row.interactive == interactive]
                    priority = Priority.INTERACTIVE if interactive else Priority.BULK
                    self._queue.push_front(items, priority)
        done = [row for row in running if row.finished]
        if not done:
            return running
        engine.release(done)
        for row in done:
            self._deliver(row.ticket, self._failure(row.error) if row.error else self._answer_of(engine, row))
        return [row for row in running if not row.finished]

    def _answer_of(self, engine: StepEngine, row: Row) -> Answer:
        try:
            return engine.answer(row)
        except Exception as exc:  # noqa: BLE001
            log.exception("decoding an answer failed")
            return self._failure(exc)

    def _evict_if_cancelled(self, engine: StepEngine, row: Row) -> bool:
        if not row.ticket.job.cancelled:
            return False
        engine.release([row])
        self._drop([row.ticket])
        return True

    def _drop_all_waiting(self) -> None:
        """At close: every waiting query still gets an answer (caller holds the lock)."""
        items = []
        for priority in Priority:
            while self._queue.waiting(priority):
                items.append(self._queue.pop(priority))
        for item in items:
            self._deliver(item, Answer(text="", error="the engine is shutting down"))
