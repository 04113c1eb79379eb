"""Interactive pointing, confidence, counts and captions against a real Label Studio 1.23.2.

Select with ``pytest -m e2e``. Uses the session's legacy-token Label Studio (tests/e2e/conftest.py)
and the backend under real gunicorn on the demo model with answers and token probabilities forced
per prompt (tests/support/forced_backend.py), so every number checked here is exact.
"""

from __future__ import annotations

import math
import sys
import time

import pytest

from molmo_backend.pointing.prompts import COUNT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE
from molmo_backend.settings import DEFAULT_CAPTION_PROMPT
from tests.support.labelstudio import E2E_TIMINGS
from tests.support.processes import BackendServer

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="cat" prompt="black cats" background="red"/>
    <Label value="window" background="blue"/>
    <Label value="bird" alias="b" background="green"/>
    <Label value="door" prompt="front doors" background="yellow"/>
  </KeyPointLabels>
  <TextArea name="prompt" toName="image" smart="true" editable="true" maxSubmissions="1"/>
  <Number name="cat_count" toName="image" count="cat"/>
  <TextArea name="caption" toName="image"/>
  <TextArea name="weather" toName="image" prompt="What is the weather like?"/>
</View>"""


def typed(text: str) -> dict:
    """A TextArea result as the labeling UI bundled with 1.23.2 serializes it into the context
    (``annotation.serializeAnnotation()`` of the region just finished)."""
    return {
        "id": "t1x2y3",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "origin": "manual",
        "value": {"text": [text]},
    }


def clicked(label: str, x: float, y: float) -> dict:
    return {
        "id": "k1x2y3",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": 200,
        "original_height": 100,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
    }


def interactive(ls, ml_id: int, task_id: int, context) -> dict:
    """What the labeling UI does after a smart region is finished: POST
    /api/ml/ID/interactive-annotating; LS answers {"data": results[0]} or {"errors": [...]}."""
    return ls.api(
        "POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context}
    ).json()


def test_label_studio_passes_the_interactive_context_through(ls_legacy, capture_backend, png_factory):
    """What 1.23.2 really sends for interactive-annotating: the context unchanged as
    params.context, the one task (with its annotations, predictions and drafts), the config; what
    it answers: results[0] of the backend as "data", storing nothing. A backend not connected as
    interactive is never called."""
    ls = ls_legacy
    project = ls.create_project(CONFIG, title="interactive capture")
    stored = ls.get_project(project["id"])
    assert stored["label_config"] == CONFIG  # count=, prompt=, smart= kept verbatim
    parsed = stored["parsed_label_config"]
    assert parsed["cat_count"]["type"] == "Number" and parsed["caption"]["type"] == "TextArea"
    [task_id] = ls.import_files(project["id"], [png_factory("capture.png", 200, 100)])

    ml = ls.connect_ml(project["id"], capture_backend.url, is_interactive=True)
    assert ml["state"] == "CO" and ml["is_interactive"] is True
    capture_backend.clear()
    context = {"result": [clicked("window", 20.0, 30.0), typed("every window of the left building")]}
    answer = interactive(ls, ml["id"], task_id, context)
    [body] = capture_backend.bodies("/predict")
    assert body["params"]["context"] == context
    assert body["label_config"] == CONFIG and body["project"].startswith(f"{project['id']}.")
    [sent] = body["tasks"]
    assert sent["id"] == task_id and sent["data"]["image"].startswith(f"/data/upload/{project['id']}/")
    assert {"annotations", "predictions", "drafts"} <= set(sent)
    assert answer["data"]["model_version"] == capture_backend.model_version
    assert answer["data"]["result"][0]["type"] == "keypointlabels"
    assert ls.predictions(task_id) == []  # interactive results are not stored
    assert [r for r in capture_backend.requests if r[0] == "/setup"] == []  # no /setup on the way

    # the API's context may be null: the backend then gets null, like a bulk request
    capture_backend.clear()
    interactive(ls, ml["id"], task_id, None)
    assert capture_backend.bodies("/predict")[0]["params"]["context"] is None

    # not connected as interactive: LS refuses without calling the backend
    other = ls.create_project(CONFIG, title="interactive off")
    [other_task] = ls.import_files(other["id"], [png_factory("off.png", 20, 10)])
    ml_off = ls.connect_ml(other["id"], capture_backend.url, is_interactive=False)
    capture_backend.clear()
    refused = interactive(ls, ml_off["id"], other_task, context)
    assert refused == {"errors": ["Model is not set to be used for interactive preannotations"]}
    assert capture_backend.bodies("/predict") == []


def point_prompt(text: str) -> str:
    return DEFAULT_PROMPT_TEMPLATE.replace("{label}", text)


CATS = 'Counting the <points coords="1 1 100 200 2 300 400 3 500 600">black cats</points> shows a total of 3.'
WINDOWS = '<points coords="1 1 150 250 2 350 450 3 650 750">windows</points>'
LEFT = '<points coords="1 1 120 220 2 220 320">windows</points>'


def char(text: str, marker: str, offset: int = 0) -> str:
    return str(text.index(marker) + offset)


# prompt text -> forced answer (and the probability of chosen tokens, by character index)
SPECS = {
    COUNT_TEMPLATE.replace("{label}", "black cats"): {  # merged count + keypoints of "cat"
        "text": CATS,
        "probs": {char(CATS, "Counting"): 0.9, char(CATS, " 3 500", 1): 0.3},
    },
    point_prompt("window"): {"text": WINDOWS, "probs": {char(WINDOWS, " 2 350", 1): 0.8}},
    point_prompt("bird"): "There are none.",  # an alias: asked by its value
    point_prompt("front doors"): '<points coords="1 1 900 800">front doors</points>',  # prompt=
    DEFAULT_CAPTION_PROMPT: "A black cat sits on a windowsill.",
    "What is the weather like?": "Sunny.",
    "the left building": {"text": LEFT, "probs": {char(LEFT, " 2 220", 1): 0.4}},
}


def keypoint_rows(result: list[dict]) -> list[tuple]:
    return sorted(
        (
            r["value"]["keypointlabels"][0],
            round(r["value"]["x"], 3),
            round(r["value"]["y"], 3),
            r.get("score"),
        )
        for r in result
        if r["type"] == "keypointlabels"
    )


def test_interactive_pointing_confidence_counts_and_captions_through_label_studio(
    ls_legacy, png_factory, tmp_path
):
    ls = ls_legacy
    t0 = time.monotonic()
    project = ls.create_project(CONFIG, title="molmo interactive e2e")
    [task_id] = ls.import_files(project["id"], [png_factory("street.png", 200, 100)])
    env = {
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.backend_api_key,
        "MOLMO_MIN_POINT_SCORE": "0.5",
        "MOLMO_MAX_NEW_TOKENS": "64",
    }
    with BackendServer(tmp_path, env=env, answers=SPECS) as backend:
        t_backend = time.monotonic()
        ml = ls.connect_ml(project["id"], backend.url, is_interactive=True)
        assert ml["state"] == "CO", ml
        version = ml["model_version"]

        # bulk: Retrieve Predictions stores keypoints, the count, the caption and the answer
        ls.retrieve_predictions(project["id"])
        [prediction] = ls.predictions(task_id)
        assert prediction["model_version"] == version
        result = prediction["result"]
        # the third cat (p = 0.3) is below MOLMO_MIN_POINT_SCORE; the first cat scores the
        # "Counting" chosen over "There are none." (0.9); window 2 its " 2" (0.8)
        assert keypoint_rows(result) == [
            ("cat", 10.0, 20.0, 0.9),
            ("cat", 30.0, 40.0, 1.0),
            ("door", 90.0, 80.0, 1.0),
            ("window", 15.0, 25.0, 1.0),
            ("window", 35.0, 45.0, 0.8),
            ("window", 65.0, 75.0, 1.0),
        ]
        assert all(
            (r["original_width"], r["original_height"]) == (200, 100)
            for r in result
            if r["type"] == "keypointlabels"
        )
        # Molmo's stated total, not the points left after the threshold
        assert [(r["from_name"], r["to_name"], r["value"]) for r in result if r["type"] == "number"] == [
            ("cat_count", "image", {"number": 3})
        ]
        texts = {r["from_name"]: r["value"]["text"] for r in result if r["type"] == "textarea"}
        assert texts == {"caption": ["A black cat sits on a windowsill."], "weather": ["Sunny."]}
        assert math.isclose(prediction["score"], (0.9 + 1.0 + 1.0 + 1.0 + 0.8 + 1.0) / 6, abs_tol=1e-6)

        # interactive: the annotator types into the prompt box, naming the label first
        started = time.monotonic()
        answer = interactive(
            ls, ml["id"], task_id, {"result": [typed("window: every window of the left building")]}
        )
        E2E_TIMINGS["interactive_typed_s"] = time.monotonic() - started
        data = answer["data"]
        assert keypoint_rows(data["result"]) == [("window", 12.0, 22.0, 1.0)]  # 2nd: p 0.4 < 0.5
        assert data["model_version"] == version and data["score"] == 1.0

        # no label named: the first label; a keypoint in the context chooses it instead
        answer = interactive(ls, ml["id"], task_id, {"result": [typed("every window of the left building")]})
        assert keypoint_rows(answer["data"]["result"]) == [("cat", 12.0, 22.0, 1.0)]
        answer = interactive(
            ls, ml["id"], task_id, {"result": [clicked("b", 90.0, 90.0), typed("the left building")]}
        )
        assert keypoint_rows(answer["data"]["result"]) == [("b", 12.0, 22.0, 1.0)]

        # a smart keypoint alone: the other instances of its label, not the one just placed
        started = time.monotonic()
        answer = interactive(ls, ml["id"], task_id, {"result": [clicked("window", 35.3, 44.8)]})
        E2E_TIMINGS["interactive_clicked_s"] = time.monotonic() - started
        assert keypoint_rows(answer["data"]["result"]) == [
            ("window", 15.0, 25.0, 1.0),
            ("window", 65.0, 75.0, 1.0),
        ]

        # interactive answers are suggestions: nothing more is stored
        assert len(ls.predictions(task_id)) == 1
        E2E_TIMINGS["interactive_flow_s"] = time.monotonic() - t_backend
        E2E_TIMINGS["interactive_backend_start_s"] = backend.startup_s
        log = backend.log
    assert '"interactive": true' in log
    E2E_TIMINGS["interactive_test_s"] = time.monotonic() - t0
    print(
        f"\ninteractive e2e: { {k: round(v, 2) for k, v in E2E_TIMINGS.items() if 'interactive' in k} }",
        file=sys.stderr,
    )
