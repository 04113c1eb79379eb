"""WSGI entry: ``gunicorn 'molmo_backend.app.wsgi:create_app_from_env()'`` (what ``serve`` runs).

Builds the app inside the worker process, so the model loads after gunicorn forks.
"""

from __future__ import annotations

import logging

from flask import Flask

from molmo_backend.app.routes import create_app
from molmo_backend.app.service import ModelService
from molmo_backend.images.address_policy import classify, parse_ip
from molmo_backend.logs import configure_logging
from molmo_backend.settings import Settings


def create_app_from_env(settings: Settings | None = None, engine_factory=None) -> Flask:
    """The app with its model loading in the background; ``engine_factory`` replaces the default
    transformers engine (tests force answers through it)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    for warning in startup_warnings(settings):
        logging.getLogger(__name__).warning(warning)
    service = ModelService(settings, **({"engine_factory": engine_factory} if engine_factory else {}))
    return create_app(service.start(background=True), settings)


def startup_warnings(settings: Settings) -> list[str]:
    """What the operator should know before the first request: settings that leave a door open."""
    warnings = []
    if settings.label_studio_api_key and not settings.label_studio_url:
        warnings.append(
            "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is sent to whichever host "
            "Label Studio's /setup call names; set LABEL_STUDIO_URL (and BASIC_AUTH_USER/PASS)"
        )
    if not settings.basic_auth_user and not _is_loopback(settings.host):
        warnings.append(
            f"the server listens on {settings.host or '*'}:{settings.port} (not a loopback address) "
            "without basic auth: anyone who can reach that port can call /setup and /predict and "
            "make the backend fetch images; set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same "
            "in Label Studio's model settings), or HOST=127.0.0.1"
        )
    return warnings


def _is_loopback(host: str) -> bool:
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    ip = parse_ip(host)
    return ip is not None and classify(ip) == "loopback"
