"""Molmo v1 checkpoints: family detection, the profile errors, and the v1 engine end to end.

A tiny local checkpoint with its own remote code (tests/support/molmo1_checkpoint.py) stands in for
allenai/Molmo-7B-D-0924: same files, same ``process`` / ``generate_from_batch`` contract.

Two environments run this file:
- the main venv (transformers 5): family detection from config.json, the error that names the
  molmo1 profile, the module refusing to import, the v1 prompt phrasing;
- the molmo1 venv (``scripts/test-molmo1``, transformers 4.53): the engine through the remote code:
  input building, -1 padding, batched generation, forced v1 answers parsed to keypoints, and the
  backend's predictions. Those tests skip under transformers 5 with the reason.
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import transformers
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.inprocess import ModelLoadError
from molmo_backend.engine.loading import load_local_engine, model_family
from molmo_backend.pointing.points import Point, parse_points
from molmo_backend.pointing.prompts import build_prompt, default_prompt_template, prompt_fingerprint
from molmo_backend.settings import Settings
from tests.support.molmo1_checkpoint import EOS, write_molmo1_checkpoint

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
needs_v1_profile = pytest.mark.skipif(
    TRANSFORMERS_MAJOR >= 5,
    reason=f"needs the molmo1 profile (transformers 4.5x, not {transformers.__version__}): "
    "run scripts/test-molmo1",
)
needs_transformers5 = pytest.mark.skipif(
    TRANSFORMERS_MAJOR < 5, reason="checks the main profile's behaviour (transformers 5)"
)

V1_TEMPLATE = "Point to {label}\nPlease say 'This isn't in the image.' if it is not in the image."
RED = Image.new("RGB", (640, 480), (200, 30, 30))  # 2x2 tiles + global crop = 5 crops
TALL = Image.new("RGB", (300, 500), (30, 200, 30))  # 2x1 tiles + global = 3 crops
SMALL = Image.new("RGB", (100, 90), (30, 30, 200))  # 1 tile + global = 2 crops


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    return write_molmo1_checkpoint(tmp_path_factory.mktemp("molmo1") / "tiny_molmo_v1")


def _remote_modules_loaded(folder) -> list[str]:
    return [name for name in sys.modules if name.startswith("transformers_modules") and folder.name in name]


# -- both profiles -------------------------------------------------------------------------------


def test_family_is_read_from_config_json_without_running_remote_code(v1_dir, tmp_path):
    assert model_family(str(v1_dir)) == "molmo"
    molmo2 = tmp_path / "molmo2"
    molmo2.mkdir()
    (molmo2 / "config.json").write_text(json.dumps({"model_type": "molmo2"}))
    assert model_family(str(molmo2)) == "molmo2"
    assert _remote_modules_loaded(v1_dir) == []  # config.json was read, config_molmo.py not run


def test_v1_prompts_use_v1_trained_phrasing():
    assert default_prompt_template("molmo") == V1_TEMPLATE
    assert default_prompt_template("molmo2") != V1_TEMPLATE  # Molmo2 says 'There are none.'
    assert build_prompt("cat", default_prompt_template("molmo")) == (
        "Point to cat\nPlease say 'This isn't in the image.' if it is not in the image."
    )
    # the template is part of model_version: v1 and Molmo2 predictions never share a version
    assert prompt_fingerprint(V1_TEMPLATE) != prompt_fingerprint(default_prompt_template("molmo2"))


# -- main profile (transformers 5) ---------------------------------------------------------------


@needs_transformers5
def test_v1_checkpoint_under_transformers5_names_the_profile_to_install(v1_dir):
    with pytest.raises(ModelLoadError) as err:
        load_local_engine(Settings(model=str(v1_dir), demo="0", device="cpu"))
    message = str(err.value)
    assert "Molmo v1" in message and "requirements-molmo1.txt" in message
    assert transformers.__version__ in message and "4.46-4.53" in message
    assert _remote_modules_loaded(v1_dir) == []  # failed before running any remote code


@needs_transformers5
def test_molmo1_engine_refuses_to_import_under_transformers5():
    sys.modules.pop("molmo_backend.engine.molmo1", None)
    with pytest.raises(ImportError, match="requirements-molmo1.txt"):
        importlib.import_module("molmo_backend.engine.molmo1")
    # ... and the rest of the package is unaffected
    service = importlib.import_module("molmo_backend.app.service")
    assert callable(service.default_engine_factory)


# -- molmo1 profile (transformers 4.5x) ----------------------------------------------------------


class NoStop(LogitsProcessor):
    """Bans the stop token, so a random model writes every allowed token (a non-trivial answer)."""

    def __init__(self, stop_id: int):
        self.stop_id = stop_id

    def __call__(self, input_ids, scores):
        scores[:, self.stop_id] = float("-inf")
        return scores


class ForceV1Answers(LogitsProcessor):
    """Makes greedy decoding write a chosen answer per prompt, then ``<|endoftext|>``.

    Rows look like v1's: [bos, image tokens, " User: {prompt} Assistant:", -1 padding, new tokens].
    """

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.stop = tokenizer.convert_tokens_to_ids(EOS)
        self.marker = tokenizer.encode(" Assistant:", add_special_tokens=False)
        self.prompts: list[str] = []

    def _split(self, row: list[int]) -> tuple[str, int]:
        m = len(self.marker)
        end = max(i for i in range(len(row) - m + 1) if row[i : i + m] == self.marker) + m
        prompt = self.tokenizer.decode([t for t in row[:end] if t >= 0], skip_special_tokens=True)
        prompt = prompt.split("User: ", 1)[1].rsplit(" Assistant:", 1)[0]
        return prompt, sum(1 for t in row[end:] if t >= 0)

    def __call__(self, input_ids, scores):
        for b, row in enumerate(input_ids.tolist()):
            prompt, done = self._split(row)
            if done == 0:
                self.prompts.append(prompt)
            label = next((k for k in sorted(self.answers, key=len, reverse=True) if k in prompt), None)
            if label is None:
                continue
            forced = self.tokenizer.encode(self.answers[label], add_special_tokens=False) + [self.stop]
            scores[b, :] = float("-inf")
            scores[b, forced[done] if done < len(forced) else self.stop] = 0.0
        return scores


@pytest.fixture(scope="module")
def engine(v1_dir):
    if TRANSFORMERS_MAJOR >= 5:
        pytest.skip("needs the molmo1 profile")
    from molmo_backend.engine.molmo1 import Molmo1Engine

    return Molmo1Engine(str(v1_dir), max_new_tokens=40, max_batch=8)


@needs_v1_profile
def test_loads_through_the_remote_code_with_every_weight(engine, v1_dir):
    from safetensors.torch import load_file

    assert type(engine.model).__module__.startswith("transformers_modules")
    assert type(engine.model).__name__ == "MolmoForCausalLM" and hasattr(engine.model, "generate_from_batch")
    assert type(engine.processor).__name__ == "MolmoProcessor"
    assert engine.family == "molmo" and engine.model_id == str(v1_dir) and len(engine.revision) == 10
    saved = load_file(str(v1_dir / "model.safetensors"))
    loaded = engine.model.state_dict()
    assert set(loaded) == set(saved)  # nothing left randomly initialised by from_pretrained
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@needs_v1_profile
def test_input_building_pads_ids_right_and_crops_with_minus_one(engine):
    from molmo_backend.engine.molmo1 import collate

    prompts = ["Point to cat", "Point to the left eye of the dog", "Point to x"]
    singles = [engine.processor.process(images=[img], text=p) for img, p in zip([RED, TALL, SMALL], prompts)]
    assert [s["images"].shape[0] for s in singles] == [5, 3, 2]
    assert len({s["input_ids"].shape[0] for s in singles}) == 3  # three different lengths
    batch = engine.build_batch([PointQuery(img, p) for img, p in zip([RED, TALL, SMALL], prompts)])
    assert set(batch) == {"input_ids", "images", "image_input_idx", "image_masks"}
    again = collate(singles)
    longest = max(s["input_ids"].shape[0] for s in singles)
    assert batch["input_ids"].shape == (3, longest) and batch["input_ids"].dtype == torch.long
    assert batch["images"].shape == (3, 5, 16, 14 * 14 * 3) and batch["images"].dtype == engine.dtype
    for row, single in enumerate(singles):
        n, crops = single["input_ids"].shape[0], single["images"].shape[0]
        assert torch.equal(batch["input_ids"][row, :n], single["input_ids"])  # content first...
        assert (batch["input_ids"][row, n:] == -1).all()  # ...then -1 on the right
        assert torch.equal(again["images"][row, :crops], single["images"])
        assert (batch["images"][row, crops:] == -1).all()
        assert (batch["image_input_idx"][row, crops:] < 0).all()
        assert (batch["image_masks"][row, crops:] == -1).all()
        text = engine.processor.tokenizer.decode(single["input_ids"], skip_special_tokens=True)
        assert text.endswith(f" User: {prompts[row]} Assistant:")


@needs_v1_profile
def test_batched_answers_equal_one_at_a_time_answers(engine):
    stop = engine.processor.tokenizer.convert_tokens_to_ids(EOS)
    engine.logits_processors.append(NoStop(stop))
    try:
        images = [RED, TALL, SMALL, RED]
        queries = [PointQuery(img, f"Point to thing {'x' * i}") for i, img in enumerate(images)]
        batched = engine.generate(queries)
        single = [engine.generate([q])[0] for q in queries]
    finally:
        engine.logits_processors.clear()
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(len(a.text) >= 20 for a in batched)  # 40 tokens of random text each
    assert len({a.text for a in batched}) > 1  # the rows really differ
    assert [a.score for a in batched] == pytest.approx([a.score for a in single], abs=1e-4)


@needs_v1_profile
def test_left_padding_would_change_answers(engine):
    """The stand-in is sensitive to padding the way v1 is, so the test above can catch a wrong batch."""
    from transformers import GenerationConfig

    stop = engine.processor.tokenizer.convert_tokens_to_ids(EOS)
    short = engine.build_batch(
        [PointQuery(SMALL, "Point to x"), PointQuery(RED, "Point to a much longer thing")]
    )
    left = dict(short)
    ids = short["input_ids"][0]
    n = int((ids != -1).sum())
    left["input_ids"] = short["input_ids"].clone()
    left["input_ids"][0] = torch.cat([ids[n:], ids[:n]])  # same row, padded on the left
    left["image_input_idx"] = short["image_input_idx"].clone()
    left["image_input_idx"][0] = torch.where(
        short["image_input_idx"][0] >= 0, short["image_input_idx"][0] + (len(ids) - n), -1
    )
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=[stop], pad_token_id=stop)
    banned = LogitsProcessorList([NoStop(stop)])
    right_out = engine.model.generate_from_batch(short, config, logits_processor=banned)[0, len(ids) :]
    left_out = engine.model.generate_from_batch(left, config, logits_processor=banned)[0, len(ids) :]
    assert not torch.equal(right_out, left_out)


@needs_v1_profile
def test_forced_v1_answers_come_back_as_percent_points(engine):
    answers = {
        "cat": '<point x="61.5" y="40.6" alt="cat">cat</point>',
        "dog": '<points x1="10.0" y1="20.5" x2="80.1" y2="55.3" alt="dogs">dogs</points>',
        "bird": "There are none.",
    }
    forcer = ForceV1Answers(engine.processor.tokenizer, answers)
    prompts = [build_prompt(label, V1_TEMPLATE) for label in ("cat", "dog", "bird")]
    queries = [PointQuery(RED, prompts[0]), PointQuery(TALL, prompts[1]), PointQuery(SMALL, prompts[2])]
    engine.logits_processors.append(forcer)
    try:
        engine.max_new_tokens = 12
        capped = engine.generate(queries)
        engine.max_new_tokens = 64
        forcer.prompts.clear()
        out = engine.generate(queries)
    finally:
        engine.logits_processors.clear()
        engine.max_new_tokens = 40
    cut = capped[0].text
    assert answers["cat"].startswith(cut) and 0 < len(cut) < len(answers["cat"])
    assert parse_points(cut) == []  # a point cut off by the cap is not trusted
    assert capped[2].text == "There are none."  # short answers end on their own
    assert [a.text for a in out] == [answers["cat"], answers["dog"], answers["bird"]]
    assert all(a.score == 1.0 for a in out)  # forced tokens have probability 1
    assert sorted(forcer.prompts) == sorted(prompts)  # the processor wrapped exactly our prompts
    assert parse_points(out[0].text) == [Point(61.5, 40.6, "cat")]
    assert parse_points(out[1].text) == [Point(10.0, 20.5, "dogs"), Point(80.1, 55.3, "dogs")]
    assert parse_points(out[2].text) == []


@needs_v1_profile
def test_profile_dispatches_v1_and_refuses_molmo2_and_the_demo(v1_dir, tmp_path):
    from molmo_backend.app.model_choice import load_engine
    from molmo_backend.engine.molmo1 import Molmo1Engine

    settings = Settings(model=str(v1_dir), demo="auto", device="cpu", max_new_tokens=8, max_batch=3)
    loaded = load_engine(settings)
    assert isinstance(loaded, Molmo1Engine)
    assert (loaded.max_new_tokens, loaded.max_batch, loaded.dtype) == (8, 3, torch.float32)
    molmo2 = tmp_path / "molmo2"
    molmo2.mkdir()
    (molmo2 / "config.json").write_text(json.dumps({"model_type": "molmo2"}))
    with pytest.raises(ModelLoadError, match="molmo1 install profile.*requirements.txt"):
        load_engine(Settings(model=str(molmo2), demo="0", device="cpu"))
    with pytest.raises(ModelLoadError, match="demo model is a Molmo2"):
        load_engine(Settings(model=str(v1_dir), demo="1", device="cpu"))


@needs_v1_profile
def test_backend_predicts_v1_keypoints_end_to_end(engine, image_url):
    from molmo_backend.app.service import build_backend
    from tests.conftest import KEYPOINT_CONFIG

    answers = {
        "cat": '<point x="25.0" y="50.0" alt="cat">cat</point>',
        "dog": '<points x1="75.0" y1="12.5" x2="10.0" y2="90.0" alt="dog">dog</points>',
    }
    forcer = ForceV1Answers(engine.processor.tokenizer, answers)
    engine.logits_processors.append(forcer)
    settings = Settings(model="allenai/Molmo-7B-D-0924", allowed_hosts=("127.0.0.1",), point_width=0.75)
    backend = build_backend(settings, engine)
    try:
        predictions = backend.predict(
            [{"id": 1, "data": {"image": f"{image_url}/red-640x480.png"}}], label_config=KEYPOINT_CONFIG
        )
    finally:
        backend.scheduler.close()
        engine.logits_processors.clear()
    assert backend.prompt_template == V1_TEMPLATE
    assert sorted(forcer.prompts) == [build_prompt("cat", V1_TEMPLATE), build_prompt("dog", V1_TEMPLATE)]
    regions = predictions[0]["result"]
    values = sorted((r["value"]["keypointlabels"][0], r["value"]["x"], r["value"]["y"]) for r in regions)
    assert values == [("cat", 25.0, 50.0), ("dog", 10.0, 90.0), ("dog", 75.0, 12.5)]
    assert all(r["original_width"] == 640 and r["score"] == 1.0 for r in predictions[0]["result"])


@needs_v1_profile
def test_profile_has_every_import_of_the_v1_remote_code(engine, v1_dir):
    from transformers.dynamic_module_utils import check_imports, get_imports

    needed = set()
    for name in ("modeling_molmo.py", "image_preprocessing_molmo.py", "preprocessing_molmo.py"):
        check_imports(str(v1_dir / name))  # what from_pretrained runs: ImportError for a missing package
        needed.update(get_imports(str(v1_dir / name)))
    assert {"einops", "torchvision", "tensorflow"} <= needed
    image_processor = engine.processor.image_processor
    by_torch = engine.processor.process(images=[RED], text="Point to cat")["images"]
    image_processor.resize_method = "tensorflow"
    try:
        by_tf = engine.processor.process(images=[RED], text="Point to cat")["images"]
    finally:
        image_processor.resize_method = "torch"
    assert by_tf.shape == by_torch.shape and torch.allclose(by_tf, by_torch, atol=0.02)
