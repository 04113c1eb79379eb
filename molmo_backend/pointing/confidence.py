"""Per-point confidence from the probabilities of the tokens that produced each point.

Which tokens, and why (docs/confidence.md has the long form): a Molmo answer lists points one
after another, ``<points coords="1 1 461 527 2 481 521">cat</points>``. Before each point the model
decides whether there *is* another point: after ``527`` it either goes on (`` 2``, the next point
id) or closes the list (``">``). That decision is the one that says "there is another object
here", so a point's score is the probability of everything the model wrote from the end of the
previous point (or the start of the answer, for the first point) up to and including the first
character of this point's id: for the first point that span holds the ``<points`` (or ``Counting
the <points``) that was chosen over "There are none."; for the others, the separator and id that
were chosen over closing the list. The product of those tokens' probabilities is the probability,
given the points before it, that the model emits this point at all.

The coordinate digits are left out on purpose. Their uncertainty is about *where* to within a
digit, not *whether*: a point at x = 500 splits its first digit between "4" (49x) and "5" (50x)
though it is perfectly placed, and a tokenizer with multi-digit number tokens spreads the mass
over 461/462/463. Scoring digits would mark well-placed points as weak.

The task score is the mean of its points' scores (``regions.task_prediction``). Engines that give
no per-token data (the remote engine, Molmo v1, plain ``generate()``) give each point the answer's
mean token probability instead.

Pure Python: no torch, no tokenizer. The engine attaches each token's text and log-probability to
the :class:`~molmo_backend.engine.base.Answer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from molmo_backend.engine.base import Answer
from molmo_backend.pointing.points import Point, parse_points


@dataclass(frozen=True)
class ScoredPoint:
    point: Point
    #: 0..1; None when the engine gave neither token probabilities nor an answer score
    score: float | None


def scored_points(answer: Answer) -> list[ScoredPoint]:
    """The answer's points, each with its confidence (see the module docstring)."""
    if answer.tokens and len(answer.tokens) == len(answer.token_logprobs):
        text = "".join(answer.tokens)
        points = parse_points(text)
        return [
            ScoredPoint(p, s)
            for p, s in zip(points, point_scores(points, answer.tokens, answer.token_logprobs))
        ]
    return [ScoredPoint(p, answer.score) for p in parse_points(answer.text)]


def point_scores(
    points: list[Point], tokens: tuple[str, ...] | list[str], logprobs: tuple[float, ...] | list[float]
) -> list[float | None]:
    """Each point's probability of being emitted, given the points before it.

    ``points`` were parsed from ``"".join(tokens)`` (they carry character offsets into it). A
    token counts for a point when it overlaps the span from the previous point's end to the
    first character of this point; empty tokens (special tokens) overlap nothing."""
    ends = []
    offset = 0
    for piece in tokens:
        offset += len(piece)
        ends.append(offset)
    scores: list[float | None] = []
    previous_end = 0
    for point in points:
        if point.start is None or point.end is None:
            scores.append(None)
            continue
        span_start, span_end = previous_end, point.start + 1
        total, used = 0.0, False
        token_start = 0
        for token_end, logprob in zip(ends, logprobs):
            if token_start < span_end and token_end > span_start and token_end > token_start:
                total += logprob
                used = True
            token_start = token_end
            if token_start >= span_end:
                break
        scores.append(round(math.exp(total), 4) if used and not math.isnan(total) else None)
        previous_end = point.end
    return scores
