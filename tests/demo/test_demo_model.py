"""The trained shapes demo (MOLMO_DEMO=1) really points: through the real server (gunicorn,
``molmo-backend serve``, HTTP on 127.0.0.1), on scenes it never saw, with nothing forced.

Scenes come from molmo_backend/demo/scenes.py with seeds training never draws, so every shape's
centre is known, in the image *as displayed*. Five kinds of file, SCENES_PER_CASE scenes each: a
plain PNG (640x480), a JPEG stored sideways with an EXIF orientation tag (6 or 8; 480x640 as
displayed), a wide 1000x300 PNG, a tiny 64x64 PNG and a 12 MP (4000x3000) JPEG. Every label of the
config is asked about every image (Label Studio's way): each shape must get one keypoint of its
label within TOLERANCE_PERCENT of its centre, in Label Studio's percent coordinates, and a label
not in the image no keypoint.

Measured on the shipped model (CPU, this test, 2026-12-02): MEASURED below; the thresholds sit
under it. The demo is a weak pointer: a quarter of its keypoints land on their shape, the rest
fall elsewhere in the image, and it never says "There are none." (every label gets a point).
It shows the whole path working with points that are visibly the model's, not a useful model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageOps

from molmo_backend.demo.models import SHIPPED_DEMO, demo_info
from molmo_backend.demo.scenes import LABELS, Scene, label_config, make_scene
from tests.support.processes import BackendServer, serve_directory

#: a keypoint "lands" when it is within this distance of the shape's true centre, in percent units
#: of the displayed image's width and height (as Label Studio stores x and y)
TOLERANCE_PERCENT = 6.0
SCENES_PER_CASE = 4
#: per kind of file: share of shapes that get exactly one keypoint that lands
MIN_HIT_RATE = 0.15
#: over all kinds
MIN_OVERALL_HIT_RATE = 0.2
MEASURED = (
    "hits within 6%: plain PNG 3/11, EXIF-rotated 4/12, 1000x300 2/11, 64x64 3/8, 12 MP 3/13 "
    "(15/55 = 27%); median distance 22-44%; absent labels left without a point: 0/185"
)
CONFIG = label_config()


@dataclass
class Case:
    kind: str
    scene: Scene  # as displayed
    file: str


def _write_sideways(scene: Scene, path: Path, orientation: int) -> None:
    """Stored turned, tagged so that viewers (and the backend) turn it back: orientation 6 means
    "rotate 90 degrees clockwise to display", 8 counter-clockwise."""
    stored = scene.image.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=92, exif=exif)


def _cases(directory: Path) -> list[Case]:
    kinds = [
        ("plain PNG 640x480", (640, 480), lambda sc, p, i: sc.image.save(p), "png"),
        (
            "EXIF-rotated JPEG, 480x640 as displayed",
            (480, 640),
            lambda sc, p, i: _write_sideways(sc, p, 6 if i % 2 == 0 else 8),
            "jpg",
        ),
        ("non-square PNG 1000x300", (1000, 300), lambda sc, p, i: sc.image.save(p), "png"),
        ("tiny PNG 64x64", (64, 64), lambda sc, p, i: sc.image.save(p), "png"),
        ("12 MP JPEG 4000x3000", (4000, 3000), lambda sc, p, i: sc.image.save(p, "JPEG", quality=90), "jpg"),
    ]
    cases = []
    for k, (kind, (width, height), write, ext) in enumerate(kinds):
        for i in range(SCENES_PER_CASE):
            rng = random.Random(f"server-test-{k}-{i}")
            scene = make_scene(rng, width, height, count=2 if width < 100 else rng.randint(2, 4))
            name = f"case{k}-{i}.{ext}"
            write(scene, directory / name, i)
            cases.append(Case(kind, scene, name))
    return cases


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo-scenes")
    cases = _cases(directory)
    env = {"MOLMO_DEMO": "1", "MOLMO_ALLOWED_HOSTS": "127.0.0.1", "MOLMO_DEVICE": "cpu"}
    with (
        serve_directory(directory) as url,
        BackendServer(tmp_path_factory.mktemp("demo-server"), env=env) as backend,
    ):
        yield backend, url, cases, directory


def _predict(backend, url: str, cases: list[Case], config: str = CONFIG) -> list[dict]:
    tasks = [{"id": i + 1, "data": {"image": f"{url}/{c.file}"}} for i, c in enumerate(cases)]
    body = {
        "tasks": tasks,
        "project": "1.1700000000",
        "label_config": config,
        "params": {"login": None, "password": None, "context": None},
    }
    response = requests.post(f"{backend.url}/predict", json=body, timeout=600)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(cases)
    return results


def test_the_exif_cases_are_stored_sideways(world):
    """The rotated files really need their orientation tag, so the next test checks that the
    backend applies it: stored 640x480, displayed 480x640 and pixel for pixel the scene."""
    _, _, cases, directory = world
    rotated = [c for c in cases if c.kind.startswith("EXIF")]
    assert len(rotated) == SCENES_PER_CASE
    for case in rotated:
        with Image.open(directory / case.file) as stored:
            assert stored.size == (640, 480)
            shown = ImageOps.exif_transpose(stored).convert("RGB")
        assert shown.size == case.scene.image.size
        for shape in case.scene.shapes:  # the shape's colour where the truth says it is
            at = (round(shape.x), round(shape.y))
            assert sum(abs(a - b) for a, b in zip(shown.getpixel(at), case.scene.image.getpixel(at))) < 60


def score(cases: list[Case], results: list[dict]) -> dict:
    """Per kind of file: shapes, hits (one keypoint of the label within the tolerance), absent
    labels and those left without a keypoint; and every distance."""
    table: dict[str, dict] = {}
    for case, result in zip(cases, results):
        width, height = case.scene.image.size
        row = table.setdefault(case.kind, {"shapes": 0, "hits": 0, "absent": 0, "clean": 0, "distances": []})
        by_label: dict[str, list[dict]] = {}
        for region in result["result"]:
            assert (region["original_width"], region["original_height"]) == (width, height), case.kind
            assert region["from_name"] == "kp" and region["to_name"] == "image"
            by_label.setdefault(region["value"]["keypointlabels"][0], []).append(region["value"])
        for shape in case.scene.shapes:
            points = by_label.get(shape.label, [])
            row["shapes"] += 1
            if len(points) == 1:
                distance = math.hypot(
                    points[0]["x"] - 100 * shape.x / width, points[0]["y"] - 100 * shape.y / height
                )
                row["distances"].append(round(distance, 1))
                row["hits"] += distance <= TOLERANCE_PERCENT
        present = {s.label for s in case.scene.shapes}
        for label in LABELS:
            if label not in present:
                row["absent"] += 1
                row["clean"] += label not in by_label
    return table


def test_demo_points_land_on_the_shapes_through_the_real_server(world):
    backend, url, cases, _ = world
    assert "serving the tiny DEMO model (trained on synthetic shapes; not Molmo)" in backend.log
    results = _predict(backend, url, cases)
    assert all(r["model_version"].startswith("molmo2-demo-shapes@") for r in results)
    table = score(cases, results)
    print("\n" + json.dumps(table, indent=1))
    for kind, row in table.items():
        assert row["hits"] / row["shapes"] >= MIN_HIT_RATE, (kind, row)
    hits = sum(r["hits"] for r in table.values()) / sum(r["shapes"] for r in table.values())
    assert hits >= MIN_OVERALL_HIT_RATE, table
    for result in results:  # visible points on every task, inside the image
        points = [r["value"] for r in result["result"] if r["type"] == "keypointlabels"]
        assert points and all(0 <= p["x"] <= 100 and 0 <= p["y"] <= 100 for p in points)


def test_a_predict_of_three_labels_is_quick_on_cpu(world):
    """One opened task with three labels, on the CPU: about MEASURED_SECONDS on an idle 2-core
    machine; the bound is loose because test machines are shared."""
    backend, url, cases, _ = world
    config = label_config(LABELS[:3])
    body = {
        "tasks": [{"id": 1, "data": {"image": f"{url}/{cases[0].file}"}}],
        "project": "1.1700000000",
        "label_config": config,
        "params": {"login": None, "password": None, "context": None},
    }
    requests.post(f"{backend.url}/predict", json=body, timeout=60).raise_for_status()  # warm
    started = time.monotonic()
    response = requests.post(f"{backend.url}/predict", json=body, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    print(f"\none task, 3 labels: {elapsed:.2f} s")
    assert elapsed < 10.0, elapsed


def test_the_shipped_demo_records_how_it_was_trained():
    info = demo_info(SHIPPED_DEMO)
    assert info["kind"] == "shapes"
    training = info["training"]
    assert training["finished"] and training["held_out"]["hit_rate"] >= 0.4, training["held_out"]  # 0.454
    assert (SHIPPED_DEMO / "model.safetensors").stat().st_size <= 20 * 1024 * 1024


def test_the_engine_answers_like_generate_on_the_shipped_demo():
    """The serving engine's fast decoder (one prefill per image, static cache) and plain greedy
    ``generate()`` give the shipped demo's answers token for token, on unseen scenes."""
    from molmo_backend.engine.base import PointQuery
    from molmo_backend.engine.molmo2 import TransformersEngine
    from molmo_backend.pointing.prompts import build_prompt

    fast = TransformersEngine.load(str(SHIPPED_DEMO), max_new_tokens=40, max_batch=16)
    plain = TransformersEngine(
        fast.model,
        fast.processor,
        model_id=fast.model_id,
        revision=fast.revision,
        max_new_tokens=40,
        max_batch=16,
        decoder="generate",
        demo=True,
    )
    rng = random.Random("engine-vs-generate")
    queries = []
    for n in range(4):
        scene = make_scene(rng)
        queries += [
            PointQuery(scene.image, build_prompt(label), image_key=n) for label in rng.sample(LABELS, 3)
        ]
    assert [a.text for a in fast.generate(queries)] == [a.text for a in plain.generate(queries)]
