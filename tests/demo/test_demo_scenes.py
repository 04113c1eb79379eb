"""The synthetic scenes the demo model is trained and tested on (pure Pillow, no model)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from molmo_backend.demo.scenes import (
    COLOURS,
    LABELS,
    NONE_ANSWER,
    SAMPLES,
    answer_for,
    label_config,
    make_scene,
    pick_question,
    sample_scene,
    write_samples,
)
from molmo_backend.labelstudio.config import parse_label_config
from molmo_backend.pointing.points import parse_points

ROOT = Path(__file__).resolve().parents[2]


def test_answers_parse_back_to_the_shape_centres():
    rng = random.Random(1)
    for _ in range(200):
        scene = make_scene(rng)
        width, height = scene.image.size
        for shape in scene.shapes:
            for grid in (1, 25):
                points = parse_points(answer_for(scene, shape.label, grid))
                assert len(points) == 1 and points[0].label == shape.label
                # percent of the image; the grid rounds by at most half a step (of 0-1000)
                assert abs(points[0].x - 100 * shape.x / width) <= grid / 20 + 0.05
                assert abs(points[0].y - 100 * shape.y / height) <= grid / 20 + 0.05
        absent = next(label for label in LABELS if scene.find(label) is None)
        assert answer_for(scene, absent) == NONE_ANSWER and parse_points(NONE_ANSWER) == []


def test_scenes_are_reproducible_and_shapes_are_inside_and_apart():
    a = make_scene(random.Random("x"), with_map=True)
    b = make_scene(random.Random("x"), with_map=True)
    assert a.image.tobytes() == b.image.tobytes() and a.shapes == b.shapes
    rng = random.Random(2)
    for _ in range(200):
        scene = make_scene(rng)
        width, height = scene.image.size
        assert 1 <= len(scene.shapes) <= 4
        assert len({s.label for s in scene.shapes}) == len(scene.shapes)
        for i, s in enumerate(scene.shapes):
            assert s.radius <= s.x <= width - s.radius and s.radius <= s.y <= height - s.radius
            for t in scene.shapes[i + 1 :]:
                assert math.hypot(s.x - t.x, s.y - t.y) > s.radius + t.radius


def test_each_shape_is_drawn_in_its_colour_at_its_centre_and_mapped_there():
    rng = random.Random(3)
    for _ in range(50):
        scene = make_scene(rng, 400, 300, with_map=True)
        for shape in scene.shapes:
            centre = (round(shape.x), round(shape.y))
            pixel = scene.image.getpixel(centre)
            nearest = min(COLOURS, key=lambda c: sum((p - q) ** 2 for p, q in zip(pixel, COLOURS[c])))
            assert nearest == shape.colour, (shape, pixel)
            assert scene.label_map.getpixel(centre) == 1 + LABELS.index(shape.label)


def test_questions_name_present_shapes_or_absent_ones_at_the_asked_share():
    rng = random.Random(4)
    asked = [(scene, pick_question(rng, scene)) for scene in (make_scene(rng) for _ in range(1000))]
    absent = sum(scene.find(label) is None for scene, label in asked)
    assert 0.25 <= absent / len(asked) <= 0.35


def test_the_sample_files_are_what_the_generator_writes(tmp_path):
    """docs/demo holds the generator's output (regenerate with python -m molmo_backend.demo.scenes)."""
    write_samples(tmp_path)
    docs = ROOT / "docs" / "demo"
    assert (docs / "shapes.json").read_text() == (tmp_path / "shapes.json").read_text()
    assert (docs / "label_config.xml").read_text() == (tmp_path / "label_config.xml").read_text()
    truth = json.loads((docs / "shapes.json").read_text())
    for name, seed, width, height in SAMPLES:
        assert [s["label"] for s in truth[name]] == [
            s.label for s in sample_scene(seed, width, height).shapes
        ]
        from PIL import Image

        with Image.open(docs / name) as image:
            assert image.size == (width, height)


def test_the_sample_label_config_is_one_keypoint_control_with_every_label():
    targets = parse_label_config(label_config()).points
    assert [(t.from_name, t.to_name, t.labels) for t in targets] == [("kp", "image", LABELS)]
