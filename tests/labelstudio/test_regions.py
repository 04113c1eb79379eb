import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from molmo_backend.labelstudio.regions import empty_prediction, keypoint_region, task_prediction
from molmo_backend.pointing.points import Point, parse_points

KW = dict(from_name="kp", to_name="image", label="cat", image_width=800, image_height=600, point_width=0.75)


def test_region_has_the_shape_label_studio_stores():
    region = keypoint_region(Point(20.0, 30.0, "cat"), **KW, score=0.9)
    region_id = region.pop("id")
    assert isinstance(region_id, str) and 1 <= len(region_id) <= 16
    assert region == {
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 800,
        "original_height": 600,
        "image_rotation": 0,
        "score": 0.9,
        "value": {"x": 20.0, "y": 30.0, "width": 0.75, "keypointlabels": ["cat"]},
    }


def test_region_without_score_has_no_score_key():
    assert "score" not in keypoint_region(Point(1, 2), **KW)


def test_non_finite_score_is_left_out():
    region = keypoint_region(Point(1, 2), **KW, score=float("nan"))
    assert "score" not in region
    json.dumps(region, allow_nan=False)


def test_region_ids_are_unique():
    ids = {keypoint_region(Point(1, 2), **KW)["id"] for _ in range(500)}
    assert len(ids) == 500


def test_label_is_used_as_given():
    region = keypoint_region(Point(1, 2, "model text"), **{**KW, "label": 'say "hi" & {x} 猫'})
    assert region["value"]["keypointlabels"] == ['say "hi" & {x} 猫']


@pytest.mark.parametrize("x, y", [(0, 0), (100, 100), (0.0, 100.0), (50.5, 0.001)])
def test_edges_are_valid(x, y):
    region = keypoint_region(Point(x, y), **KW)
    assert (region["value"]["x"], region["value"]["y"]) == (x, y)
    assert isinstance(region["value"]["x"], float)


@pytest.mark.parametrize(
    "x, y",
    [
        (-0.01, 50),
        (50, -1),
        (100.01, 50),
        (50, 150),
        (float("nan"), 50),
        (50, float("inf")),
        (float("-inf"), 1),
        ("50", 50),
        (None, 50),
        (True, 50),
    ],
)
def test_invalid_points_give_none(x, y):
    assert keypoint_region(Point(x, y), **KW) is None


@pytest.mark.parametrize(
    "width, height",
    [(0, 600), (800, 0), (-1, 600), (800.5, 600), (None, 600), (float("inf"), 600), (True, 600)],
)
def test_invalid_image_size_gives_none(width, height):
    assert keypoint_region(Point(1, 2), **{**KW, "image_width": width, "image_height": height}) is None


@pytest.mark.parametrize("point_width", [0, -1, float("nan"), None])
def test_bad_point_width_is_a_setting_error(point_width):
    with pytest.raises(ValueError):
        keypoint_region(Point(1, 2), **{**KW, "point_width": point_width})


def test_task_prediction_with_score():
    regions = [keypoint_region(Point(1, 2), **KW)]
    assert task_prediction(regions, "molmo-v1", score=0.5) == {
        "result": regions,
        "score": 0.5,
        "model_version": "molmo-v1",
    }


def test_task_prediction_score_is_the_mean_of_region_scores():
    regions = [keypoint_region(Point(1, 2), **KW, score=s) for s in (0.2, 0.6, None)]
    assert task_prediction(regions, "v")["score"] == pytest.approx(0.4)


def test_task_prediction_without_any_score_is_zero():
    regions = [keypoint_region(Point(1, 2), **KW)]
    assert task_prediction(regions, "v")["score"] == 0.0
    assert task_prediction([], "v") == {"result": [], "score": 0.0, "model_version": "v"}


def test_task_prediction_rejects_non_finite_score():
    with pytest.raises(ValueError):
        task_prediction([], "v", score=float("nan"))


def test_task_prediction_copies_the_list():
    regions = []
    prediction = task_prediction(regions, "v")
    regions.append({"x": 1})
    assert prediction["result"] == []


def test_empty_prediction():
    assert empty_prediction("molmo-abc") == {"result": [], "score": 0.0, "model_version": "molmo-abc"}


def test_answer_to_prediction_is_valid_json_with_only_sane_points():
    answer = '<points coords="1 1 461 527 2 1500 521 3 0 1000">cat</points><point x="nan" y="3">cat</point>'
    regions = [r for p in parse_points(answer) if (r := keypoint_region(p, **KW)) is not None]
    prediction = json.loads(json.dumps(task_prediction(regions, "v"), allow_nan=False))
    assert [(r["value"]["x"], r["value"]["y"]) for r in prediction["result"]] == [(46.1, 52.7), (0.0, 100.0)]
    for r in prediction["result"]:
        assert math.isfinite(r["value"]["x"])


def test_pure_modules_import_no_heavy_libraries():
    code = (
        "import sys, molmo_backend.pointing.points, molmo_backend.pointing.prompts, molmo_backend.labelstudio.regions, "
        "molmo_backend.labelstudio.config; "
        "print(sorted(m for m in ('torch', 'transformers', 'flask') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]"
