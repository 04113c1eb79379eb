"""The remote engine against a real local HTTP server that speaks the chat-completions shape.

``FakeEngineServer`` plays vLLM: it checks every request the way vLLM would need it (model name,
bearer key, an inline JPEG image, the prompt text), answers Molmo2-format points with logprobs, and
can be told to fail a prompt's tries with 500/503/429/400, to answer slowly, or to send malformed
JSON. It counts how many requests are in flight at once.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from molmo_backend.engine import openai_remote as remote
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.openai_remote import EngineUnavailable, OpenAIEngine
from molmo_backend.settings import Settings
from tests.conftest import KEYPOINT_CONFIG

KEY = "sk-test-0123456789abcdef"
RED = Image.new("RGB", (640, 480), (200, 30, 30))
GREEN = Image.new("RGB", (300, 500), (30, 200, 30))
CAT = '<points coords="1 1 250 500 2 750 125">cat</points>'
DEFAULT_LOGPROBS = [math.log(0.9), math.log(0.7)]  # mean probability 0.8


class FakeEngineServer:
    """A threaded HTTP/1.1 server with vLLM's /v1/models and /v1/chat/completions."""

    def __init__(self, served="molmo", root="allenai/Molmo2-8B", api_key=KEY):
        self.served, self.root, self.api_key = served, root, api_key
        self.answers: dict[str, str] = {}  # prompt -> answer text (default: CAT)
        self.scripts: dict[str, list] = {}  # prompt -> one action per try; the last one repeats
        self.logprobs: list[float] | None = DEFAULT_LOGPROBS
        self.delay = 0.0  # seconds every completion takes
        self.tries: Counter = Counter()  # prompt -> requests received
        self.seen: list[dict] = []  # valid completion requests: prompt, image size, model
        self.invalid: list[str] = []  # why a request was refused (the tests expect none)
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                if not fake._authorized(self.headers):
                    return self._send(401, {"error": {"message": "Unauthorized"}})
                entry = {"id": fake.served, "object": "model", "owned_by": "vllm"}
                if fake.root:
                    entry["root"] = fake.root
                self._send(200, {"object": "list", "data": [entry]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._complete(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out test)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _complete(self, raw: bytes):
                request = json.loads(raw)
                problem, prompt, size = fake._check(request, self.headers)
                if problem:
                    fake.invalid.append(problem)
                    return self._send(400, {"error": {"message": problem}})
                with fake._lock:
                    fake.tries[prompt] += 1
                    n = fake.tries[prompt]
                    fake.seen.append({"prompt": prompt, "size": size, "model": request["model"]})
                script = fake.scripts.get(prompt, ["ok"])
                action = script[min(n, len(script)) - 1]
                if isinstance(action, tuple) and action[0] == "slow":
                    time.sleep(action[1])
                    action = "ok"
                time.sleep(fake.delay)
                if action == "malformed":
                    return self._send_raw(200, b'{"choices": [{"message": {"content": "<points')
                if action == 429:
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                if isinstance(action, int):
                    return self._send(action, {"error": {"message": f"injected {action}"}})
                text = fake.answers.get(prompt, CAT)
                choice = {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
                if fake.logprobs is not None and request.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [{"token": "t", "logprob": lp, "top_logprobs": []} for lp in fake.logprobs]
                    }
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": fake.served,
                        "choices": [choice],
                    },
                )

            def _send(self, status, payload, headers=None):
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(self, status, data, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _authorized(self, headers) -> bool:
        return self.api_key is None or headers.get("Authorization") == f"Bearer {self.api_key}"

    def _check(self, request: dict, headers) -> tuple[str | None, str | None, tuple | None]:
        """What vLLM would refuse; else the prompt and the decoded image's size."""
        if not self._authorized(headers):
            return "bad or missing bearer key", None, None
        if request.get("model") != self.served:
            return f"model {request.get('model')!r} does not exist", None, None
        if request.get("temperature") != 0 or not isinstance(request.get("max_tokens"), int):
            return "expected greedy decoding and max_tokens", None, None
        try:
            (message,) = request["messages"]
            image_part, text_part = message["content"]
            assert message["role"] == "user" and image_part["type"] == "image_url"
            assert text_part["type"] == "text"
            url = image_part["image_url"]["url"]
            prefix = "data:image/jpeg;base64,"
            assert url.startswith(prefix)
            image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)))
            assert image.format == "JPEG"
            return None, text_part["text"], image.size
        except Exception as exc:  # noqa: BLE001
            return f"malformed request: {exc!r}", None, None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeEngineServer() as fake:
        yield fake
    assert not fake.invalid, fake.invalid


