"""Guesses of the next tokens of a Molmo2 pointing answer, from its format alone (pure logic).

Molmo2 writes the points of an image as ``<points coords="1 1 461 527 2 481 521">cat</points>``:
the image's index, then (point id, x, y) triples. allenai/molmo2's point formatter
(``olmo/preprocessing/point_formatter.py``, ``UnifiedPointFormatter``) writes every coordinate on
a 0-1000 scale as ``%03d`` (three digits, 1000 alone has four), numbers the points from 1, and
sorts them by x, then y. Its text model (Qwen3) makes each digit and each space before a digit a
token of its own, so a point is about 10 tokens and several of them follow from the format:

- the space after x's third digit;
- after y's third digit, the space, the next point's id and the space after it;
- the first digit of the next x, most often the same as this x's (the points are sorted by x).

A crowd of 40 points is about 420 tokens, of which these guesses are about 200. The engine
checks a guess in the decode step (:mod:`.drafting`): the model's own greedy pick decides every
token, a guess only lets the step confirm several at once. So a wrong guess costs a little
work, never a different answer.

:class:`PointDraft` follows one answer a character at a time and says what it expects next as
a string of digits and spaces (each one token).
"""

from __future__ import annotations

from collections.abc import Sequence

#: what opens a Molmo2 point list
OPENING = 'coords="'
#: digits of a coordinate on the 0-1000 scale as the formatter writes it (%03d)
COORDINATE_DIGITS = 3
DIGITS = frozenset("0123456789")


class PointDraft:
    """The format's expectation of one answer's next characters; :meth:`feed` it the answer's
    text as it is generated, ask :meth:`guess` before each step."""

    def __init__(self) -> None:
        self._recent = ""  # the last characters outside a point list, to find its opening
        self._inside = False  # between ``coords="`` and its closing quote
        self._numbers = 0  # whole numbers read in this list (the image index is the first)
        self._current = ""  # digits of the number being written
        self._last_id = 0  # the id of the point being written (or of the last one)
        self._last_x = ""  # the last whole x coordinate of this list

    def feed(self, text: str) -> None:
        for char in text:
            self._feed_char(char)

    def _feed_char(self, char: str) -> None:
        if not self._inside:
            self._recent = (self._recent + char)[-len(OPENING) :]
            if self._recent == OPENING:
                self._inside, self._numbers, self._current, self._last_id, self._last_x = True, 0, "", 0, ""
            return
        if char in DIGITS:
            self._current += char
        elif char == " " and self._current:
            self._end_number()
        else:  # the closing quote, another image's separator, or anything unexpected
            self._inside, self._recent = False, ""

    def _end_number(self) -> None:
        role = self._role(self._numbers)
        if role == "id":
            self._last_id = int(self._current[:6])
        elif role == "x":
            self._last_x = self._current
        self._numbers += 1
        self._current = ""

    @staticmethod
    def _role(index: int) -> str:
        """What the list's ``index``-th number is: the image's index, then id, x, y, id, ..."""
        return "image" if index == 0 else ("id", "x", "y")[(index - 1) % 3]

    def guess(self, limit: int) -> str:
        """At most ``limit`` characters the format expects next (digits and spaces), or ""."""
        if not self._inside or limit <= 0:
            return ""
        return self._expected()[:limit]

    def _expected(self) -> str:
        role, current = self._role(self._numbers), self._current
        next_id = str(self._last_id + 1)
        x_start = self._last_x[:1]  # the next x's likely first digit
        if role == "image":
            # one image: its index is 1, and the first point's id is 1
            return "1 1 " if not current else (" 1 " if current == "1" else "")
        if role == "id":
            if next_id.startswith(current):
                return next_id[len(current) :] + " " + x_start
            return " " if current else ""
        if role == "x":
            return " " if len(current) >= COORDINATE_DIGITS else ""
        # y: once its digits are written, the next point (or the list's end: a wrong guess)
        if len(current) >= COORDINATE_DIGITS:
            return f" {next_id} {x_start}"
        return ""


def accepted(guess: Sequence, picks: Sequence) -> int:
    """How many of ``guess`` a step confirmed: the leading guesses equal to the model's picks
    (``picks[j]`` is its pick after the row's last token and the first ``j`` guesses; fewer
    picks than guesses where the answer ends)."""
    count = 0
    while count < min(len(guess), len(picks)) and guess[count] == picks[count]:
        count += 1
    return count


def replay(pieces: Sequence[str], limit: int) -> tuple[int, list[tuple[int, str, str]]]:
    """How an answer of these token texts decodes when each step checks up to ``limit`` guesses:
    (its decode steps, each missed guess as (the token's index, the guess, the token)). One token
    a step takes ``len(pieces)`` steps. For benchmarks and tests."""
    draft, done, steps, missed = PointDraft(), 0, 0, []
    while done < len(pieces):
        guess = draft.guess(limit)
        count = accepted(guess, pieces[done : done + len(guess)])
        if count < len(guess) and done + count < len(pieces):
            missed.append((done + count, guess[count], pieces[done + count]))
        for piece in pieces[done : done + count + 1]:
            draft.feed(piece)
        done += count + 1
        steps += 1
    return steps, missed
