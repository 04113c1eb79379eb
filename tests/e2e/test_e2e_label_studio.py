"""End to end against a real Label Studio 1.23.2 (installed in its own venv by tests/support/labelstudio.py).

Select with ``pytest -m e2e``; leave out with ``-m "not e2e"``. The first run on a machine installs
LS (about 1.5 min) and migrates a template database (about 40 s); later runs start each LS in
seconds. One LS per token mode per session (fixtures in tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.labelstudio import E2E_TIMINGS
from tests.support.processes import BackendServer, serve_directory

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session", autouse=True)
def _report_e2e_time(request):
    """Prints where the e2e time went (LS install/migrate/start, backend start, each flow) at the
    end of the session: CI's budget for this part is a few minutes."""
    started = time.monotonic()
    yield
    E2E_TIMINGS["e2e_total_s"] = time.monotonic() - started
    line = "e2e timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in E2E_TIMINGS.items())
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + line)
    else:
        print(line)


KEYPOINT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" background="blue"/>
  </KeyPointLabels>
</View>"""


def test_uploaded_image_is_served_behind_a_token(ls, png_factory):
    """An uploaded file sits behind /data/upload/ and needs a token: the legacy token when legacy
    tokens are on; otherwise a PAT exchanged for a Bearer access token (the raw PAT is refused)."""
    project = ls.create_project(KEYPOINT_CONFIG, title="upload smoke")
    png = png_factory("smoke.png", 64, 48)
    [task_id] = ls.import_files(project["id"], [png])
    task = ls.open_task(task_id)
    path = task["data"]["image"]
    assert re.fullmatch(rf"/data/upload/{project['id']}/[0-9a-f]+-smoke\.png", path), path

    anonymous = requests.get(ls.url + path, timeout=30, allow_redirects=False)
    assert anonymous.status_code != 200

    bearer = {"Authorization": f"Bearer {ls.access_token()}"}
    r = requests.get(ls.url + path, headers=bearer, timeout=30)
    assert r.status_code == 200 and r.content == png.read_bytes()

    raw_pat = requests.get(ls.url + path, headers={"Authorization": f"Bearer {ls.pat()}"}, timeout=30)
    assert raw_pat.status_code == 401

    legacy = requests.get(ls.url + path, headers={"Authorization": f"Token {ls.user_token}"}, timeout=30)
    if ls.legacy_tokens:
        assert legacy.status_code == 200 and legacy.content == png.read_bytes()
    else:
        assert legacy.status_code == 401


LABEL_ATTRS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" prompt="black cats" hint="x" alias="c"/>
    <Label value="dog" prompt="a dog's nose"/>
    <Label value="bird"/>
  </KeyPointLabels>
</View>"""


def test_label_attributes_reach_the_backend(ls_legacy, capture_backend, png_factory):
    """LS 1.23.2 keeps the label config verbatim: unknown <Label> attributes such as ``prompt``
    survive in the stored config, in /setup's schema and in /predict's label_config. Its parsed
    config names a label by its ``alias`` when it has one."""
    ls = ls_legacy
    project = ls.create_project(LABEL_ATTRS_CONFIG, title="label attributes")
    stored = ls.get_project(project["id"])
    assert stored["label_config"] == LABEL_ATTRS_CONFIG
    parsed = stored["parsed_label_config"]["kp"]
    assert parsed["labels"] == ["c", "dog", "bird"]
    assert parsed["labels_attrs"]["c"] == {"value": "cat", "prompt": "black cats", "hint": "x", "alias": "c"}

    [task_id] = ls.import_files(project["id"], [png_factory("attrs.png", 32, 32)])
    ls.connect_ml(project["id"], capture_backend.url)
    setups = capture_backend.bodies("/setup")
    assert setups and setups[-1]["schema"] == LABEL_ATTRS_CONFIG
    assert setups[-1]["hostname"] == ls.url
    assert setups[-1]["access_token"] == ls.user_token

    ls.retrieve_predictions(project["id"])
    [predict] = capture_backend.bodies("/predict")
    assert predict["label_config"] == LABEL_ATTRS_CONFIG
    assert [t["id"] for t in predict["tasks"]] == [task_id]
    [prediction] = ls.predictions(task_id)
    assert prediction["model_version"] == capture_backend.model_version


# --------------------------------------------------------------------------------------------------
# Our backend behind a real Label Studio, both token modes.

FORCED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" prompt="black dogs" background="blue"/>
    <Label value="bird" alias="b" background="green"/>
    <Label value="fish" background="yellow"/>
  </KeyPointLabels>
