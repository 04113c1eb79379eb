"""Force chosen answers through the real ``generate()`` of a random-weight model.

A random Molmo2 prints garbage; tests that need known points pick the answer per prompt and this
LogitsProcessor makes greedy decoding emit exactly its tokens, then the end token.
"""

from __future__ import annotations

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
