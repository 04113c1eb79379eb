"""The server's backend for one command run (annotate, predict): loaded once, closed at the end.

The commands build it exactly as ``serve`` does (``build_backend`` over the engine of
``MOLMO_ENGINE``, or over an injected factory's engine), so their points, regions and
``model_version`` are what the server would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from molmo_backend.app.service import build_backend, default_engine_factory
from molmo_backend.labelstudio.model import MolmoBackend
from molmo_backend.settings import Settings

#: builds the engine (or engines) from the settings; tests inject one that forces answers
EngineFactory = Callable[[Settings], Any]


def load_backend(settings: Settings, engine_factory: EngineFactory | None = None) -> MolmoBackend:
    """The server's backend over a freshly loaded engine."""
    engine = (engine_factory or default_engine_factory)(settings)
    return build_backend(settings, engine)


def close_backend(backend: MolmoBackend) -> None:
    """Stop the scheduler's worker thread (the process may go on: tests, notebooks)."""
    close = getattr(backend.scheduler, "close", None)
    if close is not None:
        close()
