"""The model class Label Studio talks to, in label-studio-ml 2.x's shape.

``predict`` turns Label Studio tasks into predictions:
label config -> asks (keypoint labels, counts, captions/questions; or, for an interactive
request, the one question its context holds) -> prompts; task data -> images; (image, prompt)
queries -> the scheduler (GPU batching) -> answers -> scored points, counts, texts -> regions. It
owns the one invariant Label Studio depends on: every task gets exactly one result, in task
order, whatever fails on the way.

A bulk request ("Retrieve predictions") with a ``deadline`` answers at that deadline: finished
tasks get their prediction, unfinished ones an empty list (Label Studio 1.23.2 then stores
nothing for them and sends them again with the next retrieve). Their work goes on in the
background (:class:`TaskRun`) and lands in :class:`~molmo_backend.labelstudio.results.ResultStore`, which
the next request (or the write-back) takes it from. An opened task or interactive click has no
deadline; when its client hangs up, its queued queries are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from molmo_backend.engine.scheduler import Priority, Scheduler
from molmo_backend.images.decode import LoadedImage
from molmo_backend.images.errors import BadReference, ImageLoadError
from molmo_backend.images.loader import ImageLoader
from molmo_backend.labelstudio.asks import Ask, bulk_asks
from molmo_backend.labelstudio.config import LabelConfig, LabelConfigError, parse_label_config
from molmo_backend.labelstudio.interactive import interactive_asks
from molmo_backend.labelstudio.results import ResultStore, TaskKey, digest
from molmo_backend.labelstudio.task_run import TaskRun
from molmo_backend.metrics import FETCH_FAILURES, Counters
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE, prompt_fingerprint
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

#: image fetch threads for bulk work, and apart from them for opened tasks and clicks (so these
#: never wait behind a retrieve's fetches)
FETCH_THREADS, INTERACTIVE_FETCH_THREADS = 16, 4


class LabelStudioMLBase:
    """label-studio-ml 2.x's model contract (``setup``, ``predict``, ``fit``, ``model_version``)
    without its HTTP layer, Redis or per-request model construction."""

    def __init__(self, project_id: str | None = None, label_config: str | None = None):
        self.project_id = project_id
        self.label_config = label_config

    @property
    def model_version(self) -> str:
        return "0.0.1"

    def setup(self) -> None:
        """Called when Label Studio connects; must be cheap (Label Studio gives /setup 3 s)."""

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction dict per task, in task order."""
        raise NotImplementedError

    def fit(self, event: str, data: dict, **kwargs) -> dict | None:
        """Training hook for Label Studio's webhook events."""
        return None


@lru_cache(maxsize=64)
def cached_config(label_config: str) -> LabelConfig:
    """Everything the backend fills for a config (raises LabelConfigError when nothing)."""
    return parse_label_config(label_config)


@lru_cache(maxsize=64)
def cached_bulk_asks(label_config: str, template: str, caption_prompt: str) -> tuple[Ask, ...]:
    return bulk_asks(cached_config(label_config), template, caption_prompt)


def asks_fingerprint(asks: Sequence[Ask]) -> str:
    """Changes whenever the questions or where their answers go do (a changed label config)."""
    return digest(repr(tuple(asks)))


