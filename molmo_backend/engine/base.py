"""The engine interfaces: images and prompt strings in, answer strings out.

An engine knows nothing of Label Studio; the backend knows nothing of torch. Two kinds:

- :class:`Engine` answers whole batches (``generate``): the remote OpenAI-compatible engine,
  Molmo v1, plain Hugging Face ``generate()``.
- :class:`StepEngine` (the in-process Molmo2 engine) also exposes one decode step at a time over
  rows held in cache slots, so the scheduler can run continuous batching: it owns the loop,
  admits waiting rows into free slots between two steps (opened tasks first) and takes finished
  rows out at once. The engine never calls back into the scheduler.

Engines may raise (out of memory, a bad image): the scheduler in front of them owns batching,
priorities and retries.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True, eq=False)
class PointQuery:
    """One (image, prompt) pair. Queries with the same ``image_key`` show the same image, so an
    engine may encode that image once for all of them.

    ``answer_tokens`` and ``answer_text`` are a benchmark and test seam for random-weight models,
    whose answers are garbage of arbitrary length: the step engine then generates exactly that
    many tokens for this query (end tokens do not stop it), or this text's tokens, and stops
    (engine/answer_seam.py). Nothing else changes: the same prefill, slots, CUDA graphs and
    scheduling run. Never set by the backend."""

    image: Image.Image
    prompt: str
    image_key: Hashable | None = None
    answer_tokens: int | None = None
    answer_text: str | None = None


@dataclass(frozen=True)
class Answer:
    """What the model said to one query.

    ``tokens`` and ``token_logprobs`` are the raw material for per-point confidence (see
    :mod:`molmo_backend.pointing.confidence` and docs/confidence.md): each generated token's share of the
    decoded text and the log-probability greedy decoding gave it. They are kept as text pieces,
    not ids, so that pure code can find which tokens spell which point without a tokenizer.
    Engines that cannot see token probabilities (the remote engine, Molmo v1, plain
    ``generate()``) leave them empty; points then fall back to ``score``.
    """

    text: str
    #: mean probability of the generated tokens (greedy), or None when the engine has none
    score: float | None = None
    #: set when this query could not be answered; ``text`` is then empty
    error: str | None = None
    #: each generated token's text, end token excluded; ``"".join(tokens)`` is ``text`` before
    #: ``strip()``. Empty when the engine gives no per-token data.
    tokens: tuple[str, ...] = ()
    #: natural-log probability of each of ``tokens`` (the greedy pick, after logits processors)
    token_logprobs: tuple[float, ...] = ()
    #: True when generation stopped at the new-token cap rather than at an end token: the answer
    #: may be cut (points past the cap are lost), so callers log and count it
    truncated: bool = False


def mean_probability(logprobs: Sequence[float]) -> float | None:
    """Mean probability of an answer's tokens: its score when no finer one is known."""
    return round(sum(math.exp(x) for x in logprobs) / len(logprobs), 4) if logprobs else None


class Engine(ABC):
    """A model that answers batches of point queries."""

    #: what the model is, for model_version and logs (e.g. "allenai/Molmo2-4B")
    model_id: str
    #: checkpoint revision or content hash; part of model_version
    revision: str
    #: "molmo2" or "molmo" (v1): decides the prompt phrasing and the answer parser
    family: str = "molmo2"
    #: most queries that one call of :meth:`generate` should be given
    max_batch: int = 8
    #: True for engines the scheduler drives one decode step at a time (:class:`StepEngine`)
    stepwise: bool = False

    @abstractmethod
    def generate(self, queries: Sequence[PointQuery]) -> list[Answer]:
        """Answer every query, in order. May raise; then no answer of the batch is valid."""

    def tokens_for(self, query: PointQuery) -> int:
        """Cache tokens one query's row needs (prompt plus new tokens); 0 when unknown. A batch
        holds ``len(batch) * max(tokens_for)`` of them, rows being padded to the longest."""
        return 0

    def token_budget(self) -> int | None:
        """Most cache tokens one batch may hold now (from free GPU memory), or None: no limit
        but ``max_batch``. Asked each time a batch is formed."""
        return None

    def close(self) -> None:  # noqa: B027 (optional: most engines free nothing)  # pragma: no cover
        """Free the model's memory."""


