"""Per-point confidence: which tokens score a point, the engine's per-token data, the threshold."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from molmo_backend.engine.base import Answer, PointQuery
from molmo_backend.pointing.confidence import point_scores, scored_points
from molmo_backend.pointing.points import parse_points
from molmo_backend.settings import Settings, SettingsError
from tests.conftest import KEYPOINT_CONFIG
from tests.support.scripted import answer, keypoints, task

# Qwen-style tokens (one digit each): point 2 starts at the " " after 527 (going on rather than
# closing the list with '">') and its id "2"
TWO_POINTS = [
    "<",
    "points",
    " coords",
    '="',
    "1",
    " ",
    "1",
    " ",
    "4",
    "6",
    "1",
    " ",
    "5",
    "2",
    "7",
    " ",
    "2",
    " ",
    "4",
    "8",
    "1",
    " ",
    "5",
    "2",
    "1",
    '">',
    "cat",
    "</",
    "points",
    ">",
]


def with_probs(pieces, probs: dict[int, float]):
    """``answer()`` pieces with probability ``probs[i]`` on piece i."""
    return [(p, probs[i]) if i in probs else p for i, p in enumerate(pieces)]


def test_first_point_scores_the_choice_to_point_at_all():
    # "<" was chosen over "There are none." with p = 0.6; everything else certain
    scored = scored_points(answer(*with_probs(TWO_POINTS, {0: 0.6})))
    assert [s.score for s in scored] == [0.6, 1.0]
    assert [(s.point.x, s.point.y) for s in scored] == [(46.1, 52.7), (48.1, 52.1)]


def test_later_point_scores_the_choice_to_go_on_rather_than_close_the_list():
    # after 527 the model went on (" " then "2") instead of '">': 0.5 * 0.8
    scored = scored_points(answer(*with_probs(TWO_POINTS, {15: 0.5, 16: 0.8})))
    assert [s.score for s in scored] == [1.0, 0.4]


def test_coordinate_digits_do_not_lower_the_score():
    # unsure digits (x of point 1, y of point 2): where, not whether
    scored = scored_points(answer(*with_probs(TWO_POINTS, {8: 0.3, 10: 0.2, 22: 0.35, 24: 0.1})))
    assert [s.score for s in scored] == [1.0, 1.0]


def test_counting_answer_first_point_includes_the_sentence_before_the_list():
    pieces = [
        ("Counting", 0.7),
        " the",
        " <",
        "points",
        " coords",
        '="',
        "1 1 250 750",
        " 2 500 500",
        '">',
        "dogs",
        "</",
        "points",
        ">",
        " shows a total of 2.",
    ]
    assert [s.score for s in scored_points(answer(*pieces))] == [0.7, 1.0]


def test_multi_digit_tokens_and_v1_format_are_scored_the_same_way():
    # the demo tokenizer writes " 2" and " 481" as one token each (OLMo-style number tokens)
    pieces = [
        "<",
        "points",
        " coords",
        '="',
        "1",
        " 1",
        (" 461", 0.2),
        " 527",
        (" 2", 0.45),
        " 481",
        " 521",
        '">',
        "cat",
        "</",
        "points",
        ">",
    ]
    assert [s.score for s in scored_points(answer(*pieces))] == [1.0, 0.45]
    v1 = [
        "<",
        "points",
        " x",
        '1="',
        "10.0",
        '" y',
        '1="',
        "20.5",
        '"',
        (" x", 0.25),
        '2="',
        "80.1",
        '" y',
        '2="',
        "55.3",
        '">',
        "cats",
        "</points>",
    ]
    assert [s.score for s in scored_points(answer(*v1))] == [1.0, 0.25]


def test_empty_special_tokens_count_for_nothing():
    tokens = ["", '<points coords="1 1 100 100', ("", 0.01), ' 2 200 200">', "a", "</points>"]
    assert [s.score for s in scored_points(answer(*tokens))] == [1.0, 1.0]


def test_without_per_token_data_every_point_gets_the_answer_score():
    plain = Answer(text='<points coords="1 1 100 100 2 200 200">a</points>', score=0.83)
    assert [s.score for s in scored_points(plain)] == [0.83, 0.83]
    assert [s.score for s in scored_points(Answer(text=plain.text))] == [None, None]


def test_point_scores_directly_on_offsets():
    text = '<points coords="1 1 100 100 2 200 200">a</points>'
    points = parse_points(text)
    # one token per character: the span of point 2 is " 2" after "100" (2 characters)
    tokens = list(text)
    logprobs = [0.0] * len(tokens)
    start2 = points[1].start
    logprobs[start2 - 1] = math.log(0.5)  # the space
    logprobs[start2] = math.log(0.5)  # the "2"
    logprobs[start2 + 2] = math.log(0.01)  # first digit of x: not counted
    assert point_scores(points, tokens, logprobs) == [1.0, 0.25]


# -- the engine attaches per-token data ---------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    from molmo_backend.engine.molmo2 import TransformersEngine

    return TransformersEngine.load(str(demo_model_dir), max_new_tokens=40, max_batch=8)


def test_engine_answers_carry_token_texts_and_logprobs_that_give_forced_scores(engine):
    from tests.support.forcing import ForceScoredAnswers, at, by_substring

    cat = '<points coords="1 1 250 500 2 750 100">cat</points>'
    specs = {
        "cat": (cat, {**at(cat, " 2 750", 0.3, 1), **at(cat, "250", 0.2)}),  # id of point 2; a digit
        "dog": ("There are none.", {0: 0.9}),
    }
    engine.logits_processors.append(ForceScoredAnswers(engine.processor.tokenizer, by_substring(specs)))
    try:
        image = Image.new("RGB", (64, 48))
        out = engine.generate([PointQuery(image, "Point to cat"), PointQuery(image, "Point to dog")])
    finally:
        engine.logits_processors.clear()
    cat_answer, dog_answer = out
    assert cat_answer.text == cat and "".join(cat_answer.tokens) == cat
    assert len(cat_answer.tokens) == len(cat_answer.token_logprobs) > 5
    assert sorted(round(math.exp(lp), 3) for lp in cat_answer.token_logprobs)[:2] == [0.2, 0.3]
    assert [s.score for s in scored_points(cat_answer)] == [1.0, 0.3]
    assert dog_answer.text == "There are none." and scored_points(dog_answer) == []
    assert round(math.exp(dog_answer.token_logprobs[0]), 3) == 0.9


def test_token_texts_add_up_to_the_decoded_text_even_when_a_character_is_split(engine):
    from molmo_backend.engine.token_text import TokenTexts

    tokenizer = engine.processor.tokenizer
    splitter = TokenTexts(tokenizer)
    splitter._split_exact = None  # split characters are regrouped locally, never by prefixes
    for text in [
        '<points coords="1 1 461 527">cat</points>',
        'Köpfe café ünïcödé <points coords="1 1 5 5">ö</points>',
    ]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        pieces = splitter.split(ids, decoded)
        assert "".join(pieces) == decoded == text and len(pieces) == len(ids)
    # the split characters go to the token that completes them, never a replacement character
    assert all("\ufffd" not in piece for piece in pieces)
    special = ids + [tokenizer.eos_token_id]
    assert splitter.split(special, tokenizer.decode(special, skip_special_tokens=True))[-1] == ""


class SentencePieceLike:
    """Decoding a token alone drops its leading space (as SentencePiece's "▁cat" does)."""

    vocab = ["the", " cat", " is", '<points coords="1 1', " 5", " 5", '">', "cat</points>"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids).lstrip()

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(row) for row in rows]


