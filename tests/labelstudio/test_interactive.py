"""Interactive pointing: params.context -> one question -> keypoints under the chosen label."""

from __future__ import annotations

import threading

import pytest

from molmo_backend.engine.scheduler import Priority
from molmo_backend.labelstudio.config import parse_label_config
from molmo_backend.labelstudio.interactive import MAX_PROMPT_CHARS, interactive_asks
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE as TEMPLATE
from tests.support.scripted import ScriptedStepEngine, by_type, keypoints, task

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" prompt="black cats"/>
    <Label value="window"/>
    <Label value="bird" alias="b"/>
  </KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
  <TextArea name="caption" toName="image"/>
  <Number name="cats" toName="image" count="cat"/>
</View>"""


def typed(text, from_name="prompt", to_name="image"):
    """A TextArea result as Label Studio's UI serializes it into the context."""
    return {
        "id": "t1",
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "origin": "manual",
        "value": {"text": [text]},
    }


def clicked(label, x=20.0, y=30.0, from_name="kp"):
    return {
        "id": "k1",
        "from_name": from_name,
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": 64,
        "original_height": 48,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
    }


def ask_for(context, config=CONFIG):
    asks = interactive_asks(parse_label_config(config), context, TEMPLATE)
    return [(a.label, a.prompt, a.placed) for a in asks]


def pointing(text):
    return TEMPLATE.replace("{label}", text)


def test_typed_text_points_under_the_first_label():
    assert ask_for({"result": [typed("every window of the left building")]}) == [
        ("cat", pointing("every window of the left building"), ())
    ]


def test_a_label_before_a_colon_chooses_the_label():
    assert ask_for({"result": [typed("Window:  every window of the\nleft building ")]}) == [
        ("window", pointing("every window of the left building"), ())
    ]
    # by value when the label is stored under an alias
    assert ask_for({"result": [typed("bird: the one on the roof")]}) == [
        ("b", pointing("the one on the roof"), ())
    ]
    # a colon that is not after a label is part of the prompt
    assert ask_for({"result": [typed("note: cats")]})[0][:2] == ("cat", pointing("note: cats"))


def test_text_that_is_a_label_uses_that_labels_own_prompt():
    assert ask_for({"result": [typed("CAT")]}) == [("cat", pointing("black cats"), ())]
    assert ask_for({"result": [typed("cat:")]}) == [("cat", pointing("black cats"), ())]


def test_a_keypoint_in_the_context_selects_the_label_for_the_text():
    context = {"result": [clicked("window", 50, 50), typed("the lit ones")]}
    assert ask_for(context) == [("window", pointing("the lit ones"), ((50.0, 50.0),))]


def test_a_keypoint_alone_asks_for_the_other_instances_of_its_label():
    context = {"result": [clicked("cat", 10, 10), clicked("cat", 80, 20), clicked("b", 5, 5)]}
    assert ask_for(context) == [("b", pointing("bird"), ((5.0, 5.0),))]
    assert ask_for({"result": [clicked("cat", 10, 10), clicked("cat", 80, 20)]}) == [
        ("cat", pointing("black cats"), ((10.0, 10.0), (80.0, 20.0)))
    ]


def test_only_the_prompt_box_is_read_and_the_last_text_wins():
    # the caption TextArea is not a prompt box: its text is no request
    assert ask_for({"result": [typed("a cat on a mat", from_name="caption")]}) == []
    context = {"result": [typed("first"), typed("dogs", from_name="caption"), typed("second")]}
    assert ask_for(context)[0][1] == pointing("second")
    long = ask_for({"result": [typed("x" * 5000)]})[0][1]
    assert long == pointing("x" * MAX_PROMPT_CHARS)


def test_smart_textarea_is_a_prompt_box_whatever_its_name():
    config = CONFIG.replace(
        '<TextArea name="prompt" toName="image"/>', '<TextArea name="ask" toName="image" smart="true"/>'
    )
    assert ask_for({"result": [typed("doors", from_name="ask")]}, config)[0][1] == pointing("doors")
    assert ask_for({"result": [typed("doors", from_name="prompt")]}, config) == []
    # smart="false" (keeps caption edits from calling the backend) leaves a TextArea a caption
    config = CONFIG.replace(
        '<TextArea name="caption" toName="image"/>', '<TextArea name="caption" toName="image" smart="false"/>'
    )
    assert [t.from_name for t in parse_label_config(config).texts] == ["caption"]
    assert ask_for({"result": [typed("doors", from_name="caption")]}, config) == []


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"result": None},
        {"result": "every window"},
        {"result": [None, 3, "x"]},
        {"result": [{"type": "textarea"}]},
        {"result": [typed("   ")]},
        {"result": [{**typed("x"), "value": {"text": [None, 5]}}]},
        {"result": [{**typed("x"), "value": "x"}]},
        {"result": [typed("cats", to_name="other")]},
        {"result": [clicked("dog")]},  # not a label of the config
        {"result": [clicked("cat", from_name="other")]},
        {"result": [{**clicked("cat"), "value": {"x": "1", "y": 2, "keypointlabels": ["cat"]}}]},
        {"result": [{**clicked("cat"), "value": {"x": float("nan"), "y": 2, "keypointlabels": ["cat"]}}]},
        {"result": [{**clicked("cat"), "value": {"x": 1, "y": 2, "keypointlabels": []}}]},
    ],
)
def test_contexts_without_a_usable_request_ask_nothing(context):
    assert ask_for(context) == []


