"""One request's tasks computed in a background thread, chunk by chunk, each task reported once.

The backend (model.py) starts a run and waits for it only until its deadline; the run goes on and
its results land in the ResultStore either way. A task's answers arrive in the order they finish
(continuous batching delivers short answers first), so its regions are joined in the label
config's order when its last answer is in.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from molmo_backend.engine.base import Answer, PointQuery
from molmo_backend.engine.scheduler import Priority, Scheduler, SchedulerClosed
from molmo_backend.images.decode import LoadedImage
from molmo_backend.labelstudio.answers import answer_regions
from molmo_backend.labelstudio.asks import Ask
from molmo_backend.labelstudio.regions import empty_prediction, task_prediction
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

#: tasks whose images one request fetches at once; at most two such chunks are held in memory
TASK_CHUNK = 64

#: ``fetch_images(tasks, data_keys, priority)``: per task, data key -> a future of its image or None
FetchImages = Callable[[Sequence[Any], Sequence[str], Priority], list[dict[str, Future]]]


class _Chunk:
    """One chunk of a run on its way through the scheduler: per task, what is still to come."""

    def __init__(self, start: int, images: list[dict[str, LoadedImage | None]], asks: Sequence[Ask]):
        self.start = start
        self.images = images
        self.plan = [
            (t, ask, row[ask.data_key])
            for t, row in enumerate(images)
            for ask in asks
            if row.get(ask.data_key) is not None
        ]
        self.remaining = [0] * len(images)
        for t, _, _ in self.plan:
            self.remaining[t] += 1
        # a task missing an image is not "ok": what it gives is not kept (the next retrieve retries)
        self.bad = [any(row.get(ask.data_key) is None for ask in asks) for row in images]
        #: per task, its answers' regions by plan index: joined in the config's order when the
        #: task completes (answers arrive in the order they finish, short ones first)
        self.regions: list[dict[int, list[dict]]] = [{} for _ in images]
        self.open = sum(1 for n in self.remaining if n)

    @property
    def complete(self) -> bool:
        return self.open == 0


class TaskRun:
    """Predicts ``tasks`` in a background thread and reports each one as soon as its last answer
    is in: ``on_task(index, prediction, ok)``, exactly once per task, also when something fails
    (then an empty prediction and ``ok`` False). ``ok``: every image loaded and every answer came
    back, so the prediction is worth keeping.

    Chunks of TASK_CHUNK tasks: the next chunk's images are fetched while the current one is on
    the GPU, and it is queued before the current one finishes (the GPU does not idle at chunk
    boundaries); at most two chunks' images are held at once."""

    _ids = itertools.count(1)

    def __init__(
        self,
        tasks: Sequence[Any],
        asks: Sequence[Ask],
        priority: Priority,
        on_task: Callable[[int, dict, bool], None],
        *,
        scheduler: Scheduler,
        settings: Settings,
        model_version: str,
        fetch_images: FetchImages,
    ):
        self.scheduler = scheduler
        self.settings = settings
        self.model_version = model_version
        self.fetch_images = fetch_images
        self.tasks = list(tasks)
        self.asks = tuple(asks)
        self.priority = Priority(priority)
        self.on_task = on_task
        self._answers: queue.Queue = queue.Queue()
        self._reported = [False] * len(self.tasks)
        self._jobs: list = []
        self._lock = threading.Lock()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"predict-{next(self._ids)}", daemon=True)

    def start(self) -> TaskRun:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Queries not yet started are dropped, no further chunk is queued."""
        with self._lock:
            self._cancelled = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._chunks()
        except SchedulerClosed:
            log.warning(
                "engine shutting down: tasks left unpredicted", extra={"tasks": self._reported.count(False)}
            )
        except Exception:  # noqa: BLE001 - every task still gets its one result below
            log.exception("prediction run failed", extra={"tasks": self._reported.count(False)})
        finally:
            version = self.model_version
            for i, reported in enumerate(self._reported):
                if not reported:
                    self._report(i, empty_prediction(version), False)

    def _chunks(self) -> None:
        data_keys = list(dict.fromkeys(ask.data_key for ask in self.asks))
        bounds = [(i, min(i + TASK_CHUNK, len(self.tasks))) for i in range(0, len(self.tasks), TASK_CHUNK)]
        fetching = self.fetch_images(self.tasks[slice(*bounds[0])], data_keys, self.priority)
        active: list[_Chunk] = []
        for k, (start, _) in enumerate(bounds):
            images = [{key: future.result() for key, future in row.items()} for row in fetching]
            if self._cancelled:
                return
            active.append(self._submit(start, images))
            active = [c for c in active if not c.complete]
            while len(active) > 1:  # the older chunk finishes before another chunk is fetched
                self._take_answer()
                active = [c for c in active if not c.complete]
            if k + 1 < len(bounds):
                fetching = self.fetch_images(self.tasks[slice(*bounds[k + 1])], data_keys, self.priority)
        while active:
            self._take_answer()
            active = [c for c in active if not c.complete]

    def _submit(self, start: int, images: list[dict[str, LoadedImage | None]]) -> _Chunk:
        chunk = _Chunk(start, images, self.asks)
        for t, n in enumerate(chunk.remaining):
            if n == 0:  # no image for any question (or nothing to ask): answered already
                self._finish_task(chunk, t)
        if not chunk.plan:
            return chunk
        queries = [
            PointQuery(image=image.image, prompt=ask.prompt, image_key=id(image))
            for _, ask, image in chunk.plan
        ]

        def on_answer(i: int, answer: Answer) -> None:  # GPU worker thread: a queue put only
            self._answers.put((chunk, i, answer))

        job = self.scheduler.submit_async(queries, priority=self.priority, on_answer=on_answer)
        with self._lock:
            self._jobs.append(job)
            cancelled = self._cancelled
        if cancelled:
            job.cancel()
        return chunk

    def _take_answer(self) -> None:
        chunk, i, answer = self._answers.get()
        t, ask, image = chunk.plan[i]
        if answer.truncated:
            task = self.tasks[chunk.start + t]
            log.warning(
                "answer cut at MOLMO_MAX_NEW_TOKENS: its points past the cap are lost",
                extra={
                    "task": task.get("id") if isinstance(task, dict) else None,
                    "prompt": ask.prompt[:80],
                    "max_new_tokens": self.settings.max_new_tokens,
                },
            )
        if answer.error:
            chunk.bad[t] = True
        else:
            settings = self.settings
            chunk.regions[t][i] = answer_regions(
                ask,
                answer,
                image_width=image.width,
                image_height=image.height,
                point_width=settings.point_width,
                min_point_score=settings.min_point_score,
            )
        chunk.remaining[t] -= 1
        if chunk.remaining[t] == 0:
            chunk.open -= 1
            self._finish_task(chunk, t)
            if chunk.complete:
                chunk.images, chunk.plan = [], []  # its decoded images go as soon as it is done

    def _finish_task(self, chunk: _Chunk, t: int) -> None:
        version = self.model_version
        regions = [region for i in sorted(chunk.regions[t]) for region in chunk.regions[t][i]]
        bad = chunk.bad[t]
        prediction = empty_prediction(version) if bad and not regions else task_prediction(regions, version)
        self._report(chunk.start + t, prediction, not bad)

    def _report(self, index: int, prediction: dict, ok: bool) -> None:
        if self._reported[index]:
            return
        self._reported[index] = True
        try:
            self.on_task(index, prediction, ok)
        except Exception:  # noqa: BLE001 - a bookkeeping bug must not stop the other tasks
            log.exception("reporting a finished task failed", extra={"task_index": index})
