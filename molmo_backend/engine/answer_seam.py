"""The test and benchmark seam that forces answers on random weights (never used by the backend).

Random weights answer garbage of arbitrary length, so a query may say what its answer is:

- ``PointQuery.answer_tokens`` (or the engine-wide :attr:`AnswerSeam.answer_tokens`): the answer
  is exactly that many of the model's own tokens (end tokens do not stop it);
- ``PointQuery.answer_text``: the answer is this text's tokens (the tokenizer's), in order. At
  each step the engine takes the text's next token in place of the model's pick and feeds it
  back as the next input, so the rows' keys and values, their lengths and the decode steps are
  those of a model that answered this text. That is what lets guessed tokens (``MOLMO_DRAFT``,
  :mod:`.drafting`) be confirmed on random weights. Log-probabilities stay the model's own picks'.

Nothing else changes: the same prefill, slots, CUDA graphs and scheduling run.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from molmo_backend.engine.base import PointQuery, Row


class AnswerSeam:
    """An engine's forced answers: their lengths, and the tokens that replace the model's picks."""

    def __init__(self, tokenizer):
        #: when set, every query without its own ``answer_tokens`` or ``answer_text`` generates
        #: exactly this many tokens; None in production
        self.answer_tokens: int | None = None
        self._ids = lru_cache(maxsize=4096)(
            lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))
        )

    def length(self, query: PointQuery) -> int | None:
        """The forced answer's length in tokens, or None (the model's answer)."""
        if query.answer_text is not None:
            return len(self._ids(query.answer_text))
        return query.answer_tokens or self.answer_tokens

    def steer(self, row: Row, picks: Sequence[int]) -> list[int]:
        """``picks`` (the model's, for the row's next tokens) with the forced text's in their place."""
        if row.query.answer_text is None:
            return list(picks)
        ids, done = self._ids(row.query.answer_text), len(row.tokens)
        return [ids[done + j] if done + j < len(ids) else pick for j, pick in enumerate(picks)]
