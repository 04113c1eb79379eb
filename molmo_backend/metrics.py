"""Named, thread-safe counters: the one place a concern's numbers live, for ``/metrics``.

Each concern declares its counters with a one-line meaning (what an exporter would use as the
metric's help text) and increments them from any thread; ``snapshot()`` is what ``/metrics``
shows.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

#: "Retrieve predictions" past its deadline: what became of each task (molmo_backend/labelstudio/results.py,
#: molmo_backend/labelstudio/writeback.py)
RETRIEVE_COUNTERS: dict[str, str] = {
    "answered_in_time": "tasks whose prediction went out in the answer to their own request",
    "served_from_cache": "tasks answered at once from predictions finished after an earlier "
    "request had answered without them",
    "deferred": "tasks answered with an empty list (unfinished at the deadline, or the client "
    "had gone): their work goes on in the background",
    "completed_later": "deferred tasks whose prediction finished afterwards and was kept",
    "failed_later": "deferred tasks whose prediction failed afterwards (not kept: the next "
    "retrieve tries again)",
    "written_back": "kept predictions written to Label Studio by the backend itself",
    "already_in_label_studio": "kept predictions not written because the task already held "
    "this model_version",
    "write_back_failures": "kept predictions whose write failed after retries (left for the next retrieve)",
    "stale_dropped": "kept predictions dropped because the project's label config changed",
    "evicted": "kept predictions dropped from memory (MOLMO_RESULT_CACHE full)",
    "deadlines_hit": "bulk requests answered at MOLMO_PREDICT_DEADLINE with unfinished tasks",
    "clients_gone": "requests whose client hung up before the answer",
    "cancelled_gone": "opened-task or interactive requests cancelled because their client "
    "hung up (their queued queries dropped)",
}


#: task images that could not be loaded, by the kind of failure (molmo_backend/images/errors.py's
#: ImageLoadError subclasses carry these names)
FETCH_FAILURES: dict[str, str] = {
    "bad_reference": "no image reference, an unsupported scheme, a malformed URL or data URI",
    "refused": "a host or address the settings do not allow",
    "timeout": "the fetch took longer than MOLMO_FETCH_TIMEOUT",
    "unreachable": "connection refused or reset, a name that does not resolve, a broken download",
    "http_status": "an HTTP status other than 200 (or a redirect without a target, too many)",
    "label_studio_auth": "Label Studio refused the backend's token, or exchanging it failed",
    "local_file": "a local-files path outside LOCAL_FILES_DOCUMENT_ROOT, missing or unreadable",
    "too_large": "more bytes or pixels than MOLMO_MAX_IMAGE_BYTES / MOLMO_MAX_IMAGE_PIXELS",
    "not_an_image": "empty, truncated, or not an image in a supported format",
    "other": "any other load failure",
    "error": "an unexpected error while loading (a bug: see the log)",
}


class Counters:
    """Counters by name, all starting at 0; unknown names are refused (a typo is a bug)."""

    def __init__(self, names: Mapping[str, str]):
        self.help = dict(names)
        self._values = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                if name not in self._values:
                    raise KeyError(f"unknown counter {name!r}")
                self._values[name] += value

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
