"""The model class Label Studio talks to, in label-studio-ml 2.x's shape.

``predict`` turns Label Studio tasks into predictions:
label config -> asks (keypoint labels, counts, captions/questions; or, for an interactive
request, the one question its context holds) -> prompts; task data -> images; (image, prompt)
queries -> the scheduler (GPU batching) -> answers -> scored points, counts, texts -> regions. It
owns the one invariant Label Studio depends on: every task gets exactly one prediction, in task
order, whatever fails on the way.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Sequence

from .answers import answer_regions
from .asks import Ask, bulk_asks
from .engine.base import PointQuery
from .engine.scheduler import Priority, Scheduler
from .images import ImageLoader, ImageLoadError, LoadedImage
from .interactive import interactive_asks
from .labels import LabelConfig, LabelConfigError, parse_label_config
from .prompts import prompt_fingerprint
from .regions import empty_prediction, task_prediction
from .settings import DEFAULT_PROMPT_TEMPLATE, Settings

log = logging.getLogger(__name__)

#: tasks whose images are held in memory at once during one request
TASK_CHUNK = 64


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


def make_model_version(model_id: str, revision: str, prompt_template: str, caption_prompt: str = "") -> str:
    """Stable across restarts: model, checkpoint revision and prompt settings, nothing else.
    Label Studio skips tasks that already hold a prediction of this version."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    prompts = prompt_template if not caption_prompt else f"{prompt_template}\x00{caption_prompt}"
    return f"{name}@{revision}-p{prompt_fingerprint(prompts)}"


class MolmoBackend(LabelStudioMLBase):
    """Keypoint pre-annotations from Molmo pointing answers."""

    def __init__(self, settings: Settings, scheduler: Scheduler, images: ImageLoader, model_version: str,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE):
        super().__init__()
        self.settings = settings
        self.prompt_template = prompt_template
        self.scheduler = scheduler
        self.images = images
        self._model_version = model_version
        self._fetch_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fetch")

    @property
    def model_version(self) -> str:
        return self._model_version

    def setup(self, label_config: str | None = None, hostname: str | None = None,
              access_token: str | None = None) -> str:
        """Validate the project's config (raises LabelConfigError) and remember how to reach LS."""
        if label_config is not None:
            cached_config(label_config)
            self.label_config = label_config
        self.images.configure_label_studio(hostname, access_token)
        return self.model_version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict]:
        """One prediction per task, in order. Raises LabelConfigError for an unusable config
        (that is the whole request's fault); anything that goes wrong with one task gives that
        task an empty prediction and a logged reason."""
        label_config = kwargs.get("label_config") or self.label_config
        if not label_config:
            raise LabelConfigError("no label config: send 'label_config' with the request, or call "
                                   "/setup with the project's 'schema' first")
        config = cached_config(label_config)
        interactive = context is not None
        if interactive:
            # params.context is only set by Label Studio's interactive-annotating call
            # (docs/interactive.md): answer the one question it holds, at once
            asks = interactive_asks(config, context, self.prompt_template)
            priority = Priority.INTERACTIVE
            if not asks:
                log.info("interactive context without a prompt or keypoint of this config",
                         extra={"context_keys": sorted(context)[:10]})
        else:
            asks = cached_bulk_asks(label_config, self.prompt_template, self.settings.caption_prompt)
            priority = kwargs.get("priority")  # INTERACTIVE is 0: test for None, not falsiness
            if priority is None:
                priority = Priority.INTERACTIVE if len(tasks) <= 1 else Priority.BULK
        started = time.monotonic()
        # Chunks bound the memory held in decoded images; the next chunk's images are fetched
        # while the current one is on the GPU.
        chunks = [tasks[i : i + TASK_CHUNK] for i in range(0, len(tasks), TASK_CHUNK)]
        keys = list(dict.fromkeys(ask.data_key for ask in asks))
        predictions: list[dict] = []
        pending = self._fetch_images(chunks[0], keys) if chunks else []
        for k in range(len(chunks)):
            images = [{key: future.result() for key, future in row.items()} for row in pending]
            if k + 1 < len(chunks):
                pending = self._fetch_images(chunks[k + 1], keys)
            predictions.extend(self._predict_chunk(images, asks, priority))
        log.info(
            "predicted",
            extra={
                "tasks": len(tasks), "regions": sum(len(p["result"]) for p in predictions),
                "points": sum(r.get("type") == "keypointlabels" for p in predictions for r in p["result"]),
                "seconds": round(time.monotonic() - started, 3), "priority": Priority(priority).name,
                "interactive": interactive,
            },
        )
        return predictions

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Molmo is not fine-tuned from annotations here; events are acknowledged and ignored."""
        log.debug("webhook event ignored", extra={"event": event})
        return {"status": "ignored", "event": event}

    # -- helpers -------------------------------------------------------------------------------
    def _predict_chunk(self, images: list[dict[str, LoadedImage | None]], asks: Sequence[Ask],
                       priority: Priority) -> list[dict]:
        jobs = [
            (task_index, ask, task_images[ask.data_key])
            for task_index, task_images in enumerate(images)
            for ask in asks
            if task_images.get(ask.data_key) is not None
        ]
        queries = [PointQuery(image=image.image, prompt=ask.prompt, image_key=id(image))
                   for _, ask, image in jobs]
        answers = self.scheduler.submit(queries, priority=priority) if queries else []

        regions: list[list[dict]] = [[] for _ in images]
        failed = [False] * len(images)
        for (task_index, ask, image), answer in zip(jobs, answers):
            if answer.error:
                failed[task_index] = True
                continue
            regions[task_index].extend(answer_regions(
                ask, answer, image_width=image.width, image_height=image.height,
                point_width=self.settings.point_width, min_point_score=self.settings.min_point_score,
            ))
        return [
            empty_prediction(self.model_version) if failed[i] and not task_regions
            else task_prediction(task_regions, self.model_version)
            for i, task_regions in enumerate(regions)
        ]

    def _fetch_images(self, tasks: Sequence[Any], data_keys: Sequence[str]) -> list[dict[str, Future]]:
        """Per task: data key -> a future of its image, or of None when it cannot be had."""
        return [{key: self._fetch_pool.submit(self._load_one, task, key) for key in data_keys}
                for task in tasks]

    def _load_one(self, task: Any, data_key: str) -> LoadedImage | None:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ImageLoadError("task has no 'data' object")
            value = task["data"].get(data_key)
            if not isinstance(value, str) or not value.strip():
                raise ImageLoadError(f"task data has no string '{data_key}' (the Image's value)")
            return self.images.load(value.strip(), task_id=task_id if isinstance(task_id, int) else None)
        except ImageLoadError as exc:
            log.warning("image unavailable", extra={"task": task_id, "key": data_key, "reason": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one task never spoils its batch
            log.exception("image loading failed", extra={"task": task_id, "reason": repr(exc)[:300]})
        return None