def test_token_texts_fall_back_to_prefix_decoding_when_single_tokens_lose_their_spaces():
    from molmo_backend.engine.token_text import TokenTexts

    tokenizer = SentencePieceLike()
    ids = list(range(len(tokenizer.vocab)))
    text = tokenizer.decode(ids)
    pieces = TokenTexts(tokenizer).split(ids, text)
    assert pieces == tuple(tokenizer.vocab) and "".join(pieces) == text
    # and the scores land on the right tokens: " 5" after "1 1" is the first point's x
    logprobs = [0.0] * len(ids)
    logprobs[3] = math.log(0.7)  # '<points coords="1 1': the choice to point
    logprobs[4] = math.log(0.1)  # a digit: not counted
    assert [
        p.score for p in scored_points(Answer(text=text, tokens=pieces, token_logprobs=tuple(logprobs)))
    ] == [0.7]


# -- the backend: region scores, task score, threshold -----------------------------------------

CAT_PIECES = with_probs(TWO_POINTS, {15: 0.3})  # point 2: 0.3
DOG = answer('<points coords="1 1 100 200">dog</points>', score=0.9)  # no per-token split: 1 piece


def test_regions_carry_point_scores_and_the_task_score_is_their_mean(make_backend):
    backend, _ = make_backend({"cat": answer(*CAT_PIECES), "dog": DOG})
    [prediction] = backend.predict([task()], label_config=KEYPOINT_CONFIG)
    assert keypoints(prediction) == [
        ("cat", 46.1, 52.7, 1.0),
        ("cat", 48.1, 52.1, 0.3),
        ("dog", 10.0, 20.0, 1.0),
    ]
    assert prediction["score"] == pytest.approx((1.0 + 0.3 + 1.0) / 3)


def test_min_point_score_drops_weak_points_and_the_mean_follows(make_backend):
    backend, _ = make_backend({"cat": answer(*CAT_PIECES), "dog": DOG}, min_point_score=0.5)
    [prediction] = backend.predict([task()], label_config=KEYPOINT_CONFIG)
    assert keypoints(prediction) == [("cat", 46.1, 52.7, 1.0), ("dog", 10.0, 20.0, 1.0)]
    assert prediction["score"] == 1.0


def test_points_without_any_score_survive_the_threshold(make_backend):
    unscored = Answer(text='<points coords="1 1 100 200">cat</points>')
    backend, _ = make_backend({"cat": unscored}, min_point_score=0.9)
    [prediction] = backend.predict([task()], label_config=KEYPOINT_CONFIG)
    assert [(label, x, y) for label, x, y, _ in keypoints(prediction)] == [("cat", 10.0, 20.0)]
    assert "score" not in prediction["result"][0] and prediction["score"] == 0.0


def test_min_point_score_setting():
    assert Settings.from_env({}).min_point_score == 0.0
    assert Settings.from_env({"MOLMO_MIN_POINT_SCORE": "0.35"}).min_point_score == 0.35
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(SettingsError, match="MOLMO_MIN_POINT_SCORE"):
            Settings.from_env({"MOLMO_MIN_POINT_SCORE": bad})
