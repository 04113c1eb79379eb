"""The engine interface: images and prompt strings in, answer strings out.

An engine knows nothing of Label Studio; the backend knows nothing of torch. Engines run one
batch at a time and may raise (out of memory, a bad image): the scheduler in front of them owns
batching, priorities and retries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Hashable, Sequence

from PIL import Image


@dataclass(frozen=True, eq=False)
class PointQuery:
    """One (image, prompt) pair. Queries with the same ``image_key`` show the same image, so an
    engine may encode that image once for all of them."""

    image: Image.Image
    prompt: str
    image_key: Hashable | None = None


@dataclass(frozen=True)
class Answer:
    """What the model said to one query.

    ``tokens`` and ``token_logprobs`` are the raw material for per-point confidence (see
    :mod:`molmo_backend.confidence` and docs/confidence.md): each generated token's share of the
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

    @abstractmethod
    def generate(self, queries: Sequence[PointQuery]) -> list[Answer]:
        """Answer every query, in order. May raise; then no answer of the batch is valid.

        An engine whose ``generate`` also takes ``between_steps`` (a callable) calls it between
        its steps; the scheduler uses that to run an opened task inside a long bulk batch."""

    def tokens_for(self, query: PointQuery) -> int:
        """Cache tokens one query's row needs (prompt plus new tokens); 0 when unknown. A batch
        holds ``len(batch) * max(tokens_for)`` of them, rows being padded to the longest."""
        return 0

    def token_budget(self) -> int | None:
        """Most cache tokens one batch may hold now (from free GPU memory), or None: no limit
        but ``max_batch``. Asked each time a batch is formed."""
        return None

    def close(self) -> None:  # pragma: no cover - optional
        """Free the model's memory."""
