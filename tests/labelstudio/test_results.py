"""The deferred-results store (molmo_backend/labelstudio/results.py): what a request answers at once, waits
for, computes, and what becomes of tasks finished after their request answered."""

from __future__ import annotations

import threading
import time

from molmo_backend.labelstudio.results import NOT_YET, ResultStore, TaskKey


def key(task_id: int, asks: str = "asks-a", images: str = "img") -> TaskKey:
    return TaskKey(task_id, images, asks, "v1")


def pred(task_id: int) -> dict:
    return {"result": [{"task": task_id}], "score": 0.5, "model_version": "v1"}


def test_unfinished_tasks_get_an_empty_list_and_are_kept_when_they_finish():
    store = ResultStore(10)
    claim = store.claim([key(1), key(2)], project=7)
    assert claim.new == [0, 1]
    store.resolve(claim.entries[0], pred(1), ok=True)
    assert claim.wait(deadline=time.monotonic()) == "deadline"
    assert store.finish(claim, delivered=True) == [pred(1), NOT_YET]
    store.resolve(claim.entries[1], pred(2), ok=True)  # after its request answered: kept
    stats = store.stats.snapshot()
    assert (stats["answered_in_time"], stats["deferred"], stats["completed_later"]) == (1, 1, 1)
    assert store.sizes() == {"in_flight": 0, "kept": 1, "written_markers": 0}

    again = store.claim([key(2)], project=7)  # the next retrieve sends only task 2
    assert again.new == [] and again.wait() == "done"
    assert store.finish(again, delivered=True) == [pred(2)]
    assert store.stats["served_from_cache"] == 1
    # delivered once: a third request computes it anew (Label Studio holds it by then)
    assert store.claim([key(2)]).new == [0]


def test_a_task_already_in_flight_is_waited_for_not_computed_twice():
    store = ResultStore(10)
    first = store.claim([key(1), key(2)])
    assert store.finish(first, delivered=True) == [NOT_YET, NOT_YET]  # deadline, nothing done
    second = store.claim([key(2), key(3)])
    assert second.new == [1]  # task 2 is still being computed by the first request's work
    assert second.entries[0] is first.entries[1]
    store.resolve(first.entries[1], pred(2), ok=True)
    store.resolve(second.entries[1], pred(3), ok=True)
    assert second.wait() == "done"
    assert store.finish(second, delivered=True) == [pred(2), pred(3)]
    # task 1 finishes with nobody waiting: kept; task 2 went out with the second answer: not kept
    store.resolve(first.entries[0], pred(1), ok=True)
    assert store.sizes()["kept"] == 1


def test_a_changed_label_config_or_image_is_another_key():
    store = ResultStore(10)
    claim = store.claim([key(1)])
    store.finish(claim, delivered=True)
    store.resolve(claim.entries[0], pred(1), ok=True)
    assert store.claim([key(1, asks="asks-b")]).new == [0]
    assert store.claim([key(1, images="other")]).new == [0]
    assert store.claim([key(1)]).new == []  # the old config's result still serves the old config


def test_failed_tasks_are_not_kept_and_the_store_is_bounded():
    store = ResultStore(capacity=2)
    claim = store.claim([key(i) for i in range(1, 5)])
    store.finish(claim, delivered=True)
    store.resolve(claim.entries[0], pred(1), ok=False)  # image missing, engine error: retried later
    for i in (1, 2, 3):
        store.resolve(claim.entries[i], pred(i + 1), ok=True)
    stats = store.stats.snapshot()
    assert (stats["failed_later"], stats["completed_later"], stats["evicted"]) == (1, 3, 1)
    assert [store.claim([key(i)]).new for i in (1, 2)] == [[0], [0]]  # 1 failed, 2 evicted
    assert store.claim([key(3), key(4)]).new == []


def test_written_or_being_written_is_answered_empty_so_label_studio_gets_no_duplicate():
    written = []
    store = ResultStore(10, on_kept=written.append)
    claim = store.claim([key(1), key(2), key(3)], project=7)
    store.finish(claim, delivered=True)
    for i, entry in enumerate(claim.entries):
        store.resolve(entry, pred(i + 1), ok=True)
    assert [e.key.task_id for e in written] == [1, 2, 3]
    writing = store.start_writing(written)
    assert len(writing) == 3
    store.written(writing[:1])
    store.write_failed(writing[2:])  # Label Studio down: kept for the next retrieve
    racing = store.claim([key(1), key(2), key(3)])
    assert racing.new == [] and store.finish(racing, delivered=True) == [NOT_YET, NOT_YET, pred(3)]
    # a retrieve that lists a written task again (someone deleted the prediction): predicted anew
    assert store.claim([key(1)]).new == [0]
    # what a retrieve took is not written any more
    assert store.start_writing(written[2:]) == []


def test_a_request_whose_client_has_gone_keeps_what_it_had():
    store = ResultStore(10)
    setup = store.claim([key(1)])
    store.finish(setup, delivered=True)
    store.resolve(setup.entries[0], pred(1), ok=True)  # kept
    claim = store.claim([key(1), key(2), key(3)])
    store.resolve(claim.entries[1], pred(2), ok=True)
    assert claim.wait(gone=lambda: True) == "gone"
    store.finish(claim, delivered=False)
    store.resolve(claim.entries[2], pred(3), ok=True)
    assert store.sizes()["kept"] == 3  # taken, finished, finished later: nothing reached LS
    stats = store.stats.snapshot()
    assert (stats["answered_in_time"], stats["served_from_cache"]) == (0, 0)
    assert stats["deferred"] == 1 + 3  # the setup request's task, then all three
    assert store.claim([key(1), key(2), key(3)]).new == []


def test_an_opened_task_never_waits_on_bulk_work_and_bulk_does_not_deliver_it_again():
    store = ResultStore(10)
    bulk = store.claim([key(1), key(2)])
    opened = store.claim([key(1)], register=False)
    assert opened.new == [0] and opened.entries[0] is not bulk.entries[0]
    store.resolve(opened.entries[0], pred(1), ok=True)
    assert store.finish(opened, delivered=True) == [pred(1)]
    store.resolve(bulk.entries[0], pred(1), ok=True)
    store.resolve(bulk.entries[1], pred(2), ok=True)
    assert store.finish(bulk, delivered=True) == [NOT_YET, pred(2)]
    assert store.sizes()["kept"] == 0


def test_concurrent_requests_for_one_task_deliver_it_once():
    """Two retrieves of the same tasks at once (a double click): one answer carries each task."""
    store = ResultStore(10)
    a = store.claim([key(1)])
    b = store.claim([key(1)])
    assert b.new == []
    store.resolve(a.entries[0], pred(1), ok=True)
    assert store.finish(a, delivered=True) == [pred(1)]
    assert store.finish(b, delivered=True) == [NOT_YET]


def test_wait_returns_when_done_at_the_deadline_or_when_the_client_goes():
    store = ResultStore(10)
    claim = store.claim([key(1)])
    assert claim.wait(deadline=time.monotonic() - 1) == "deadline"
    hung_up = threading.Event()
    hung_up.set()
    assert claim.wait(gone=hung_up.is_set, poll=0.01) == "gone"
    resolver = threading.Thread(target=store.resolve, args=(claim.entries[0], pred(1), True))
    resolver.start()
    assert claim.wait(deadline=time.monotonic() + 60) == "done"
    resolver.join()
    assert store.claim([]).wait() == "done"
