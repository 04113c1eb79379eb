"""Runs the WSGI app under gunicorn: one worker process (it holds the model), many threads."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from molmo_backend.settings import Settings


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings, engine_factory=None):
        self.settings = settings
        self.engine_factory = engine_factory
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.host}:{s.port}",
            "workers": 1,  # the model lives in this one process; the GPU scheduler serialises work
            "worker_class": "gthread",
            "threads": s.threads,
            "timeout": 120,  # heartbeat of the worker's main loop, not a request time limit
            "graceful_timeout": 30,
            "keepalive": 5,
            "loglevel": s.log_level.lower(),
            "preload_app": False,  # never load CUDA in the master before fork
            "proc_name": "molmo-backend",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        from molmo_backend.app.wsgi import create_app_from_env

        return create_app_from_env(self.settings, self.engine_factory)


def serve(settings: Settings, engine_factory=None) -> int:
    """Serve until stopped; ``engine_factory(settings)`` builds the engine inside the worker."""
    _Gunicorn(settings, engine_factory).run()
    return 0
