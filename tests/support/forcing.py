"""Force chosen answers through the real ``generate()`` of a random-weight model.

A random Molmo2 prints garbage; tests that need known points pick the answer per prompt and a
LogitsProcessor here makes greedy decoding emit exactly its tokens, then the end token:

- :class:`ForceAnswers`: every forced token with probability 1;
- :class:`ForceScoredAnswers`: chosen tokens with chosen probabilities (for confidence scores);
  :func:`at` names the character whose token gets a probability;
- :func:`by_substring` (alias :data:`by_label`): pick the answer whose key occurs in the prompt.

tests/support/forced_backend.py puts them into the server and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from transformers import LogitsProcessor

T = TypeVar("T")


class ForceAnswers(LogitsProcessor):
    """``answer_for(prompt) -> answer text or None`` (None: leave the row alone)."""

    def __init__(self, tokenizer, answer_for: Callable[[str], str | None]):
        self.tokenizer = tokenizer
        self.answer_for = answer_for
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos = tokenizer.eos_token_id
        self.assistant_len = len(tokenizer("assistant\n", add_special_tokens=False).input_ids)
        self._cache: dict[tuple, list[int] | None] = {}

    def _plan(self, row: list[int]) -> tuple[list[int] | None, int]:
        """(forced answer tokens for this row, how many of them are already generated)."""
        starts = [i for i, t in enumerate(row) if t == self.im_start]
        user_start, answer_start = starts[-2], starts[-1] + 1 + self.assistant_len
        prompt_ids = tuple(row[user_start:answer_start])
        if prompt_ids not in self._cache:
            text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
            prompt = text.split("user\n", 1)[-1].split("<|im_end|>", 1)[0]
            answer = self.answer_for(prompt)
            ids = (
                None
                if answer is None
                else self.tokenizer(answer, add_special_tokens=False).input_ids + [self.eos]
            )
            self._cache[prompt_ids] = ids
        return self._cache[prompt_ids], len(row) - answer_start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for b, row in enumerate(input_ids.tolist()):
            forced, done = self._plan(row)
            if forced is not None:
                scores[b, :] = float("-inf")
                self._force(scores[b], forced, done)
        return scores

    def _force(self, row_scores: torch.FloatTensor, forced: list[int], done: int) -> None:
        """Make the next forced token (the end token once the answer is out) the only choice."""
        row_scores[forced[done] if done < len(forced) else self.eos] = 0.0


def by_substring(answers: Mapping[str, T]) -> Callable[[str], T | None]:
    """Pick the value whose key (a label, a prompt fragment) occurs in the prompt, longest key first."""
    ordered = sorted(answers, key=len, reverse=True)

    def answer_for(prompt: str) -> T | None:
        for key in ordered:
            if key in prompt:
                return answers[key]
        return None

    return answer_for


#: answers per label: ``by_label({"cat": "<points ...>"})``
by_label = by_substring


# -- answers with chosen token probabilities -------------------------------------------------------
#
# ForceAnswers gives every forced token probability 1. Confidence tests need less: here an answer
# is ``(text, {char_index: p})``, and the token that spells character ``char_index`` of ``text`` is
# emitted with probability ``p`` (the rest of the mass is spread over other tokens, each below
# ``p``, so greedy decoding still picks the forced one). ``p`` must be above 0 and at most 1.

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
