"""The interleaving check of issue #12, shared by the CPU test (tests/engine/test_interleaving.py) and
the GPU bench (bench/interleaving_gpu.py).

Each trial: a bulk job of a random size class (1-20 queries over several images, a task's labels
queued together) and 1-2 opened tasks (1-3 queries each) submitted at random prefill or decode
steps of the bulk work, through the real scheduler. Every answer, text and per-token
log-probabilities, is compared with the same query's answer run alone on the same engine.
With ``texts``, each query's answer is forced as a pointing answer of 0-3 points (the
engine's ``answer_text`` seam), so that an engine with ``MOLMO_DRAFT`` confirms guessed tokens
in its steps; the log-probabilities (the model's own picks over the forced tokens' keys and
values) still have to match.
"""

from __future__ import annotations

import random
import threading

from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.scheduler import Priority, Scheduler
from molmo_backend.pointing.points import molmo2_answer

SIZE_CLASSES = [1, 2, 3, 5, 8, 13, 16, 17, 20]
WORDS = ["red", "small", "cat", "left", "dog", "the"]


def make_job(rng: random.Random, images, size: int, tag: str, texts: bool = False) -> list[PointQuery]:
    """``size`` queries over a few images, each image asked about by consecutive queries (as
    the backend submits a task's labels), with prompts of different lengths."""
    queries, key = [], rng.randrange(10**6)
    while len(queries) < size:
        image = rng.randrange(len(images))
        for _ in range(min(rng.randint(1, 3), size - len(queries))):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            points = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(rng.randint(0, 3))]
            queries.append(
                PointQuery(
                    images[image],
                    f"Point to {tag} {words}",
                    image_key=(tag, key, image),
                    answer_text=molmo2_answer(points, words) if texts else None,
                )
            )
        key += 1
    return queries


def same(answer, alone, tolerance: float) -> bool:
    return (
        answer.error is None
        and answer.text == alone.text
        and len(answer.token_logprobs) == len(alone.token_logprobs)
        and all(abs(a - b) <= tolerance for a, b in zip(answer.token_logprobs, alone.token_logprobs))
    )


def interleave(scheduler: Scheduler, engine, bulk, opened, rng: random.Random) -> dict:
    """Submit ``bulk``; submit each opened job at a random step of it (a step engine's prefill
    or decode step; for a whole-batch engine such as plain ``generate()``, while its batch is on
    the engine)."""
    jobs: list = []
    arrived = threading.Event()
    if engine.stepwise:
        events = iter(sorted(rng.sample(range(1, 12), len(opened))))
        plan = {"at": next(events), "seen": 0}
        bulk_job = None

        def on_step(event, index):
            plan["seen"] += 1
            while plan["at"] is not None and plan["seen"] >= plan["at"] and len(jobs) < len(opened):
                if bulk_job is not None and not bulk_job.finished.is_set():
                    arrived.set()
                jobs.append(scheduler.submit_async(opened[len(jobs)], Priority.INTERACTIVE))
                plan["at"] = next(events, None)

        scheduler.on_step = on_step
        bulk_job = scheduler.submit_async(bulk, Priority.BULK)
        bulk_job.wait(600)
        scheduler.on_step = None
    else:
        real_generate = engine.generate
        inside = threading.Event()

        def generate(queries, **kwargs):
            if not inside.is_set():
                inside.set()
                for job in opened:  # they queue behind the running batch
                    jobs.append(scheduler.submit_async(job, Priority.INTERACTIVE))
                arrived.set()
            return real_generate(queries, **kwargs)

        engine.generate = generate
        try:
            bulk_job = scheduler.submit_async(bulk, Priority.BULK)
            bulk_job.wait(600)
        finally:
            engine.generate = real_generate
    while len(jobs) < len(opened):  # the bulk work ended before the planned step: submit now
        jobs.append(scheduler.submit_async(opened[len(jobs)], Priority.INTERACTIVE))
    for job in jobs:
        assert job.wait(600), "an opened task never finished"
    return {
        "bulk": bulk_job.answers,
        "opened": [job.answers for job in jobs],
        "arrived_mid_bulk": arrived.is_set(),
    }


def run_trials(
    engine, images, trials: int, seed_base: int, tolerance: float, texts: bool = False
) -> list[dict]:
    """One dict per trial: seed, sizes, whether an opened task arrived mid-bulk, and the
    prompts whose answers differ from alone (empty when all agree)."""
    alone: dict[tuple, object] = {}
    scheduler = Scheduler(engine)
    out = []
    try:
        for trial in range(trials):
            seed = seed_base + trial
            rng = random.Random(seed)
            bulk = make_job(rng, images, rng.choice(SIZE_CLASSES), "bulk", texts)
            opened = [
                make_job(rng, images, rng.randint(1, 3), f"open{k}", texts) for k in range(rng.randint(1, 2))
            ]
            for query in bulk + [q for job in opened for q in job]:
                key = (query.image_key, query.prompt, query.answer_text)  # a query's whole identity
                if key not in alone:
                    alone[key] = engine.generate([query])[0]
            answers = interleave(scheduler, engine, bulk, opened, rng)
            pairs = list(zip(bulk, answers["bulk"])) + [
                pair for job, got in zip(opened, answers["opened"]) for pair in zip(job, got)
            ]
            wrong = [
                q.prompt
                for q, a in pairs
                if not same(a, alone[(q.image_key, q.prompt, q.answer_text)], tolerance)
            ]
            out.append(
                {
                    "seed": seed,
                    "bulk": len(bulk),
                    "opened": [len(job) for job in opened],
                    "answers": len(pairs),
                    "arrived_mid_bulk": answers["arrived_mid_bulk"],
                    "mismatches": wrong,
                }
            )
    finally:
        scheduler.close()
    return out
