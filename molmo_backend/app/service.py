"""Wires settings -> engine -> scheduler -> backend, and loads the model off the request path.

The model loads in a background thread of the serving process (never in gunicorn's master:
CUDA does not survive a fork), so the HTTP server answers ``/health`` from its first second and
no request ever waits on ``from_pretrained``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from molmo_backend.engine.base import Engine
from molmo_backend.engine.scheduler import Scheduler
from molmo_backend.images.loader import ImageLoader
from molmo_backend.labelstudio.model import MolmoBackend, make_model_version
from molmo_backend.labelstudio.results import ResultStore
from molmo_backend.labelstudio.writeback import WriteBack
from molmo_backend.pointing.prompts import default_prompt_template
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)


def default_engine_factory(settings: Settings) -> Engine | list[Engine]:
    """The engine ``MOLMO_ENGINE`` names (one per GPU with MOLMO_GPUS); heavy imports (torch)
    happen only here."""
    if settings.engine == "openai":
        from molmo_backend.engine.openai_remote import OpenAIEngine

        return OpenAIEngine.from_settings(settings)
    from molmo_backend.app.model_choice import load_engine

    return load_engine(settings)


def build_backend(
    settings: Settings, engine: Engine | list[Engine], write_back: bool = False
) -> MolmoBackend:
    """The backend over one engine, or over replicas of one model (one per GPU).

    ``write_back`` (the server): predictions finished after their retrieve answered are also
    written to Label Studio, when the settings say so (``Settings.writes_back``)."""
    scheduler = Scheduler(engine)  # the engine knows its batch size (remote: its concurrency)
    first = scheduler.engine
    template = settings.prompt_template or default_prompt_template(first.family)
    version = make_model_version(first.model_id, first.revision, template, settings.caption_prompt)
    results = ResultStore(settings.result_cache)
    backend = MolmoBackend(
        settings, scheduler, ImageLoader(settings), version, prompt_template=template, results=results
    )
    if write_back and settings.writes_back:
        writer = WriteBack(
            results,
            settings.label_studio_url,
            settings.label_studio_api_key,
            version,
            backend.asks_fingerprint_for,
        )
        results.on_kept = writer.start().enqueue
        backend.write_back = writer
        log.info(
            "deferred predictions are written to Label Studio as they finish",
            extra={"label_studio_url": settings.label_studio_url},
        )
    return backend


class ModelService:
    """Holds the backend once its model has loaded; reports loading state and errors meanwhile."""

    def __init__(
        self,
        settings: Settings,
        engine_factory: Callable[[Settings], Engine | list[Engine]] = default_engine_factory,
    ):
        self.settings = settings
        self.engine_factory = engine_factory
        self.backend: MolmoBackend | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        if self.backend is not None:
            return "ready"
        return "failed" if self.error else "loading"

    def start(self, background: bool = True) -> ModelService:
        if background:
            self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._thread.start()
        else:
            self._load()
        return self

    def wait(self, timeout: float | None = None) -> MolmoBackend | None:
        """The backend, waiting up to ``timeout`` seconds for the model; None if not ready."""
        self._ready.wait(timeout)
        return self.backend

    def _load(self) -> None:
        try:
            engine = self.engine_factory(self.settings)
            self.backend = build_backend(self.settings, engine, write_back=True)
            log.info(
                "backend ready",
                extra={
                    "model_version": self.backend.model_version,
                    "startup_s": round(time.monotonic() - self.started, 2),
                },
            )
        except Exception as exc:  # noqa: BLE001 - reported by /health, the server stays up
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
        finally:
            self._ready.set()
