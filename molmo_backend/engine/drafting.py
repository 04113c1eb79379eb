"""Guessed tokens of pointing answers, checked in the decode step (``MOLMO_DRAFT``).

A decode step of a few rows (an opened task's; the end of a bulk job, where the long answers
finish with few others) costs about what reading the model's weights costs, whatever it
computes. Molmo2's point format fixes several tokens of every point (:mod:`.point_drafts`: the
spaces, the ids, most often the first digit of x). Such guessed tokens ride in the same step as
more entries of their row's slot, each at its own position, so one step can confirm several
tokens of a row. The model's greedy pick decides every token: a row keeps its picks up to the
first that differs from its guess, which is exactly what one token a step would have made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from molmo_backend.engine.point_drafts import PointDraft, accepted

log = logging.getLogger(__name__)

#: most guessed tokens a row checks in one step: after a y, " 12 4" (the space, a two-digit id, the
#: space, x's first digit) is five; in the model of bench/tail_model.py 6 makes the realistic job
#: 0.904x mean_length, 4 0.896x
GUESSES = 6
#: steps of up to this many rows check guesses; a larger step is no longer mostly the weights' read
MOST_ROWS = 64
#: a pointing answer's numbers, to check that the tokenizer writes them a character a token
SAMPLE = "1 1 461 527 2 1000 0"


class Drafting:
    """Guesses for the rows of decode steps, and which of the picks each row keeps."""

    def __init__(self, token_of: dict[str, int], piece: Callable[[int], str]):
        self.token_of = token_of  # the token id of each digit and of the space
        self.piece = piece  # a token id's text

    @classmethod
    def for_tokenizer(cls, tokenizer, piece: Callable[[int], str]) -> Drafting | None:
        """Drafting for this tokenizer, or None (logged) where it does not write each digit and
        each space between numbers as a token of its own, as Molmo2's (Qwen3's) does."""
        token_of = {}
        for char in "0123456789 ":
            ids = tokenizer.encode(char, add_special_tokens=False)
            if len(ids) != 1:
                break
            token_of[char] = ids[0]
        sample = tokenizer.encode(SAMPLE, add_special_tokens=False)
        if len(token_of) < 11 or sample != [token_of[c] for c in SAMPLE]:
            log.info("no guessed tokens: this tokenizer does not write a digit a token (MOLMO_DRAFT)")
            return None
        return cls(token_of, piece)

    def feed(self, state, token: int) -> None:
        """The row (its decoder state) took ``token``."""
        if state.draft is None:
            state.draft = PointDraft()
        state.draft.feed(self.piece(token))

    def guesses(self, decoder, states: Sequence) -> list[list[int]]:
        """Each row's guessed token ids for its next step of ``decoder`` (the decoder's row
        states, of one region): as many as its run holds after its next token and as the
        region's step list has entries to spare, shared out between the rows; none in a step
        of too many rows to gain."""
        if not states or len(states) > MOST_ROWS:
            return [[] for _ in states]
        interactive = decoder.space.interactive(states[0].slot)
        left = (decoder.interactive_slots if interactive else decoder.bulk_slots) - len(states)
        each = max(1, left // len(states))  # the spare entries shared out
        out = []
        for state in states:
            room = min(decoder.space.capacity(state.slot), decoder.max_length - 1) - state.length - 1
            draft = state.draft
            text = draft.guess(min(GUESSES, each, room, left)) if draft is not None else ""
            left -= len(text)
            out.append([self.token_of[char] for char in text])
        return out


def settle(decoder, states, guesses, picks, logprobs, steered) -> list[list[tuple[int, float]]]:
    """Each row's tokens of a decode step (its picks up to the first that differs from its guess)
    with their log-probabilities; tells the decoder where the rows with guesses now are, and
    the next input of the ``steered`` rows (whose picks are not the model's: :mod:`.answer_seam`)."""
    kept, guessed, more, last = [], [], [], []
    for state, guess, pick, logprob, steer in zip(states, guesses, picks, logprobs, steered):
        count = accepted(guess, pick)
        kept.append(list(zip(pick[: count + 1], logprob[: count + 1])))
        if guess or steer:
            guessed.append(state)
            more.append(count)
            last.append(pick[count])
    if guessed:
        decoder.settle(guessed, more, last)
    return kept
