"""Predictions that no answer has carried yet, and the tasks being computed right now.

Why: Label Studio (LS) sends every task of a "Retrieve predictions" in one ``/predict`` and stores
nothing when the answer takes longer than its ``ML_TIMEOUT_PREDICT`` (100 s). So the backend
answers a bulk request at its own deadline with the tasks finished by then and an empty list for
every other task (LS 1.23.2 stores nothing for an empty list and sends that task again with the
next retrieve: docs/label-studio.md). The unfinished work is not thrown away: it keeps running,
and what it finishes is *kept* here, so that the next retrieve, or opening the task, gets it at
once, and the write-back (molmo_backend/labelstudio/writeback.py) can store it in LS meanwhile.

- A result is keyed by what determines it: :class:`TaskKey` (task id, the task's image
  references, the label config's asks, model_version). A changed label config or image gives
  another key: an old result is never served for it.
- *In flight*: key -> :class:`Entry` while a bulk request's work computes it, so that a later
  request does not queue the task again but waits for the same entry (until its own deadline).
- *Kept*: an LRU of at most ``capacity`` finished entries that no delivered answer carried.
- A :class:`Claim` is one request's view of its tasks: some answered at once (kept, or already
  written to LS: an empty list, so LS stores no duplicate), the others waited for.

Each entry is delivered at most once: an answer that carried it, or the write-back, takes it out.
Pure bookkeeping: no HTTP, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from molmo_backend.metrics import RETRIEVE_COUNTERS, Counters

log = logging.getLogger(__name__)

#: what an unfinished task gets in a bulk answer: LS 1.23.2 stores no prediction for it
NOT_YET: list = []
#: how often a waiting request checks whether its client is still there
POLL_S = 0.2


@dataclass(frozen=True)
class TaskKey:
    """What a task's prediction depends on (apart from process-wide settings)."""

    task_id: int
    images: str  # digest of the task's image references, one per data key the asks read
    asks: str  # fingerprint of the label config's asks (prompts and where answers go)
    model_version: str


def digest(*parts: str) -> str:
    """16 hex characters that change whenever any part does."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


# entry states
PENDING = "pending"  # being computed
DONE = "done"  # finished, claims still hold it
KEPT = "kept"  # finished, nobody delivered it: in the LRU
WRITING = "writing"  # the write-back is storing it in LS
WRITTEN = "written"  # stored in LS by the write-back (a marker: a racing retrieve gets [])
DELIVERED = "delivered"  # carried by an answer
DROPPED = "dropped"  # failed, stale, evicted, or delivered by an opened task instead


class Entry:
    """One task's result on its way: computed once, delivered at most once."""

    __slots__ = (
        "key",
        "project",
        "state",
        "prediction",
        "ok",
        "claims",
        "delivered_to",
        "registered",
        "served_elsewhere",
        "finished_at",
    )

    def __init__(self, key: TaskKey | None, project: int | None, registered: bool):
        self.key = key
        self.project = project  # LS project id, for the write-back
        self.state = PENDING
        self.prediction: dict | None = None
        self.ok = False  # every image loaded and every answer came back without error
        self.claims: list[Claim] = []
        self.delivered_to: Claim | None = None
        self.registered = registered  # in the in-flight registry (bulk work) or private
        self.served_elsewhere = False  # an opened task delivered this key's prediction itself
        self.finished_at = 0.0


class Claim:
    """One request's tasks: ``ready[i]`` is an answer already known (a kept prediction, or
    ``NOT_YET`` for a task the write-back stored), else ``entries[i]`` is waited for. The
    request computes the tasks at ``new`` (their entries are ``entries[i]``)."""

    def __init__(self, n: int):
        self.ready: list[Any] = [None] * n
        self.entries: list[Entry | None] = [None] * n
        self.new: list[int] = []
        self.taken: list[Entry] = []  # kept entries this request answers with
        self.remaining = 0
        self.finished = threading.Event()

    def wait(
        self, deadline: float | None = None, gone: Callable[[], bool] | None = None, poll: float = POLL_S
    ) -> str:
        """Until every entry is finished ("done"), ``deadline`` (monotonic) passes
        ("deadline") or ``gone()`` says the client hung up ("gone")."""
        while True:
            timeout = poll if gone is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "done" if self.finished.is_set() else "deadline"
                timeout = left if timeout is None else min(timeout, left)
            if self.finished.wait(timeout):
                return "done"
            if gone is not None and gone():
                return "gone"


