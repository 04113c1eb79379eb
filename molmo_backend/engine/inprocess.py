"""What the two in-process engines (Molmo2 in :mod:`.molmo2`, Molmo v1 in :mod:`.molmo1`) share.

Where a model runs (device, dtype), what their loaders take from the settings, a local
checkpoint's revision, and the log-probabilities of greedy ``generate()``'s picks. Both engines
import these from here, so neither imports the other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import LogitsProcessor

from molmo_backend.errors import MolmoError
from molmo_backend.settings import Settings


class ModelLoadError(MolmoError, RuntimeError):
    """The checkpoint or the install cannot serve (wrong profile, bad MOLMO_GPUS, unloadable
    weights): raised at start, so the server reports it as failed (HTTP 500), a command exits 1."""


def pick_device(settings: Settings) -> torch.device:
    if settings.device != "auto":
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_devices(settings: Settings) -> list[torch.device]:
    """``MOLMO_GPUS``: empty = the one device of MOLMO_DEVICE; ``all`` = every visible GPU;
    ``0,2`` = those GPUs. One model replica runs on each."""
    if not settings.gpus:
        return [pick_device(settings)]
    if settings.gpus == "all":
        count = torch.cuda.device_count()
        if count == 0:
            raise ModelLoadError("MOLMO_GPUS=all but no CUDA GPU is visible")
        return [torch.device("cuda", i) for i in range(count)]
    try:
        return [torch.device("cuda", int(i)) for i in settings.gpus.split(",") if i.strip()]
    except ValueError as exc:
        raise ModelLoadError(f"MOLMO_GPUS={settings.gpus!r}: expected 'all' or GPU indices like 0,1") from exc


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


#: MOLMO_MAX_BATCH when unset, for the fast decoder: bulk rows decoding together, each row's cache
#: its own length (on an H100 256 rows ran 13% faster than 107, bench/RESULTS.md)
FAST_DECODER_ROWS = 256
#: MOLMO_MAX_BATCH when unset, for engines that run whole batches (HF ``generate()``, Molmo v1):
#: a batch is padded to its longest prompt and runs until its longest answer ends, so its memory
#: grows with every pair
BATCH_PAIRS = 128


def load_options(settings: Settings, path: str, device: torch.device, whole_batches: bool = True) -> dict:
    """What every in-process engine's loader takes from the settings, for ``path`` on ``device``
    (``whole_batches``: an engine that runs padded batches, with the smaller MOLMO_MAX_BATCH
    default)."""
    return dict(
        revision=None if Path(path).is_dir() else settings.revision,
        device=device,
        dtype=pick_dtype(settings, device),
        max_new_tokens=settings.max_new_tokens,
        max_batch=settings.max_batch or (BATCH_PAIRS if whole_batches else FAST_DECODER_ROWS),
        model_id=settings.model,
    )


def local_revision(path: Path) -> str:
    """A content hash of a local checkpoint's small files: stable while the checkpoint is."""
    digest = hashlib.sha256()
    # DEMO_MODEL.json: a retrained demo has the same config but another training record
    for name in sorted(
        ["config.json", "model.safetensors.index.json", "generation_config.json", "DEMO_MODEL.json"]
    ):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    weights = path / "model.safetensors"
    if weights.is_file():
        digest.update(str(weights.stat().st_size).encode())
    return digest.hexdigest()[:10]


class TokenLogprobs(LogitsProcessor):
    """Records, at each step, the log-probability of the token greedy decoding is about to pick.

    Placed last in the processor list, it sees the scores generate() takes its argmax from."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)
        return scores


def cut_at_end(
    rows: list[list[int]], steps: list[torch.Tensor], ends: set[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's generated ids and their log-probabilities (as :class:`TokenLogprobs` recorded
    them), up to (not including) the row's first end token."""
    logprobs = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
    cut = [next((i for i, token in enumerate(row) if token in ends), len(row)) for row in rows]
    return [row[:k] for row, k in zip(rows, cut)], [row[:k] for row, k in zip(logprobs, cut)]
