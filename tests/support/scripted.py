"""Scripted engines and task helpers for the backend tests (interactive, confidence, counts, captions).

The ``make_backend`` fixture (tests/conftest.py) builds a real backend around these engines.

- :class:`ScriptedEngine`: an engine that answers each prompt with a chosen :class:`Answer`
  (tokens and log-probabilities included) and records the prompts it was asked, run behind the
  real :class:`Scheduler`.
  :class:`ScriptedStepEngine` gives the same answers as a step engine (continuous batching).
- :func:`answer`: an Answer whose tokens and probabilities are spelled out per piece.
- :func:`png_data_uri`: a task image the backend loads without any server.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Mapping, Sequence

from PIL import Image

from molmo_backend.engine.base import Answer, Engine, PointQuery, StepEngine
from molmo_backend.engine.scheduler import Priority, Scheduler


def answer(*pieces: str | tuple[str, float], score: float | None = None) -> Answer:
    """An Answer spelled token by token: a piece is its text, or (text, probability)."""
    tokens = tuple(p if isinstance(p, str) else p[0] for p in pieces)
    probs = [1.0 if isinstance(p, str) else p[1] for p in pieces]
    logprobs = tuple(math.log(p) for p in probs)
    text = "".join(tokens)
    mean = sum(probs) / len(probs) if probs else None
    return Answer(
        text=text.strip(), score=mean if score is None else score, tokens=tokens, token_logprobs=logprobs
    )


class ScriptedEngine(Engine):
    """Answers by the longest key found in the prompt; ``asked`` records (prompt, image size)."""

    model_id, revision, family, max_batch = "scripted", "r1", "molmo2", 16

    def __init__(self, answers: Mapping[str, Answer | str]):
        self.answers = dict(answers)
        self.asked: list[tuple[str, tuple[int, int]]] = []
        self.lock = threading.Lock()

    def generate(self, queries: Sequence[PointQuery]) -> list[Answer]:
        return [self.answer_to(q) for q in queries]

    def answer_to(self, query: PointQuery) -> Answer:
        with self.lock:
            self.asked.append((query.prompt, query.image.size))
        key = max((k for k in self.answers if k in query.prompt), key=len, default=None)
        value = self.answers.get(key, "There are none.")
        return value if isinstance(value, Answer) else Answer(text=value, score=1.0)

    def prompts(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.asked]


class ScriptedStepEngine(StepEngine, ScriptedEngine):
    """The same answers from a step engine, so the scheduler runs continuous batching: opened
    tasks' rows end at their first decode step; bulk rows keep decoding until
    ``release_bulk`` is set (``bulk_decoding`` says they are), so a test orders events by them
    instead of by time."""

    def __init__(self, answers: Mapping[str, Answer | str]):
        ScriptedEngine.__init__(self, answers)
        self.free = {True: 4, False: 16}
        self.bulk_decoding, self.release_bulk = threading.Event(), threading.Event()

    def generate(self, queries, interactive=False):
        return StepEngine.generate(self, queries, interactive)

    def free_slots(self, interactive):
        return self.free[interactive]

    def prefill_cost(self, query):
        return 1

    def prefill(self, rows):
        for row in rows:
            self.free[row.interactive] -= 1
            row.slot = 1
            row.tokens.append(0)

    def decode(self, rows):
        for row in rows:
            if not row.interactive:
                self.bulk_decoding.set()
            row.finished = row.interactive or self.release_bulk.is_set()

    def answer(self, row):
        return self.answer_to(row.query)

    def release(self, rows):
        for row in rows:
            if row.slot >= 0:
                self.free[row.interactive] += 1
                row.slot = -1


class RecordingScheduler(Scheduler):
    """The real scheduler, also recording the priority of each submit."""

    def __init__(self, engine):
        super().__init__(engine)
        self.priorities: list[Priority] = []

    def submit_async(self, queries, priority=Priority.BULK, on_answer=None):
        self.priorities.append(Priority(priority))
        return super().submit_async(queries, priority=priority, on_answer=on_answer)


def png_data_uri(width: int = 64, height: int = 48, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def task(task_id: int = 1, width: int = 64, height: int = 48, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: png_data_uri(width, height)}}


def by_type(prediction: dict, kind: str) -> list[dict]:
    return [r for r in prediction["result"] if r["type"] == kind]


def keypoints(prediction: dict) -> list[tuple]:
    """(label, x, y, score) of each keypoint region, sorted."""
    return sorted(
        (r["value"]["keypointlabels"][0], r["value"]["x"], r["value"]["y"], r.get("score"))
        for r in by_type(prediction, "keypointlabels")
    )


__all__ = [
    "RecordingScheduler",
    "ScriptedEngine",
    "ScriptedStepEngine",
    "answer",
    "by_type",
    "keypoints",
    "png_data_uri",
    "task",
]
