"""The demo model's training script: it runs, is reproducible on a CPU, and writes a checkpoint
that the serving engine loads like any Molmo2 (a few steps here; the shipped model took
thousands, see DEMO_MODEL.json)."""

from __future__ import annotations

import json
import random

import torch

from molmo_backend.app.model_choice import choose_model
from molmo_backend.demo.models import SHAPES_RECIPE, demo_info, demo_name
from molmo_backend.demo.scenes import make_scene
from molmo_backend.demo.training import PatchProbe, main
from molmo_backend.demo.training_data import Batches, draw_example, encode, patch_labels
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.settings import Settings


def _train(out):
    argv = ["--out", str(out), "--steps", "3", "--batch", "2", "--eval-count", "2", "--eval-every", "0"]
    assert main(argv) == 0
    return (out / "model.safetensors").read_bytes()


def test_training_writes_a_loadable_reproducible_demo_checkpoint(tmp_path, capsys):
    first = _train(tmp_path / "a")
    record = json.loads(capsys.readouterr().out)
    assert (
        record["steps"] == 3
        and record["finished"]
        and record["held_out"]["present"] + record["held_out"]["absent"] == 2
    )
    assert _train(tmp_path / "b") == first  # same seed, same weights
    info = demo_info(tmp_path / "a")
    assert info["kind"] == "shapes" and info["training"]["steps"] == 3
    assert demo_name(tmp_path / "a") == "molmo2-demo-shapes"

    choice = choose_model(Settings(model=str(tmp_path / "a"), demo="0"))  # as the server picks and names it
    engine = TransformersEngine.load(
        choice.path, model_id=choice.model_id, demo=choice.demo, max_new_tokens=8, max_batch=4
    )
    assert engine.model_id == "molmo2-demo-shapes" and engine.demo
    scene = make_scene(random.Random(0))
    answers = engine.generate([PointQuery(scene.image, "Point to red circle")])
    assert len(answers) == 1


def test_batches_depend_only_on_seed_and_step():
    from molmo_backend.demo.models import new_model

    _, processor = new_model(SHAPES_RECIPE, 0, __import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    batches = Batches(processor, seed=0, steps=10, batch_size=2, ramp_steps=5, grid=25)
    again = Batches(processor, seed=0, steps=10, batch_size=2, ramp_steps=5, grid=25)
    for step in (0, 7):
        a, b = batches.batch(step), again.batch(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(batches.batch(1)["pixel_values"], batches.batch(2)["pixel_values"])


def test_only_answer_tokens_are_scored_and_patch_labels_match_the_image_tokens():
    from molmo_backend.demo.models import new_model

    model, processor = new_model(
        SHAPES_RECIPE, 0, __import__("pathlib").Path(__import__("tempfile").mkdtemp())
    )
    examples = [draw_example(random.Random(i)) for i in range(3)]
    batch = encode(processor, examples)
    tokenizer = processor.tokenizer
    for row, example in enumerate(examples):
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(scored) == example.answer + tokenizer.eos_token
    side = SHAPES_RECIPE.crop // SHAPES_RECIPE.patch
    assert batch["patch_labels"].shape == (3, side * side)
    assert torch.equal(batch["patch_labels"][0], patch_labels(examples[0].scene))
    probe = PatchProbe(model)
    model.train()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "patch_labels")}
    model(**inputs)
    assert probe.features.shape[0] == 3 * 2 * side * side  # two views of side x side tokens each
    assert probe.loss(batch["patch_labels"]).item() > 0