</View>"""

# Molmo2 answers per prompt text (tests/support/forcing.py finds the key in the prompt): the
# dog's prompt comes from its `prompt` attribute, the bird's from its value (it has an alias).
FORCED_ANSWERS = {
    "cat": '<points coords="1 1 250 500 2 750 500">cat</points>',
    "black dogs": '<points coords="1 1 100 200">black dogs</points>',
    "bird": '<points coords="1 1 999 1">bird</points>',
    "fish": "There are none.",
}
# (label as stored, x %, y %) that those answers must become on every image
EXPECTED_POINTS = sorted([("cat", 25.0, 50.0), ("cat", 75.0, 50.0), ("dog", 10.0, 20.0), ("b", 99.9, 0.1)])
LABELS = {"cat", "dog", "b", "fish"}


def _check_prediction(
    ls, task_id: int, size: tuple[int, int], model_version: str, expected_points=EXPECTED_POINTS
) -> dict:
    """Exactly one stored prediction of ours, keypoints of the config in range, sized like the
    image; with ``expected_points`` the forced answers' points exactly."""
    preds = ls.predictions(task_id)
    assert len(preds) == 1, f"task {task_id}: {len(preds)} predictions: {preds}"
    [pred] = preds
    assert pred["model_version"] == model_version
    points = []
    for region in pred["result"]:
        assert region["from_name"] == "kp" and region["to_name"] == "image"
        assert region["type"] == "keypointlabels"
        assert (region["original_width"], region["original_height"]) == size
        value = region["value"]
        [label] = value["keypointlabels"]
        assert label in LABELS
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100
        assert value["width"] > 0
        points.append((label, round(value["x"], 3), round(value["y"], 3)))
    if expected_points is not None:
        assert sorted(points) == expected_points, f"task {task_id}: {points}"
    return pred


@pytest.mark.parametrize("mode", ["legacy", "legacy-setup-token", "pat"])
def test_backend_pre_annotates_through_label_studio(mode, request, png_factory, tmp_path):
    """A user's clicks: create a keypoint project, import uploaded files and http URLs, connect the
    backend, Retrieve Predictions, open a new task, retrieve again. Modes: legacy tokens on with the
    legacy token as LABEL_STUDIO_API_KEY; legacy tokens on and no key (the backend uses the token
    LS sends in /setup: docker-compose.yml's default); legacy tokens off with a PAT as the key."""
    t0 = time.monotonic()
    ls = request.getfixturevalue("ls_pat" if mode == "pat" else "ls_legacy")
    uploads = [png_factory("red.png", 640, 480), png_factory("tall.png", 300, 500)]
    web_dir = tmp_path / "web"
    web_dir.mkdir()
    Image.new("RGB", (320, 200), (10, 120, 200)).save(web_dir / "web.jpg", quality=90)
    Image.new("RGB", (123, 77), (90, 90, 10)).save(web_dir / "odd.png")
    sizes: dict[int, tuple[int, int]] = {}

    with serve_directory(web_dir) as web_url:
        project = ls.create_project(FORCED_CONFIG, title=f"molmo e2e {mode}")
        pid = project["id"]
        for task_id, path in zip(ls.import_files(pid, uploads), uploads):
            sizes[task_id] = Image.open(path).size
        for task_id, name in zip(
            ls.import_urls(pid, [f"{web_url}/web.jpg", f"{web_url}/odd.png"]), ["web.jpg", "odd.png"]
        ):
            sizes[task_id] = Image.open(web_dir / name).size
        assert [t["data"]["image"].startswith("/data/upload/") for t in ls.tasks(pid)] == [
            True,
            True,
            False,
            False,
        ]

        env = {
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.backend_api_key,
            "MOLMO_ALLOWED_HOSTS": web_url.split("//", 1)[1],
        }
        if mode == "legacy-setup-token":
            env["LABEL_STUDIO_API_KEY"] = ""  # empty = unset for the backend's settings
        with BackendServer(tmp_path, env=env, answers=FORCED_ANSWERS) as backend:
            t_backend = time.monotonic()
            ml = ls.connect_ml(pid, backend.url)
            assert ml["state"] == "CO", ml
            model_version = ml["model_version"]
            assert model_version

            # Data Manager: select all -> Retrieve Predictions
            answer = ls.retrieve_predictions(pid)
            assert answer.get("processed_items") == 4, answer
            for task_id, size in sizes.items():
                _check_prediction(ls, task_id, size, model_version)

            # a new task, opened in the labeling UI: predicted on open
            extra = png_factory("late.png", 200, 150)
            [late] = ls.import_files(pid, [extra])
            sizes[late] = (200, 150)
            opened = ls.open_task(late)
            assert opened["id"] == late
            _check_prediction(ls, late, sizes[late], model_version)

            # Retrieve Predictions again: every task already holds this version, nothing is added
            ls.retrieve_predictions(pid)
            for task_id, size in sizes.items():
                _check_prediction(ls, task_id, size, model_version)
            E2E_TIMINGS[f"forced_{mode}_backend_start_s"] = backend.startup_s
            E2E_TIMINGS[f"forced_{mode}_flow_s"] = time.monotonic() - t_backend
    E2E_TIMINGS[f"forced_{mode}_test_s"] = time.monotonic() - t0


