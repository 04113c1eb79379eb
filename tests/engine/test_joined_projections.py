"""One matrix product for Molmo2's q/k/v projections and one for its MLP's gate and up
(molmo_backend/engine/joined_projections.py), on the tiny random Molmo2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from molmo_backend.engine import joined_projections
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.molmo2 import TransformersEngine
from tests.engine.test_prepare_ahead import BLUE, RED


def _layers(model):
    return [m for m in model.modules() if type(m).__name__ == "Molmo2DecoderLayer"]


@pytest.fixture()
def model(demo_model_dir):
    return AutoModelForImageTextToText.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def test_joined_layers_compute_what_huggingfaces_compute_without_new_memory(model):
    layers = _layers(model)
    config = model.config.text_config
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, config.hidden_size, generator=generator)
    angle = torch.rand(3, 9, config.head_dim, generator=generator) * 20
    rotary = (angle.cos(), angle.sin())
    with torch.no_grad():
        plain = [(layer.self_attn(x, rotary, None)[0], layer.mlp(x)) for layer in layers]
        assert joined_projections.join(model) == 2 * len(layers)
        joined = [(layer.self_attn(x, rotary, None)[0], layer.mlp(x)) for layer in layers]
    for (attention, mlp), (attention_joined, mlp_joined) in zip(plain, joined):
        torch.testing.assert_close(attention_joined, attention, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp_joined, mlp, rtol=1e-5, atol=1e-5)
    attention = layers[0].self_attn
    assert "forward" in vars(attention) and "forward" in vars(layers[0].mlp)
    stack = attention.joined_weight
    assert stack.shape[0] == sum(
        p.weight.shape[0] for p in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    # the separate weights are views of the stack: the model holds each weight once
    assert attention.k_proj.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
    assert torch.equal(attention.v_proj.weight, stack[-attention.v_proj.weight.shape[0] :])
    assert joined_projections.unjoin(model) == 2 * len(layers) and "forward" not in vars(attention)
    with torch.no_grad():
        assert torch.equal(layers[0].mlp(x), plain[0][1])


def test_a_second_join_leaves_the_joined_layers_alone(model):
    assert joined_projections.join(model) > 0
    assert joined_projections.join(model) == 0


def test_the_engine_joins_its_model_and_answers_as_plain_generate(demo_model_dir):
    """Every path on the engine's model runs the joined products: its continuous-batching steps
    and plain ``generate()`` on the same model give the same greedy answers."""
    engine = TransformersEngine.load(str(demo_model_dir), model_id="tiny", max_new_tokens=12, max_batch=8)
    attention = _layers(engine.model)[0].self_attn
    assert "forward" in vars(attention)
    queries = [PointQuery(image, label) for image in (RED, BLUE) for label in ("cat", "dog", "red square")]
    fast = engine.generate(queries)
    plain = engine.generate_plain(queries)
    assert [a.text for a in fast] == [a.text for a in plain]
