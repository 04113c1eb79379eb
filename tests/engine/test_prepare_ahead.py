"""Work done ahead of the GPU worker: one preparation per image (not per label), vision features
computed on the preparation thread, and Molmo2's RMS norms fused into one kernel each."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from molmo_backend.app.model_choice import choose_model
from molmo_backend.engine import fused_norms
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.engine.prefill import image_features, prepare_image, step_features
from molmo_backend.engine.scheduler import Scheduler
from molmo_backend.settings import Settings
from tests.support.scripted import ScriptedStepEngine

RED = Image.new("RGB", (640, 480), (200, 30, 30))
BLUE = Image.new("RGB", (300, 500), (30, 30, 200))


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    choice = choose_model(Settings(model=str(demo_model_dir), demo="0"))
    return TransformersEngine.load(choice.path, model_id=choice.model_id, max_new_tokens=12, max_batch=8)


class PreparingEngine(ScriptedStepEngine):
    """Counts its preparations and, like the real engine, reads each admitted row's."""

    def __init__(self):
        super().__init__({})
        self.release_bulk.set()
        self.prepared_keys: list = []
        self.futures: dict = {}
        self._lock = threading.Lock()

    def prepare(self, query):
        with self._lock:
            self.prepared_keys.append(query.image_key)
        return query.image_key

    def prefill(self, rows):
        """Each image of ``rows`` prepared once: ahead (its first row's future) or now."""
        done = {}
        for row in rows:
            key = row.query.image_key
            if key not in done:
                done[key] = row.prepared.result() if row.prepared is not None else self.prepare(row.query)
                self.futures.setdefault(key, set()).add(id(row.prepared))
            assert done[key] == key
        super().prefill(rows)


def test_the_labels_of_one_image_share_one_preparation():
    engine = PreparingEngine()
    scheduler = Scheduler(engine)
    queries = [PointQuery(RED, f"Point to {label}.", image_key="red") for label in ("cat", "dog", "car")]
    queries += [PointQuery(BLUE, f"Point to {label}.", image_key="blue") for label in ("cat", "dog")]
    try:
        answers = scheduler.submit(queries)
    finally:
        scheduler.close()
    assert len(answers) == 5 and all(a.error is None for a in answers)
    assert sorted(engine.prepared_keys) == ["blue", "red"], "one preparation per image"
    assert {key: len(ids) for key, ids in engine.futures.items()} == {"red": 1, "blue": 1}
    assert len(engine.prepared_keys) == len(engine.futures)


def test_features_computed_ahead_are_the_features_the_step_would_compute(engine):
    ahead = [engine.prepare(PointQuery(image, "Point to the cat.")) for image in (RED, BLUE)]
    assert all(image.features is not None for image in ahead)
    fresh = prepare_image(engine.processor, BLUE)
    with torch.inference_mode():
        want = image_features(engine.model, [prepare_image(engine.processor, RED), fresh], engine.dtype)
        both_ahead = step_features(engine.model, ahead, engine.dtype)
        mixed = step_features(engine.model, [ahead[0], fresh], engine.dtype)
    assert fresh.features is None
    torch.testing.assert_close(both_ahead, torch.cat([image.features for image in ahead]), rtol=0, atol=0)
    torch.testing.assert_close(both_ahead, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)


def test_answers_are_the_same_with_features_ahead_or_in_the_step(engine):
    queries = [
        PointQuery(image, f"Point to the {label}.", image_key=key)
        for key, image in (("red", RED), ("blue", BLUE))
        for label in ("cat", "dog")
    ]
    texts = {}
    for ahead in (True, False):
        engine.features_ahead = ahead
        scheduler = Scheduler(engine)
        try:
            texts[ahead] = [a.text for a in scheduler.submit(queries)]
        finally:
            scheduler.close()
            engine.features_ahead = True
    assert texts[True] == texts[False] and all(texts[True])


def test_every_rms_norm_of_the_model_is_one_kernel_with_huggingfaces_arithmetic(engine):
    model = engine.model
    norms = [m for m in model.modules() if type(m).__name__ == fused_norms.NORM_CLASS]
    assert len(norms) >= 4 * model.config.text_config.num_hidden_layers + 1  # 4 a layer, the last
    assert all("forward" in vars(norm) for norm in norms), "every norm fused"
    generator = torch.Generator().manual_seed(3)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2**-7)):
        copy = torch.nn.Sequential(type(norms[0])(64, eps=norms[0].variance_epsilon)).to(dtype)
        with torch.no_grad():
            copy[0].weight.copy_(torch.rand(64, generator=generator) + 0.5)
        x = (4 * torch.randn(7, 64, generator=generator)).to(dtype)
        plain = copy(x)
        assert fused_norms.fuse(copy) == 1 and "forward" in vars(copy[0])
        fused = copy(x)
        assert fused_norms.unfuse(copy) == 1 and torch.equal(copy(x), plain)
        # bf16: the fused kernel rounds once where Hugging Face rounds twice, a step apart at most
        error = (fused.float() - plain.float()).abs().max().item()
        assert error <= tolerance * plain.float().abs().max().item()
