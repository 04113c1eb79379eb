"""The bodies the HTTP routes accept, parsed once into typed requests.

Label Studio's ML client sends JSON objects: ``/predict`` gets ``tasks``, ``label_config``,
``project`` (``"<id>.<timestamp>"``) and ``params`` (whose ``context`` is set only by interactive
annotating); ``/setup`` gets ``schema`` (the project's label config), ``hostname`` and
``access_token``; ``/webhook`` gets Label Studio's webhook events. Only the fields the backend
uses are read. A body of the wrong shape raises :class:`BadRequest` (HTTP 400) whose message says
what to send instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request

from molmo_backend.errors import BadInput


class BadRequest(BadInput, ValueError):
    """The request body is not what the route accepts (HTTP 400)."""


@dataclass(frozen=True)
class PredictRequest:
    tasks: list
    label_config: str | None = None
    #: ``params.context``: set only by Label Studio's interactive-annotating call
    context: dict | None = None
    #: as sent (``"<id>.<timestamp>"``, an id, or anything): the backend reads the id from it
    project: Any = None


@dataclass(frozen=True)
class SetupRequest:
    schema: str | None = None
    hostname: str | None = None
    access_token: str | None = None


@dataclass(frozen=True)
class WebhookEvent:
    event: str
    data: dict


def json_object(request: Request) -> dict:
    """The request's JSON object body; BadRequest for anything else (413 for a cut chunked body).

    Only Content-Type: application/json is read (what Label Studio sends): a browser cannot send
    that cross-site without a CORS preflight, which this server never grants."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json raises it, not ValueError, for deeply nested input
        raise BadRequest("the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        limit = request.max_content_length
        if limit is not None and request.content_length is None and len(request.get_data()) >= limit:
            raise RequestEntityTooLarge()  # a chunked body is cut at the cap, not refused by it
        raise BadRequest("the request body must be a JSON object sent as Content-Type: application/json")
    return body


def parse_predict(body: dict) -> PredictRequest:
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of Label Studio tasks")
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest("'label_config' must be the label config XML string")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else None
    return PredictRequest(
        tasks=tasks, label_config=label_config, context=context, project=body.get("project")
    )


def parse_setup(body: dict) -> SetupRequest:
    schema = body.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise BadRequest("'schema' must be the label config XML string")
    return SetupRequest(
        schema=schema,
        hostname=_str_or_none(body.get("hostname")),
        access_token=_str_or_none(body.get("access_token")),
    )


def parse_webhook(body: Any) -> WebhookEvent:
    """Never refuses: every event is acknowledged, one the backend cannot read as ``unknown``."""
    data = body if isinstance(body, dict) else {}
    return WebhookEvent(event=str(data.get("action") or data.get("event") or "unknown"), data=data)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
