"""Guessed tokens of pointing answers checked in the decode step (MOLMO_DRAFT: engine/drafting.py,
engine/point_drafts.py) and the forced-text seam that lets a benchmark confirm them on random
weights (engine/answer_seam.py).

The guesses only decide how many tokens a step confirms, never which: every answer must be the
one decoding a token a step gives (plain generate()'s), on every attention path, with rows
joining and leaving, and with runs that have to grow or move. The trained shapes demo answers in
Molmo2's point format with a digit a token (as Qwen3 does), so its answers are real material.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_backend.demo.models import SHIPPED_DEMO
from molmo_backend.demo.scenes import sample_scene
from molmo_backend.demo.training_data import prompt_for
from molmo_backend.engine import cascade, flash_decode, point_drafts, slot_attention
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.drafting import GUESSES, Drafting
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.engine.point_drafts import PointDraft, accepted
from molmo_backend.engine.queue import Priority
from molmo_backend.engine.scheduler import Scheduler
from molmo_backend.pointing.points import molmo2_answer
from molmo_backend.settings import Settings, SettingsError
from tests.engine.test_cascade import reference_kernel
from tests.support.forcing import ForceAnswers, by_label
from tests.support.pools import tight_pool

#: Qwen3 writes each digit, and each space before a digit, as a token of its own
QWEN_TOKENS = re.compile(r"\d| (?=\d)|[^\d ]+| +")
NOISE = Image.effect_noise((200, 150), 40).convert("RGB")


def crowd(count: int, seed: int, label: str = "person") -> str:
    rng = random.Random(seed)
    return molmo2_answer([(rng.randrange(1000), rng.randrange(1000)) for _ in range(count)], label)


def replay(text: str, limit: int = GUESSES) -> tuple[int, int, list[tuple[str, str, str]]]:
    """Decode ``text`` a step at a time as the engine does, the text's tokens standing for the
    model's picks: (tokens, steps, each missed guess as (the text before it, the guessed
    token, the text's token))."""
    tokens = QWEN_TOKENS.findall(text)
    steps, missed = point_drafts.replay(tokens, limit)
    return len(tokens), steps, [("".join(tokens[:at]), guess, token) for at, guess, token in missed]


# -- the format's guesses (pure) -------------------------------------------------------------------
def test_the_guesses_are_what_molmo2s_point_format_fixes():
    draft = PointDraft()
    assert draft.guess(4) == ""  # nothing before a point list
    draft.feed('<points coords="')
    assert draft.guess(4) == "1 1 "  # one image, the first point's id
    draft.feed("1 1 46")
    assert draft.guess(4) == ""  # x's digits are the model's
    draft.feed("1")
    assert draft.guess(4) == " "  # after x's three digits
    draft.feed(" 527")
    assert draft.guess(4) == " 2 4"  # the next id, then x's first digit again (sorted by x)
    assert draft.guess(2) == " 2"
    draft.feed(" 2 481 521 3 1000")
    assert draft.guess(4) == " "  # 1000 has four digits: still a space after it
    draft.feed(" 9")
    draft.feed('99">cat</points>')
    assert draft.guess(4) == ""  # the list is closed
    draft.feed(' and <points coords="1 1 5')
    assert draft.guess(4) == ""  # a second list starts over


def test_a_step_confirms_the_leading_guesses_that_the_model_also_picks():
    assert accepted([5, 6, 7], [5, 6, 9, 1]) == 2
    assert accepted([5, 6], [4, 6, 1]) == 0
    assert accepted([], [3]) == 0
    assert accepted([5, 6], [5, 6, 2]) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), max_size=60))
def test_on_well_formed_answers_only_the_first_digit_of_x_and_the_lists_end_are_ever_missed(points):
    tokens, steps, missed = replay(molmo2_answer(points, "person"))
    x_starts = re.compile(r'coords="1( \d+ \d{3,4} \d{3,4})* \d+ $')
    for before, guessed, actual in missed:
        list_ended = actual.startswith('"')
        thousand = guessed == " " and actual == "0"  # x or y of 1000: four digits
        assert list_ended or thousand or (guessed.isdigit() and x_starts.search(before)), (before, guessed)
    assert steps <= tokens


