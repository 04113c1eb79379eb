"""The real server (gunicorn, HTTP on 127.0.0.1) on the tiny demo Molmo2, as Label Studio calls it."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import KEYPOINT_CONFIG
from tests.support.processes import BackendServer

FORCED = {
    "cat": '<points coords="1 1 250 500 2 750 100">cat</points>',  # Molmo2 format, 0-1000
    "dog": '<point x="12.5" y="80.0" alt="dog">dog</point>',  # Molmo v1 format, 0-100
}
ENV = {"MOLMO_ALLOWED_HOSTS": "127.0.0.1", "MOLMO_MAX_NEW_TOKENS": "48"}


def predict_body(tasks, config=KEYPOINT_CONFIG):
    return {
        "tasks": tasks,
        "project": "1.1700000000",
        "label_config": config,
        "params": {"login": None, "password": None, "context": None},
    }


def two_tasks(image_url):
    return [
        {"id": 1, "data": {"image": f"{image_url}/red-640x480.png"}},
        {"id": 2, "data": {"image": f"{image_url}/green-300x500.jpg"}},
    ]


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    with BackendServer(tmp_path_factory.mktemp("forced"), env=ENV, answers=FORCED) as backend:
        yield backend


@pytest.fixture(scope="module")
def unforced(tmp_path_factory):
    env = {**ENV, "MOLMO_MAX_NEW_TOKENS": "200"}
    with BackendServer(tmp_path_factory.mktemp("unforced"), env=env) as backend:
        yield backend


def test_forced_answers_become_exactly_the_expected_keypoints(forced, image_url):
    setup = requests.post(
        f"{forced.url}/setup",
        json={
            "project": "1.1700000000",
            "schema": KEYPOINT_CONFIG,
            "hostname": "http://localhost:8080",
            "access_token": "x",
        },
    )
    assert setup.status_code == 200
    version = setup.json()["model_version"]
    assert version.startswith("molmo2-demo@")

    response = requests.post(f"{forced.url}/predict", json=predict_body(two_tasks(image_url)), timeout=60)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 2
    for result, (width, height) in zip(results, [(640, 480), (300, 500)]):
        assert result["model_version"] == version
        got = sorted(
            (
                r["value"]["keypointlabels"][0],
                r["value"]["x"],
                r["value"]["y"],
                r["original_width"],
                r["original_height"],
                r["from_name"],
                r["to_name"],
                r["type"],
            )
            for r in result["result"]
        )
        assert got == [
            ("cat", 25.0, 50.0, width, height, "kp", "image", "keypointlabels"),
            ("cat", 75.0, 10.0, width, height, "kp", "image", "keypointlabels"),
            ("dog", 12.5, 80.0, width, height, "kp", "image", "keypointlabels"),
        ]
        assert all(r["score"] == 1.0 for r in result["result"]) and result["score"] == 1.0
        assert len({r["id"] for r in result["result"]}) == 3


def test_a_task_whose_image_is_missing_gets_an_empty_result_and_the_others_theirs(forced, image_url):
    tasks = two_tasks(image_url)
    tasks.insert(1, {"id": 9, "data": {"image": f"{image_url}/no-such-file.png"}})
    tasks.append({"id": 10, "data": {"text": "no image key"}})
    results = requests.post(f"{forced.url}/predict", json=predict_body(tasks), timeout=60).json()["results"]
    assert [len(r["result"]) for r in results] == [3, 0, 3, 0]
    assert results[2]["result"][0]["original_width"] == 300  # order kept


def test_a_config_without_keypoints_is_refused_with_what_to_add(forced, image_url):
    config = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
    setup = requests.post(f"{forced.url}/setup", json={"schema": config})
    assert setup.status_code == 400 and "KeyPointLabels" in setup.json()["error"]
    predict = requests.post(f"{forced.url}/predict", json=predict_body(two_tasks(image_url), config))
    assert predict.status_code == 400 and "KeyPointLabels" in predict.json()["error"]
    assert requests.get(f"{forced.url}/health").json()["status"] == "UP"


def test_protocol_side_routes(forced):
    health = requests.get(f"{forced.url}/health").json()
    assert health["status"] == "UP" and health["model_class"] == "MolmoBackend"
    assert requests.get(f"{forced.url}/versions").json() == {"versions": [health["model_version"]]}
    assert requests.post(f"{forced.url}/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200
    metrics = requests.get(f"{forced.url}/metrics?format=json").json()
    assert metrics["state"] == "ready" and metrics["requests"]["webhooks"] >= 1
    assert requests.post(f"{forced.url}/predict", data="not json").status_code == 400


def test_unforced_answers_give_one_valid_result_per_task_in_order(unforced, image_url):
    results = requests.post(f"{unforced.url}/predict", json=predict_body(two_tasks(image_url)), timeout=120)
    results = results.json()["results"]
    assert len(results) == 2
    version = requests.get(f"{unforced.url}/health").json()["model_version"]
    for result, width in zip(results, (640, 300)):
        assert result["model_version"] == version and isinstance(result["score"], float)
        for region in result["result"]:
            assert 0 <= region["value"]["x"] <= 100 and 0 <= region["value"]["y"] <= 100
            assert region["value"]["keypointlabels"][0] in ("cat", "dog")
            assert region["original_width"] == width


def test_health_answers_fast_while_a_long_predict_runs(unforced, image_url):
    tasks = [{"id": i, "data": {"image": f"{image_url}/blue-1280x960.png"}} for i in range(24)]
    done = {}

    def long_predict():
        started = time.monotonic()
        done["response"] = requests.post(f"{unforced.url}/predict", json=predict_body(tasks), timeout=300)
        done["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=long_predict)
    thread.start()
    latencies = []
    while thread.is_alive():  # polled from the start; only polls made while it runs are counted
        started = time.monotonic()
        health = requests.get(f"{unforced.url}/health", timeout=5)
        setup = requests.post(f"{unforced.url}/setup", json={"schema": KEYPOINT_CONFIG}, timeout=5)
        latencies.append(time.monotonic() - started)
        assert health.status_code == 200 and setup.status_code == 200
        time.sleep(0.1)
    thread.join()
    assert done["response"].status_code == 200 and len(done["response"].json()["results"]) == 24
    assert len(latencies) >= 3, f"predict took only {done['seconds']:.1f} s: too short to observe"
    assert max(latencies) < 1.0, latencies
