"""Molmo2 in this process, through Hugging Face transformers' Auto classes.

The loading code is the real one users run: ``from_pretrained`` on a hub id or a local folder
(``MOLMO_MODEL``), honouring ``HF_HOME``. Without a GPU and without local weights the serve
command falls back to the tiny demo model (see :mod:`molmo_backend.demo`) and says so.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from ..demo import DEMO_BANNER, demo_name, ensure_demo_model, ensure_random_model, is_demo_model
from ..settings import Settings
from .base import Answer, Engine, PointQuery
from .decoding import GreedyDecoder, prepare
from .token_text import TokenTexts

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


#: share of the GPU memory free when a batch is formed that its static KV cache may take; the rest
#: is headroom for the prefill (8 images' activations and cache at a time), logits and graphs
KV_MEMORY_FRACTION = 0.7
#: image tokens assumed when the processor cannot say (more than Molmo2's 8-crop maximum)
FALLBACK_IMAGE_TOKENS = 2048


def kv_token_budget(free_bytes: int, bytes_per_token: int, fraction: float = KV_MEMORY_FRACTION) -> int:
    """Cache tokens (rows x length) that fit in ``fraction`` of ``free_bytes``."""
    return max(0, int(free_bytes * fraction) // bytes_per_token)


def weights_available_locally(model: str, revision: str | None) -> bool:
    """True when ``model`` is a local checkpoint folder or already in the Hugging Face cache."""
    if Path(model).is_dir():
        return (Path(model) / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False


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
            log.warning("no GPU and no local weights for %s: %s. Set MOLMO_DEMO=0 to fail instead, "
                        "or point MOLMO_MODEL at downloaded weights.", settings.model, DEMO_BANNER)
            return str(ensure_demo_model(settings.cache_dir)), True
    return settings.model, is_demo_model(settings.model)


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


def load_options(settings: Settings, path: str, device: torch.device) -> dict:
    """What every in-process engine's loader takes from the settings, for ``path`` on ``device``."""
    return dict(
        revision=None if Path(path).is_dir() else settings.revision,
        device=device,
        dtype=pick_dtype(settings, device),
        max_new_tokens=settings.max_new_tokens,
        max_batch=settings.max_batch,
        model_id=settings.model,
    )


def _local_revision(path: Path) -> str:
    """A content hash of a local checkpoint's small files: stable while the checkpoint is."""
    digest = hashlib.sha256()
    # DEMO_MODEL.json: a retrained demo has the same config but another training record
    for name in sorted(["config.json", "model.safetensors.index.json", "generation_config.json", "DEMO_MODEL.json"]):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    weights = path / "model.safetensors"
    if weights.is_file():
        digest.update(str(weights.stat().st_size).encode())
    return digest.hexdigest()[:10]


def model_family(path_or_id: str, revision: str | None = None) -> str:
    """``model_type`` of a checkpoint's config.json, read without running any remote code."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path_or_id, revision=revision)
    return config.get("model_type", "unknown")


def load_local_engine(settings: Settings) -> Engine | list[Engine]:
    """The in-process engine for the checkpoint's family (picked from its config.json).

    ``model_type`` "molmo" (v1: Molmo-7B-D/-7B-O/MolmoE-1B/-72B-0924) runs through its own remote
    code in the molmo1 install profile (transformers 4.5x, requirements-molmo1.txt); anything else
    is Molmo2 on transformers 5 (requirements.txt). Each profile says plainly when it is the wrong one.
    """
    import transformers

    installed = transformers.__version__
    v1_profile = int(installed.split(".")[0]) < 5
    if v1_profile:
        # The demo model is a Molmo2, which transformers 4.x cannot build or run.
        no_local_weights = not weights_available_locally(settings.model, settings.revision)
        auto_demo = settings.demo == "auto" and not torch.cuda.is_available() and no_local_weights
        if settings.demo in ("1", "random") or auto_demo:
            raise ModelLoadError(
                f"the demo model is a Molmo2 and this is the molmo1 install profile (transformers "
                f"{installed}): point MOLMO_MODEL at Molmo v1 weights already downloaded (a local folder "
                f"or the Hugging Face cache) and set MOLMO_DEMO=0, or install requirements.txt for the demo"
            )
        path = settings.model
    else:
        path, _ = resolve_model(settings)
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
            from .molmo1_engine import Molmo1Engine
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
    engines = [TransformersEngine.from_settings(settings, device=device, path=path) for device in devices]
    return engines[0] if len(engines) == 1 else engines


class _TokenLogprobs(LogitsProcessor):
    """Records, at each step, the log-probability of the token greedy decoding is about to pick.

    Placed last in the processor list, it sees the scores generate() takes its argmax from."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)
        return scores


