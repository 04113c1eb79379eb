"""The Label Studio REST calls the backend makes, through label-studio-sdk's client.

Shared by ``molmo-backend annotate`` (molmo_backend/commands/annotate.py) and the server's write-back of
predictions finished after their retrieve answered (molmo_backend/labelstudio/writeback.py), so both list,
check and write predictions the same way. Facts checked against Label Studio 1.23.2 with
label-studio-sdk 2.1.2:

- ``LabelStudio(base_url=, api_key=)`` takes a legacy token or a personal access token (PAT): the
  SDK tells them apart (a PAT is a JWT) and exchanges a PAT at ``/api/token/refresh/`` itself,
  again shortly before the access token expires. An expired PAT raises already in the constructor.
- ``tasks.list(project=, fields="all")`` pages through ``/api/tasks`` and gives each task's
  ``predictions`` with their ``model_version``; without ``fields="all"`` there are no predictions
  and ``predictions_model_versions`` is empty. ``view=`` applies a Data Manager tab's filters and
  LS then ignores ``query=``; ``query='{"selectedItems": {"all": false, "included": [ids]},
  "filters": ...}'`` filters otherwise.
- ``POST /api/projects/ID/import/predictions`` checks that every task is in the project and
  inserts the predictions with one bulk insert per ``PREDICTION_IMPORT_BATCH_SIZE`` (500): a
  request of at most 500 tasks is written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from molmo_backend.errors import BadInput

log = logging.getLogger(__name__)

#: Label Studio's PREDICTION_IMPORT_BATCH_SIZE: one import request of at most this many tasks is
#: one bulk insert (all or nothing)
MAX_WRITE = 500
DEFAULT_PAGE_SIZE = 500
WRITE_ATTEMPTS = 4


class LabelStudioAPIError(BadInput, RuntimeError):
    """Something the user must fix (URL, key, project, filters, files); the message says what
    (exit code 2). ``retryable``: the cause was transient (no answer, 429, 5xx), so another try
    may succeed."""

    retryable = False


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks of the project: ids, a Data Manager view (tab) id, a raw Data Manager query."""

    task_ids: tuple[int, ...] = ()
    view: int | None = None
    query: dict | None = None

    def validate(self) -> None:
        if self.view is not None and self.query:
            raise LabelStudioAPIError(
                "--view and --query cannot be combined: Label Studio ignores the "
                "query when a view is given (add the filters to the view instead)"
            )
        if self.query is not None and not isinstance(self.query, dict):
            raise LabelStudioAPIError(
                '--query must be a JSON object such as {"filters": {"conjunction": "and", "items": [...]}}'
            )

    def list_params(self) -> dict:
        """tasks.list() arguments; ids go into the query unless a view is used (then they are
        applied here, on the listed tasks)."""
        if self.view is not None:
            return {"view": self.view}
        query = dict(self.query or {})
        if self.task_ids:
            query["selectedItems"] = {"all": False, "included": list(self.task_ids)}
        return {"query": json.dumps(query)} if query else {}


@dataclass(frozen=True)
class TaskInfo:
    """What annotate keeps of a listed task: its id, its data, its predictions' versions."""

    id: int
    data: dict
    model_versions: tuple[str, ...]

    def as_task(self) -> dict:
        return {"id": self.id, "data": self.data}