def make_model_version(model_id: str, revision: str, prompt_template: str, caption_prompt: str = "") -> str:
    """Stable across restarts: model, checkpoint revision and prompt settings, nothing else.
    Label Studio skips tasks that already hold a prediction of this version."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    prompts = prompt_template if not caption_prompt else f"{prompt_template}\x00{caption_prompt}"
    return f"{name}@{revision}-p{prompt_fingerprint(prompts)}"


class MolmoBackend(LabelStudioMLBase):
    """Keypoint pre-annotations from Molmo pointing answers."""

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        images: ImageLoader,
        model_version: str,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        results: ResultStore | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.prompt_template = prompt_template
        self.scheduler = scheduler
        self.images = images
        self._model_version = model_version
        #: results nobody received yet, and the tasks being computed (molmo_backend/labelstudio/results.py)
        self.results = results if results is not None else ResultStore(settings.result_cache)
        self.write_back = None  # the server's molmo_backend.labelstudio.writeback.WriteBack, when it has one
        #: task images not loaded, by kind of failure (exported by /metrics)
        self.fetch_failures = Counters(FETCH_FAILURES)
        self._fetch_pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch")
        self._interactive_fetch_pool = ThreadPoolExecutor(
            max_workers=INTERACTIVE_FETCH_THREADS, thread_name_prefix="fetch-open"
        )

    @property
    def model_version(self) -> str:
        return self._model_version

    def setup(
        self, label_config: str | None = None, hostname: str | None = None, access_token: str | None = None
    ) -> str:
        """Validate the project's config (raises LabelConfigError) and remember how to reach LS."""
        if label_config is not None:
            cached_config(label_config)
            self.label_config = label_config
        self.images.configure_label_studio(hostname, access_token)
        return self.model_version

    def predict(
        self,
        tasks: list[dict],
        context: dict | None = None,
        *,
        label_config: str | None = None,
        priority: Priority | None = None,
        deadline: float | None = None,
        client_gone: Callable[[], bool] | None = None,
        project: Any = None,
        **kwargs: Any,
    ) -> list:
        """One result per task, in order: its prediction dict, or, only for a bulk request given
        a ``deadline``, an empty list for a task not finished by then (or answered meanwhile by
        the write-back). Raises LabelConfigError for an unusable config (that is the whole
        request's fault); anything that goes wrong with one task gives that task an empty
        prediction and a logged reason.

        ``label_config``: the config to fill (default: the one /setup gave); ``priority``
        (default: INTERACTIVE for one task, BULK for more; an interactive context is always
        INTERACTIVE); ``deadline`` (``time.monotonic()`` value, bulk requests only);
        ``client_gone`` (a callable: True once the HTTP client has hung up); ``project`` (the
        Label Studio project, ``"<id>.<timestamp>"`` or an id, for the write-back).

        Other keywords are accepted and ignored: label-studio-ml 2.x's server calls
        ``predict(tasks, context=context, **params)`` with the rest of the request's ``params``
        (Label Studio sends ``login`` and ``password`` there besides ``context``), so a caller
        written for that contract must not get a TypeError."""
        label_config = label_config or self.label_config
        if not label_config:
            raise LabelConfigError(
                "no label config: send 'label_config' with the request, or call "
                "/setup with the project's 'schema' first"
            )
        config = cached_config(label_config)
        interactive = context is not None
        if interactive:
            # params.context is only set by Label Studio's interactive-annotating call
            # (docs/interactive.md): answer the one question it holds, at once
            asks = interactive_asks(config, context, self.prompt_template)
            priority = Priority.INTERACTIVE
            if not asks:
                log.info(
                    "interactive context without a prompt or keypoint of this config",
                    extra={"context_keys": sorted(context)[:10]},
                )
        else:
            asks = cached_bulk_asks(label_config, self.prompt_template, self.settings.caption_prompt)
            if priority is None:  # INTERACTIVE is 0: test for None, not falsiness
                priority = Priority.INTERACTIVE if len(tasks) <= 1 else Priority.BULK
        bulk = priority != Priority.INTERACTIVE
        deadline = deadline if bulk else None
        started = time.monotonic()

        # What an interactive context asks is not a task's prediction: nothing to key or keep.
        keys = [None] * len(tasks) if interactive else self._keys(tasks, asks)
        claim = self.results.claim(keys, project=project_id(project, tasks), register=bulk)
        run = None
        if claim.new:
            new = claim.new
            run = TaskRun(
                [tasks[i] for i in new],
                asks,
                priority,
                on_task=lambda j, prediction, ok: self.results.resolve(claim.entries[new[j]], prediction, ok),
                scheduler=self.scheduler,
                settings=self.settings,
                model_version=self.model_version,
                fetch_images=self.fetch_images,
            ).start()
        outcome = claim.wait(deadline, client_gone)
        if outcome == "gone":
            self.results.stats.add(clients_gone=1)
            if not bulk and run is not None:
                # an opened task or a click nobody waits for: drop its queued queries (what already
                # runs finishes and is kept for the next open)
                run.cancel()
                self.results.stats.add(cancelled_gone=1)
        results = self.results.finish(claim, delivered=outcome != "gone")
        self._log_outcome(tasks, results, claim, outcome, priority, interactive, started, deadline)
        return results

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Molmo is not fine-tuned from annotations here; events are acknowledged and ignored."""
        log.debug("webhook event ignored", extra={"event": event})
        return {"status": "ignored", "event": event}

    def _log_outcome(
        self,
        tasks,
        results,
        claim,
        outcome: str,
        priority: Priority,
        interactive: bool,
        started: float,
        deadline: float | None,
    ) -> None:
        unfinished = sum(1 for r in results if isinstance(r, list))
        if outcome == "deadline":
            self.results.stats.add(deadlines_hit=1)
            log.warning(
                "predict deadline reached: answering the finished tasks, the rest keep "
                "running and are kept for the next retrieve",
                extra={
                    "tasks": len(tasks),
                    "unfinished": unfinished,
                    "deadline_s": round(deadline - started, 1),
                },
            )
        elif outcome == "gone":
            log.warning(
                "client hung up before the answer",
                extra={
                    "tasks": len(tasks),
                    "unfinished": unfinished,
                    "then": "kept running for the next retrieve"
                    if priority == Priority.BULK
                    else "cancelled",
                },
            )
        predictions = [r for r in results if isinstance(r, dict)]
        waited = sum(1 for e in claim.entries if e is not None) - len(claim.new)
        log.info(
            "predicted",
            extra={
                "tasks": len(tasks),
                "regions": sum(len(p["result"]) for p in predictions),
                "points": sum(r.get("type") == "keypointlabels" for p in predictions for r in p["result"]),
                "seconds": round(time.monotonic() - started, 3),
                "priority": Priority(priority).name,
                "interactive": interactive,
                "computed": len(claim.new),
                "from_earlier_work": waited + len(claim.taken),
                "unfinished": unfinished,
                "outcome": outcome,
            },
        )

    def asks_fingerprint_for(self, label_config: str) -> str | None:
        """The fingerprint a bulk prediction for ``label_config`` carries; None when the config
        is unusable (the write-back then drops what was made for an older one)."""
        try:
            return asks_fingerprint(
                cached_bulk_asks(label_config, self.prompt_template, self.settings.caption_prompt)
            )
        except LabelConfigError:
            return None

    # -- helpers -------------------------------------------------------------------------------
    def _keys(self, tasks: Sequence[Any], asks: Sequence[Ask]) -> list[TaskKey | None]:
        """Per task: what its prediction depends on; None when it cannot be told apart (no
        integer id), so it is computed but never kept."""
        fingerprint = asks_fingerprint(asks)
        data_keys = sorted({ask.data_key for ask in asks})
        keys: list[TaskKey | None] = []
        for task in tasks:
            task_id = task.get("id") if isinstance(task, dict) else None
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(task_id, int) or isinstance(task_id, bool) or not isinstance(data, dict):
                keys.append(None)
                continue
            images = digest(*(f"{key}={data.get(key)!r}" for key in data_keys))
            keys.append(TaskKey(task_id, images, fingerprint, self.model_version))
        return keys

    def fetch_images(
        self, tasks: Sequence[Any], data_keys: Sequence[str], priority: Priority = Priority.BULK
    ) -> list[dict[str, Future]]:
        """Per task: data key -> a future of its image, or of None when it cannot be had."""
        pool = self._interactive_fetch_pool if priority == Priority.INTERACTIVE else self._fetch_pool
        return [{key: pool.submit(self._load_one, task, key) for key in data_keys} for task in tasks]

    def _load_one(self, task: Any, data_key: str) -> LoadedImage | None:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise BadReference("task has no 'data' object")
            value = task["data"].get(data_key)
            if not isinstance(value, str) or not value.strip():
                raise BadReference(f"task data has no string '{data_key}' (the Image's value)")
            return self.images.load(value.strip(), task_id=task_id if isinstance(task_id, int) else None)
        except ImageLoadError as exc:
            self.fetch_failures.add(**{exc.reason if exc.reason in FETCH_FAILURES else "other": 1})
            log.warning(
                "image unavailable",
                extra={"task": task_id, "key": data_key, "reason": str(exc), "kind": exc.reason},
            )
        except Exception as exc:  # noqa: BLE001 - one task never spoils its batch
            self.fetch_failures.add(error=1)
            log.exception("image loading failed", extra={"task": task_id, "reason": repr(exc)[:300]})
        return None


def project_id(project: Any, tasks: Sequence[Any]) -> int | None:
    """Label Studio's project id: from /predict's ``"<id>.<timestamp>"``, else the tasks' own."""
    if isinstance(project, int) and not isinstance(project, bool):
        return project
    if isinstance(project, str) and project.split(".", 1)[0].isdigit():
        return int(project.split(".", 1)[0])
    first = tasks[0] if tasks and isinstance(tasks[0], dict) else {}
    value = first.get("project")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
