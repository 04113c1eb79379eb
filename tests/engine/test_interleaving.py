"""Opened tasks arriving in the middle of bulk work never change any answer (issue #12).

Through the real :class:`Scheduler` and the real engine on the tiny random Molmo2, with the
model's own answers (nothing forced, so the decoder's real paths run): bulk jobs of every size
class (1-20 queries over several images of different token counts), and opened tasks (1-3
queries) submitted at a random prefill or decode step of the bulk work. Every answer, text and
per-token log-probabilities, must equal the same query's answer run alone
(tests/support/interleave.py; bench/interleaving_gpu.py runs the same check with CUDA graphs).

The previous engine ran an opened task *inside* a paused bulk batch and could overwrite that
batch's reused buffers: this check, run against it (through the ``between_steps`` hook it had,
commit 154caef), gave a query an error instead of its answer in 2 of 10 seeded trials on the
CPU (bench/results-old-engine-interleaving-cpu.log). Now the scheduler owns the loop and the
engine never re-enters itself. Covered: the slot decoder with few and many bulk slots (rows
admitted as others leave, or all at once), and plain ``generate()`` run as whole batches.
"""

from __future__ import annotations

import pytest
from PIL import Image

from molmo_backend.demo.models import SHIPPED_DEMO
from molmo_backend.engine.molmo2 import TransformersEngine
from tests.support.interleave import run_trials

TRIALS = 8
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images():
    """Five images whose prefixes have different token counts (up to 4 crops)."""
    sizes = [(300, 200), (640, 480), (200, 700), (900, 300), (500, 500)]
    return [Image.effect_noise(size, 30 + 9 * i).convert("RGB") for i, size in enumerate(sizes)]


@pytest.mark.parametrize("decoder,max_batch", [("fast", 4), ("fast", 24), ("generate", 24)])
def test_opened_tasks_mid_bulk_leave_every_answer_as_it_is_alone(demo_model_dir, images, decoder, max_batch):
    engine = TransformersEngine.load(
        str(demo_model_dir), max_new_tokens=12, max_batch=max_batch, decoder=decoder
    )
    engine.processor.image_processor.max_crops = 4
    trials = run_trials(
        engine,
        images,
        TRIALS,
        seed_base=1000 * max_batch + 100 * (decoder == "generate"),
        tolerance=LOGPROB_TOLERANCE,
    )
    for trial in trials:
        print(
            trial["seed"], trial["bulk"], trial["opened"], trial["arrived_mid_bulk"], len(trial["mismatches"])
        )
        assert not trial["mismatches"], (
            f"seed {trial['seed']}: answers differ from alone: {trial['mismatches'][:3]}"
        )
    mid_bulk = sum(trial["arrived_mid_bulk"] for trial in trials)
    assert mid_bulk >= TRIALS // 2, f"only {mid_bulk} of {TRIALS} trials had an opened task arrive mid-bulk"


@pytest.mark.parametrize("max_batch", [4, 24])
def test_with_guessed_tokens_opened_tasks_mid_bulk_leave_every_answer_as_it_is_alone(images, max_batch):
    """The same check with MOLMO_DRAFT on the shapes demo (its tokenizer writes a digit a token)
    and every answer forced as a pointing answer, so that steps confirm guessed tokens."""
    engine = TransformersEngine.load(str(SHIPPED_DEMO), max_new_tokens=64, max_batch=max_batch, draft=True)
    assert engine.drafting is not None
    engine.processor.image_processor.max_crops = 4
    engine.decoder.profile = {}
    trials = run_trials(
        engine, images, TRIALS, seed_base=5000 + max_batch, tolerance=LOGPROB_TOLERANCE, texts=True
    )
    for trial in trials:
        assert not trial["mismatches"], f"seed {trial['seed']}: answers differ: {trial['mismatches'][:3]}"
    assert sum(trial["arrived_mid_bulk"] for trial in trials) >= TRIALS // 2
    assert engine.decoder.profile["guessed"] > 0, "guesses rode in the steps"
