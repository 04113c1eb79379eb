"""Molmo2 in this process, through Hugging Face transformers' Auto classes.

:class:`TransformersEngine` loads with ``from_pretrained`` on a hub id or a local folder, as users
run it; which checkpoint to load is decided above it (:mod:`.loading`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor

from molmo_backend.engine import fused_mlp, fused_norms, row_memory
from molmo_backend.engine import slots as cache_slots
from molmo_backend.engine.answer_seam import AnswerSeam
from molmo_backend.engine.base import Answer, PointQuery, Row, StepEngine, mean_probability
from molmo_backend.engine.decoding import SlotDecoder
from molmo_backend.engine.drafting import Drafting, settle
from molmo_backend.engine.inprocess import (
    ModelLoadError,
    load_options,
    local_revision,
    pick_device,
)
from molmo_backend.engine.plain_generate import plain_generate
from molmo_backend.engine.prefill import PreparedImage, prepare_image, with_features
from molmo_backend.engine.token_text import TokenTexts
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)


#: image tokens assumed when the processor cannot say (more than Molmo2's 8-crop maximum)
FALLBACK_IMAGE_TOKENS = 2048
#: prompt tokens after the image a cache slot leaves room for (the chat template around a label
#: takes about 25; a label's own ``prompt`` attribute may be longer)
SUFFIX_TOKENS = 128
DECODERS = ("fast", "generate")


class TransformersEngine(StepEngine):
    """Greedy Molmo2 with a loaded model and its processor.

    ``decoder``: ``fast`` (the default) keeps rows in cache slots and lets the scheduler run
    continuous batching over them (:mod:`.decoding`); ``generate`` is plain Hugging Face
    ``generate()``, the reference. (The previous engine, one padded batch until its longest answer
    ends, was removed: 8.21 vs 22.84 pairs/s realistic, 37.09 vs 38.91 fixed-40, H200, RESULTS.md.)"""

    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str,
        revision: str,
        max_new_tokens: int = 1024,
        max_batch: int = 8,
        logits_processors: Sequence[LogitsProcessor] = (),
        decoder: str = "fast",
        cuda_graphs: bool = True,
        compile_step: bool = False,
        triton_kernels: bool = False,
        draft: bool = False,
        demo: bool = False,
    ):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
        config = model.config
        if config.model_type != "molmo2":
            raise ModelLoadError(f"{model_id!r} is a {config.model_type!r} model; this engine runs Molmo2")
        self.model, self.processor = model.eval(), processor
        fused_norms.fuse(model)  # one kernel per RMS norm, for every path on this model
        self.fused_mlp = triton_kernels and fused_mlp.ON and fused_mlp.fuse(model)  # one SiLU-and-mul kernel
        self.device, self.dtype = model.device, model.dtype
        self.model_id, self.revision, self.demo, self.family = model_id, revision, demo, "molmo2"
        self.max_new_tokens, self.max_batch = max_new_tokens, max_batch
        self.logits_processors = list(logits_processors)
        self.decoder_name, self.stepwise = decoder, decoder == "fast"
        tokenizer = processor.tokenizer
        self.seam = AnswerSeam(tokenizer)  # forced answers, for tests and benchmarks only
        self._pad_id = tokenizer.pad_token_id
        self._eos_ids = set(_as_list(model.generation_config.eos_token_id) or [tokenizer.eos_token_id])
        self._token_texts = TokenTexts(tokenizer)
        self._lock = threading.Lock()  # the scheduler's worker and direct generate() callers
        # memo tables of its own (an lru_cache on a method keeps every engine alive, pool and all)
        self._image_tokens = lru_cache(maxsize=4096)(self._count_image_tokens)
        self._suffix_tokens = lru_cache(maxsize=1024)(self._count_suffix_tokens)
        self._suffix_ids = lru_cache(maxsize=1024)(self._tokenize_suffix)
        self.chat_text = lru_cache(maxsize=1024)(self._render_chat)
        self._prepare_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        #: :meth:`prepare` computes the vision features too; off, the packed step does
        self.features_ahead = True
        # only where it pays: a compiled step is captured as a CUDA graph
        steps = (cuda_graphs, compile_step and cuda_graphs and model.device.type == "cuda", triton_kernels)
        #: cache slots and their steps; None for ``generate`` (slots would take its memory)
        self.decoder = self._slot_decoder(*steps) if self.stepwise else None
        #: guessed tokens of pointing answers checked in decode steps (MOLMO_DRAFT; not with
        #: logits processors, which tests use to force answers)
        drafting = draft and self.stepwise and not self.logits_processors
        self.drafting = Drafting.for_tokenizer(tokenizer, self._token_texts.piece) if drafting else None

    def _slot_decoder(self, cuda_graphs: bool, compile_step: bool, triton_kernels: bool) -> SlotDecoder:
        """The cache pool: rows up to the longest this model can have (its largest image, a long
        prompt and the new-token cap); up to MOLMO_MAX_BATCH bulk rows (fewer where the pool holds
        fewer of a typical length), each taking what its own prompt and answer need, in the share
        of the free memory (the GPU's, or on the CPU the RAM) the pool may take."""
        length = cache_slots.round_up(
            self._largest_prefix() + SUFFIX_TOKENS + self.max_new_tokens + 1, cache_slots.LENGTH_STEP
        )
        bulk_tokens = cache_slots.bulk_pool_tokens(
            self.model.config.text_config, self.dtype, self.device, self.max_batch, length
        )
        self.max_batch = rows = cache_slots.bulk_rows_for(bulk_tokens, self.max_batch, length)
        log.info("cache pool", extra={"bulk_tokens": bulk_tokens, "bulk_rows": rows, "longest": length})
        return SlotDecoder(
            self.model,
            sorted(self._eos_ids),
            self._pad_id,
            bulk_slots=self.max_batch,
            max_length=length,
            bulk_tokens=bulk_tokens,
            use_cuda_graph=cuda_graphs,
            compile_step=compile_step,
            triton=triton_kernels,
        )

    def _largest_prefix(self) -> int:
        """The most prefix tokens (bos + image) an image can take, over aspect ratios 8:1 to 1:8."""
        sizes = [(4000, 4000 * w // h) for w, h in ((1, 1), (4, 3), (16, 9), (2, 1), (4, 1), (8, 1))]
        sizes += [(w, h) for h, w in sizes]
        return max(self._image_tokens(h, w) for h, w in sizes)

    @classmethod
    def load(
        cls,
        model_path: str,
        *,
        revision: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        model_id: str | None = None,
        demo: bool = False,
        **options,
    ) -> TransformersEngine:
        """``from_pretrained`` on a hub id or a local folder, as users run it. ``model_id`` (default
        ``model_path``) and ``demo`` are what it reports: the caller knows whether it is the demo
        model (molmo_backend.app.model_choice)."""
        started = time.monotonic()
        try:
            processor = AutoProcessor.from_pretrained(model_path, revision=revision)
            model = AutoModelForImageTextToText.from_pretrained(model_path, revision=revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {model_path!r}: {exc}") from exc
        model.to(torch.device(device))
        revision = (
            revision
            or (getattr(model.config, "_commit_hash", None) or "")[:10]
            or (local_revision(Path(model_path)) if Path(model_path).is_dir() else "main")
        )
        engine = cls(
            model, processor, model_id=model_id or model_path, revision=revision, demo=demo, **options
        )
        engine.warm_up()
        loaded = dict(model=engine.model_id, revision=engine.revision, device=str(engine.device))
        loaded |= dict(dtype=str(dtype).removeprefix("torch."), demo=demo, decoder=engine.decoder_name)
        loaded |= dict(bulk_rows=engine.max_batch, drafting=engine.drafting is not None)
        log.info("model loaded", extra=loaded | {"load_s": round(time.monotonic() - started, 2)})
        return engine

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        device: torch.device | None = None,
        path: str | None = None,
        *,
        model_id: str | None = None,
        **kwargs,
    ) -> TransformersEngine:
        """The engine ``settings`` describe, for ``path`` (default MOLMO_MODEL; the demo model's
        folder when molmo_backend.app.model_choice picks it, with its ``model_id`` and ``demo``)."""
        path = path or settings.model
        device = device or pick_device(settings)
        options = load_options(settings, path, device, whole_batches=settings.decoder != "fast")
        if model_id:
            options["model_id"] = model_id
        return cls.load(
            path,
            **options,
            decoder=settings.decoder,
            cuda_graphs=settings.cuda_graphs == "1",
            compile_step=settings.compile_step == "1",
            triton_kernels=settings.triton_kernels == "1",
            draft=settings.draft == "1",
            **kwargs,
        )

    # -- sizes ---------------------------------------------------------------------------------
    def tokens_for(self, query: PointQuery) -> int:
        """The length of this query's cache row: its image's tokens (from the image size alone,
        as the processor will lay them out), the prompt suffix, and the new tokens."""
        return self.prefill_cost(query) + self.max_new_tokens

    def prefill_cost(self, query: PointQuery) -> int:
        return self._image_tokens(query.image.height, query.image.width) + self._suffix_tokens(query.prompt)

    def _count_image_tokens(self, height: int, width: int) -> int:
        try:
            sizes = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            return 1 + int(sizes.num_image_tokens[0])  # + the bos token before the image
        except Exception:  # noqa: BLE001 - a processor that cannot tell: assume a large image
            return FALLBACK_IMAGE_TOKENS

    def _count_suffix_tokens(self, prompt: str) -> int:
        try:
            return len(self._suffix_ids(prompt))
        except ValueError:  # a template without the image first (MOLMO_DECODER=generate): close enough
            return len(
                self.processor.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"]
            )

    def _tokenize_suffix(self, prompt: str) -> tuple[int, ...]:
        ids = self.processor.tokenizer(self.chat_suffix(prompt), add_special_tokens=False)["input_ids"]
        return tuple(ids)

    def warm_up(self) -> None:
        """At start: compile the opened tasks' decode step (MOLMO_COMPILE), then capture every
        decode step's CUDA graph (~8 s for Molmo2-8B on an H100), as the benchmarks run it, so
        that no request waits for a compile or a capture, and no capture runs beside the
        preparation threads' GPU work."""
        if self.decoder is None:
            return
        started = time.monotonic()
        if self.decoder.compile_step:
            log.info("compiling the decode step for opened tasks (torch.compile, once per start)")
            image = Image.new("RGB", (640, 480), (128, 128, 128))
            self.generate(
                [PointQuery(image, "Point to the dot."), PointQuery(image, "Point to the line.")],
                interactive=True,
            )
        captured = self.decoder.capture_graphs()
        if self.decoder.compile_step or captured:
            ready = {"compiled": self.decoder.compile_step, "graphs": captured}
            log.info("decode steps ready", extra=ready | {"warm_up_s": round(time.monotonic() - started, 1)})

    def _render_chat(self, prompt: str) -> str:
        """The model's own chat template around one image and ``prompt`` (as :attr:`chat_text`)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat_suffix(self, prompt: str) -> str:
        """The chat text after the image token: what differs between labels of one image."""
        text = self.chat_text(prompt)
        image_token = self.processor.image_token
        if not text.startswith(image_token):
            raise ValueError("the chat template does not put the image first; use MOLMO_DECODER=generate")
        return text[len(image_token) :]

    # -- whole batches -------------------------------------------------------------------------
    def generate(self, queries: Sequence[PointQuery], interactive: bool = False) -> list[Answer]:
        if self.decoder_name == "generate":
            return self.generate_plain(queries)
        return super().generate(queries, interactive=interactive)

    def generate_plain(self, queries: Sequence[PointQuery]) -> list[Answer]:
        """Hugging Face ``generate()``: the reference for the fast path (:mod:`.plain_generate`)."""
        return plain_generate(self, queries)

    # -- rows in slots (StepEngine) -------------------------------------------------------------
    def free_slots(self, interactive: bool) -> int:
        with self._lock:
            return self.decoder.free_slots(interactive)

    def prepare(self, query: PointQuery) -> PreparedImage:
        """The processor's work for this query's image and its vision features
        (``features_ahead``); its prompt's token ids (cached). Runs on the scheduler's
        preparation threads ahead of the worker; on CUDA in a stream of its own, finished
        before it returns, so the worker can use the tensors at once: the vision tower then
        runs beside the worker's decode steps, whose small kernels leave much of the GPU idle,
        instead of inside its packed steps."""
        self._suffix_ids(query.prompt)
        if self.device.type != "cuda":
            return self._prepare_image(query.image, None)
        with torch.cuda.device(self.device), torch.cuda.stream(self._prepare_stream):
            prepared = self._prepare_image(query.image, self.device)
            self._prepare_stream.synchronize()
        return prepared

    @torch.inference_mode()
    def _prepare_image(self, image, device) -> PreparedImage:
        prepared = prepare_image(self.processor, image, device)
        return with_features(self.model, prepared, self.dtype) if self.features_ahead else prepared

    def prefill(self, rows: Sequence[Row]) -> None:
        self.step(rows, ())

    def step(self, admit: Sequence[Row], decode: Sequence[Row]) -> None:
        """Admit ``admit`` and advance ``decode`` by one token in one packed forward. A row
        admitted when no free run holds its prompt is handed back (``requeue``); a decoding row
        whose run cannot grow now waits for this step."""
        started = time.perf_counter()
        images, image_of = self._prepared_images(admit)
        suffixes = [list(self._suffix_ids(row.query.prompt)) for row in admit]
        for suffix, image in zip(suffixes, image_of):
            if images[image].length + len(suffix) + 2 > self.decoder.max_length:
                raise ValueError(f"the prompt is too long: {len(suffix)} tokens after the image")
        if self.decoder.profile is not None:
            profile = self.decoder.profile
            profile["prepare"] = profile.get("prepare", 0.0) + time.perf_counter() - started
        with self._lock:
            slots = []
            try:
                prompts = [images[image].length + len(suffix) for suffix, image in zip(suffixes, image_of)]
                kept, slots = row_memory.take_runs(self.decoder, admit, prompts)
                if len(kept) < len(admit):
                    admit = kept
                    images, image_of = self._prepared_images(admit)
                    suffixes = [list(self._suffix_ids(row.query.prompt)) for row in admit]
                decode = row_memory.with_room(self.decoder, decode)
                if not admit and not decode:
                    return
                states, tokens, logprobs, next_tokens, next_logprobs = self.decoder.step(
                    images,
                    image_of,
                    slots,
                    suffixes,
                    [row.state for row in decode],
                    [row.tokens for row in decode],
                    self.logits_processors,
                )
            except BaseException:
                self.decoder.release(slots)
                raise
            for row, state in zip(admit, states):
                row.slot, row.state = state.slot, state
            rows, picks = [*admit, *decode], [[token] for token in [*tokens, *next_tokens]]
            kept = self._settle(rows, picks, [[lp] for lp in [*logprobs, *next_logprobs]], [[]] * len(rows))
        self._keep(rows, kept)

    def _prepared_images(self, rows: Sequence[Row]) -> tuple[list[PreparedImage], list[int]]:
        """Each distinct image of ``rows`` prepared once (ahead on a CPU thread where the scheduler
        started it), and which of them each row shows."""
        images: list[PreparedImage] = []
        index_of: dict = {}
        image_of = []
        for row in rows:
            key = row.query.image_key if row.query.image_key is not None else id(row.query.image)
            if key not in index_of:
                index_of[key] = len(images)
                ready = row.prepared.result() if isinstance(row.prepared, Future) else None
                device = self.device if self.device.type == "cuda" else None
                images.append(ready or prepare_image(self.processor, row.query.image, device))
            image_of.append(index_of[key])
        return images, image_of

    def decode(self, rows: Sequence[Row]) -> None:
        """One token for each row that has room for it (the others wait for memory; if none has
        room, the youngest rows are handed back until one has), more where the step confirms
        tokens the point format guessed (``drafting``)."""
        with self._lock:
            if not (stepping := row_memory.with_room(self.decoder, rows)):
                stepping = row_memory.evict_for_room(self.decoder, rows)
            states = [row.state for row in stepping]
            guesses = self.drafting.guesses(self.decoder, states) if self.drafting else [[]] * len(states)
            tokens = [row.tokens for row in stepping]
            picks, logprobs = self.decoder.decode(states, tokens, self.logits_processors, guesses)
            kept = self._settle(stepping, picks, logprobs, guesses)
        self._keep(stepping, kept)

    def _settle(self, rows, picks, logprobs, guesses) -> list[list[tuple[int, float]]]:
        """Each row's tokens of a step (caller holds the lock): its picks, steered where its answer
        is forced, up to the first that differs from its guess."""
        steered = [row.query.answer_text is not None for row in rows]
        if not any(steered) and not any(guesses):  # one token a row, the model's: the usual step
            return [[(row_picks[0], lps[0])] for row_picks, lps in zip(picks, logprobs)]
        picks = [self.seam.steer(row, row_picks) for row, row_picks in zip(rows, picks)]
        return settle(self.decoder, [row.state for row in rows], guesses, picks, logprobs, steered)

    def _keep(self, rows: Sequence[Row], kept: list[list[tuple[int, float]]]) -> None:
        for row, tokens in zip(rows, kept):
            for token, logprob in tokens:
                if not row.finished:
                    self._record(row, token, logprob)

    def _record(self, row: Row, token: int, logprob: float) -> None:
        """Keep the row's new token; decide whether the row has ended."""
        forced = self.seam.length(row.query)
        if forced is None and token in self._eos_ids:
            row.finished = True  # the end token itself is not part of the answer
            return
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if self.drafting:
            self.drafting.feed(row.state, token)
        # the row's length once this token is in its slot (a step may have taken several)
        length = len(row.state.prompt_ids) + len(row.tokens)
        if forced is not None and len(row.tokens) >= forced:
            row.finished = True
        elif (forced is None and len(row.tokens) >= self.max_new_tokens) or length >= self.decoder.max_length:
            row.finished = row.truncated = True

    def answer(self, row: Row) -> Answer:
        return self._answers([row.tokens], [row.logprobs], [row.truncated])[0]

    def release(self, rows: Sequence[Row]) -> None:
        with self._lock:
            held = [row for row in rows if row.slot >= 0]
            self.decoder.release([row.slot for row in held])
            for row in held:
                row.slot = -1

    def _answers(
        self, tokens: list[list[int]], logprobs: list[list[float]], truncated: list[bool]
    ) -> list[Answer]:
        """Answers from each row's generated ids and their log-probabilities (end token cut off):
        the text, its mean token probability, and each token's piece of the text for per-point
        confidence (molmo_backend/pointing/confidence.py works on these, away from torch)."""
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [
            Answer(
                text=text.strip(),
                score=mean_probability(lp),
                tokens=self._token_texts.split(ids, text),
                token_logprobs=tuple(lp),
                truncated=cut,
            )
            for text, ids, lp, cut in zip(texts, tokens, logprobs, truncated)
        ]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