DEMO_DIR = Path(__file__).resolve().parents[2] / "docs" / "demo"


#: shapes of docs/demo's six images (21) that the shipped demo finds within the tolerance:
#: measured 7 on 2026-12-02 (deterministic greedy decoding on the CPU)
DEMO_MIN_HITS = 6


def test_try_it_the_demo_model_points_at_the_sample_shapes_in_label_studio(ls_pat, tmp_path):
    """README's "Try it", step by step: the sample label config, the six sample images uploaded,
    the backend on MOLMO_DEMO=1 (nothing forced) with a PAT, connect, open one task, retrieve the
    rest. Every task gets one prediction of the demo's model_version with visible keypoints of the
    config's labels inside the image, and the demo's points land on their shapes as often as it
    measured in tests/demo/test_demo_model.py (it is a weak pointer that never says "There are none.")."""
    from tests.demo.test_demo_model import TOLERANCE_PERCENT

    ls = ls_pat
    truth = json.loads((DEMO_DIR / "shapes.json").read_text())
    config = (DEMO_DIR / "label_config.xml").read_text()
    project = ls.create_project(config, title="molmo try it")
    names = sorted(truth)
    ids = ls.import_files(project["id"], [DEMO_DIR / name for name in names])
    env = {"MOLMO_DEMO": "1", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat()}
    with BackendServer(tmp_path, env=env) as backend:
        assert "serving the tiny DEMO model (trained on synthetic shapes; not Molmo)" in backend.log
        ml = ls.connect_ml(project["id"], backend.url)
        assert ml["state"] == "CO", ml
        ls.open_task(ids[0])
        ls.retrieve_predictions(project["id"])
    shapes = hits = 0
    for task_id, name in zip(ids, names):
        [prediction] = ls.predictions(task_id)
        assert prediction["model_version"].startswith("molmo2-demo-shapes@")
        with Image.open(DEMO_DIR / name) as image:
            width, height = image.size
        found = {}
        for region in prediction["result"]:
            [label] = region["value"]["keypointlabels"]
            assert (
                f'value="{label}"' in config
                and 0 <= region["value"]["x"] <= 100
                and 0 <= region["value"]["y"] <= 100
            )
            found.setdefault(label, []).append((region["value"]["x"], region["value"]["y"]))
        assert found, name
        for shape in truth[name]:
            shapes += 1
            points = found.get(shape["label"], [])
            hits += any(
                math.hypot(x - 100 * shape["x"] / width, y - 100 * shape["y"] / height) <= TOLERANCE_PERCENT
                for x, y in points
            )
    print(f"\ntry-it demo: {hits} of {shapes} shapes got a keypoint within {TOLERANCE_PERCENT}%")
    assert hits >= DEMO_MIN_HITS, (hits, shapes)


def test_demo_model_served_by_the_cli(ls_pat, png_factory, tmp_path):
    """`molmo-backend serve` itself (the tiny random demo model, not forced): whatever it answers,
    LS stores one valid prediction per task and no duplicates on a second retrieve."""
    ls = ls_pat
    project = ls.create_project(FORCED_CONFIG, title="molmo demo e2e")
    uploads = [png_factory("a.png", 640, 480), png_factory("b.png", 300, 500)]
    ids = ls.import_files(project["id"], uploads)
    env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat()}
    with BackendServer(tmp_path, env=env) as backend:
        ml = ls.connect_ml(project["id"], backend.url)
        assert ml["state"] == "CO", ml
        for _ in range(2):
            ls.retrieve_predictions(project["id"], task_ids=ids)
            for task_id, size in zip(ids, [(640, 480), (300, 500)]):
                _check_prediction(ls, task_id, size, ml["model_version"], expected_points=None)
