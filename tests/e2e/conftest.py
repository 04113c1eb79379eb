"""Fixtures for the end-to-end tests against a real Label Studio (see tests/support/labelstudio.py).

pytest loads it for the tests in tests/e2e/ only, and a session-scoped Label Studio starts only
when a selected test asks for it (``-m e2e``).

- ``ls_legacy`` / ``ls_pat``: one Label Studio per token mode per test session (module scope would
  start them again for every module that imports them; session scope keeps one each).
- ``capture_backend``: a minimal ML backend (Flask on a thread, 127.0.0.1) that records what LS
  sends to /setup and /predict and answers with one keypoint per task.
- ``png_factory``: writes PNG files of a chosen size.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.labelstudio import E2E_TIMINGS, LabelStudio
from tests.support.processes import free_port


def _start(legacy: bool) -> LabelStudio:
    t0 = time.monotonic()
    ls = LabelStudio(legacy_tokens=legacy).start()
    name = "legacy" if legacy else "pat"
    E2E_TIMINGS[f"ls_{name}_total_s"] = time.monotonic() - t0
    for k, v in ls.timings.items():
        E2E_TIMINGS[f"ls_{name}_{k}"] = v
    return ls


def _running(request, legacy: bool):
    ls = _start(legacy)
    try:
        yield ls
    finally:
        if request.session.testsfailed:  # LS's log goes with its temp dir: show it first
            capman = request.config.pluginmanager.getplugin("capturemanager")
            with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
                print(
                    f"\n--- Label Studio log (legacy tokens {legacy}), last lines ---\n{ls.log_tail(6000)}",
                    file=sys.stderr,
                )
        ls.stop()


@pytest.fixture(scope="session")
def ls_legacy(request):
    """Label Studio 1.23.2 with legacy tokens on (``Token <user_token>``)."""
    yield from _running(request, True)


@pytest.fixture(scope="session")
def ls_pat(request):
    """Label Studio 1.23.2 as 1.23 ships it: legacy tokens off, personal access tokens only."""
    yield from _running(request, False)


@pytest.fixture(params=["legacy", "pat"])
def ls(request):
    """Each test that takes ``ls`` runs once per token mode."""
    return request.getfixturevalue(f"ls_{request.param}")


@pytest.fixture
def png_factory(tmp_path):
    """``png_factory(name, width, height)`` writes an RGB PNG and returns its path."""
    from PIL import Image, ImageDraw

    def make(name: str = "img.png", width: int = 64, height: int = 48, color=(200, 30, 30)) -> Path:
        img = Image.new("RGB", (width, height), (240, 240, 240))
        ImageDraw.Draw(img).ellipse([width // 4, height // 4, width * 3 // 4, height * 3 // 4], fill=color)
        path = tmp_path / name
        img.save(path, format="PNG")
        return path

    return make


@dataclass
class CaptureBackend:
    """What LS sent to a minimal backend; ``url`` is where LS reaches it."""

    url: str
    model_version: str = "capture-1"
    requests: list[tuple[str, dict]] = field(default_factory=list)

    def bodies(self, path: str) -> list[dict]:
        return [body for p, body in self.requests if p == path]

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture
def capture_backend():
    """A throwaway ML backend on 127.0.0.1 that records /setup and /predict bodies and answers
    each task with one keypoint of the first label of the first KeyPointLabels control."""
    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    port = free_port()
    rec = CaptureBackend(url=f"http://127.0.0.1:{port}")
    app = Flask("capture-backend")

    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="CaptureBackend")

    @app.post("/setup")
    def setup():
        rec.requests.append(("/setup", request.get_json(force=True)))
        return jsonify(model_version=rec.model_version)

    @app.post("/predict")
    def predict():
        body = request.get_json(force=True)
        rec.requests.append(("/predict", body))
        results = []
        for _task in body.get("tasks", []):
            region = {
                "from_name": "kp",
                "to_name": "image",
                "type": "keypointlabels",
                "value": {"x": 50.0, "y": 50.0, "width": 1.0, "keypointlabels": ["cat"]},
            }
            results.append({"result": [region], "score": 0.5, "model_version": rec.model_version})
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        rec.requests.append(("/webhook", request.get_json(force=True, silent=True) or {}))
        return jsonify(status="ok")

    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        thread.join(timeout=10)