@pytest.mark.parametrize("count", [20, 40, 60])
def test_a_crowd_takes_about_half_the_steps(count):
    tokens, steps, _ = replay(crowd(count, seed=count))
    assert tokens / steps >= 1.7, (tokens, steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(['coords="', "1", "0", " ", '"', "\t", "<points ", "x", "é", "99999999"])))
def test_any_text_gives_guesses_of_digits_and_spaces_within_the_limit(pieces):
    draft = PointDraft()
    for piece in pieces:
        draft.feed(piece)
        for limit in (0, 1, 4):
            guess = draft.guess(limit)
            assert len(guess) <= limit and set(guess) <= set("0123456789 ")


# -- the engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_queries():
    """Questions about the demo's scenes, as it was trained to be asked: real pointing answers."""
    queries = []
    for seed in range(4):
        scene = sample_scene(seed, 640, 480)
        queries += [PointQuery(scene.image, prompt_for(s.label), image_key=seed) for s in scene.shapes[:3]]
    return queries


def _shapes(draft: bool = True, max_batch: int = 32, **options) -> TransformersEngine:
    return TransformersEngine.load(
        str(SHIPPED_DEMO), max_new_tokens=600, max_batch=max_batch, draft=draft, **options
    )


def _steps(engine, queries, interactive=False):
    engine.decoder.profile = {}
    answers = engine.generate(queries, interactive=interactive)
    profile, engine.decoder.profile = engine.decoder.profile, None
    return answers, profile


@pytest.mark.parametrize("interactive", [False, True])
def test_with_guesses_the_demos_answers_are_generates_in_fewer_steps(shapes_queries, interactive):
    """Bulk work, and an opened task of four labels (its region's steps have 16 entries)."""
    shapes_queries = shapes_queries[:4] if interactive else shapes_queries
    engine = _shapes()
    assert engine.drafting is not None
    plain = engine.generate_plain(shapes_queries)
    fast, drafted = _steps(engine, shapes_queries, interactive)
    engine.drafting = None
    _, one_a_step = _steps(engine, shapes_queries, interactive)
    assert all(a.text.startswith('<points coords="1 1 ') for a in plain), "the demo must point"
    assert [a.text for a in fast] == [a.text for a in plain]
    assert [a.tokens for a in fast] == [a.tokens for a in plain]
    for a, b in zip(fast, plain):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert drafted["steps"] < one_a_step["steps"]
    assert drafted["guessed"] > 0 and one_a_step["guessed"] == 0, "guesses rode in the steps"


def _forced(points=(0, 1, 3, 12, 40, 25)) -> tuple[list[str], list[PointQuery]]:
    texts = [crowd(n, seed=n) for n in points]
    queries = [
        PointQuery(NOISE, f"Point to thing {i}", image_key="noise", answer_text=t)
        for i, t in enumerate(texts)
    ]
    return texts, queries


def test_forced_crowds_come_out_whole_and_take_about_half_the_steps():
    """Forced texts (the seam) are the answers exactly, guesses or not; a 40-point crowd, the
    longest row, takes at most 0.6 of its tokens in steps."""
    texts, queries = _forced()
    answers, one_a_step = _steps(_shapes(draft=False), queries)
    drafted_answers, drafted = _steps(_shapes(), queries)
    assert [a.text for a in answers] == texts
    assert [a.text for a in drafted_answers] == texts
    for a, b in zip(answers, drafted_answers):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    longest = max(len(a.token_logprobs) for a in answers)
    assert one_a_step["steps"] >= longest - 1
    assert drafted["steps"] <= 0.6 * longest, (drafted["steps"], longest)


