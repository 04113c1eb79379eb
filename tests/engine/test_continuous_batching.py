"""The scheduler's continuous-batching loop over a step engine (no torch): rows join and leave
between steps, opened tasks first, failures and cancellations contained.

:class:`CountingEngine` is a :class:`StepEngine` whose row for prompt ``"name:k"`` ends after
``k`` tokens and answers ``name``; it logs every prefill and decode step, so the tests read the
order of events from the log instead of timing anything.
"""

from __future__ import annotations

import threading

from PIL import Image

from molmo_backend.engine.base import Answer, PointQuery, Row, StepEngine
from molmo_backend.engine.scheduler import CANCELLED, Priority, Scheduler

IMG = Image.new("RGB", (4, 4))


class CountingEngine(StepEngine):
    model_id, revision, family = "counting", "0", "molmo2"

    def __init__(self, bulk_slots=4, interactive_slots=2, fail_prefill=None, fail_decode=None):
        self.max_batch = bulk_slots
        self.free = {False: bulk_slots, True: interactive_slots}
        self.log: list[tuple[str, list[str]]] = []
        self.fail_prefill, self.fail_decode = fail_prefill, fail_decode
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    @staticmethod
    def name(row: Row) -> str:
        return row.query.prompt.split(":")[0]

    def free_slots(self, interactive):
        return self.free[interactive]

    def prefill_cost(self, query):
        return 10

    def prefill(self, rows):
        self.entered.set()
        assert self.gate.wait(10)
        names = [self.name(r) for r in rows]
        if self.fail_prefill and any(self.fail_prefill in n for n in names):
            raise ValueError(f"bad image in {names}")
        for row in rows:
            assert self.free[row.interactive] > 0, "admitted without a free slot"
            self.free[row.interactive] -= 1
            row.slot = 1
        self.log.append(("prefill", names))
        self._advance(rows)

    def decode(self, rows):
        names = [self.name(r) for r in rows]
        self.log.append(("decode", names))
        if self.fail_decode and any(self.fail_decode in n for n in names):
            raise RuntimeError("the step broke")
        self._advance(rows)

    def _advance(self, rows):
        for row in rows:
            assert not row.finished
            row.tokens.append(0)
            row.finished = len(row.tokens) >= int(row.query.prompt.split(":")[1])

    def answer(self, row):
        return Answer(text=self.name(row), score=1.0)

    def release(self, rows):
        for row in rows:
            if row.slot >= 0:
                self.free[row.interactive] += 1
                row.slot = -1


def queries(*prompts, image=None):
    return [PointQuery(image or Image.new("RGB", (4, 4)), p) for p in prompts]


def steps_of(engine, kind):
    return [names for event, names in engine.log if event == kind]


def test_a_row_that_ends_leaves_at_once_and_a_waiting_row_takes_its_slot():
    engine = CountingEngine(bulk_slots=2)
    scheduler = Scheduler(engine)
    answers = scheduler.submit(queries("a:1", "b:6", "c:2", "d:1"))
    assert [a.text for a in answers] == ["a", "b", "c", "d"]
    # a ends with its first token (at prefill): c takes its slot in a step where b decodes (one
    # packed step: StepEngine.step's default logs it as a prefill, then a decode), then d c's
    assert engine.log == [
        ("prefill", ["a", "b"]),
        ("prefill", ["c"]),
        ("decode", ["b"]),
        ("decode", ["b", "c"]),
        ("prefill", ["d"]),
        ("decode", ["b"]),
        ("decode", ["b"]),
        ("decode", ["b"]),
    ]
    assert engine.free == {False: 2, True: 2}
    scheduler.close()