class ResultStore:
    """The in-flight registry and the LRU of kept results; one per backend, all threads."""

    def __init__(
        self, capacity: int, stats: Counters | None = None, on_kept: Callable[[Entry], None] | None = None
    ):
        self.capacity = max(0, int(capacity))
        self.stats = stats or Counters(RETRIEVE_COUNTERS)
        #: called (under the lock: keep it cheap, e.g. a queue put) when an entry becomes kept
        self.on_kept = on_kept
        self._lock = threading.Lock()
        self._pending: dict[TaskKey, Entry] = {}
        self._kept: OrderedDict[TaskKey, Entry] = OrderedDict()

    # -- requests ------------------------------------------------------------------------------
    def claim(
        self, keys: Sequence[TaskKey | None], project: int | None = None, register: bool = True
    ) -> Claim:
        """Sort a request's tasks into answered now, waited for, and to compute (``new``).

        ``register=False`` (an opened task, an interactive click): its new entries stay private,
        so it never waits on bulk work and nobody waits on it; kept results still serve it."""
        claim = Claim(len(keys))
        with self._lock:
            for i, key in enumerate(keys):
                kept = self._kept.get(key) if key is not None else None
                if kept is not None and kept.state == KEPT:
                    del self._kept[key]
                    kept.state = DELIVERED
                    claim.ready[i] = kept.prediction
                    claim.taken.append(kept)
                    continue
                if kept is not None and kept.state in (WRITING, WRITTEN):
                    # LS listed the task before the write-back stored it (or someone deleted
                    # what it stored: the entry is forgotten, so the next retrieve predicts it)
                    if kept.state == WRITTEN:
                        del self._kept[key]
                    claim.ready[i] = NOT_YET
                    log.debug("task already written to Label Studio", extra={"task": key.task_id})
                    continue
                entry = self._pending.get(key) if (register and key is not None) else None
                if entry is None:
                    entry = Entry(key, project, registered=register and key is not None)
                    if entry.registered:
                        self._pending[key] = entry
                    claim.new.append(i)
                entry.claims.append(claim)
                claim.entries[i] = entry
                claim.remaining += 1
            if claim.remaining == 0:
                claim.finished.set()
        return claim

    def finish(self, claim: Claim, delivered: bool) -> list:
        """The request's results in task order, and what becomes of the rest.

        ``delivered``: the answer will reach LS (False: the client has gone). A finished entry
        goes out once; an unfinished one gets ``NOT_YET`` and is kept when it finishes."""
        results: list = []
        counts = {"answered_in_time": 0, "deferred": 0, "served_from_cache": 0}
        with self._lock:
            for i, entry in enumerate(claim.entries):
                if entry is None:
                    results.append(claim.ready[i])
                    if claim.ready[i] is not NOT_YET:
                        counts["answered_in_time" if delivered else "deferred"] += 1
                    continue
                entry.claims.remove(claim)
                if entry.state != DONE:
                    results.append(NOT_YET)
                    counts["deferred"] += 1
                    continue
                if entry.served_elsewhere or entry.delivered_to not in (None, claim):
                    results.append(NOT_YET)  # another answer already carried it
                    continue
                results.append(entry.prediction)
                if delivered:
                    entry.delivered_to = claim
                    counts["answered_in_time"] += 1
                else:
                    counts["deferred"] += 1
                    if not entry.claims:
                        self._orphan(entry)
            for entry in set(e for e in claim.entries if e is not None):
                if entry.delivered_to is claim and not entry.claims:
                    entry.state = DELIVERED
                    if not entry.registered and entry.key is not None:
                        self._delivered_elsewhere(entry.key)
            if delivered:
                counts["served_from_cache"] = len(claim.taken)
            else:  # what this request took from the LRU never reached LS: keep it again
                for entry in claim.taken:
                    self._keep(entry)
            self.stats.add(**counts)
        return results

    def resolve(self, entry: Entry, prediction: dict, ok: bool) -> None:
        """``entry`` finished (``ok``: a result worth keeping); wakes the requests waiting on it."""
        with self._lock:
            if entry.state != PENDING:
                return
            entry.prediction, entry.ok, entry.state = prediction, ok, DONE
            entry.finished_at = time.monotonic()
            if entry.registered and self._pending.get(entry.key) is entry:
                del self._pending[entry.key]
            for claim in entry.claims:
                claim.remaining -= 1
                if claim.remaining == 0:
                    claim.finished.set()
            if not entry.claims:
                self._orphan(entry)

    # -- the write-back ------------------------------------------------------------------------
    def start_writing(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries still waiting to be delivered, now marked as being written."""
        with self._lock:
            out = [e for e in entries if e.state == KEPT]
            for entry in out:
                entry.state = WRITING
            return out

    def written(self, entries: Sequence[Entry]) -> None:
        """Stored in LS: remembered as written, so that a retrieve that still lists them gets
        ``NOT_YET`` (no duplicate), until the LRU forgets them."""
        with self._lock:
            for entry in entries:
                entry.state, entry.prediction = WRITTEN, None

    def write_failed(self, entries: Sequence[Entry]) -> None:
        """Not stored: kept for the next retrieve."""
        with self._lock:
            for entry in entries:
                if entry.state == WRITING:
                    entry.state = KEPT

    def drop(self, entries: Sequence[Entry]) -> None:
        """Forget these (their label config changed): never served, never written."""
        with self._lock:
            for entry in entries:
                entry.state, entry.prediction = DROPPED, None
                if entry.key is not None and self._kept.get(entry.key) is entry:
                    del self._kept[entry.key]

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_flight": len(self._pending),
                "kept": sum(1 for e in self._kept.values() if e.state == KEPT),
                "written_markers": sum(1 for e in self._kept.values() if e.state == WRITTEN),
            }

    # -- inside the lock -----------------------------------------------------------------------
    def _orphan(self, entry: Entry) -> None:
        """A finished entry that no answer will carry: kept if it is worth it."""
        if entry.served_elsewhere or entry.key is None:
            entry.state = DROPPED
            return
        if not entry.ok:
            entry.state = DROPPED
            self.stats.add(failed_later=1)
            return
        self.stats.add(completed_later=1)
        self._keep(entry)

    def _keep(self, entry: Entry) -> None:
        entry.state = KEPT
        self._kept[entry.key] = entry
        self._kept.move_to_end(entry.key)
        while len(self._kept) > self.capacity:
            _, old = self._kept.popitem(last=False)
            if old.state == KEPT:
                self.stats.add(evicted=1)
            if old.state != WRITING:  # the write-back holds a writing one and finishes it
                old.state, old.prediction = DROPPED, None
        if entry.state == KEPT and self.on_kept is not None:
            self.on_kept(entry)

    def _delivered_elsewhere(self, key: TaskKey) -> None:
        """An opened task's own answer carried this key: bulk work computing it must not
        deliver it again."""
        pending = self._pending.get(key)
        if pending is not None:
            pending.served_elsewhere = True