def get_field(obj: Any, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def task_info(item: Any) -> TaskInfo:
    versions = tuple(
        str(v)
        for v in (get_field(p, "model_version") for p in get_field(item, "predictions") or [])
        if v is not None
    )
    return TaskInfo(int(get_field(item, "id")), dict(get_field(item, "data") or {}), versions)


class LabelStudioProject:
    """The few calls annotate makes, through label-studio-sdk's client.

    ``client`` may be given (tests); otherwise one is made from ``url`` and ``api_key`` (a legacy
    token or a personal access token: the SDK exchanges a PAT by itself)."""

    def __init__(
        self,
        project_id: int,
        url: str | None = None,
        api_key: str | None = None,
        *,
        client: Any = None,
        timeout: float = 120.0,
    ):
        self.id = int(project_id)
        self.url = (url or "").rstrip("/")
        if client is None:
            if not url:
                raise LabelStudioAPIError("Label Studio's URL is not set: pass --url or set LABEL_STUDIO_URL")
            if not api_key:
                raise LabelStudioAPIError(
                    "no Label Studio key: pass --api-key or set LABEL_STUDIO_API_KEY "
                    "(a personal access token, or a legacy token)"
                )
            from label_studio_sdk import LabelStudio

            try:
                client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
            except Exception as exc:  # the SDK checks a PAT's expiry right here
                raise self.explain(exc, "checking the API key") from None
        self.client = client

    def label_config(self) -> str:
        with self._errors("reading the project"):
            project = self.client.projects.get(id=self.id)
        config = get_field(project, "label_config")
        if not config:
            raise LabelStudioAPIError(f"project {self.id} has no labeling config yet")
        return config

    def tasks(self, task_filter: TaskFilter, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[TaskInfo]:
        """Every task the filter selects, each once, in Label Studio's order."""
        wanted = set(task_filter.task_ids)
        seen: set[int] = set()
        with self._errors("listing the project's tasks"):
            pager = self.client.tasks.list(
                project=self.id, fields="all", page_size=page_size, **task_filter.list_params()
            )
            for item in pager:
                info = task_info(item)
                if info.id in seen or (wanted and info.id not in wanted):
                    continue
                seen.add(info.id)
                yield info

    def model_versions(self, task_ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """The model_versions of the predictions that ``task_ids`` hold now."""
        if not task_ids:
            return {}
        query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
        with self._errors("re-reading tasks"):
            pager = self.client.tasks.list(
                project=self.id, fields="all", query=query, page_size=max(len(task_ids), 1)
            )
            return {info.id: info.model_versions for info in map(task_info, pager)}

    def write(self, predictions: list[dict]) -> None:
        """One import request; the SDK's own retries are off (a retried POST could double it)."""
        self.client.projects.import_predictions(
            id=self.id, request=predictions, request_options={"max_retries": 0}
        )

    # -- errors --------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, doing: str):
        try:
            yield
        except LabelStudioAPIError:
            raise
        except Exception as exc:
            raise self.explain(exc, doing) from None

    def explain(self, exc: BaseException, doing: str) -> LabelStudioAPIError:
        error = self._describe(exc, doing)
        error.retryable = transient(exc)
        return error

    def _describe(self, exc: BaseException, doing: str) -> LabelStudioAPIError:
        if isinstance(exc, LabelStudioAPIError):
            return exc
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)
        detail = body.get("detail") if isinstance(body, dict) else body
        where = self.url or "Label Studio"
        if status == 401:
            return LabelStudioAPIError(
                f"Label Studio at {where} refused the API key while {doing} "
                f"(HTTP 401{': ' + str(detail) if detail else ''}). Use a personal "
                f"access token (Account & Settings), or a legacy token where "
                f"legacy tokens are enabled"
            )
        if status == 403:
            return LabelStudioAPIError(
                f"the API key's user may not do this in project {self.id} (HTTP 403 while {doing})"
            )
        if status == 404:
            return LabelStudioAPIError(
                f"project {self.id} (or the view) was not found at {where} (HTTP 404 while {doing})"
            )
        if status is not None:
            return LabelStudioAPIError(
                f"Label Studio answered HTTP {status} while {doing}: {str(detail)[:500]}"
            )
        return LabelStudioAPIError(
            f"could not reach Label Studio at {where} while {doing}: {type(exc).__name__}: {exc}"
        )


def transient(exc: BaseException) -> bool:
    """Worth another try: no answer (network, timeout), 429 or a 5xx."""
    if isinstance(exc, LabelStudioAPIError):
        return exc.retryable
    status = getattr(exc, "status_code", None)
    if status is None:
        return not isinstance(exc, (ValueError, TypeError))
    return status == 429 or status >= 500


@dataclass
class WriteOutcome:
    """What :func:`write_new_predictions` did with its rows (task ids)."""

    written: list[int] = field(default_factory=list)  # stored by this call
    present: list[int] = field(default_factory=list)  # held this model_version already: not written


def write_new_predictions(
    project: LabelStudioProject,
    rows: list[dict],
    version: str,
    *,
    attempts: int = WRITE_ATTEMPTS,
    pause: Callable[[float], None] = time.sleep,
) -> WriteOutcome:
    """Write ``rows`` (``{"task", "result", "score", "model_version"}``, at most ``MAX_WRITE``)
    except those whose task already holds a prediction of ``version``; never a task twice.

    The tasks are checked just before writing (another run, a retrieve or an opened task may have
    predicted them meanwhile). A transient failure (no answer, 429, 5xx) of the check or the
    write is retried up to ``attempts`` times with a growing pause, checking again first: the
    failed request may still have been stored. Raises :class:`LabelStudioAPIError` when it gives
    up."""
    outcome = WriteOutcome()
    pending = list(rows)
    tried_to_write = False
    for attempt in range(attempts):
        try:
            # the tasks are checked first, on every attempt: a failed write may still have been
            # stored, and a failed check (a busy Label Studio timing out) is simply repeated
            now = project.model_versions([r["task"] for r in pending])
            held = [r["task"] for r in pending if version in now.get(r["task"], ())]
            (outcome.written if tried_to_write else outcome.present).extend(held)
            pending = [r for r in pending if version not in now.get(r["task"], ())]
            if not pending:
                return outcome
            tried_to_write = True
            project.write(pending)
            outcome.written += [r["task"] for r in pending]
            return outcome
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not transient(exc) or attempt == attempts - 1:
                raise project.explain(exc, f"writing {len(pending)} predictions") from None
            log.warning(
                "writing predictions failed, checking and retrying",
                extra={"tasks": len(pending), "error": str(exc)[:300], "attempt": attempt + 1},
            )
            pause(min(2**attempt, 10))
    return outcome
