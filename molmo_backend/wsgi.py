"""WSGI entry: ``gunicorn 'molmo_backend.wsgi:create_app_from_env()'`` (what ``serve`` runs).

Builds the app inside the worker process, so the model loads after gunicorn forks.
"""

from __future__ import annotations

import logging

from flask import Flask

from .logs import configure_logging
from .server import create_app
from .service import ModelService
from .settings import Settings


def create_app_from_env(settings: Settings | None = None, engine_factory=None) -> Flask:
    """The app with its model loading in the background; ``engine_factory`` replaces the default
    transformers engine (tests force answers through it)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if settings.label_studio_api_key and not settings.label_studio_url:
        logging.getLogger(__name__).warning(
            "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is sent to whichever host "
            "Label Studio's /setup call names; set LABEL_STUDIO_URL (and BASIC_AUTH_USER/PASS)"
        )
    service = ModelService(settings, **({"engine_factory": engine_factory} if engine_factory else {}))
    return create_app(service.start(background=True), settings)
