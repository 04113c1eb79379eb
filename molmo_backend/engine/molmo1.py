"""Molmo v1 in this process, through the checkpoints' own remote code (the "molmo1" profile).

allenai/Molmo-7B-D-0924, Molmo-7B-O-0924, MolmoE-1B-0924 and Molmo-72B-0924 ship their model and
processor as Python files next to the weights (``trust_remote_code=True``). That code runs on
transformers 4.46-4.53 and breaks on 5.x, so this module belongs to the molmo1 install
profile (``requirements-molmo1.txt``) and refuses to import under transformers 5; nothing else in
the package imports it except :func:`~molmo_backend.engine.loading.load_local_engine`,
and only for a checkpoint whose ``model_type`` is ``"molmo"``.

How v1 is driven (its remote code's contract):

- ``processor.process(images=[image], text=prompt)`` gives one *unbatched* example: ``input_ids``
  (L,), ``images`` (crops, patches, pixels), ``image_input_idx`` (crops, tokens per crop),
  ``image_masks`` (crops, patches). It wraps the prompt as ``" User: {prompt} Assistant:"`` itself.
- ``model.generate_from_batch(batch, GenerationConfig(...))`` takes the batch with ``input_ids``
  right-padded with -1: it builds the attention mask from ``input_ids != -1`` and reads the first
  new token at each row's last valid position, so left padding or a real pad id would be wrong.
  The image tensors are padded with -1 along the crop axis (a crop of all -1 is dropped, a negative
  ``image_input_idx`` is ignored), as in v1's own training collator.
- Generation stops on ``<|endoftext|>``. The model card uses ``stop_strings``; here the token id is
  given as ``eos_token_id`` instead, because ``stop_strings`` looks back over the -1 padding of a
  batch, and because then finished rows are padded rather than run on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers

from molmo_backend.engine.base import Answer, Engine, PointQuery, mean_probability
from molmo_backend.settings import Settings

#: transformers versions the v1 remote code is known to run on
SUPPORTED_TRANSFORMERS = ">=4.46,<4.54"
PROFILE_HINT = (
    "Molmo v1 checkpoints need the molmo1 install profile: pip install -r requirements-molmo1.txt "
    "(transformers 4.53) in a separate environment; see docs/molmo1.md"
)

if int(transformers.__version__.split(".")[0]) >= 5:
    raise ImportError(
        f"molmo_backend.engine.molmo1 runs Molmo v1 remote code, which breaks on "
        f"transformers {transformers.__version__} (it needs {SUPPORTED_TRANSFORMERS}). {PROFILE_HINT}"
    )

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,  # noqa: E402
)

from molmo_backend.engine.inprocess import (  # noqa: E402
    ModelLoadError,
    TokenLogprobs,
    cut_at_end,
    load_options,
    local_revision,
    pick_device,
)

log = logging.getLogger(__name__)

#: v1's end of answer (the model card stops on this string)
STOP_TOKEN = "<|endoftext|>"
#: the processor's tensors that carry one entry per image crop
CROP_KEYS = ("images", "image_input_idx", "image_masks")


def collate(examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack unbatched ``processor.process`` outputs into one ``generate_from_batch`` batch.

    ``input_ids`` are right-padded with -1 (v1 masks ``input_ids != -1`` and starts generating at
    each row's last valid token); the crop tensors are padded with -1 up to the largest crop count.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    out: dict[str, torch.Tensor] = {}
    longest = max(int(e["input_ids"].shape[0]) for e in examples)
    ids = torch.full((len(examples), longest), -1, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : example["input_ids"].shape[0]] = example["input_ids"].long()
    out["input_ids"] = ids
    for key in CROP_KEYS:
        if not all(key in e and e[key] is not None for e in examples):
            continue
        first = examples[0][key]
        crops = max(int(e[key].shape[0]) for e in examples)
        padded = torch.full((len(examples), crops, *first.shape[1:]), -1, dtype=first.dtype)
        for row, example in enumerate(examples):
            padded[row, : example[key].shape[0]] = example[key]
        out[key] = padded
    return out


class Molmo1Engine(Engine):
    """Batched greedy generation with a Molmo v1 checkpoint and its remote code."""

    family = "molmo"

    def __init__(
        self,
        model_path: str,
        *,
        revision: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 256,
        max_batch: int = 8,
        model_id: str | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        device_map: str | None = None,
    ):
        started = time.monotonic()
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.logits_processors = list(logits_processors)
        try:
            self.processor = AutoProcessor.from_pretrained(
                model_path, revision=revision, trust_remote_code=True
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path,
                revision=revision,
                trust_remote_code=True,
                torch_dtype=dtype,
                **({"device_map": device_map} if device_map else {}),
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot load Molmo v1 model {model_path!r}: {exc}") from exc
        if not device_map:
            self.model.to(self.device)
        self.model.eval()
        config = self.model.config
        if config.model_type != "molmo":
            raise ModelLoadError(
                f"{model_path!r} is a {config.model_type!r} model; this engine runs Molmo v1"
            )
        if not hasattr(self.model, "generate_from_batch") or not hasattr(self.processor, "process"):
            raise ModelLoadError(f"{model_path!r} does not have Molmo v1's process/generate_from_batch API")
        self.model_id = model_id or model_path
        self.revision = (
            revision
            or (getattr(config, "_commit_hash", None) or "")[:10]
            or (local_revision(Path(model_path)) if Path(model_path).is_dir() else "main")
        )
        tokenizer = self.processor.tokenizer
        self._stop_ids = _stop_ids(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]
        log.info(
            "model loaded",
            extra={
                "model": self.model_id,
                "revision": self.revision,
                "family": self.family,
                "device": str(self.input_device),
                "device_map": device_map,
                "dtype": str(dtype).removeprefix("torch."),
                "load_s": round(time.monotonic() - started, 2),
            },
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> Molmo1Engine:
        path = settings.model
        device = pick_device(settings)
        # One process, several GPUs and no index chosen: let accelerate spread the layers (Molmo-72B
        # needs about 150 GB in bf16). MOLMO_DEVICE=cuda:0 keeps a model on one card.
        device_map = None
        if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
            device_map = "auto"
        return cls(path, **load_options(settings, path, device), device_map=device_map, **kwargs)

    @property
    def input_device(self) -> torch.device:
        """Where the batch goes: the model's first device (with a device map, its embedding's)."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return self.device

    def build_batch(self, queries: Sequence[PointQuery]) -> dict[str, torch.Tensor]:
        """v1's input building: ``processor.process`` for each (image, prompt), then :func:`collate`."""
        examples = [self.processor.process(images=[q.image], text=q.prompt) for q in queries]
        batch = collate(examples)
        device = self.input_device
        batch = {k: v.to(device) for k, v in batch.items()}
        if "images" in batch:
            batch["images"] = batch["images"].to(self.dtype)  # as the model card does for bf16 weights
        return batch

    def generate(self, queries: Sequence[PointQuery]) -> list[Answer]:
        if not queries:
            return []
        batch = self.build_batch(queries)
        generation_config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id,
        )
        recorder = TokenLogprobs()
        with torch.inference_mode():
            output = self.model.generate_from_batch(
                batch,
                generation_config,
                tokenizer=self.processor.tokenizer,
                logits_processor=LogitsProcessorList([*self.logits_processors, recorder]),
            )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        ends = set(self._stop_ids) | ({self._pad_id} if self._pad_id is not None else set())
        rows, logprobs = cut_at_end(
            sequences[:, batch["input_ids"].shape[1] :].tolist(), recorder.steps, ends
        )
        texts = self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [Answer(text=t.strip(), score=mean_probability(lp)) for t, lp in zip(texts, logprobs)]

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stop_ids(tokenizer) -> list[int]:
    """Token ids that end a v1 answer: ``<|endoftext|>`` and the tokenizer's eos (often the same)."""
    ids: list[int] = []
    stop = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if isinstance(stop, int) and stop != tokenizer.unk_token_id:
        ids.append(stop)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ModelLoadError(
            f"the tokenizer has neither {STOP_TOKEN} nor an eos token: not a Molmo v1 tokenizer"
        )
    return ids