def make_engine(server, **kwargs) -> OpenAIEngine:
    options = dict(model="molmo", api_key=KEY, concurrency=4, timeout=5.0, max_new_tokens=64, backoff=0.01)
    options.update(kwargs)
    engine = OpenAIEngine(server.url, **options)
    return engine


def test_answers_come_back_in_order_from_checked_requests(server, monkeypatch):
    encoded = []
    real_encode = remote.encode_image
    monkeypatch.setattr(
        remote, "encode_image", lambda image: encoded.append(image.size) or real_encode(image)
    )
    server.answers = {"Point to cat": CAT, "Point to dog": "There are none.", "Point to tail": "no points"}
    queries = [
        PointQuery(RED, "Point to cat", image_key="red"),
        PointQuery(RED, "Point to dog", image_key="red"),
        PointQuery(GREEN, "Point to cat\nPlease say 'There are none.'", image_key="green"),
        PointQuery(RED, "Point to tail", image_key="red"),
        PointQuery(GREEN, "Point to dog", image_key="green"),
    ]
    engine = make_engine(server)
    out = engine.generate(queries)
    assert [a.text for a in out] == [CAT, "There are none.", CAT, "no points", "There are none."]
    assert all(a.error is None for a in out)
    assert all(a.score == pytest.approx(0.8, abs=1e-4) for a in out)
    got = sorted((s["prompt"], s["size"]) for s in server.seen)
    assert got == sorted((q.prompt, q.image.size) for q in queries)  # each prompt with its own image
    assert {s["model"] for s in server.seen} == {"molmo"}
    assert sorted(encoded) == [(300, 500), (640, 480)]  # one encoding per distinct image

    # the next batch reuses an image still alive under the same key; a new image under a reused
    # key (keys may be id()s) is encoded again rather than mistaken for the old one
    other = Image.new("RGB", (320, 240), (1, 2, 3))
    out = engine.generate(
        [
            PointQuery(RED, "Point to cat", image_key="red"),
            PointQuery(other, "Point to dog", image_key="green"),
        ]
    )
    assert [a.text for a in out] == [CAT, "There are none."]
    assert sorted(encoded) == [(300, 500), (320, 240), (640, 480)]
    assert server.seen[-1]["size"] == (320, 240) or server.seen[-2]["size"] == (320, 240)


def test_score_is_none_without_logprobs_and_the_mean_probability_with_them(server):
    engine = make_engine(server)
    server.logprobs = [math.log(1.0), math.log(0.5), math.log(0.25), -math.inf]
    assert engine.generate([PointQuery(RED, "Point to cat")])[0].score == pytest.approx(0.5833, abs=1e-4)
    server.logprobs = None
    (answer,) = engine.generate([PointQuery(RED, "Point to cat")])
    assert answer.text == CAT and answer.score is None


def test_concurrency_limit_is_respected_and_used(server):
    server.delay = 0.15
    engine = make_engine(server, concurrency=4)
    assert engine.max_batch == 4
    queries = [PointQuery(RED, f"Point to thing {i}", image_key="red") for i in range(16)]
    started = time.monotonic()
    out = engine.generate(queries)
    elapsed = time.monotonic() - started
    assert all(a.text == CAT for a in out)
    assert server.max_in_flight == 4  # never more, and the limit is actually reached
    assert elapsed < 16 * 0.15 / 2  # 4 waves of 0.15 s, not 16 one after another