def test_an_opened_task_joins_at_the_next_step_and_bulk_rows_wait_while_it_decodes():
    engine = CountingEngine(bulk_slots=4)
    scheduler = Scheduler(engine)
    opened = {}

    def on_step(event, index):
        if event == "decode" and len(steps_of(engine, "decode")) == 2 and not opened:
            opened["job"] = scheduler.submit_async(queries("open:3"), Priority.INTERACTIVE)

    scheduler.on_step = on_step
    bulk = scheduler.submit(queries("b1:8", "b2:8"), Priority.BULK)
    assert opened["job"].wait(5) and opened["job"].answers[0].text == "open"
    assert [a.text for a in bulk] == ["b1", "b2"]
    decodes = steps_of(engine, "decode")
    joined = engine.log.index(("prefill", ["open"]))
    after = [names for event, names in engine.log[joined + 1 :] if event == "decode"]
    assert after[:2] == [["open"], ["open"]], "bulk rows wait in their slots while the opened task decodes"
    assert after[2] == ["b1", "b2"]  # then the bulk rows go on where they were
    assert decodes[:2] == [["b1", "b2"], ["b1", "b2"]]
    # the opened task's join (its prefill, bulk rows not stepping) and its two decode steps
    assert scheduler.stats["bulk_paused_steps"] == 3
    scheduler.close()


def test_an_image_whose_prefill_fails_costs_only_its_own_rows():
    engine = CountingEngine(bulk_slots=8, fail_prefill="bad")
    scheduler = Scheduler(engine)
    answers = scheduler.submit(queries("a:2", "b:2", "bad:2", "c:2", "d:2"))
    assert [a.text for a in answers] == ["a", "b", "", "c", "d"]
    assert "bad image" in answers[2].error and all(a.error is None for i, a in enumerate(answers) if i != 2)
    assert scheduler.stats["failed_queries"] == 1
    assert engine.free[False] == 8
    scheduler.close()


def test_a_failing_decode_step_ends_its_rows_with_the_error_and_the_worker_goes_on():
    engine = CountingEngine(bulk_slots=2, fail_decode="boom")
    scheduler = Scheduler(engine)
    first = scheduler.submit(queries("boom:3", "x:3"))
    assert [a.error and "the step broke" in a.error for a in first] == [True, True]
    assert [a.text for a in scheduler.submit(queries("y:2"))] == ["y"]  # the worker is alive
    assert engine.free[False] == 2
    scheduler.close()


def test_a_cancelled_job_leaves_its_slots_and_its_waiting_rows_never_start():
    engine = CountingEngine(bulk_slots=2)
    scheduler = Scheduler(engine)
    held = {}

    def on_step(event, index):
        if event == "decode" and len(steps_of(engine, "decode")) == 1:
            held["job"].cancel()

    scheduler.on_step = on_step
    held["job"] = job = scheduler.submit_async(queries("a:50", "b:50", "c:50", "d:50"))
    assert job.wait(5)
    assert all(a.error == CANCELLED for a in job.answers)
    assert [names for event, names in engine.log if event == "prefill"] == [["a", "b"]], "c, d never started"
    assert len(steps_of(engine, "decode")) == 1 and engine.free[False] == 2
    assert scheduler.stats["cancelled"] == 4
    scheduler.on_step = None
    assert [a.text for a in scheduler.submit(queries("e:1"))] == ["e"]
    scheduler.close()


def test_labels_of_one_image_are_prefilled_together_and_several_engines_share_the_queue():
    engines = [CountingEngine(bulk_slots=3), CountingEngine(bulk_slots=3)]
    for engine in engines:  # each replica is held in its first prefill (one image fills its 3 slots)
        engine.gate.clear()
    scheduler = Scheduler(engines)
    image = Image.new("RGB", (8, 8))
    jobs = [
        scheduler.submit_async([PointQuery(image, f"t{t}l{label}:3", image_key=t) for label in range(3)])
        for t in range(6)
    ]
    assert all(engine.entered.wait(5) for engine in engines), "both replicas must take work"
    for engine in engines:
        engine.gate.set()
    for t, job in enumerate(jobs):
        assert job.wait(10) and [a.text for a in job.answers] == [f"t{t}l{label}" for label in range(3)]
    prefills = [names for engine in engines for names in steps_of(engine, "prefill")]
    assert sorted(prefills) == sorted([[f"t{t}l{label}" for label in range(3)] for t in range(6)])
    assert all(steps_of(engine, "prefill") for engine in engines), "both replicas must have worked"
    scheduler.close()


