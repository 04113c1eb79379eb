"""Stores predictions that finished after their retrieve had answered in Label Studio, as they
finish, so the user needs no further retrieve for them.

Why: a bulk ``/predict`` answers at ``MOLMO_PREDICT_DEADLINE`` with the tasks finished by then;
the rest keep computing and are kept in memory (molmo_backend/labelstudio/results.py) for the next retrieve.
With ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` set (and ``MOLMO_WRITE_BACK`` not ``0``)
this thread also writes each kept prediction to Label Studio the way ``molmo-backend annotate``
does (molmo_backend/labelstudio/api.py): ``POST /api/projects/ID/import/predictions`` in chunks,
after checking that the task does not already hold this model_version (a retrieve, an opened task
or annotate may have stored it meanwhile). Nothing is written twice: an entry being written or
written is never served by a retrieve (results.py answers it with an empty list).

- The project's label config is read before each write: predictions made for another config
  (the user changed it) are dropped, never written.
- Label Studio unreachable or failing: retried (``WRITE_ATTEMPTS``, growing pauses), then the
  predictions stay kept for the next retrieve to answer, and the failure is logged and counted.
- After a restart nothing is pending here: what was written stays in Label Studio, the rest is
  predicted again by the next retrieve.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from molmo_backend.labelstudio.api import MAX_WRITE, WRITE_ATTEMPTS, LabelStudioProject, write_new_predictions
from molmo_backend.labelstudio.results import Entry, ResultStore

log = logging.getLogger(__name__)

#: after the first finished prediction, wait this long for more before writing (fewer requests)
LINGER_S = 0.5
#: predictions per check-and-write: small enough that a Label Studio busy storing a retrieve's
#: answer still lists and imports them well within LS_TIMEOUT_S
WRITE_CHUNK = 100
#: seconds allowed for one Label Studio request
LS_TIMEOUT_S = 60.0


class WriteBack:
    """One daemon thread that writes kept entries (``enqueue``: ResultStore's ``on_kept``)."""

    def __init__(
        self,
        store: ResultStore,
        url: str,
        api_key: str,
        model_version: str,
        asks_fingerprint: Callable[[str], str | None],
        *,
        client=None,
        attempts: int = WRITE_ATTEMPTS,
        pause: Callable[[float], None] = time.sleep,
        linger: float = LINGER_S,
    ):
        self.store = store
        self.stats = store.stats
        self.url, self._api_key = url, api_key
        self.model_version = model_version
        #: label config -> the fingerprint of its asks (None: the config is unusable now)
        self.asks_fingerprint = asks_fingerprint
        self.attempts, self.pause, self.linger = max(1, attempts), pause, linger
        self._client = client  # label-studio-sdk's client, made on first use (PAT exchange)
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="write-back", daemon=True)

    def start(self) -> WriteBack:
        self._thread.start()
        return self

    def enqueue(self, entry: Entry) -> None:
        """Called by the store (under its lock) when an entry is kept: only a queue put."""
        if entry.project is not None:
            self._queue.put(entry)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            until = time.monotonic() + self.linger
            stop = False
            while len(batch) < MAX_WRITE:
                try:
                    item = self._queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - the thread must live on; the entries stay kept
                log.exception("write-back failed unexpectedly")
                self.store.write_failed(batch)
            if stop:
                return

    def _write(self, batch: list[Entry]) -> None:
        by_project: dict[int, list[Entry]] = defaultdict(list)
        for entry in self.store.start_writing(batch):  # a retrieve may have taken some meanwhile
            by_project[entry.project].append(entry)
        for project_id, entries in by_project.items():
            self._write_project(project_id, entries)

    def _write_project(self, project_id: int, entries: list[Entry]) -> None:
        try:
            project, config = self._with_retries(lambda: self._read_project(project_id))
        except Exception as exc:  # noqa: BLE001 - logged, left for the next retrieve
            self._failed(project_id, entries, exc)
            return
        fingerprint = self.asks_fingerprint(config)
        stale = [e for e in entries if e.key.asks != fingerprint]
        if stale:
            self.store.drop(stale)
            self.stats.add(stale_dropped=len(stale))
            log.info(
                "label config changed: predictions made for the old one dropped, not written",
                extra={"project": project_id, "tasks": len(stale)},
            )
        fresh = [e for e in entries if e.key.asks == fingerprint]
        for start in range(0, len(fresh), WRITE_CHUNK):
            chunk = fresh[start : start + WRITE_CHUNK]
            rows = [
                {
                    "task": e.key.task_id,
                    "result": e.prediction["result"],
                    "score": e.prediction.get("score", 0.0),
                    "model_version": e.prediction.get("model_version", self.model_version),
                }
                for e in chunk
            ]
            try:
                outcome = write_new_predictions(
                    project, rows, self.model_version, attempts=self.attempts, pause=self.pause
                )
            except Exception as exc:  # noqa: BLE001 - logged, left for the next retrieve
                self._failed(project_id, chunk, exc)
                continue
            # written, or found in LS already: either way LS holds one prediction of this version
            self.store.written(chunk)
            self.stats.add(written_back=len(outcome.written), already_in_label_studio=len(outcome.present))
            log.info(
                "deferred predictions written to Label Studio",
                extra={
                    "project": project_id,
                    "written": len(outcome.written),
                    "already_there": len(outcome.present),
                },
            )

    def _read_project(self, project_id: int) -> tuple[LabelStudioProject, str]:
        if self._client is None:
            self._client = LabelStudioProject(
                project_id, self.url, self._api_key, timeout=LS_TIMEOUT_S
            ).client
        project = LabelStudioProject(project_id, self.url, client=self._client)
        return project, project.label_config()

    def _with_retries(self, call):
        for attempt in range(self.attempts):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - any failure to reach LS is worth a retry
                if attempt == self.attempts - 1:
                    raise
                log.warning(
                    "Label Studio unavailable for the write-back, retrying",
                    extra={"error": str(exc)[:300], "attempt": attempt + 1},
                )
                self.pause(min(2**attempt, 10))

    def _failed(self, project_id: int, entries: list[Entry], exc: BaseException) -> None:
        self.store.write_failed(entries)
        self.stats.add(write_back_failures=len(entries))
        log.warning(
            "write-back to Label Studio failed; these predictions stay in memory for the next retrieve",
            extra={"project": project_id, "tasks": len(entries), "error": str(exc)[:500]},
        )