def test_429_and_5xx_are_retried_until_they_succeed(server):
    server.scripts = {"Point to a": [500, 503, "ok"], "Point to b": [429, "ok"], "Point to c": [502, "ok"]}
    engine = make_engine(server, max_tries=3)
    out = engine.generate([PointQuery(RED, f"Point to {x}") for x in "abcd"])
    assert [a.error for a in out] == [None] * 4 and [a.text for a in out] == [CAT] * 4
    assert server.tries == Counter({"Point to a": 3, "Point to b": 2, "Point to c": 2, "Point to d": 1})
    assert engine.stats["retries"] == 4 and engine.stats["failed"] == 0


def test_a_query_that_keeps_failing_errors_alone(server):
    server.scripts = {"Point to broken": [500], "Point to refused": [400], "Point to garbled": ["malformed"]}
    engine = make_engine(server, max_tries=3)
    prompts = ["Point to cat", "Point to broken", "Point to refused", "Point to dog", "Point to garbled"]
    out = engine.generate([PointQuery(RED, p) for p in prompts])
    ok = [out[0], out[3]]
    assert all(a.text == CAT and a.error is None for a in ok)
    assert out[1].text == "" and "HTTP 500" in out[1].error and "injected 500" in out[1].error
    assert "after 3 tries" in out[1].error
    assert out[2].text == "" and "HTTP 400" in out[2].error
    assert out[4].text == "" and "malformed answer" in out[4].error
    # 5xx: all three tries; 4xx and a malformed 200: no retry
    assert server.tries["Point to broken"] == 3
    assert server.tries["Point to refused"] == 1 and server.tries["Point to garbled"] == 1
    assert engine.stats["failed"] == 3


def test_a_slow_answer_times_out_into_an_error_within_bounds(server):
    server.scripts = {"Point to slowly": [("slow", 2.0)]}
    engine = make_engine(server, timeout=0.5)
    started = time.monotonic()
    out = engine.generate([PointQuery(RED, "Point to slowly"), PointQuery(RED, "Point to cat")])
    elapsed = time.monotonic() - started
    assert out[1].text == CAT and out[1].error is None
    assert out[0].text == "" and "did not answer within 0.5 s" in out[0].error
    assert 0.5 <= elapsed < 1.5
    assert server.tries["Point to slowly"] == 1  # a read time-out is not retried


def test_an_unreachable_server_gives_error_answers_not_an_exception(server):
    server.httpd.shutdown()
    server.httpd.server_close()  # nothing listens on that port any more
    engine = make_engine(server, max_tries=3)
    started = time.monotonic()
    out = engine.generate([PointQuery(RED, "Point to cat"), PointQuery(GREEN, "Point to dog")])
    assert time.monotonic() - started < 2.0
    assert all(a.text == "" and "cannot reach the engine server" in a.error for a in out)
    assert all("after 3 tries" in a.error for a in out)


def test_from_settings_asks_the_server_which_model_it_runs(server):
    settings = Settings(
        engine="openai",
        engine_url=server.url + "/",
        engine_api_key=KEY,
        engine_concurrency=3,
        engine_timeout=7.0,
        max_new_tokens=99,
    )
    engine = OpenAIEngine.from_settings(settings, startup_wait=2)
    # MOLMO_MODEL (allenai/Molmo2-4B) is not served: the served name is used, the root is reported
    assert (engine.request_model, engine.model_id, engine.family) == ("molmo", "allenai/Molmo2-8B", "molmo2")
    assert (engine.max_batch, engine.timeout, engine.max_new_tokens, engine.revision) == (
        3,
        7.0,
        99,
        "remote",
    )
    assert engine.generate([PointQuery(RED, "Point to cat")])[0].text == CAT  # "molmo" accepted

    server.served, server.root = "allenai/Molmo-7B-D-0924", None
    v1 = OpenAIEngine.from_settings(
        Settings(engine="openai", engine_url=server.url, engine_api_key=KEY, model="allenai/Molmo-7B-D-0924"),
        startup_wait=2,
    )
    assert (v1.request_model, v1.model_id, v1.family) == ("allenai/Molmo-7B-D-0924",) * 2 + ("molmo",)


