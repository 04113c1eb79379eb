"""Molmo served by an OpenAI-compatible server (vLLM, SGLang), reached over HTTP.

``MOLMO_ENGINE=openai`` with ``MOLMO_ENGINE_URL=http://host:8000/v1``. Every (image, prompt)
query becomes one chat completion with the image inline as a JPEG data URL; the server batches
them on its GPUs (continuous batching, data and tensor parallel are its business), so this engine
only keeps ``MOLMO_ENGINE_CONCURRENCY`` requests in flight, times them out, retries what is worth
retrying, and turns a failure into an error answer for that one query.

Which model: at start the engine asks the server ``GET {url}/models`` (waiting for it to come up,
the way the local engine waits for weights to load). The request ``model`` is ``MOLMO_MODEL`` when
the server serves it, else the first id the server lists (vLLM's ``--served-model-name``). The
model id that goes into model_version is what the server says it runs: the entry's ``root`` (vLLM
reports the checkpoint path there) or else its ``id``. The family (answer format, prompt phrasing)
follows that name: "Molmo2" -> molmo2, "Molmo-"/"MolmoE-" (v1) -> molmo, anything else molmo2.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from PIL import Image
from requests.adapters import HTTPAdapter

from molmo_backend.engine.base import Answer, Engine, PointQuery, mean_probability
from molmo_backend.errors import Unavailable
from molmo_backend.redaction import describe_url, error_reason
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

#: tries per query (the first one included) for errors worth retrying
MAX_TRIES = 3
#: first back-off in seconds; doubled per retry, with jitter, capped by MAX_BACKOFF
BACKOFF = 0.5
MAX_BACKOFF = 8.0
#: how long ``from_settings`` waits for the server to answer GET /models (vLLM loading an 8B
#: checkpoint and capturing CUDA graphs takes minutes)
STARTUP_WAIT = 600.0
#: JPEG quality of the inline images: near-lossless, about 10x smaller than PNG for photos
JPEG_QUALITY = 95
#: encoded images kept between batches (labels of one image may straddle two batches)
IMAGE_CACHE = 64
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_JSON = {"Content-Type": "application/json"}


class EngineUnavailable(Unavailable, RuntimeError):
    """The engine server could not be used at start (unreachable, refused the key, serves nothing)."""


@dataclass(frozen=True)
class ServedModel:
    request_name: str  # what goes in the request's "model"
    model_id: str  # what the server says it runs (for model_version)
    family: str


def family_of(name: str) -> str:
    """Molmo family from a model name: Molmo2 checkpoints vs Molmo v1 (``Molmo-7B-D-0924``)."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    if "molmo2" in base:
        return "molmo2"
    if re.match(r"molmoe?-", base):
        return "molmo"
    return "molmo2"


