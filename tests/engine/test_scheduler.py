"""The scheduler: order, batching across callers, priorities, failure isolation (no torch)."""

from __future__ import annotations

import threading

from PIL import Image

from molmo_backend.engine.base import Answer, Engine, PointQuery
from molmo_backend.engine.scheduler import CANCELLED, Priority, Scheduler

IMG = Image.new("RGB", (4, 4))


class EchoEngine(Engine):
    """Answers each prompt with itself; can be held at a gate and made to fail."""

    model_id, revision = "echo", "0"

    def __init__(self, max_batch=4, fail_if=lambda prompts: None):
        self.max_batch = max_batch
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_if = fail_if

    def generate(self, queries):
        prompts = [q.prompt for q in queries]
        self.entered.set()
        self.gate.wait(10)
        error = self.fail_if(prompts)
        if error:
            raise error
        self.batches.append(prompts)
        return [Answer(text=p, score=1.0) for p in prompts]


def queries(*prompts):
    return [PointQuery(IMG, p) for p in prompts]


def submit_in_thread(scheduler, qs, priority=Priority.BULK):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("answers", scheduler.submit(qs, priority)))
    thread.start()
    return thread, out


def test_answers_come_back_in_order_and_in_batches_of_at_most_max_batch():
    engine = EchoEngine(max_batch=4)
    scheduler = Scheduler(engine)
    prompts = [f"p{i}" for i in range(10)]
    assert [a.text for a in scheduler.submit(queries(*prompts))] == prompts
    assert max(len(b) for b in engine.batches) == 4
    assert scheduler.submit([]) == []
    scheduler.close()


def test_one_batch_carries_queries_of_several_concurrent_requests():
    engine = EchoEngine(max_batch=16)
    scheduler = Scheduler(engine)
    engine.gate.clear()
    blocker, _ = submit_in_thread(scheduler, queries("first"))
    assert engine.entered.wait(5)
    threads = [submit_in_thread(scheduler, queries(f"r{r}a", f"r{r}b")) for r in range(3)]
    while scheduler.pending() < 6:
        threading.Event().wait(0.01)
    engine.gate.set()
    blocker.join(5)
    for thread, _out in threads:
        thread.join(5)
    assert engine.batches[1] and len(engine.batches[1]) == 6  # all three requests in one batch
    for r, (_, out) in enumerate(threads):
        assert [a.text for a in out["answers"]] == [f"r{r}a", f"r{r}b"]
    scheduler.close()


def test_an_opened_task_jumps_ahead_of_queued_bulk_work():
    engine = EchoEngine(max_batch=2)
    scheduler = Scheduler(engine)
    engine.gate.clear()
    blocker, _ = submit_in_thread(scheduler, queries("running"))
    assert engine.entered.wait(5)
    bulk, bulk_out = submit_in_thread(scheduler, queries(*[f"bulk{i}" for i in range(8)]), Priority.BULK)
    while scheduler.pending() < 8:
        threading.Event().wait(0.01)
    opened, opened_out = submit_in_thread(scheduler, queries("open"), Priority.INTERACTIVE)
    while scheduler.pending() < 9:
        threading.Event().wait(0.01)
    engine.gate.set()
    for thread in (blocker, bulk, opened):
        thread.join(5)
    assert engine.batches[1] == ["open"]  # next batch after the running one; no bulk rides along
    assert [a.text for a in bulk_out["answers"]] == [f"bulk{i}" for i in range(8)]
    assert opened_out["answers"][0].text == "open"
    scheduler.close()


def test_a_failing_query_is_isolated_and_the_rest_of_its_batch_answered():
    engine = EchoEngine(max_batch=8, fail_if=lambda ps: ValueError("bad image") if "bad" in ps else None)
    scheduler = Scheduler(engine)
    answers = scheduler.submit(queries("a", "b", "bad", "c", "d"))
    assert [a.text for a in answers] == ["a", "b", "", "c", "d"]
    assert answers[2].error and "bad image" in answers[2].error
    assert all(a.error is None for i, a in enumerate(answers) if i != 2)
    assert scheduler.stats["failed_queries"] == 1
    scheduler.close()


def test_out_of_memory_splits_the_batch_until_it_fits():
    class OutOfMemory(RuntimeError):
        pass

    engine = EchoEngine(
        max_batch=8, fail_if=lambda ps: OutOfMemory("CUDA out of memory") if len(ps) > 2 else None
    )
    scheduler = Scheduler(engine)
    prompts = [f"q{i}" for i in range(8)]
    answers = scheduler.submit(queries(*prompts))
    assert [a.text for a in answers] == prompts and all(a.error is None for a in answers)
    assert max(len(b) for b in engine.batches) == 2
    scheduler.close()


