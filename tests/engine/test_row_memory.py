"""Cache memory budgeted by each row's own length (molmo_backend/engine/slots.py, decoding.py).

A bulk row takes a run of blocks for its prompt and a little answer room, and its run grows with
its answer: in place, by moving to a longer free run, or, when memory is short, the row waits a
step or (when no row can go on) is handed back and starts again. None of it may change an answer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_backend.engine import row_memory
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.engine.queue import Priority
from molmo_backend.engine.scheduler import Scheduler
from molmo_backend.engine.slots import ANSWER_ROOM, BLOCK_TOKENS, BlockRuns, RowSpace
from tests.support.pools import tight_pool

IMAGES = [
    Image.new("RGB", (640, 480), (200, 30, 30)),
    Image.effect_noise((500, 500), 60).convert("RGB"),
    Image.new("RGB", (300, 900), (10, 200, 10)),
]


def test_block_runs_take_the_lowest_fit_grow_in_place_and_merge_when_freed():
    runs = BlockRuns(first=10, count=10)
    a, b = runs.take(3), runs.take(2)
    assert (a, b) == (10, 13) and runs.free_blocks == 5
    assert not runs.extend(a, 3, 1), "the block after a's run is b's"
    assert runs.extend(b, 2, 2) and runs.free_blocks == 3
    runs.release(a, 3)
    assert runs.take(4) is None, "3 free at 10..12 and 3 at 17..19: no run of 4"
    runs = BlockRuns(first=0, count=6)
    x, y, z = runs.take(2), runs.take(2), runs.take(2)
    assert runs.take(1) is None
    runs.release(x, 2)
    runs.release(z, 2)
    assert runs.take(3) is None, "two free runs of 2 are not one of 3"
    runs.release(y, 2)
    assert runs.take(6) == 0, "freed neighbours merge into one run"
    runs.release(0, 6)
    with pytest.raises(ValueError):
        runs.release(2, 1)  # already free


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=60))
def test_block_runs_never_hand_out_a_block_twice(ops):
    """Any sequence of takes and releases: held runs never overlap, and free + held = all."""
    runs, held = BlockRuns(first=5, count=24), {}
    for take, size in ops:
        if take or not held:
            start = runs.take(size)
            if start is not None:
                held[start] = size
        else:
            start = sorted(held)[size % len(held)]
            runs.release(start, held.pop(start))
        blocks = [b for s, n in held.items() for b in range(s, s + n)]
        assert len(blocks) == len(set(blocks)) and all(5 <= b < 29 for b in blocks)
        assert runs.free_blocks + len(blocks) == 24


def test_a_bulk_row_takes_its_prompt_and_some_answer_room_and_an_opened_task_the_longest_row():
    space = RowSpace(interactive_rows=2, bulk_rows=8, row_blocks=8, bulk_blocks=20)
    bulk = space.take(False, 300)
    assert space.capacity(bulk) == -(-(300 + ANSWER_ROOM) // BLOCK_TOKENS) * BLOCK_TOKENS
    opened = space.take(True, 10)
    assert space.capacity(opened) == 8 * BLOCK_TOKENS and space.interactive(opened)
    assert space.take(True, 10) is not None and space.take(True, 10) is None, "2 opened-task rows"
    assert space.grow(bulk, space.capacity(bulk) + 1, space.capacity(bulk) + 1) == bulk, "in place"
    blocker = space.take(False, 10)
    moved = space.grow(bulk, space.capacity(bulk) + 1, space.capacity(bulk) + 1)
    assert moved not in (None, bulk), "the blocks after it are taken: a new run"
    space.release(bulk)
    assert space.free_rows(False) >= 1 and space.rows(False) == 2 and blocker is not None


def _engine(demo_model_dir, bulk_tokens=None):
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=200, max_batch=4)
    if bulk_tokens is not None:  # a pool that holds fewer tokens than 4 rows may need
        tight_pool(engine, bulk_tokens)
    return engine


def _queries():
    lengths = [150, 140, 120, 110, 3, 20]  # the first four outgrow a block together
    return [
        PointQuery(IMAGES[i % 3], f"Point to thing {i}", image_key=i % 3, answer_tokens=n)
        for i, n in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def roomy_answers(demo_model_dir):
    return _engine(demo_model_dir).generate(_queries())


@pytest.mark.parametrize("pool_rows", [2, 1])
def test_runs_that_grow_move_wait_or_start_again_never_change_an_answer(
    demo_model_dir, roomy_answers, pool_rows, monkeypatch
):
    """With room for 2 longest rows, rows outgrow their runs and move; with room for 1, rows
    also wait for memory and some are handed back and start again. Every answer is the one a
    roomy pool gives, with all its forced tokens."""
    engine = _engine(demo_model_dir)
    engine = _engine(demo_model_dir, bulk_tokens=pool_rows * engine.decoder.max_length)
    requeued = []
    evict = row_memory.evict_for_room
    monkeypatch.setattr(row_memory, "evict_for_room", lambda *a: requeued.append(1) or evict(*a))
    tight = engine.generate(_queries())
    assert [len(a.token_logprobs) for a in tight] == [q.answer_tokens for q in _queries()]
    assert [a.text for a in tight] == [a.text for a in roomy_answers]
    for a, b in zip(tight, roomy_answers):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert engine.decoder.moves > 0, "some row outgrew its run and moved"
    if pool_rows == 1:
        assert engine.decoder.waits > 0 and requeued, "rows waited and one was handed back"
    assert not engine.decoder.space.held, "every run was given back"


def test_the_scheduler_puts_a_row_handed_back_at_the_head_of_the_queue(demo_model_dir, roomy_answers):
    engine = _engine(demo_model_dir)
    engine = _engine(demo_model_dir, bulk_tokens=engine.decoder.max_length)
    scheduler = Scheduler(engine)
    try:
        answers = scheduler.submit(_queries(), Priority.BULK)
    finally:
        scheduler.close()
    assert [a.text for a in answers] == [a.text for a in roomy_answers]
    assert [len(a.token_logprobs) for a in answers] == [q.answer_tokens for q in _queries()]
    assert scheduler.stats["requeued"] > 0 and scheduler.stats["failed_queries"] == 0
    assert not engine.decoder.space.held
