"""Helpers and fixtures for the interactive / confidence / counts / captions tests.

Not a conftest.py: the test modules import what they use.

- :class:`ScriptedEngine`: an engine that answers each prompt with a chosen :class:`Answer`
  (tokens and log-probabilities included) and records the prompts it was asked, run behind the
  real :class:`Scheduler`; ``make_backend`` builds a real :class:`MolmoBackend` around it.
- :func:`answer`: an Answer whose tokens and probabilities are spelled out per piece.
- :func:`png_data_uri`: a task image the backend loads without any server.
- :func:`run_scored_backend`: the real server (gunicorn) on the demo model with answers and token
  probabilities forced (tests/support/scored_server.py), for the end-to-end tests.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import pytest
from PIL import Image

from molmo_backend.backend import MolmoBackend
from molmo_backend.engine.base import Answer, Engine, PointQuery
from molmo_backend.engine.scheduler import Priority, Scheduler
from molmo_backend.images import ImageLoader
from molmo_backend.settings import DEFAULT_PROMPT_TEMPLATE, Settings
from tests.support.processes import run_backend


def answer(*pieces: str | tuple[str, float], score: float | None = None) -> Answer:
    """An Answer spelled token by token: a piece is its text, or (text, probability)."""
    tokens = tuple(p if isinstance(p, str) else p[0] for p in pieces)
    probs = [1.0 if isinstance(p, str) else p[1] for p in pieces]
    logprobs = tuple(math.log(p) for p in probs)
    text = "".join(tokens)
    mean = sum(probs) / len(probs) if probs else None
    return Answer(text=text.strip(), score=mean if score is None else score, tokens=tokens,
                  token_logprobs=logprobs)


class ScriptedEngine(Engine):
    """Answers by the longest key found in the prompt; ``asked`` records (prompt, image size)."""

    model_id, revision, family, max_batch = "scripted", "r1", "molmo2", 16

    def __init__(self, answers: Mapping[str, Answer | str], step_s: float = 0.0, steps: int = 1):
        self.answers = dict(answers)
        self.asked: list[tuple[str, tuple[int, int]]] = []
        self.step_s, self.steps = step_s, steps
        self.lock = threading.Lock()

    def generate(self, queries: Sequence[PointQuery], between_steps=None) -> list[Answer]:
        for _ in range(self.steps):  # a slow engine pauses between "decode steps" like the real one
            time.sleep(self.step_s)
            if between_steps is not None:
                between_steps()
        out = []
        for q in queries:
            with self.lock:
                self.asked.append((q.prompt, q.image.size))
            key = max((k for k in self.answers if k in q.prompt), key=len, default=None)
            value = self.answers.get(key, "There are none.")
            out.append(value if isinstance(value, Answer) else Answer(text=value, score=1.0))
        return out

    def prompts(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.asked]


class RecordingScheduler(Scheduler):
    """The real scheduler, also recording the priority of each submit."""

    def __init__(self, engine):
        super().__init__(engine)
        self.priorities: list[Priority] = []

    def submit_async(self, queries, priority=Priority.BULK, on_answer=None):
        self.priorities.append(Priority(priority))
        return super().submit_async(queries, priority=priority, on_answer=on_answer)


@pytest.fixture
def make_backend():
    """``make_backend(answers, **settings) -> (backend, engine)``; schedulers closed afterwards."""
    made = []

    def make(answers: Mapping[str, Answer | str], engine: ScriptedEngine | None = None, **settings):
        engine = engine or ScriptedEngine(answers)
        scheduler = RecordingScheduler(engine)
        made.append(scheduler)
        config = Settings(**settings)
        backend = MolmoBackend(config, scheduler, ImageLoader(config), "scripted@r1",
                               prompt_template=DEFAULT_PROMPT_TEMPLATE)
        return backend, engine

    yield make
    for scheduler in made:
        scheduler.close()


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
    return sorted((r["value"]["keypointlabels"][0], r["value"]["x"], r["value"]["y"], r.get("score"))
                  for r in by_type(prediction, "keypointlabels"))


def run_scored_backend(tmp: Path, specs: Mapping[str, object], env: dict[str, str] | None = None,
                       timeout: float = 120.0):
    """tests/support/scored_server.py under real gunicorn on a free port. ``specs``: prompt text
    -> answer text, or {"text": ..., "probs": {char index: p}}."""
    return run_backend(tmp, env, answers=dict(specs), timeout=timeout, server="tests/support/scored_server.py")


__all__ = ["RecordingScheduler", "ScriptedEngine", "answer", "by_type", "keypoints", "make_backend",
           "png_data_uri", "run_scored_backend", "task"]