class SteppingEngine(EchoEngine):
    """A plain engine that takes a few steps per batch (no pause: the scheduler never re-enters it)."""

    def __init__(self, steps=5, anyone_entered: threading.Event | None = None, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps
        self.anyone_entered = anyone_entered or threading.Event()
        self.log: list[str] = []

    def generate(self, queries):
        self.log.append(f"start {queries[0].prompt}")
        self.entered.set()
        self.anyone_entered.set()
        self.gate.wait(10)
        self.log.append(f"end {queries[0].prompt}")
        return [Answer(text=q.prompt) for q in queries]


def test_several_engines_share_the_queue_and_answers_stay_in_order():
    # Both replicas start held; whichever takes the first batch stays held while the other is let
    # go, so the other must drain the queue (no assumption about which worker thread runs first).
    anyone_entered = threading.Event()
    engines = [SteppingEngine(max_batch=4, anyone_entered=anyone_entered) for _ in range(2)]
    for engine in engines:
        engine.gate.clear()
    scheduler = Scheduler(engines)
    prompts = [f"q{i}" for i in range(40)]
    job = scheduler.submit_async(queries(*prompts))
    assert anyone_entered.wait(10)
    held, free = sorted(engines, key=lambda e: not e.entered.is_set())
    free.gate.set()
    assert job.wait(0) is False
    for _ in range(1000):  # the free replica drains the queue while the other is held
        if scheduler.pending() == 0:
            break
        threading.Event().wait(0.01)
    assert scheduler.pending() == 0
    assert job.wait(0) is False, "the held replica's batch cannot have been answered"
    held.gate.set()
    assert job.wait(10)
    assert [a.text for a in job.answers] == prompts
    assert all(engine.log for engine in engines), "both replicas must have worked"
    assert scheduler.stats["queries"] == 40
    scheduler.close()


class BudgetEngine(EchoEngine):
    """Each prompt "name:tokens" needs that many cache tokens; the budget can change."""

    def __init__(self, budget, max_batch=16):
        super().__init__(max_batch=max_batch)
        self.budget = budget

    def tokens_for(self, query):
        return int(query.prompt.split(":")[1])

    def token_budget(self):
        return self.budget


def test_batches_fit_the_engines_token_budget_rows_times_longest_row():
    engine = BudgetEngine(budget=1000)
    scheduler = Scheduler(engine)
    prompts = [f"q{i}:{cost}" for i, cost in enumerate([100, 100, 100, 300, 100, 900, 1500, 50, 50, 50])]
    assert [a.text for a in scheduler.submit(queries(*prompts))] == prompts  # all, in order
    costs = [[int(p.split(":")[1]) for p in batch] for batch in engine.batches]
    for batch in costs:
        assert len(batch) == 1 or len(batch) * max(batch) <= 1000, costs
    # greedy in queue order: 3 x 100, then 300 makes 4 x 300 > 1000; a 1500 row goes alone
    assert costs == [[100, 100, 100], [300, 100], [900], [1500], [50, 50, 50]]
    assert scheduler.stats["budget_cuts"] == 4
    scheduler.close()


def test_a_budget_asked_each_batch_follows_free_memory_and_none_means_max_batch_only():
    engine = BudgetEngine(budget=None, max_batch=4)
    scheduler = Scheduler(engine)
    scheduler.submit(queries(*[f"a{i}:500" for i in range(8)]))
    assert [len(b) for b in engine.batches] == [4, 4]
    engine.budget = 1000  # less memory free now
    engine.batches.clear()
    scheduler.submit(queries(*[f"b{i}:500" for i in range(4)]))
    assert [len(b) for b in engine.batches] == [2, 2]
    scheduler.close()


def test_an_engine_whose_budget_fails_is_batched_by_count_and_nothing_hangs():
    class BrokenBudget(BudgetEngine):
        def tokens_for(self, query):
            raise ValueError("cannot size this query")

    engine = BrokenBudget(budget=1000, max_batch=3)
    scheduler = Scheduler(engine)
    prompts = [f"q{i}:1" for i in range(5)]
    assert [a.text for a in scheduler.submit(queries(*prompts))] == prompts
    assert [len(b) for b in engine.batches] == [3, 2]
    assert scheduler.stats["budget_cuts"] == 0
    scheduler.close()


def test_submit_async_fills_answers_as_they_finish_and_calls_back_per_query():
    engine = EchoEngine(max_batch=2)
    scheduler = Scheduler(engine)
    seen = []
    job = scheduler.submit_async(queries("a", "b", "c"), on_answer=lambda i, a: seen.append((i, a.text)))
    assert job.wait(10)
    assert [a.text for a in job.answers] == ["a", "b", "c"]
    assert sorted(seen) == [(0, "a"), (1, "b"), (2, "c")]
    empty = scheduler.submit_async([])
    assert empty.wait(0) and empty.answers == []
    scheduler.close()


def test_a_cancelled_job_is_not_computed_and_still_gets_one_answer_per_query():
    engine = EchoEngine(max_batch=2)
    scheduler = Scheduler(engine)
    engine.gate.clear()
    blocker = scheduler.submit_async(queries("running"))
    assert engine.entered.wait(5)  # the GPU is busy: the next job waits in the queue
    job = scheduler.submit_async(queries("x", "y", "z"))
    assert not job.wait(0)
    job.cancel()
    engine.gate.set()
    assert blocker.wait(10) and job.wait(10)
    assert all(a.error == CANCELLED and a.text == "" for a in job.answers)
    assert engine.batches == [["running"]]  # nothing of the cancelled job reached the engine
    assert scheduler.stats["cancelled"] == 3
    scheduler.close()


def test_work_submitted_after_close_is_refused_as_unavailable_not_as_a_bug():
    from molmo_backend.engine.job import SchedulerClosed

    scheduler = Scheduler(EchoEngine())
    scheduler.close()
    try:
        scheduler.submit_async(queries("late"))
    except SchedulerClosed as exc:
        assert (exc.http_status, exc.exit_code) == (503, 1)  # the status the routes answer
    else:
        raise AssertionError("a closed scheduler accepted work")
