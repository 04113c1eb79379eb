"""Force chosen answers through real ``generate()`` *with chosen token probabilities*.

:class:`tests.support.forcing.ForceAnswers` gives every forced token probability 1. Confidence
tests need less: here an answer is ``(text, {char_index: p})``, and the token that spells
character ``char_index`` of ``text`` is emitted with probability ``p`` (the rest of the mass is
spread over other tokens, each below ``p``, so greedy decoding still picks the forced one).
``p`` must be above 0 and at most 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from tests.support.forcing import ForceAnswers, by_substring  # noqa: F401 (re-exported)

Spec = str | tuple[str, Mapping[int, float]]


class ForceScoredAnswers(ForceAnswers):
    """``spec_for(prompt) -> Spec or None`` (None: leave the row alone)."""

    def __init__(self, tokenizer, spec_for: Callable[[str], Spec | None]):
        self._probs: dict[tuple[int, ...], list[float]] = {}

        def answer_for(prompt: str) -> str | None:
            spec = spec_for(prompt)
            if spec is None:
                return None
            text, probs = (spec, {}) if isinstance(spec, str) else spec
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"]) + [tokenizer.eos_token_id]
            per_token = [1.0] * len(ids)
            for char, p in probs.items():
                if not 0 < p <= 1:
                    raise ValueError(f"probability {p} out of (0, 1]")
                hits = [k for k, (a, b) in enumerate(encoded["offset_mapping"]) if a <= int(char) < b]
                if not hits:
                    raise ValueError(f"no token spells character {char} of {text!r}")
                per_token[hits[0]] = p
            self._probs[tuple(ids)] = per_token
            return text

        super().__init__(tokenizer, answer_for)

    def _force(self, row_scores: torch.FloatTensor, forced: list[int], done: int) -> None:
        """The next forced token at its chosen probability, the rest spread thinner over others."""
        p = self._probs.get(tuple(forced), [])[done] if done < len(forced) else 1.0
        if p >= 1.0:
            return super()._force(row_scores, forced, done)
        token = forced[done]
        k = math.floor((1 - p) / p) + 1  # each of k others gets (1 - p) / k < p
        others = [i for i in range(min(row_scores.shape[0], k + 1)) if i != token][:k]
        row_scores[token] = math.log(p)
        row_scores[others] = math.log((1 - p) / k)


def at(text: str, marker: str, p: float, offset: int = 0) -> dict[int, float]:
    """``{index of marker in text + offset: p}``: e.g. ``at(answer, " 2 750", 0.3, 1)`` is the
    character "2" that starts the second point."""
    index = text.index(marker)
    return {index + offset: p}