def test_an_image_with_more_labels_than_its_region_has_rows_is_answered_in_parts():
    """A pose project's 17 keypoints on one opened task (16 rows for opened tasks; here 2), or a
    bulk task with more labels than bulk rows: the labels join in parts as rows free up, each
    part prefilling the image again, instead of waiting for room that never comes. A part
    waits while rows of its region still run (they free their rows)."""
    engine = CountingEngine(bulk_slots=2, interactive_slots=2)
    scheduler = Scheduler(engine)
    image = Image.new("RGB", (8, 8))
    opened = scheduler.submit_async(
        [PointQuery(image, f"k{i}:2", image_key="pose") for i in range(5)], Priority.INTERACTIVE
    )
    assert opened.wait(10), "the opened task never got its rows"
    bulk = scheduler.submit_async([PointQuery(image, f"b{i}:1", image_key="task") for i in range(3)])
    assert bulk.wait(10), "the bulk task never got its rows"
    assert [a.text for a in opened.answers] == [f"k{i}" for i in range(5)]
    assert [a.text for a in bulk.answers] == ["b0", "b1", "b2"]
    assert steps_of(engine, "prefill") == [["k0", "k1"], ["k2", "k3"], ["k4"], ["b0", "b1"], ["b2"]]
    assert engine.free == {False: 2, True: 2}
    scheduler.close()


def test_queries_left_waiting_at_close_still_get_an_answer():
    engine = CountingEngine(bulk_slots=1)
    scheduler = Scheduler(engine)
    gate, inside = threading.Event(), threading.Event()

    def on_step(event, index):
        inside.set()
        gate.wait(5)

    scheduler.on_step = on_step
    job = scheduler.submit_async(queries("a:2", "b:2", "c:2"))
    assert inside.wait(5)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert job.wait(5) and all(a is not None for a in job.answers)


def test_a_failing_packed_step_is_retried_apart_and_loses_nothing():
    """If the one forward that admits rows and steps the running ones fails, the rows are
    prefilled and decoded in forwards of their own: every query still gets its answer."""
    engine = CountingEngine(bulk_slots=2)
    tried = []

    def broken_step(admit, decode):
        tried.append(([engine.name(r) for r in admit], [engine.name(r) for r in decode]))
        raise RuntimeError("the packed forward broke")

    engine.step = broken_step
    scheduler = Scheduler(engine)
    answers = scheduler.submit(queries("a:1", "b:3", "c:2"))
    assert [(a.text, a.error) for a in answers] == [("a", None), ("b", None), ("c", None)]
    assert tried[:2] == [(["a", "b"], []), (["c"], ["b"])]
    # two images: their halves next (the whole set just failed), then c alone beside b's decode
    assert engine.log[:4] == [("prefill", ["a"]), ("prefill", ["b"]), ("prefill", ["c"]), ("decode", ["b"])]
    assert scheduler.stats["failed_batches"] == len(tried) and scheduler.stats["failed_queries"] == 0
    scheduler.close()


def test_an_opened_task_joins_in_a_step_of_its_own_not_beside_a_bulk_prefill():
    """Bulk rows that could join (free slots, waiting) do not share the opened task's first
    step: its prefill stays small, and the bulk rows join once it has finished."""
    engine = CountingEngine(bulk_slots=8)
    scheduler = Scheduler(engine)
    engine.gate.clear()
    first = scheduler.submit_async(queries("b1:2"), Priority.BULK)
    assert engine.entered.wait(5)  # the worker holds b1's prefill until the gate opens
    opened = scheduler.submit_async(queries("open:2"), Priority.INTERACTIVE)
    later = scheduler.submit_async(queries("b2:1", "b3:1"), Priority.BULK)
    engine.gate.set()
    assert first.wait(5) and opened.wait(5) and later.wait(5)
    prefills = [names for event, names in engine.log if event == "prefill"]
    assert prefills == [["b1"], ["open"], ["b2", "b3"]]
    joined = engine.log.index(("prefill", ["open"]))
    assert engine.log.index(("prefill", ["b2", "b3"])) > engine.log.index(("decode", ["open"]), joined)
    scheduler.close()
