"""The request bodies' parsers (molmo_backend/app/protocol.py), without a server: what each route
reads from a body and the BadRequest (HTTP 400) it raises otherwise. tests/app/test_bad_inputs.py
sends the same bodies through the real server."""

from __future__ import annotations

import pytest

from molmo_backend.app.protocol import (
    BadRequest,
    PredictRequest,
    SetupRequest,
    WebhookEvent,
    parse_predict,
    parse_setup,
    parse_webhook,
)
from molmo_backend.errors import BadInput


def test_bad_request_is_a_400_bad_input_and_a_value_error():
    assert issubclass(BadRequest, BadInput) and issubclass(BadRequest, ValueError)
    assert (BadRequest.http_status, BadRequest.exit_code) == (400, 2)


def test_predict_reads_tasks_config_context_and_project():
    tasks = [{"id": 1, "data": {"image": "x"}}]
    body = {
        "tasks": tasks,
        "label_config": "<View/>",
        "project": "3.1700000000",
        "params": {"login": None, "password": None, "context": {"result": []}},
    }
    assert parse_predict(body) == PredictRequest(
        tasks=tasks, label_config="<View/>", context={"result": []}, project="3.1700000000"
    )
    assert parse_predict({"tasks": []}) == PredictRequest(tasks=[])


@pytest.mark.parametrize("params", [None, [], "x", {"context": []}, {"context": "x"}, {}])
def test_predict_without_a_context_object_is_a_bulk_request(params):
    assert parse_predict({"tasks": [], "params": params}).context is None


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "'tasks' must be a list of Label Studio tasks"),
        ({"tasks": {"id": 1}}, "'tasks' must be a list of Label Studio tasks"),
        ({"tasks": [], "label_config": ["<View/>"]}, "'label_config' must be the label config XML string"),
    ],
)
def test_predict_refuses_wrong_shapes(body, message):
    with pytest.raises(BadRequest) as info:
        parse_predict(body)
    assert str(info.value) == message


def test_setup_reads_schema_and_how_to_reach_label_studio():
    assert parse_setup(
        {"schema": "<View/>", "hostname": "http://ls:8080", "access_token": "k", "project": "3.1"}
    ) == SetupRequest("<View/>", "http://ls:8080", "k")
    assert parse_setup({"hostname": "", "access_token": 5}) == SetupRequest()
    with pytest.raises(BadRequest, match="^'schema' must be the label config XML string$"):
        parse_setup({"schema": 1})


def test_webhook_acknowledges_anything():
    assert parse_webhook({"action": "ANNOTATION_CREATED", "x": 1}) == WebhookEvent(
        "ANNOTATION_CREATED", {"action": "ANNOTATION_CREATED", "x": 1}
    )
    assert parse_webhook({"event": "PROJECT_UPDATED"}).event == "PROJECT_UPDATED"
    assert parse_webhook(None) == WebhookEvent("unknown", {})
    assert parse_webhook([1, 2]) == WebhookEvent("unknown", {})
