"""Which checkpoint the in-process engine loads: ``MOLMO_MODEL``, or the tiny demo model (``MOLMO_DEMO``).

Knowing the demo model (building the random one, naming it, warning loudly that it is served) is
the app's job: the engine layer (:mod:`molmo_backend.engine.loading`) loads the path it is given,
under the name and demo flag it is given. Without a GPU and without local weights the serve
command falls back to the demo model (see :mod:`molmo_backend.demo.models`) and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from molmo_backend.demo.models import (
    DEMO_BANNER,
    demo_name,
    ensure_demo_model,
    ensure_random_model,
    is_demo_model,
)
from molmo_backend.engine.base import Engine
from molmo_backend.engine.inprocess import ModelLoadError
from molmo_backend.engine.loading import (
    installed_transformers,
    load_local_engine,
    molmo1_profile,
    weights_available_locally,
)
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """What to load (a hub id or a folder) and what the engine reports: ``model_id`` is
    MOLMO_MODEL, or a demo checkpoint's own name (molmo2-demo, molmo2-demo-shapes)."""

    path: str
    model_id: str
    demo: bool


def resolve_model(settings: Settings) -> tuple[str, bool]:
    """(what to load, whether it is the demo model), following ``MOLMO_DEMO``."""
    if settings.demo == "random":
        log.warning("serving the tiny RANDOM demo model (untrained, not Molmo): its points are meaningless")
        return str(ensure_random_model(settings.cache_dir)), True
    if settings.demo == "1":
        log.warning(DEMO_BANNER)
        return str(ensure_demo_model(settings.cache_dir)), True
    if settings.demo == "auto" and not torch.cuda.is_available():
        if not weights_available_locally(settings.model, settings.revision):
            log.warning(
                "no GPU and no local weights for %s: %s. Set MOLMO_DEMO=0 to fail instead, "
                "or point MOLMO_MODEL at downloaded weights.",
                settings.model,
                DEMO_BANNER,
            )
            return str(ensure_demo_model(settings.cache_dir)), True
    return settings.model, is_demo_model(settings.model)


def choose_model(settings: Settings) -> ModelChoice:
    """:func:`resolve_model`, with the name the engine reports for it."""
    path, demo = resolve_model(settings)
    return ModelChoice(path, demo_name(path) if demo else settings.model, demo)


def load_engine(settings: Settings) -> Engine | list[Engine]:
    """The in-process engine (one per GPU with MOLMO_GPUS) for the model :func:`choose_model` picks.

    The molmo1 install profile (transformers 4.x) runs only Molmo v1: there it loads MOLMO_MODEL,
    and refuses the demo model (a Molmo2, which transformers 4.x cannot build or run) before
    building or announcing it."""
    if molmo1_profile():
        no_local_weights = not weights_available_locally(settings.model, settings.revision)
        auto_demo = settings.demo == "auto" and not torch.cuda.is_available() and no_local_weights
        if settings.demo in ("1", "random") or auto_demo:
            raise ModelLoadError(
                f"the demo model is a Molmo2 and this is the molmo1 install profile (transformers "
                f"{installed_transformers()}): point MOLMO_MODEL at Molmo v1 weights already downloaded (a "
                f"local folder or the Hugging Face cache) and set MOLMO_DEMO=0, or install requirements.txt "
                f"for the demo"
            )
        return load_local_engine(settings)
    choice = choose_model(settings)
    return load_local_engine(settings, choice.path, model_id=choice.model_id, demo=choice.demo)