def cut_at_end(rows: list[list[int]], steps: list[torch.Tensor], ends: set[int]
               ) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's generated ids and their log-probabilities (as :class:`_TokenLogprobs` recorded
    them), up to (not including) the row's first end token."""
    logprobs = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
    cut = [next((i for i, token in enumerate(row) if token in ends), len(row)) for row in rows]
    return [row[:k] for row, k in zip(rows, cut)], [row[:k] for row, k in zip(logprobs, cut)]


def mean_probability(logprobs: Sequence[float]) -> float | None:
    """Mean probability of an answer's tokens: its score when no finer one is known."""
    return round(sum(math.exp(x) for x in logprobs) / len(logprobs), 4) if logprobs else None


class TransformersEngine(Engine):
    """Batched greedy generation with a loaded Molmo2 model and its processor."""

    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str,
        revision: str,
        max_new_tokens: int = 256,
        max_batch: int = 8,
        logits_processors: Sequence[LogitsProcessor] = (),
        decoder: str = "fast",
        cuda_graphs: bool = True,
        compile_step: bool = False,
        demo: bool = False,
    ):
        if decoder not in ("fast", "generate"):
            raise ValueError(f"decoder must be 'fast' or 'generate', not {decoder!r}")
        config = model.config
        if config.model_type != "molmo2":
            raise ModelLoadError(f"{model_id!r} is a {config.model_type!r} model; this engine runs Molmo2")
        self.model, self.processor = model.eval(), processor
        self.device, self.dtype = model.device, model.dtype
        self.model_id, self.revision, self.demo = model_id, revision, demo
        self.family = "molmo2"
        self.max_new_tokens, self.max_batch = max_new_tokens, max_batch
        self.logits_processors = list(logits_processors)
        self.decoder_name = decoder
        tokenizer = processor.tokenizer
        self._pad_id = tokenizer.pad_token_id
        self._eos_ids = set(_as_list(model.generation_config.eos_token_id) or [tokenizer.eos_token_id])
        self.decoder = GreedyDecoder(
            model, self._eos_ids, self._pad_id, use_cuda_graph=cuda_graphs,
            # only where it pays: a compiled step is captured as a CUDA graph, and only the fast
            # decoder's small batches use it
            compile_step=compile_step and cuda_graphs and decoder == "fast" and model.device.type == "cuda",
        )
        self._token_texts = TokenTexts(tokenizer)

    @classmethod
    def load(cls, model_path: str, *, revision: str | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, model_id: str | None = None, **options) -> "TransformersEngine":
        """``from_pretrained`` on a hub id or a local folder, as users run it."""
        started = time.monotonic()
        try:
            processor = AutoProcessor.from_pretrained(model_path, revision=revision)
            model = AutoModelForImageTextToText.from_pretrained(model_path, revision=revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {model_path!r}: {exc}") from exc
        model.to(torch.device(device))
        demo = is_demo_model(model_path)
        revision = (
            revision
            or (getattr(model.config, "_commit_hash", None) or "")[:10]
            or (_local_revision(Path(model_path)) if Path(model_path).is_dir() else "main")
        )
        engine = cls(model, processor, model_id=demo_name(model_path) if demo else (model_id or model_path),
                     revision=revision, demo=demo, **options)
        engine.warm_up()
        log.info(
            "model loaded",
            extra={
                "model": engine.model_id, "revision": engine.revision, "device": str(engine.device),
                "dtype": str(dtype).removeprefix("torch."), "demo": demo,
                "load_s": round(time.monotonic() - started, 2),
            },
        )
        return engine

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device | None = None, path: str | None = None,
                      **kwargs) -> "TransformersEngine":
        """The engine ``settings`` describe; ``path`` skips resolving MOLMO_MODEL/MOLMO_DEMO again."""
        path = path or resolve_model(settings)[0]
        device = device or pick_device(settings)
        return cls.load(
            path,
            **load_options(settings, path, device),
            decoder=settings.decoder,
            cuda_graphs=settings.cuda_graphs == "1",
            compile_step=settings.compile_step == "1",
            **kwargs,
        )

    def tokens_for(self, query: PointQuery) -> int:
        """The length of this query's cache row: its image's tokens (from the image size alone,
        as the processor will lay them out), the prompt suffix, and the new tokens."""
        return (self._image_tokens(query.image.height, query.image.width)
                + self._suffix_tokens(query.prompt) + self.max_new_tokens)

    def token_budget(self) -> int | None:
        """Cache tokens a batch may hold: KV_MEMORY_FRACTION of the GPU memory free now (the
        driver's free memory plus what torch's allocator holds unused). None on the CPU."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return kv_token_budget(free, self.decoder.kv_bytes_per_token)

    @lru_cache(maxsize=4096)
    def _image_tokens(self, height: int, width: int) -> int:
        try:
            sizes = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            return 1 + int(sizes.num_image_tokens[0])  # + the bos token before the image
        except Exception:  # noqa: BLE001 - a processor that cannot tell: assume a large image
            return FALLBACK_IMAGE_TOKENS

    @lru_cache(maxsize=1024)
    def _suffix_tokens(self, prompt: str) -> int:
        try:
            text = self.chat_suffix(prompt)
        except ValueError:  # a template without the image first (MOLMO_DECODER=generate): close enough
            text = self.chat_text(prompt)
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def warm_up(self) -> None:
        """Compile the small-batch decode step now (MOLMO_COMPILE), at start, so that no opened
        task waits for the compiler. A no-op when nothing is compiled."""
        if not self.decoder.compile_step:
            return
        log.info("compiling the decode step for opened tasks (torch.compile, once per start)")
        started = time.monotonic()
        image = Image.new("RGB", (640, 480), (128, 128, 128))
        self.generate([PointQuery(image, "Point to the dot."), PointQuery(image, "Point to the line.")])
        log.info("decode step ready", extra={"compiled": self.decoder.compile_step,
                                             "warm_up_s": round(time.monotonic() - started, 1)})

    @lru_cache(maxsize=1024)
    def chat_text(self, prompt: str) -> str:
        """The model's own chat template around one image and ``prompt``."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat_suffix(self, prompt: str) -> str:
        """The chat text after the image token: what differs between labels of one image."""
        text = self.chat_text(prompt)
        image_token = self.processor.image_token
        if not text.startswith(image_token):
            raise ValueError("the chat template does not put the image first; use MOLMO_DECODER=generate")
        return text[len(image_token):]

    def generate(self, queries: Sequence[PointQuery], between_steps=None) -> list[Answer]:
        if self.decoder_name == "generate":
            return self.generate_plain(queries)
        started = time.perf_counter()
        batch = prepare(self.processor, queries, self.chat_suffix, self.device)
        for chunk in batch.prefix_chunks:
            chunk["pixel_values"] = chunk["pixel_values"].to(self.dtype)
        if self.decoder.profile is not None:
            self.decoder.profile["prepare"] = self.decoder.profile.get("prepare", 0.0) + time.perf_counter() - started
        tokens, logprobs = self.decoder.run(batch, self.max_new_tokens, self.logits_processors, between_steps)
        return self._answers(tokens, logprobs)

    def generate_plain(self, queries: Sequence[PointQuery]) -> list[Answer]:
        """Hugging Face ``generate()`` on left-padded full prompts: the reference for the fast path."""
        inputs = self.processor(
            images=[[q.image] for q in queries],
            text=[self.chat_text(q.prompt) for q in queries],
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        recorder = _TokenLogprobs()
        with torch.inference_mode():
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([*self.logits_processors, recorder]),
            )
        ends = self._eos_ids | ({self._pad_id} if self._pad_id is not None else set())
        return self._answers(*cut_at_end(sequences[:, inputs["input_ids"].shape[1]:].tolist(), recorder.steps, ends))

    def _answers(self, tokens: list[list[int]], logprobs: list[list[float]]) -> list[Answer]:
        """Answers from each row's generated ids and their log-probabilities (end token cut off):
        the text, its mean token probability, and each token's piece of the text for per-point
        confidence (molmo_backend/confidence.py works on these, away from torch)."""
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [
            Answer(text=text.strip(), score=mean_probability(lp), tokens=self._token_texts.split(ids, text),
                   token_logprobs=tuple(lp))
            for text, ids, lp in zip(texts, tokens, logprobs)
        ]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
