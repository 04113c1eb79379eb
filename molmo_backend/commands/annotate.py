"""Pre-annotate outside the server: a whole Label Studio project, or image files on disk.

Both run the server's own code path: one engine (``default_engine_factory`` or an injected
factory), ``build_backend`` around it, and ``MolmoBackend.predict`` on lists of tasks. So the
points, regions and ``model_version`` are exactly what ``serve`` would give, and predictions made
here and by a connected server dedupe against each other in Label Studio.

:func:`annotate_project` (``molmo-backend annotate``): Label Studio's "Retrieve predictions" sends
every selected task in one request and gives up after ``ML_TIMEOUT_PREDICT`` (100 s). Here the
project's tasks are listed through label-studio-sdk's client (``fields="all"``: each task with its
predictions' ``model_version``), tasks that already hold a prediction of this model_version are
skipped, and the rest go through the backend in chunks. Each chunk's predictions are written with
one ``POST /api/projects/ID/import/predictions`` as soon as the chunk is done, so an interruption
loses at most the chunks in flight and a re-run resumes where it stopped. The Label Studio calls
(and the facts about them) live in molmo_backend/labelstudio/api.py, shared with the server's
write-back.

Interrupts (molmo_backend/commands/interrupts.py): the first SIGINT/SIGTERM stops starting chunks, lets the chunks
in flight finish and writes them; a second one abandons those chunks without writing anything
of them. A task is never written twice by one run, and before each write the chunk's tasks are
checked again, so a run beside another (or beside "Retrieve predictions") rarely duplicates.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from molmo_backend.commands.backend_session import EngineFactory, close_backend, load_backend
from molmo_backend.commands.interrupts import Abandon, Interrupts
from molmo_backend.commands.progress import Progress
from molmo_backend.engine.scheduler import Priority
from molmo_backend.labelstudio.api import (
    DEFAULT_PAGE_SIZE,
    MAX_WRITE,
    LabelStudioAPIError,
    LabelStudioProject,
    TaskFilter,
    TaskInfo,
    write_new_predictions,
)
from molmo_backend.labelstudio.model import MolmoBackend, cached_config
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

#: one import request of at most this many tasks is one bulk insert in Label Studio
MAX_CHUNK = MAX_WRITE
DEFAULT_CHUNK = 64
#: chunks predicted at once: while one chunk's tail batch is on the GPU the next one's images are
#: fetched and its queries fill the batch, so the GPU does not idle at chunk boundaries
IN_FLIGHT = 2
#: stop early when this many tasks failed to load their image before any succeeded
FAILED_STREAK = 16

#: something the user must fix (URL, key, project, filters, files); the message says what. One
#: class with the Label Studio API's errors (a BadInput: exit code 2), so that a caller catching
#: AnnotateError gets those too
AnnotateError = LabelStudioAPIError


class _FailureRecorder:
    """Stands in for the backend's ImageLoader and remembers the tasks whose image could not be
    loaded: the backend gives them an empty prediction, which annotate does not write, so the next
    run tries them again (an unreachable image must not look like "no points")."""

    def __init__(self, inner):
        self.inner = inner
        self.failed: set[int] = set()
        self._lock = threading.Lock()

    def load(self, value: str, task_id: int | None = None):
        try:
            return self.inner.load(value, task_id=task_id)
        except BaseException:
            if task_id is not None:
                with self._lock:
                    self.failed.add(task_id)
            raise

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@dataclass
class AnnotateReport:
    project: int
    model_version: str = ""
    listed: int = 0  # tasks the filter selected
    skipped: int = 0  # already held a prediction of this model_version
    todo: int = 0
    written: int = 0  # predictions written by this run
    with_points: int = 0  # of those, how many have at least one keypoint
    skipped_late: int = 0  # got a prediction of this version from elsewhere while running
    failed: list[int] = field(default_factory=list)  # image not loaded: left for the next run
    abandoned: int = 0  # tasks of chunks dropped by a second interrupt
    truncated: int = 0  # answers cut at MOLMO_MAX_NEW_TOKENS (points past the cap are lost)
    interrupted: int | None = None  # the signal that stopped the run
    seconds: float = 0.0
    predict_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.interrupted is None and not self.failed and self.written + self.skipped_late == self.todo

    def as_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "failed"}
        out["failed"] = len(self.failed)
        out["failed_ids"] = self.failed[:50]
        return out


@dataclass
class _Chunk:
    index: int
    tasks: list[TaskInfo]
    predictions: list[dict] | None = None
    error: BaseException | None = None


def annotate_project(
    settings: Settings,
    project_id: int,
    *,
    task_filter: TaskFilter = TaskFilter(),
    chunk_size: int = DEFAULT_CHUNK,
    page_size: int = DEFAULT_PAGE_SIZE,
    engine_factory: EngineFactory | None = None,
    project: LabelStudioProject | None = None,
    progress: str = "auto",
    interrupts: Interrupts | None = None,
    in_flight: int = IN_FLIGHT,
    stream=None,
) -> AnnotateReport:
    """Pre-annotate the project's tasks that hold no prediction of this model_version.

    Raises AnnotateError (URL, key, project, filters), LabelConfigError (the project's config has
    no keypoints for an image); returns a report otherwise, also after an interruption."""
    started = time.monotonic()
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise AnnotateError(
            f"--chunk-size must be 1..{MAX_CHUNK} (Label Studio imports up to "
            f"{MAX_CHUNK} predictions in one bulk insert)"
        )
    task_filter.validate()
    project = project or LabelStudioProject(
        project_id, settings.label_studio_url, settings.label_studio_api_key
    )
    report = AnnotateReport(project=project.id)
    label_config = project.label_config()
    cached_config(label_config)  # LabelConfigError now, not after the model has loaded

    # The model loads while the tasks are listed: skipping needs its model_version.
    loaded: dict[str, Any] = {}

    def load() -> None:
        try:
            loaded["backend"] = load_backend(settings, engine_factory)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            loaded["error"] = exc

    loader = threading.Thread(target=load, name="model-loader", daemon=True)
    loader.start()
    listed = list(project.tasks(task_filter, page_size))
    loader.join()
    if "error" in loaded:
        raise loaded["error"]
    backend: MolmoBackend = loaded["backend"]
    version = backend.model_version
    report.model_version = version
    report.listed = len(listed)
    todo = [t for t in listed if version not in t.model_versions]
    report.skipped = report.listed - len(todo)
    report.todo = len(todo)
    log.info(
        "annotate plan",
        extra={
            "project": project.id,
            "model_version": version,
            "tasks": report.listed,
            "already_done": report.skipped,
            "to_do": report.todo,
            "chunk_size": chunk_size,
        },
    )
    if task_filter.task_ids:
        missing = sorted(set(task_filter.task_ids) - {t.id for t in listed})
        if missing:
            log.warning(
                "task ids not in the project (or not in the view)",
                extra={"ids": missing[:50], "count": len(missing)},
            )
    if not todo:
        close_backend(backend)
        report.seconds = time.monotonic() - started
        return report

    recorder = _FailureRecorder(backend.images)
    backend.images = recorder
    chunks = [_Chunk(i, todo[s : s + chunk_size]) for i, s in enumerate(range(0, len(todo), chunk_size))]
    stats = getattr(backend.scheduler, "stats", {})
    truncated_before = int(stats.get("truncated", 0))
    bar = Progress(len(todo), progress, stream=stream, pairs=lambda: int(stats.get("queries", 0)))
    interrupts = interrupts or Interrupts()
    t_predict = time.monotonic()
    try:
        with bar.logging_redirected(), interrupts:
            _run_chunks(
                backend, project, label_config, chunks, recorder, report, bar, interrupts, max(1, in_flight)
            )
    finally:
        bar.close()
        report.predict_seconds = time.monotonic() - t_predict
        report.seconds = time.monotonic() - started
        report.interrupted = interrupts.signum
        report.truncated = int(stats.get("truncated", 0)) - truncated_before
    if not report.abandoned:  # abandoned chunks may still hold the GPU worker: do not wait on it
        close_backend(backend)
    return report


def _run_chunks(
    backend: MolmoBackend,
    project: LabelStudioProject,
    label_config: str,
    chunks: list[_Chunk],
    recorder: _FailureRecorder,
    report: AnnotateReport,
    bar: Progress,
    interrupts: Interrupts,
    in_flight: int,
) -> None:
    """Predict chunks on daemon threads (``in_flight`` at once), write each when it is done."""
    results: queue.Queue[_Chunk] = queue.Queue()
    version = backend.model_version

    def predict(chunk: _Chunk) -> None:
        try:
            chunk.predictions = backend.predict(
                [t.as_task() for t in chunk.tasks], label_config=label_config, priority=Priority.BULK
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            chunk.error = exc
        results.put(chunk)

    pending = list(reversed(chunks))
    running: set[int] = set()
    started: set[int] = set()
    finished: set[int] = set()
    streak: int | None = 0  # tasks failed since the start; None once one image loaded
    try:
        while pending or running:
            while pending and len(running) < in_flight and not interrupts.stop_requested:
                chunk = pending.pop()
                running.add(chunk.index)
                started.add(chunk.index)
                threading.Thread(
                    target=predict, args=(chunk,), name=f"chunk-{chunk.index}", daemon=True
                ).start()
            if not running:
                break  # stop requested: nothing more starts
            try:
                chunk = results.get(timeout=0.5)
            except queue.Empty:
                bar.tick()
                continue
            running.discard(chunk.index)
            if chunk.error is not None:
                raise chunk.error
            _write_chunk(project, chunk, version, recorder, report, interrupts)
            finished.add(chunk.index)
            if interrupts.abandoned:
                raise Abandon()
            bar.advance(len(chunk.tasks), written=report.written, failed=len(report.failed))
            if streak is not None:
                ok = [t for t in chunk.tasks if t.id not in recorder.failed]
                streak = None if ok else streak + len(chunk.tasks)
                if streak is not None and streak >= FAILED_STREAK and (pending or running):
                    raise AnnotateError(
                        f"the images of the first {streak} tasks could not be loaded (the log says "
                        f"why): check LABEL_STUDIO_URL, the key and MOLMO_ALLOWED_HOSTS. Nothing "
                        f"was written for them; stopping before trying the rest"
                    )
    except Abandon:
        report.abandoned = sum(len(c.tasks) for c in chunks if c.index in started - finished)
        log.warning(
            "abandoned the chunks in flight: nothing of them was written", extra={"tasks": report.abandoned}
        )


def _write_chunk(
    project: LabelStudioProject,
    chunk: _Chunk,
    version: str,
    recorder: _FailureRecorder,
    report: AnnotateReport,
    interrupts: Interrupts,
) -> None:
    assert chunk.predictions is not None and len(chunk.predictions) == len(chunk.tasks)
    rows = []
    for task, prediction in zip(chunk.tasks, chunk.predictions):
        if task.id in recorder.failed:
            report.failed.append(task.id)
            continue
        rows.append(
            {
                "task": task.id,
                "result": prediction["result"],
                "score": prediction.get("score", 0.0),
                "model_version": prediction.get("model_version", version),
            }
        )
    if not rows:
        return
    with interrupts.writing():
        # checked again just before writing: another run or a "Retrieve predictions" may have
        # predicted some of these tasks while this chunk was on the GPU
        outcome = write_new_predictions(project, rows, version)
    if outcome.present:
        report.skipped_late += len(outcome.present)
        log.info(
            "tasks predicted elsewhere meanwhile, not written again", extra={"tasks": len(outcome.present)}
        )
    written = set(outcome.written)
    report.written += len(written)
    report.with_points += sum(1 for r in rows if r["task"] in written and r["result"])


def parse_task_ids(values: Iterable[str]) -> tuple[int, ...]:
    """``["1,2", "5-8"]`` -> (1, 2, 5, 6, 7, 8); raises AnnotateError on anything else."""
    ids: list[int] = []
    for value in values:
        for part in str(value).replace(" ", "").split(","):
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            try:
                if dash:
                    a, b = int(lo), int(hi)
                    if b < a or b - a > 1_000_000:
                        raise ValueError
                    ids.extend(range(a, b + 1))
                else:
                    ids.append(int(part))
            except ValueError:
                raise AnnotateError(f"bad task id or range {part!r} (use e.g. 1,2,10-20)") from None
    if any(i < 1 for i in ids):
        raise AnnotateError("task ids are positive integers")
    return tuple(dict.fromkeys(ids))