class OpenAIEngine(Engine):
    """Point queries as concurrent chat completions against a vLLM or SGLang server."""

    revision = "remote"

    def __init__(
        self,
        url: str,
        *,
        model: str,
        model_id: str | None = None,
        family: str | None = None,
        api_key: str | None = None,
        concurrency: int = 32,
        timeout: float = 60.0,
        max_new_tokens: int = 256,
        max_tries: int = MAX_TRIES,
        backoff: float = BACKOFF,
        session: requests.Session | None = None,
    ):
        if concurrency < 1:
            raise ValueError("MOLMO_ENGINE_CONCURRENCY must be >= 1")
        if timeout <= 0:
            raise ValueError("MOLMO_ENGINE_TIMEOUT must be > 0")
        self.url = url.rstrip("/")
        self.request_model = model
        self.model_id = model_id or model
        self.family = family or family_of(self.model_id)
        self.max_batch = concurrency
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.max_new_tokens = max_new_tokens
        self.max_tries = max(1, max_tries)
        self.backoff = backoff
        self.session = session or _session(concurrency, api_key)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="engine-http")
        self._cache: OrderedDict[Hashable, tuple[weakref.ref, bytes]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine({describe_url(self.url)!r}, model={self.request_model!r})"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, startup_wait: float = STARTUP_WAIT, **kwargs
    ) -> OpenAIEngine:
        """The engine for ``settings``, once the server answers which model it serves."""
        if not settings.engine_url:
            raise EngineUnavailable("MOLMO_ENGINE=openai needs MOLMO_ENGINE_URL (e.g. http://vllm:8000/v1)")
        url = settings.engine_url.rstrip("/")
        session = _session(settings.engine_concurrency, settings.engine_api_key)
        served = discover_model(
            session, url, settings.model, timeout=min(settings.engine_timeout, 10.0), wait=startup_wait
        )
        engine = cls(
            url,
            model=served.request_name,
            model_id=served.model_id,
            family=served.family,
            api_key=settings.engine_api_key,
            concurrency=settings.engine_concurrency,
            timeout=settings.engine_timeout,
            max_new_tokens=settings.max_new_tokens,
            session=session,
            **kwargs,
        )
        log.info(
            "engine server ready",
            extra={
                "url": describe_url(url),
                "model": served.request_name,
                "model_id": served.model_id,
                "family": served.family,
                "concurrency": engine.concurrency,
            },
        )
        return engine

    # -- answering -----------------------------------------------------------------------------
    def generate(self, queries: Sequence[PointQuery]) -> list[Answer]:
        """One answer per query, in order; a query that fails gets an error answer, the others
        are unaffected. Requests run ``concurrency`` at a time."""
        if not queries:
            return []
        parts = self._encode_images(queries)
        futures = [self._pool.submit(self._answer, q.prompt, part) for q, part in zip(queries, parts)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _answer(self, prompt: str, image_part: bytes | Exception) -> Answer:
        answer = self._ask(prompt, image_part)
        if answer.error:
            self._count("failed")
        return answer

    def _ask(self, prompt: str, image_part: bytes | Exception) -> Answer:
        if isinstance(image_part, Exception):
            return Answer(text="", error=f"image could not be encoded: {image_part!r}"[:500])
        # The image part (about 1 MB for a 1280x960 photo) was serialised once per image; only the
        # prompt is serialised per query. Same JSON as json=..., a fifth of the client CPU.
        head = json.dumps(
            {
                "model": self.request_model,
                "temperature": 0,
                "max_tokens": self.max_new_tokens,
                "logprobs": True,
            }
        )
        text_part = json.dumps({"type": "text", "text": prompt})
        body = b"".join(
            [
                head[:-1].encode(),
                b', "messages": [{"role": "user", "content": [',
                image_part,
                b", ",
                text_part.encode(),
                b"]}]}",
            ]
        )
        error = "no try made"
        started = time.monotonic()
        for attempt in range(1, self.max_tries + 1):
            retry_after = None
            self._count("requests")
            try:
                resp = self.session.post(
                    f"{self.url}/chat/completions",
                    data=body,
                    headers=_JSON,
                    timeout=(min(self.timeout, 10.0), self.timeout),
                )
            except requests.ConnectionError as exc:  # includes ConnectTimeout: nothing was sent
                error = f"cannot reach the engine server at {describe_url(self.url)}: {error_reason(exc)}"
            except requests.Timeout:
                # a read time-out is not retried: the server already spent the whole budget on
                # this query, and three tries would triple the wait that Label Studio sees
                return Answer(text="", error=f"engine server did not answer within {self.timeout:g} s")
            except requests.RequestException as exc:
                return Answer(text="", error=f"request to the engine server failed: {error_reason(exc)}")
            else:
                with resp:
                    if resp.status_code == 200:
                        return self._parse(resp)
                    error = f"HTTP {resp.status_code} from the engine server: {_server_message(resp)}"
                    if resp.status_code not in _RETRY_STATUS:
                        return Answer(text="", error=error[:500])
                    retry_after = _retry_after(resp)
            if attempt < self.max_tries:
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_BACKOFF))
                if time.monotonic() - started + delay >= self.timeout:
                    # retries share one time-out budget: a query never takes much over 2x timeout
                    error = f"{error} (no time left for another try)"
                    break
                self._count("retries")
                log.warning(
                    "engine request failed, retrying",
                    extra={"attempt": attempt, "delay_s": round(delay, 3), "error": error[:300]},
                )
                time.sleep(delay)
        return Answer(text="", error=f"{error} (after {attempt} tries)"[:500])

    def _parse(self, resp: requests.Response) -> Answer:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return Answer(text="", error=f"malformed answer from the engine server: {exc!r}"[:500])
        return Answer(text=text.strip(), score=mean_probability(_token_logprobs(choice.get("logprobs"))))

    # -- images --------------------------------------------------------------------------------
    def _encode_images(self, queries: Sequence[PointQuery]) -> list[bytes | Exception]:
        """The serialised image part per query; each distinct image (``image_key``) is encoded once."""
        keys = [q.image_key if q.image_key is not None else ("id", id(q.image)) for q in queries]
        todo: dict[Hashable, Image.Image] = {}
        found: dict[Hashable, bytes | Exception] = {}
        with self._cache_lock:
            for key, q in zip(keys, queries):
                if key in found or key in todo:
                    continue
                hit = self._cache.get(key)
                if hit is not None and hit[0]() is q.image:  # same key AND the same image object
                    self._cache.move_to_end(key)
                    found[key] = hit[1]
                else:
                    todo[key] = q.image
        if todo:
            encoded = list(self._pool.map(_safe_encode, todo.values()))
            with self._cache_lock:
                for (key, image), part in zip(todo.items(), encoded):
                    found[key] = part
                    if isinstance(part, bytes):
                        try:
                            self._cache[key] = (weakref.ref(image), part)
                        except TypeError:  # not weak-referenceable: just don't cache it
                            continue
                        self._cache.move_to_end(key)
                while len(self._cache) > IMAGE_CACHE:
                    self._cache.popitem(last=False)
        return [found[key] for key in keys]


