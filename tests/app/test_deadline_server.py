"""Deadline and hang-ups through the real server (gunicorn on 127.0.0.1, the demo model with forced
answers): a bulk /predict answers at MOLMO_PREDICT_DEADLINE with the unfinished tasks as empty
lists and keeps their work; a client that hangs up leaves bulk work running for the next retrieve
and gets an opened task's queued query dropped (issue #12, point 4).

The engine is slowed with tests/support/forced_backend.py's MOLMO_TEST_FAULTS ``sleep`` rule: a
batch that holds a SLOW-sized image sleeps SLEEP_S before it runs (so it holds the GPU worker
that long). MOLMO_MAX_BATCH=1: every task is a batch of its own. Real Label Studio:
tests/e2e/test_e2e_retrieve.py.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
import requests
from PIL import Image

from molmo_backend.app.connection import client_gone_probe
from tests.support.processes import BackendServer

CAT = '<points coords="1 1 250 500">cat</points>'
CONFIG = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/></KeyPointLabels></View>'
)
FAST, SLOW = (40, 30), (77, 55)
SLEEP_S = 4.0
DEADLINE_S = 2.0
WAIT_S = 90.0


def png_uri(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def task(task_id: int, size) -> dict:
    return {"id": task_id, "data": {"image": png_uri(size)}, "project": 3}


def body(tasks) -> bytes:
    return json.dumps(
        {"tasks": tasks, "project": "3.1700000000", "label_config": CONFIG, "params": {"context": None}}
    ).encode()


class Server:
    def __init__(self, backend):
        self.backend, self.url = backend, backend.url
        self.port = int(backend.url.rsplit(":", 1)[1])

    def predict(self, tasks) -> list:
        r = requests.post(
            f"{self.url}/predict",
            data=body(tasks),
            timeout=WAIT_S,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        return r.json()["results"]

    def metrics(self) -> dict:
        m = requests.get(f"{self.url}/metrics?format=json", timeout=5).json()
        return {**{f"s.{k}": v for k, v in m["scheduler"].items()}, **m["retrieve"]}

    def send_and_hang_up(self, tasks) -> None:
        """A whole /predict, then the connection closed at once (Label Studio giving up)."""
        payload = body(tasks)
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head + payload)

    def until(self, condition, what: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while True:
            m = self.metrics()
            if condition(m):
                return m
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {m}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    env = {
        "MOLMO_MAX_BATCH": "1",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "MOLMO_PREDICT_DEADLINE": str(DEADLINE_S),
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        "MOLMO_TEST_FAULTS": json.dumps([{"image_size": list(SLOW), "sleep": SLEEP_S}]),
    }
    with BackendServer(tmp_path_factory.mktemp("deadline"), env=env, answers={"cat": CAT}) as backend:
        yield Server(backend)


def is_cat(result, size) -> bool:
    return isinstance(result, dict) and [
        (r["value"]["keypointlabels"], r["value"]["x"], r["original_width"]) for r in result["result"]
    ] == [(["cat"], 25.0, size[0])]


def test_the_deadline_answers_what_is_finished_and_the_rest_comes_from_memory(server):
    before = server.metrics()
    sizes = [FAST, SLOW, FAST]
    tasks = [task(i + 1, s) for i, s in enumerate(sizes)]
    started = time.monotonic()
    first = server.predict(tasks)
    assert time.monotonic() - started < SLEEP_S + DEADLINE_S  # answered at the deadline
    assert first[1] == []  # the slow one cannot be done by then
    assert all(r == [] or is_cat(r, s) for r, s in zip(first, sizes))
    late = [i for i, r in enumerate(first) if r == []]
    after = server.until(
        lambda m: m["completed_later"] - before["completed_later"] == len(late),
        "the deferred tasks to finish",
    )
    assert after["deadlines_hit"] - before["deadlines_hit"] == 1
    assert after["deferred"] - before["deferred"] == len(late)

    second = server.predict([tasks[i] for i in late])
    assert all(is_cat(r, sizes[i]) for r, i in zip(second, late))
    done = server.metrics()
    assert done["s.queries"] == after["s.queries"]  # nothing computed again
    assert done["served_from_cache"] - before["served_from_cache"] == len(late)


def test_bulk_work_of_a_client_that_hung_up_is_kept_for_the_next_retrieve(server):
    before = server.metrics()
    tasks = [task(11, SLOW), task(12, FAST)]
    server.send_and_hang_up(tasks)
    server.until(lambda m: m["clients_gone"] - before["clients_gone"] == 1, "the hang-up to be seen")
    after = server.until(
        lambda m: m["completed_later"] - before["completed_later"] == 2, "the abandoned work to finish"
    )
    assert after["cancelled_gone"] == before["cancelled_gone"]  # bulk work is not cancelled
    results = server.predict(tasks)
    assert is_cat(results[0], SLOW) and is_cat(results[1], FAST)
    assert server.metrics()["s.queries"] == after["s.queries"]


def test_an_opened_task_whose_client_hung_up_is_dropped_from_the_queue(server):
    before = server.metrics()
    faults = server.backend.log.count("injected fault")
    bulk = threading.Thread(target=server.predict, args=([task(21, SLOW), task(22, SLOW)],))
    bulk.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while server.backend.log.count("injected fault") == faults:  # a slow batch holds the GPU
            assert time.monotonic() < deadline, "the slow batch never started"
            time.sleep(0.05)
        server.send_and_hang_up([task(23, FAST)])  # an opened task; Label Studio gives up on it
        server.until(
            lambda m: m["cancelled_gone"] - before["cancelled_gone"] == 1, "the opened task to be cancelled"
        )
        after = server.until(
            lambda m: m["s.cancelled"] - before["s.cancelled"] == 1 and m["s.pending"] == 0,
            "its query to be dropped",
        )
    finally:
        bulk.join(WAIT_S)
    # the two slow bulk tasks were computed, the opened task's query never was
    final = server.until(lambda m: m["in_flight"] == 0, "the bulk work to finish")
    assert final["s.queries"] - before["s.queries"] == 2
    assert after["clients_gone"] - before["clients_gone"] == 1


def test_the_probe_tells_a_closed_client_from_a_waiting_one():
    ours, theirs = socket.socketpair()
    try:
        gone = client_gone_probe({"gunicorn.socket": ours})
        assert gone is not None and gone() is False
        theirs.close()
        assert gone() is True
    finally:
        ours.close()
    assert gone() is True  # our side closed too: nobody to answer
    assert client_gone_probe({}) is None  # not under gunicorn: no probe