def test_text_string_instead_of_list_is_read():
    assert ask_for({"result": [{**typed(""), "value": {"text": "doors"}}]})[0][1] == pointing("doors")


# -- through the backend -------------------------------------------------------------------------

WINDOWS = '<points coords="1 1 100 100 2 500 500 3 205 300">windows</points>'


def test_interactive_predict_asks_one_question_at_interactive_priority(make_backend):
    backend, engine = make_backend({"left building": WINDOWS, "black cats": "There are none."})
    context = {"result": [typed("window: every window of the left building")]}
    [prediction] = backend.predict([task()], context=context, label_config=CONFIG)
    # one question: no other labels, no count, no caption
    assert engine.prompts() == [pointing("every window of the left building")]
    assert backend.scheduler.priorities == [Priority.INTERACTIVE]
    assert [(lab, x, y) for lab, x, y, _ in keypoints(prediction)] == [
        ("window", 10.0, 10.0),
        ("window", 20.5, 30.0),
        ("window", 50.0, 50.0),
    ]
    assert by_type(prediction, "number") == [] and by_type(prediction, "textarea") == []
    region = prediction["result"][0]
    assert (region["from_name"], region["to_name"], region["original_width"]) == ("kp", "image", 64)
    assert prediction["model_version"] == "scripted@r1"


def test_points_on_top_of_the_annotators_own_are_dropped(make_backend):
    backend, engine = make_backend({"window": WINDOWS})
    context = {"result": [clicked("window", 50.5, 49.0), clicked("window", 90.0, 90.0)]}
    [prediction] = backend.predict([task()], context=context, label_config=CONFIG)
    assert engine.prompts() == [pointing("window")]
    assert [(x, y) for _, x, y, _ in keypoints(prediction)] == [(10.0, 10.0), (20.5, 30.0)]


def test_unusable_context_gives_an_empty_prediction_without_asking(make_backend):
    backend, engine = make_backend({})
    results = backend.predict(
        [task(1), task(2)], context={"result": [typed("x", from_name="caption")]}, label_config=CONFIG
    )
    assert [r["result"] for r in results] == [[], []] and engine.prompts() == []


def test_without_context_the_same_task_gets_the_full_pre_annotation(make_backend):
    backend, engine = make_backend(
        {"black cats": '<points coords="1 1 100 100">c</points> shows a total of 7.', "Describe": "A cat."}
    )
    [prediction] = backend.predict([task()], context=None, label_config=CONFIG)
    assert len(engine.prompts()) == 4  # cat (counted), window, bird, caption
    assert by_type(prediction, "number")[0]["value"] == {"number": 7}
    assert by_type(prediction, "textarea")[0]["value"] == {"text": ["A cat."]}


def test_an_interactive_request_does_not_wait_for_a_running_bulk_batch(make_backend):
    """The click-and-wait loop: bulk rows are decoding (and would go on until released); the
    interactive request joins at the next step, runs while they wait in their slots, and comes
    back while the bulk request is still running."""
    engine = ScriptedStepEngine({"left building": WINDOWS})
    backend, _ = make_backend({}, engine=engine)
    bulk_done = {}
    thread = threading.Thread(
        target=lambda: bulk_done.setdefault(
            "results", backend.predict([task(i) for i in range(2)], label_config=CONFIG)
        )
    )
    thread.start()
    assert engine.bulk_decoding.wait(10), "the bulk rows never started decoding"
    [prediction] = backend.predict(
        [task(99)], context={"result": [typed("window: the left building")]}, label_config=CONFIG
    )
    assert len(keypoints(prediction)) == 3
    assert thread.is_alive() and "results" not in bulk_done, "answered while the bulk request still runs"
    engine.release_bulk.set()
    thread.join(10)
    assert len(bulk_done["results"]) == 2
    assert backend.scheduler.stats["bulk_paused_steps"] >= 1


def test_an_answer_cut_at_the_cap_is_logged_with_its_task_and_counted(make_backend, caplog):
    from molmo_backend.engine.base import Answer

    cut = Answer(text='<points coords="1 1 100 100 2 200 200 3 300', score=0.9, truncated=True)
    backend, _ = make_backend({"window": cut})
    with caplog.at_level("WARNING", logger="molmo_backend.labelstudio.model"):
        [prediction] = backend.predict([task(41)], label_config=CONFIG)
    assert len([k for k in keypoints(prediction) if k[0] == "window"]) == 2  # the whole points it holds
    records = [r for r in caplog.records if "MOLMO_MAX_NEW_TOKENS" in r.getMessage()]
    assert records and records[0].task == 41
    assert backend.scheduler.stats["truncated"] == 1
