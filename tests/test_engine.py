"""The transformers engine on the tiny demo Molmo2: real processor -> generate -> decode on CPU."""

from __future__ import annotations

import pytest
from PIL import Image

from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.transformers_engine import TransformersEngine, resolve_model
from molmo_backend.settings import Settings
from tests.support.forcing import ForceAnswers, by_label

RED = Image.new("RGB", (640, 480), (200, 30, 30))
GREEN = Image.new("RGB", (300, 500), (30, 200, 30))


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)


def test_loads_through_the_auto_classes_and_reports_what_it_is(engine):
    assert type(engine.model).__name__ == "Molmo2ForConditionalGeneration"
    assert type(engine.processor).__name__ == "Molmo2Processor"
    assert engine.family == "molmo2" and engine.demo and engine.model_id == "molmo2-demo"
    assert len(engine.revision) == 10


def test_chat_text_puts_the_image_first_and_asks_for_the_assistant(engine):
    text = engine.chat_text("Point to cat")
    assert text == "<|image|><|im_start|>user\nPoint to cat<|im_end|>\n<|im_start|>assistant\n"


def test_forced_answers_come_through_real_generate(engine):
    answers = {"cat": '<points coords="1 1 461 527 2 481 521">cat</points>', "dog": "There are none."}
    engine.logits_processors.append(ForceAnswers(engine.processor.tokenizer, by_label(answers)))
    try:
        out = engine.generate([PointQuery(RED, "Point to cat"), PointQuery(GREEN, "Point to dog")])
    finally:
        engine.logits_processors.clear()
    assert [a.text for a in out] == [answers["cat"], answers["dog"]]
    assert all(a.score == 1.0 for a in out)  # forced tokens have probability 1


def test_batched_answers_equal_one_at_a_time_answers(engine):
    queries = [PointQuery(img, f"Point to thing {i}") for i, img in enumerate([RED, GREEN, RED, GREEN, RED])]
    batched = engine.generate(queries)
    single = [engine.generate([q])[0] for q in queries]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.text for a in batched)  # the random model says something
    assert [a.score for a in batched] == pytest.approx([a.score for a in single], abs=1e-3)


@pytest.mark.parametrize("chunk", [8, 2])
def test_fast_decoder_equals_plain_generate_with_padding_everywhere(demo_model_dir, monkeypatch, chunk):
    """Images with different crop counts (prefix padding), prompts of different lengths (suffix
    padding), labels sharing images, prefill in one or several chunks: the fast path gives
    generate()'s tokens and scores."""
    monkeypatch.setattr("molmo_backend.engine.decoding.PREFILL_CHUNK_IMAGES", chunk)
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=32, max_batch=8)
    engine.processor.image_processor.max_crops = 4
    noise = Image.effect_noise((500, 500), 60).convert("RGB")
    tall = Image.new("RGB", (300, 900), (10, 200, 10))
    images = [RED, tall, noise]
    prompts = ["Point to cat", "Point to the big brown dog", "Point to a", "Point to every window", "x", "Point to cat"]
    queries = [PointQuery(images[i % 3], p, image_key=i % 3) for i, p in enumerate(prompts)]
    fast, plain = engine.generate(queries), engine.generate_plain(queries)
    assert [a.text for a in fast] == [a.text for a in plain]
    assert [a.score for a in fast] == pytest.approx([a.score for a in plain], abs=1e-3)
    assert [a.tokens for a in fast] == [a.tokens for a in plain]  # per-point confidence from either
    for f, p in zip(fast, plain):
        assert "".join(f.tokens) == f.text or "".join(f.tokens).strip() == f.text
        assert f.token_logprobs == pytest.approx(p.token_logprobs, abs=1e-3)
    batch_tokens = engine.processor(images=[[im] for im in images], text=[engine.processor.image_token] * 3,
                                    padding=True, return_tensors="pt")["attention_mask"].sum(-1)
    assert len(set(batch_tokens.tolist())) > 1, "test images must give prefixes of different lengths"


def test_reused_small_batch_buffers_give_the_same_answers_call_after_call(demo_model_dir):
    """Opened tasks reuse cached buffers (and, on CUDA, a captured graph): batches of other
    sizes and prompt lengths in between must not leak into the next answers."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)
    reference = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8, decoder="generate")
    engine.decoder.reuse_buffers = True
    batches = [
        [PointQuery(RED, "Point to cat", 1), PointQuery(RED, "Point to the dog on the left", 1),
         PointQuery(RED, "Point to x", 1)],
        [PointQuery(GREEN, "Point to a very long description of something " * 3, 2)],
        [PointQuery(RED, "Point to cat", 3), PointQuery(GREEN, "Point to cat", 4)],
        [PointQuery(RED, "Point to cat", 5), PointQuery(RED, "Point to the dog on the left", 5),
         PointQuery(RED, "Point to x", 5)],
    ]
    for queries in batches:
        assert [a.text for a in engine.generate(queries)] == [a.text for a in reference.generate(queries)]
    assert engine.decoder._slots, "small batches should have used cached buffers"


def test_fast_decoder_offers_a_pause_after_every_step(engine):
    calls = []
    engine.generate([PointQuery(RED, "Point to cat")], between_steps=lambda: calls.append(1))
    assert len(calls) >= engine.max_new_tokens - 1  # every decode step, plus each prefill chunk


def test_fast_decoder_answers_each_query_like_it_was_alone(demo_model_dir):
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)
    queries = [PointQuery(img, f"Point to item number {i}" + " please" * i) for i, img in enumerate([RED, GREEN, RED])]
    together = engine.generate(queries)
    alone = [engine.generate([q])[0] for q in queries]
    assert [a.text for a in together] == [a.text for a in alone]


def test_demo_auto_falls_back_only_without_gpu_and_local_weights(tmp_path, demo_model_dir):
    path, demo = resolve_model(Settings(model="allenai/not-downloaded", demo="auto", cache_dir=tmp_path))
    assert demo and (tmp_path / "molmo2-demo-v1" / "DEMO_MODEL.json").is_file() and path.startswith(str(tmp_path))
    assert resolve_model(Settings(model="allenai/not-downloaded", demo="0", cache_dir=tmp_path)) == (
        "allenai/not-downloaded", False)
    assert resolve_model(Settings(model=str(demo_model_dir), demo="auto", cache_dir=tmp_path)) == (
        str(demo_model_dir), True)
