"""HTTP layer: Label Studio's ML-backend routes around a :class:`ModelService`.

Routes and auth live here; the request bodies' shapes in molmo_backend/app/protocol.py; what a
prediction is in the backend. ``/health`` and ``/setup`` never wait on the GPU (Label Studio
gives them 1 s and 3 s). ``/predict`` gives the backend its deadline (``MOLMO_PREDICT_DEADLINE``
from the request's arrival) and a way to tell that Label Studio has hung up
(molmo_backend/app/connection.py).
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections import Counter

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from molmo_backend.app import prometheus
from molmo_backend.app.connection import client_gone_probe
from molmo_backend.app.protocol import json_object, parse_predict, parse_setup, parse_webhook
from molmo_backend.app.service import ModelService
from molmo_backend.errors import MolmoError
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

#: how long /predict waits for a model that is still loading before answering 503
PREDICT_WAIT_FOR_MODEL_S = 30.0
#: routes that answer without basic auth (container health checks)
OPEN_ROUTES = {"/", "/health"}


def create_app(service: ModelService, settings: Settings) -> Flask:
    app = Flask("molmo_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    counters: Counter = Counter()
    counters_lock = threading.Lock()
    timer = prometheus.RequestTimer()

    def count(**increments: int) -> None:
        with counters_lock:
            counters.update(increments)

    @app.before_request
    def check_auth():
        if not settings.basic_auth_user or request.path in OPEN_ROUTES:
            return None
        if _basic_auth_ok(request.headers.get("Authorization", ""), settings):
            return None
        count(auth_failures=1)
        return Response(
            '{"error": "authentication required"}',
            401,
            {"WWW-Authenticate": 'Basic realm="molmo-backend"', "Content-Type": "application/json"},
        )

    @app.errorhandler(MolmoError)
    def molmo_error(exc: MolmoError):
        """The backend's own errors (a bad body or label config: 400) answer with their status and
        message, without a traceback: the caller can act on them."""
        if exc.http_status < 500:
            count(bad_requests=1)
            log.warning("bad request", extra={"path": request.path, "reason": str(exc)})
        else:
            log.warning(
                "request failed", extra={"path": request.path, "reason": str(exc), "status": exc.http_status}
            )
        return jsonify(error=str(exc)), exc.http_status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            count(too_large=1)
            return jsonify(
                error=f"the request body is larger than MOLMO_MAX_REQUEST_BYTES="
                f"{settings.max_request_bytes} bytes"
            ), 413
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc):
        count(server_errors=1)
        log.exception("request failed", extra={"path": request.path})
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        state = service.state
        body = {"status": "UP" if state == "ready" else state.upper(), "model_class": "MolmoBackend"}
        if state == "ready":
            body["model_version"] = service.backend.model_version
            return jsonify(body)
        if state == "failed":
            body["error"] = service.error
            return jsonify(body), 500
        return jsonify(body), 503

    def ready_backend(wait: float = 0.0):
        backend = service.wait(wait) if wait else service.backend
        if backend is None:
            status = 500 if service.state == "failed" else 503
            message = f"model failed to load: {service.error}" if service.error else "model is still loading"
            return None, (jsonify(error=message, status=service.state.upper()), status)
        return backend, None

    @app.post("/setup")
    def setup():
        body = json_object(request)
        backend, error = ready_backend()
        if error:
            return error
        setup_request = parse_setup(body)  # after the readiness check: a loading model answers 503
        model_version = backend.setup(
            label_config=setup_request.schema,
            hostname=setup_request.hostname,
            access_token=setup_request.access_token,
        )
        count(setups=1)
        return jsonify(model_version=model_version)

    @app.post("/predict")
    def predict():
        started = time.monotonic()
        deadline = started + settings.predict_deadline if settings.predict_deadline > 0 else None
        predict_request = parse_predict(json_object(request))
        backend, error = ready_backend(wait=PREDICT_WAIT_FOR_MODEL_S)
        if error:
            return error
        tasks = predict_request.tasks
        results = backend.predict(
            tasks,
            context=predict_request.context,
            label_config=predict_request.label_config,
            deadline=deadline,
            client_gone=client_gone_probe(request.environ),
            project=predict_request.project,
        )
        count(predict_requests=1, tasks=len(tasks))
        log.info(
            "predict request", extra={"tasks": len(tasks), "seconds": round(time.monotonic() - started, 3)}
        )
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        event = parse_webhook(request.get_json(silent=True))
        backend = service.backend
        result = backend.fit(event.event, event.data) if backend is not None else {"status": "ignored"}
        count(webhooks=1)
        return jsonify(result), 200

    @app.get("/versions")
    def versions():
        backend = service.backend
        return jsonify(versions=[backend.model_version] if backend else [])

    def request_counts() -> dict:
        with counters_lock:
            return dict(counters)

    @app.get("/metrics")
    def metrics():
        """Prometheus text format (docs/metrics.md); ``?format=json`` for the same as JSON."""
        if request.args.get("format") != "json":
            return Response(
                prometheus.render(service, request_counts, timer),
                200,
                {"Content-Type": prometheus.CONTENT_TYPE},
            )
        backend = service.backend
        body = {"state": service.state, "requests": request_counts()}
        if backend is not None:
            scheduler = backend.scheduler
            body["model_version"] = backend.model_version
            body["scheduler"] = dict(
                scheduler.stats,
                pending=scheduler.pending(),
                running=scheduler.running(),
                pairs_per_s=round(scheduler.pairs_per_second(), 3),
            )
            body["fetch_failures"] = backend.fetch_failures.snapshot()
            body["retrieve"] = dict(
                backend.results.stats.snapshot(),
                **backend.results.sizes(),
                write_back=backend.write_back is not None,
            )
        return jsonify(body)

    @app.before_request
    def start_timer():
        g.started = time.monotonic()

    @app.after_request
    def observe(response):
        started = getattr(g, "started", None)
        if started is not None and request.url_rule is not None:
            timer.observe(request.url_rule.rule, response.status_code, time.monotonic() - started)
        return response

    return app


def _basic_auth_ok(header: str, settings: Settings) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except ValueError:
        return False
    # Label Studio sends the credentials through requests' HTTPBasicAuth, which encodes them as
    # latin-1; curl and browsers use UTF-8. Either spelling of the configured pair is accepted.
    ok = False
    for encoding in ("utf-8", "latin-1"):
        try:
            want_user = settings.basic_auth_user.encode(encoding)
            want_pass = settings.basic_auth_pass.encode(encoding)
        except UnicodeEncodeError:
            continue
        ok |= hmac.compare_digest(user, want_user) & hmac.compare_digest(password, want_pass)
    return bool(colon) and ok
