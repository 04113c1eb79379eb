"""Which in-process engine loads a checkpoint: Molmo2 (:mod:`.molmo2`) or Molmo v1 (:mod:`.molmo1`).

The loading code is the real one users run: ``from_pretrained`` on a hub id or a local folder
(``MOLMO_MODEL``), honouring ``HF_HOME``. Which checkpoint (MOLMO_MODEL or the demo model) is
decided above this layer, in :mod:`molmo_backend.app.model_choice`, and passed down.
"""

from __future__ import annotations

import logging
from pathlib import Path

import transformers

from molmo_backend.engine.base import Engine
from molmo_backend.engine.inprocess import ModelLoadError, pick_devices
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)


def weights_available_locally(model: str, revision: str | None) -> bool:
    """True when ``model`` is a local checkpoint folder or already in the Hugging Face cache."""
    if Path(model).is_dir():
        return (Path(model) / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False


def model_family(path_or_id: str, revision: str | None = None) -> str:
    """``model_type`` of a checkpoint's config.json, read without running any remote code."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path_or_id, revision=revision)
    return config.get("model_type", "unknown")


def installed_transformers() -> str:
    return transformers.__version__


def molmo1_profile() -> bool:
    """True in the molmo1 install profile (transformers 4.5x, requirements-molmo1.txt), which runs
    only Molmo v1; the main profile (transformers 5, requirements.txt) runs Molmo2."""
    return int(installed_transformers().split(".")[0]) < 5


def load_local_engine(
    settings: Settings, path: str | None = None, *, model_id: str | None = None, demo: bool = False
) -> Engine | list[Engine]:
    """The in-process engine for the checkpoint at ``path`` (default MOLMO_MODEL), by its family
    (picked from its config.json); a Molmo2 engine reports ``model_id`` (default MOLMO_MODEL) and
    ``demo``, which the caller knows.

    ``model_type`` "molmo" (v1: Molmo-7B-D/-7B-O/MolmoE-1B/-72B-0924) runs through its own remote
    code in the molmo1 install profile (transformers 4.5x, requirements-molmo1.txt); anything else
    is Molmo2 on transformers 5 (requirements.txt). Each profile says plainly when it is the wrong one.
    """
    installed = installed_transformers()
    v1_profile = molmo1_profile()
    path = path or settings.model
    family = model_family(path, None if Path(path).is_dir() else settings.revision)
    if family == "molmo":
        if not v1_profile:
            raise ModelLoadError(
                f"{settings.model} is a Molmo v1 checkpoint (model_type 'molmo'): its remote code needs "
                f"transformers 4.46-4.53, but {installed} is installed. Install the molmo1 profile in its "
                f"own environment: pip install -r requirements-molmo1.txt (Docker: build with "
                f"--build-arg PROFILE=molmo1); see docs/molmo1.md"
            )
        try:
            from molmo_backend.engine.molmo1 import Molmo1Engine
        except ImportError as exc:
            raise ModelLoadError(
                f"{settings.model} is a Molmo v1 checkpoint, but its engine cannot load: {exc}"
            ) from exc
        return Molmo1Engine.from_settings(settings)
    if v1_profile:
        raise ModelLoadError(
            f"{settings.model} is a {family!r} checkpoint, but this is the molmo1 install profile "
            f"(transformers {installed}), which runs only Molmo v1 (model_type 'molmo'). Molmo2 needs "
            f"requirements.txt (transformers 5)"
        )
    devices = pick_devices(settings)
    if len(devices) > 1:
        log.info("one model replica per GPU", extra={"devices": [str(d) for d in devices]})
    engines = [
        TransformersEngine.from_settings(settings, device=device, path=path, model_id=model_id, demo=demo)
        for device in devices
    ]
    return engines[0] if len(engines) == 1 else engines