@dataclass(eq=False)
class Row:
    """One query living in a cache slot of a :class:`StepEngine`, from admission to its end.

    The scheduler creates it and reads ``finished``; the engine fills the rest. ``ticket`` is the
    scheduler's own handle (which job, which index), opaque to the engine."""

    query: PointQuery
    interactive: bool
    ticket: Any = None
    #: the cache slot, set by :meth:`StepEngine.prefill`
    slot: int = -1
    #: generated token ids and their log-probabilities so far
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    #: set by the engine once the row has ended (end token, the cap, or ``answer_tokens``)
    finished: bool = False
    truncated: bool = False
    #: the engine's :meth:`StepEngine.prepare` of this query, started ahead on a CPU thread
    #: (a Future), or None
    prepared: Any = None
    #: set by the scheduler when a step failed for this row; it then ends with that error
    error: BaseException | None = None
    #: engine-private state (its slot's bookkeeping); the scheduler never reads it
    state: Any = None
    #: set by the engine when it gave the row's cache memory back before the row ended (memory
    #: ran short): the row holds no slot and must be admitted again from its prompt
    requeue: bool = False


class StepEngine(Engine):
    """An engine whose rows live in cache slots and advance one token per :meth:`decode`.

    The scheduler calls, from one thread per engine: :meth:`free_slots` to see room,
    :meth:`step` to admit rows (their image prefix once per distinct image, then each prompt
    suffix, which yields each row's first token) while the running rows it chooses take their
    next token, :meth:`decode` for one token of the rows it chooses when none is admitted,
    :meth:`answer` for a finished row, and :meth:`release` to free its slot.
    ``generate`` (answer a batch from start to end) is built from the same calls, so both paths
    give the same answers."""

    stepwise = True

    def generate(self, queries: Sequence[PointQuery], interactive: bool = False) -> list[Answer]:
        """Answer ``queries`` alone, by the same prefill and decode steps the scheduler runs
        (tests and benchmarks compare the two). Raises if a step fails."""
        rows = [Row(q, interactive) for q in queries]
        waiting, running = list(rows), []
        try:
            while waiting or running:
                free = self.free_slots(interactive)
                if waiting and free:
                    admitted, waiting = waiting[:free], waiting[free:]
                    self.prefill(admitted)
                    running += admitted
                requeued = [row for row in running if row.requeue]
                for row in requeued:  # handed back for lack of memory: they start again
                    fresh = Row(row.query, interactive)
                    rows = [fresh if r is row else r for r in rows]
                    waiting.insert(0, fresh)
                running = [row for row in running if not row.requeue]
                ended = [row for row in running if row.finished]
                self.release(ended)
                running = [row for row in running if not row.finished]
                if running:
                    self.decode(running)
        finally:
            self.release([row for row in rows if row.slot >= 0])
        return [self.answer(row) for row in rows]

    @abstractmethod
    def free_slots(self, interactive: bool) -> int:
        """Slots free for new rows of that class (opened tasks have slots of their own, so a
        full bulk pool never makes an opened task wait)."""

    @abstractmethod
    def prefill_cost(self, query: PointQuery) -> int:
        """Tokens the prefill of this query's image and prompt computes (its image counted once
        per distinct image by the caller); the scheduler bounds a step's prefill by these."""

    def prepare(self, query: PointQuery) -> None:
        """Work for a query's image that may run ahead of :meth:`prefill` on another thread
        (image tensors, tokenization, on a GPU its vision features); the scheduler runs it once
        per image of a job, for all the queries that show it. Thread-safe; optional."""

    @abstractmethod
    def prefill(self, rows: Sequence[Row]) -> None:
        """Admit ``rows`` into free slots of their class and compute each one's first token.
        Raises if anything fails; then none of ``rows`` holds a slot."""

    def step(self, admit: Sequence[Row], decode: Sequence[Row]) -> None:
        """Admit ``admit`` (as :meth:`prefill`) and advance ``decode`` (running rows) by one token.
        An engine that can do both in one forward overrides this, so decoding rows ride along
        with a prefill instead of waiting for it. Raises if anything fails; then none of
        ``admit`` holds a slot and ``decode`` has not advanced."""
        self.prefill(admit)
        if decode:
            self.decode(decode)

    @abstractmethod
    def decode(self, rows: Sequence[Row]) -> None:
        """One more token for each of ``rows`` (all admitted, none finished); sets ``finished``
        on the rows that ended."""

    @abstractmethod
    def answer(self, row: Row) -> Answer:
        """The answer of a finished row."""

    @abstractmethod
    def release(self, rows: Sequence[Row]) -> None:
        """Free the slots of ``rows`` (finished, failed or dropped)."""
