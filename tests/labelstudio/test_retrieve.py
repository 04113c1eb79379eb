"""Retrieves past their deadline, in one process: MolmoBackend.predict with a torch-free engine
whose batches can be held back (gates, not sleeps), and the write-back against an in-memory
Label Studio client. Through the real server and a real Label Studio: tests/e2e/test_e2e_retrieve.py.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
from PIL import Image

from molmo_backend.commands.predict import keypoint_config
from molmo_backend.engine.base import Answer, Engine
from molmo_backend.engine.scheduler import Priority, Scheduler
from molmo_backend.images.loader import ImageLoader
from molmo_backend.labelstudio.model import MolmoBackend
from molmo_backend.labelstudio.results import NOT_YET, ResultStore
from molmo_backend.labelstudio.writeback import WriteBack
from molmo_backend.settings import Settings
from tests.support.fake_label_studio import FakeLabelStudio, StatusError

CONFIG = keypoint_config(["cat"])
OTHER_CONFIG = keypoint_config(["dog"])
CAT = '<points coords="1 1 250 500">cat</points>'
VERSION = "gated@r1"
GATED = (50, 50)  # a batch holding an image of this size waits for the test to open its gate
WAIT_S = 60  # upper bound of every wait below (they end as soon as their condition holds)


def png_uri(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def task(task_id: int, size=(40, 30)) -> dict:
    return {"id": task_id, "data": {"image": png_uri(size)}, "project": 7}


class GatedEngine(Engine):
    """Answers every prompt with one cat point; a batch with a GATED image waits for ``gate``."""

    model_id, revision, family, max_batch = "test/gated", "r1", "molmo2", 2

    def __init__(self):
        self.hold_all = False  # every batch waits for the gate, not only gated images
        self.gate = threading.Event()
        self.held = threading.Event()  # set while a gated batch waits at the gate
        self.asked: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def generate(self, queries):
        with self.lock:
            self.asked += [q.image.size for q in queries]
        if self.hold_all or any(q.image.size == GATED for q in queries):
            self.held.set()
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return [Answer(text=CAT, score=0.5) for _ in queries]

    def times_asked(self, size) -> int:
        with self.lock:
            return self.asked.count(tuple(size))


@pytest.fixture
def made():
    """``made(store=None) -> (backend, engine)``; schedulers closed afterwards."""
    schedulers = []

    def make(store: ResultStore | None = None):
        engine = GatedEngine()
        scheduler = Scheduler(engine)
        schedulers.append((scheduler, engine))
        settings = Settings(result_cache=100)
        return MolmoBackend(settings, scheduler, ImageLoader(settings), VERSION, results=store), engine

    yield make
    for scheduler, engine in schedulers:
        engine.gate.set()
        scheduler.close()


def until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def is_cat(result, size) -> bool:
    [region] = result["result"]
    return (region["value"]["keypointlabels"], region["value"]["x"], region["original_width"]) == (
        ["cat"],
        25.0,
        size[0],
    ) and result["model_version"] == VERSION


def test_past_the_deadline_unfinished_tasks_are_empty_then_answered_from_memory(made):
    backend, engine = made()
    sizes = [(40 + i, 30) for i in range(5)] + [GATED]
    tasks = [task(i + 1, size) for i, size in enumerate(sizes)]
    first = backend.predict(tasks, label_config=CONFIG, deadline=time.monotonic() + 2)
    assert first[-1] == [] and engine.held.is_set()
    for result, size in zip(first, sizes):
        assert result == [] or is_cat(result, size)
    left = [i for i, r in enumerate(first) if r == []]

    # the next retrieve sends only those; the gated one is still running: waited for, not queued
    # again (bulk priority, as Label Studio's retrieve of several tasks)
    second = backend.predict(
        [tasks[-1]], label_config=CONFIG, priority=Priority.BULK, deadline=time.monotonic() + 0.5
    )
    assert second == [NOT_YET] and engine.times_asked(GATED) == 1
    assert backend.scheduler.pending() == 0

    engine.gate.set()
    until(lambda: backend.results.sizes()["in_flight"] == 0, "the deferred work to finish")
    asked = len(engine.asked)
    third = backend.predict([tasks[i] for i in left], label_config=CONFIG, deadline=time.monotonic() + WAIT_S)
    assert all(is_cat(r, sizes[i]) for r, i in zip(third, left))
    assert len(engine.asked) == asked  # all from memory: nothing computed again
    stats = backend.results.stats.snapshot()
    assert stats["served_from_cache"] == len(left) and stats["completed_later"] == len(left)
    assert stats["answered_in_time"] == len(tasks) and stats["deadlines_hit"] == 2

    # a changed label config is another question: the kept results are not served for it
    fourth = backend.predict(
        [tasks[0], tasks[1]], label_config=OTHER_CONFIG, deadline=time.monotonic() + WAIT_S
    )
    assert [[reg["value"]["keypointlabels"] for reg in r["result"]] for r in fourth] == [[["dog"]], [["dog"]]]
    assert len(engine.asked) == asked + 2


def test_without_a_deadline_every_task_is_waited_for(made):
    backend, engine = made()
    engine.gate.set()
    tasks = [task(i, (40 + i, 30)) for i in range(1, 8)]
    results = backend.predict(tasks, label_config=CONFIG)  # annotate's way: no deadline
    assert all(is_cat(r, (40 + i, 30)) for r, i in zip(results, range(1, 8)))


def test_an_opened_task_whose_client_has_gone_is_dropped_from_the_queue(made):
    backend, engine = made()
    busy = threading.Thread(
        target=backend.predict,
        args=([task(1, GATED), task(2)],),
        kwargs={"label_config": CONFIG, "deadline": time.monotonic() + WAIT_S},
    )
    busy.start()
    until(engine.held.is_set, "the bulk batch to hold the GPU worker")
    hung_up = threading.Event()
    out = {}
    opened = threading.Thread(
        target=lambda: out.setdefault(
            "r", backend.predict([task(3, (33, 33))], label_config=CONFIG, client_gone=hung_up.is_set)
        )
    )
    opened.start()
    until(lambda: backend.scheduler.pending() == 1, "the opened task to be queued")
    hung_up.set()
    opened.join(WAIT_S)
    assert not opened.is_alive()
    engine.gate.set()
    busy.join(WAIT_S)
    until(lambda: backend.scheduler.pending() == 0, "the queue to drain")
    assert engine.times_asked((33, 33)) == 0  # never computed
    assert backend.scheduler.stats["cancelled"] == 1
    stats = backend.results.stats.snapshot()
    assert (stats["clients_gone"], stats["cancelled_gone"]) == (1, 1)


def test_bulk_work_whose_client_has_gone_keeps_running_for_the_next_retrieve(made):
    backend, engine = made()
    tasks = [task(1, GATED), task(2, (41, 30))]
    hung_up = threading.Event()
    out = {}
    request = threading.Thread(
        target=lambda: out.setdefault(
            "r",
            backend.predict(
                tasks, label_config=CONFIG, deadline=time.monotonic() + WAIT_S, client_gone=hung_up.is_set
            ),
        )
    )
    request.start()
    until(engine.held.is_set, "the batch to start")
    hung_up.set()
    request.join(WAIT_S)
    assert not request.is_alive() and backend.results.stats["clients_gone"] == 1
    engine.gate.set()
    until(lambda: backend.results.sizes()["kept"] == 2, "both tasks to be kept")
    asked = len(engine.asked)
    again = backend.predict(tasks, label_config=CONFIG, deadline=time.monotonic() + WAIT_S)
    assert is_cat(again[0], GATED) and is_cat(again[1], (41, 30)) and len(engine.asked) == asked


def test_a_task_whose_image_cannot_be_loaded_is_not_kept(made):
    """Its empty prediction is no answer worth keeping: the next retrieve tries it again."""
    backend, engine = made()
    broken = {"id": 5, "data": {"image": "data:image/png;base64,AAAA"}}
    backend.predict(
        [broken, task(6, GATED)],
        label_config=CONFIG,
        client_gone=lambda: True,
        deadline=time.monotonic() + WAIT_S,
    )
    engine.gate.set()
    until(lambda: backend.results.sizes()["in_flight"] == 0, "both to finish")
    assert backend.results.sizes()["kept"] == 1 and backend.results.stats["failed_later"] == 1


# -- the write-back ----------------------------------------------------------------------------


class FlakyLabelStudio(FakeLabelStudio):
    """The stand-in client, unreachable while ``down`` is set."""

    def __init__(self, tasks, config):
        super().__init__(tasks, config)
        self.down = threading.Event()
        ls = self

        class Projects(FakeLabelStudio._Projects):
            def get(self, id):
                if ls.down.is_set():
                    raise ConnectionError("Label Studio is down")
                return super().get(id)

            def import_predictions(self, id, request, request_options=None):
                if ls.down.is_set():
                    raise StatusError(502)
                return super().import_predictions(id, request, request_options)

        self.projects = Projects(self)


def writing_backend(made, ls: FakeLabelStudio):
    store = ResultStore(100)
    backend, engine = made(store)
    engine.hold_all = True  # so the requests below go before their tasks finish
    writer = WriteBack(
        store,
        "http://127.0.0.1:9",
        "key",
        VERSION,
        backend.asks_fingerprint_for,
        client=ls,
        pause=lambda s: None,
        linger=0.0,
    )
    store.on_kept = writer.start().enqueue
    return backend, engine, writer


def test_deferred_predictions_are_written_once_and_tasks_already_predicted_are_skipped(made):
    ls = FakeLabelStudio({i: {} for i in range(1, 5)}, CONFIG)
    backend, engine, writer = writing_backend(made, ls)
    ls.store[2]["predictions"].append({"model_version": VERSION, "result": []})  # an opened task
    tasks = [task(i, (40 + i, 30)) for i in range(1, 5)]
    backend.predict(tasks, label_config=CONFIG, client_gone=lambda: True, deadline=time.monotonic() + WAIT_S)
    engine.gate.set()
    until(lambda: backend.results.stats["written_back"] == 3, "the write-back")
    stats = backend.results.stats.snapshot()
    assert stats["already_in_label_studio"] == 1 and stats["write_back_failures"] == 0
    assert [len(ls.predictions(i)) for i in range(1, 5)] == [1, 1, 1, 1]
    assert all(is_cat(ls.predictions(i)[0], (40 + i, 30)) for i in (1, 3, 4))
    # a retrieve that still lists them (it raced the write) gets empty lists: no duplicate
    assert backend.predict(tasks[:2], label_config=CONFIG, deadline=time.monotonic() + 1) == [
        NOT_YET,
        NOT_YET,
    ]
    writer.close()


def test_label_studio_down_during_the_write_back_leaves_them_for_the_next_retrieve(made):
    ls = FlakyLabelStudio({1: {}, 2: {}}, CONFIG)
    ls.down.set()
    backend, engine, writer = writing_backend(made, ls)
    tasks = [task(1, (41, 30)), task(2, (42, 30))]
    backend.predict(tasks, label_config=CONFIG, client_gone=lambda: True, deadline=time.monotonic() + WAIT_S)
    engine.gate.set()
    until(lambda: backend.results.stats["write_back_failures"] == 2, "the write-back to give up")
    assert ls.writes == [] and backend.results.sizes()["kept"] == 2
    ls.down.clear()
    results = backend.predict(tasks, label_config=CONFIG, deadline=time.monotonic() + WAIT_S)
    assert is_cat(results[0], (41, 30)) and is_cat(results[1], (42, 30))
    assert backend.results.stats["served_from_cache"] == 2
    writer.close()


def test_predictions_for_an_old_label_config_are_dropped_not_written(made):
    ls = FakeLabelStudio({1: {}}, OTHER_CONFIG)  # the user changed the config meanwhile
    backend, engine, writer = writing_backend(made, ls)
    backend.predict(
        [task(1), task(2)], label_config=CONFIG, client_gone=lambda: True, deadline=time.monotonic() + WAIT_S
    )
    engine.gate.set()
    until(lambda: backend.results.stats["stale_dropped"] == 2, "the stale results to be dropped")
    assert ls.writes == [] and backend.results.sizes()["kept"] == 0
    writer.close()


def test_a_label_studio_too_busy_to_answer_the_check_is_asked_again(made):
    """A listing that times out (Label Studio busy storing a retrieve's answer) is retried; the
    predictions are then written once."""
    ls = FakeLabelStudio({1: {}, 2: {}}, CONFIG)
    listing = ls.tasks.list
    calls = []

    def slow_then_fine(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("timed out")
        return listing(*args, **kwargs)

    ls.tasks.list = slow_then_fine
    backend, engine, writer = writing_backend(made, ls)
    backend.predict(
        [task(1), task(2)], label_config=CONFIG, client_gone=lambda: True, deadline=time.monotonic() + WAIT_S
    )
    engine.gate.set()
    until(lambda: backend.results.stats["written_back"] == 2, "the write-back")
    assert len(calls) >= 2 and backend.results.stats["write_back_failures"] == 0
    assert sorted(t for write in ls.writes for t in write) == [1, 2]
    writer.close()