def test_from_settings_fails_clearly_on_a_wrong_key_or_a_dead_server(server, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = Settings(engine="openai", engine_url=server.url, engine_api_key="sk-wrong-key-999")
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="HTTP 401.*MOLMO_ENGINE_API_KEY"):
        OpenAIEngine.from_settings(wrong, startup_wait=30)
    assert time.monotonic() - started < 2  # a refused key is not waited on
    with pytest.raises(EngineUnavailable, match="404.*/v1"):
        OpenAIEngine.from_settings(
            Settings(engine="openai", engine_url=server.url[:-3], engine_api_key=KEY), startup_wait=2
        )
    server.httpd.shutdown()
    server.httpd.server_close()
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="did not come up within 0.6 s"):
        OpenAIEngine.from_settings(
            Settings(engine="openai", engine_url=server.url, engine_api_key=KEY), startup_wait=0.6
        )
    assert time.monotonic() - started < 2
    assert "sk-wrong-key-999" not in caplog.text


def test_the_api_key_is_never_logged_or_reported(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.scripts = {"Point to a": [503, "ok"], "Point to b": [401]}
    engine = make_engine(server, timeout=0.5)
    out = engine.generate([PointQuery(RED, "Point to a"), PointQuery(RED, "Point to b")])
    assert out[0].text == CAT and "HTTP 401" in out[1].error
    assert "engine request failed, retrying" in caplog.text  # the retry was logged...
    assert KEY not in caplog.text and KEY not in repr(engine)  # ...without the key
    assert all(KEY not in (a.error or "") for a in out)


def test_backend_predict_end_to_end_gives_exact_keypoints(server, image_url):
    from molmo_backend.app.service import build_backend

    template = "Point to {label}\nPlease say 'There are none.' if it is not in the image."
    server.answers = {
        template.replace("{label}", "cat"): CAT,
        template.replace("{label}", "dog"): '<points coords="1 1 100 900">dog</points>',
    }
    server.scripts = {template.replace("{label}", "dog"): [503, "ok"]}  # a retry on the way
    settings = Settings(
        engine="openai",
        engine_url=server.url,
        engine_api_key=KEY,
        engine_concurrency=4,
        allowed_hosts=("127.0.0.1",),
        point_width=0.75,
    )
    engine = OpenAIEngine.from_settings(settings, startup_wait=2, backoff=0.01)
    backend = build_backend(settings, engine)
    try:
        tasks = [
            {"id": 1, "data": {"image": f"{image_url}/red-640x480.png"}},
            {"id": 2, "data": {"image": f"{image_url}/missing.png"}},
        ]
        predictions = backend.predict(tasks, label_config=KEYPOINT_CONFIG)
    finally:
        backend.scheduler.close()
        engine.close()
    assert backend.model_version.startswith("Molmo2-8B@remote-p")
    assert len(predictions) == 2
    assert predictions[1] == {"result": [], "score": 0.0, "model_version": backend.model_version}
    regions = [
        {
            key: r[key]
            for key in ("from_name", "to_name", "type", "original_width", "original_height", "value")
        }
        for r in predictions[0]["result"]
    ]

    def point(x, y, label):
        return {
            "from_name": "kp",
            "to_name": "image",
            "type": "keypointlabels",
            "original_width": 640,
            "original_height": 480,
            "value": {"x": x, "y": y, "width": 0.75, "keypointlabels": [label]},
        }

    assert regions == [point(25.0, 50.0, "cat"), point(75.0, 12.5, "cat"), point(10.0, 90.0, "dog")]
    assert all(r["score"] == pytest.approx(0.8, abs=1e-4) for r in predictions[0]["result"])
    assert predictions[0]["score"] == pytest.approx(0.8, abs=1e-4)
    assert sorted(s["size"] for s in server.seen) == [(640, 480)] * 3  # cat, dog (503), dog