def encode_image(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """``data:image/jpeg;base64,...`` of ``image`` (converted to RGB)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _safe_encode(image: Image.Image) -> bytes | Exception:
    """The chat-message part that carries ``image``, serialised; or why it could not be made."""
    try:
        return json.dumps({"type": "image_url", "image_url": {"url": encode_image(image)}}).encode()
    except Exception as exc:  # noqa: BLE001 - becomes that query's error answer
        return exc


def discover_model(
    session: requests.Session,
    url: str,
    wanted: str,
    *,
    timeout: float = 10.0,
    wait: float = STARTUP_WAIT,
    poll: float = 2.0,
) -> ServedModel:
    """Which model the server at ``url`` serves, waiting up to ``wait`` s for it to answer."""
    deadline = time.monotonic() + wait
    last = "no answer yet"
    announced = 0.0
    while True:
        try:
            resp = session.get(f"{url}/models", timeout=(min(timeout, 10.0), timeout))
        except requests.RequestException as exc:
            last = f"cannot reach {describe_url(url)}: {error_reason(exc)}"
        else:
            with resp:
                if resp.status_code in (401, 403):
                    raise EngineUnavailable(
                        f"the engine server at {describe_url(url)} refused the request (HTTP "
                        f"{resp.status_code}): check MOLMO_ENGINE_API_KEY"
                    )
                if resp.status_code == 404:
                    raise EngineUnavailable(
                        f"{describe_url(url)}/models does not exist (HTTP 404): MOLMO_ENGINE_URL must be "
                        "the OpenAI base URL, usually ending in /v1"
                    )
                if resp.status_code == 200:
                    try:
                        entries = [e for e in resp.json()["data"] if isinstance(e.get("id"), str)]
                    except (ValueError, KeyError, TypeError, AttributeError):
                        entries = None
                    if not entries:
                        raise EngineUnavailable(f"{describe_url(url)}/models lists no model")
                    return _choose(entries, wanted)
                last = f"HTTP {resp.status_code} from {describe_url(url)}/models"
        now = time.monotonic()
        if now >= deadline:
            raise EngineUnavailable(f"the engine server did not come up within {wait:g} s ({last})")
        if now - announced >= 30.0:
            announced = now
            log.info("waiting for the engine server", extra={"url": describe_url(url), "reason": last})
        time.sleep(min(poll, max(deadline - now, 0.0)))


def _choose(entries: list[dict], wanted: str) -> ServedModel:
    by_id = {e["id"]: e for e in entries}
    entry = by_id.get(wanted)
    if entry is None:
        entry = entries[0]
        log.warning(
            "MOLMO_MODEL is not served by the engine server; using the model it serves",
            extra={"wanted": wanted, "served": [e["id"] for e in entries][:10], "using": entry["id"]},
        )
    root = entry.get("root")
    model_id = root if isinstance(root, str) and root.strip() else entry["id"]
    return ServedModel(request_name=entry["id"], model_id=model_id, family=family_of(model_id))


def _session(concurrency: int, api_key: str | None) -> requests.Session:
    session = requests.Session()
    # retries are ours (per query, with back-off); urllib3's own are off
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(concurrency, 1), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


def _token_logprobs(logprobs) -> list[float]:
    """The generated tokens' log-probabilities in an OpenAI ``logprobs`` object (chat shape
    ``{"content": [{"logprob": ..}]}`` or the completions shape ``{"token_logprobs": [..]}``);
    values that are no log-probability (missing, not finite, above 0) are left out."""
    if not isinstance(logprobs, dict):
        return []
    values = logprobs.get("content")
    if isinstance(values, list):
        values = [v.get("logprob") if isinstance(v, dict) else None for v in values]
    else:
        values = logprobs.get("token_logprobs")
    if not isinstance(values, list):
        return []
    return [
        v
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 0
    ]


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: our own back-off is used


def _server_message(resp: requests.Response) -> str:
    """The server's error message, short: vLLM/SGLang send {"error": {"message": ..}} or {"message": ..}."""
    try:
        data = resp.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = resp.text
    return " ".join(text.split())[:300] or resp.reason or "no message"