@pytest.mark.parametrize("path", ["split-key", "cascade"])
def test_guesses_on_the_gpus_attention_paths_give_the_same_answers(path, monkeypatch):
    """The decode attention of a GPU (the split-key kernels in Triton's interpreter; the cascade
    over a reference kernel) with guesses: one slot is several entries of an image group in a
    step. Short answers: the interpreter is slow on the CPU."""
    monkeypatch.setattr(cascade, "MIN_ROWS", 1)
    monkeypatch.setattr(cascade, "efficient_attention", reference_kernel)
    monkeypatch.setattr(slot_attention, "efficient_attention", reference_kernel)
    texts, queries = _forced((2, 0, 1))
    expected = _shapes().generate(queries)
    engine = _shapes()
    slot_attention.install()
    if path == "split-key":
        engine.decoder.flash = True
    else:
        engine.decoder.varlen = engine.decoder.cascade = True
    kernels, real = [], flash_decode.attention
    monkeypatch.setattr(flash_decode, "attention", lambda *a, **k: kernels.append(1) or real(*a, **k))
    answers, drafted = _steps(engine, queries)
    assert [a.text for a in answers] == texts
    for a, b in zip(answers, expected):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert drafted["guessed"] > 0, "guesses rode in the steps"
    assert bool(kernels) == (path == "split-key")


@pytest.mark.parametrize("pool_rows", [2, 1])
def test_runs_that_must_grow_move_or_wait_with_guesses_lose_nothing(pool_rows):
    """A pool of one or two longest rows: rows outgrow their runs, move, wait, start again; a
    row's guesses never pass what its run holds, and every answer is still its forced text."""
    texts, queries = _forced()
    engine = _shapes()
    engine = tight_pool(engine, bulk_tokens=pool_rows * engine.decoder.max_length)
    assert [a.text for a in engine.generate(queries)] == texts
    assert engine.decoder.moves > 0
    assert not engine.decoder.space.held


def test_with_the_scheduler_rows_joining_and_leaving_keep_their_answers(shapes_queries):
    """Continuous batching: rows join mid-answer (two slots for twelve queries), opened tasks
    come first; natural and forced answers are each query's own."""
    texts, forced = _forced()
    engine = _shapes(max_batch=2)
    alone = [engine.generate([q])[0].text for q in shapes_queries[:9]]
    scheduler = Scheduler(engine)
    try:
        bulk = scheduler.submit_async(forced + shapes_queries[:6])
        opened = scheduler.submit(shapes_queries[6:9], priority=Priority.INTERACTIVE)
        bulk.wait()
    finally:
        scheduler.close()
    assert [a.text for a in bulk.answers] == texts + alone[:6]
    assert [a.text for a in opened] == alone[6:]


# -- when it is on ----------------------------------------------------------------------------------
def test_only_a_tokenizer_that_writes_a_digit_a_token_gets_guesses(demo_model_dir):
    """The random demo's tokenizer merges digits ("Ġ461"): its engine decodes a token a step."""
    assert TransformersEngine.load(str(demo_model_dir), max_new_tokens=8, draft=True).drafting is None
    pieces = {}
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [ord(c) for c in text])
    assert Drafting.for_tokenizer(tokenizer, pieces.get) is not None


def test_answers_forced_by_logits_processors_take_no_guesses():
    tokenizer = _shapes(draft=False).processor.tokenizer
    answer = by_label({"thing": '<points coords="1 1 100 200">thing</points>'})
    engine = _shapes(logits_processors=[ForceAnswers(tokenizer, answer)])
    assert engine.drafting is None


def test_molmo_draft_is_off_by_default_and_reaches_the_engine():
    assert Settings.from_env({}).draft == "0"
    with pytest.raises(SettingsError, match="MOLMO_DRAFT"):
        Settings.from_env({"MOLMO_DRAFT": "yes"})
    for value, on in (("1", True), ("0", False)):
        settings = Settings.from_env({"MOLMO_DRAFT": value}, model=str(SHIPPED_DEMO))
        assert (TransformersEngine.from_settings(settings).drafting is not None) is on
