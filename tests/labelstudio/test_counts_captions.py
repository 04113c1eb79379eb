"""Counts into <Number>, captions and answers into <TextArea>, per-label prompts alongside."""

from __future__ import annotations

import pytest

from molmo_backend.engine.base import Answer
from molmo_backend.labelstudio.asks import bulk_asks
from molmo_backend.labelstudio.config import (
    CountTarget,
    LabelConfigError,
    PromptInput,
    TextTarget,
    parse_label_config,
)
from molmo_backend.labelstudio.regions import number_region, textarea_region
from molmo_backend.pointing.points import parse_count
from molmo_backend.pointing.prompts import COUNT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE, build_count_prompt
from molmo_backend.settings import DEFAULT_CAPTION_PROMPT, Settings
from tests.support.scripted import by_type, keypoints, task

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" prompt="black cats"/>
    <Label value="dog"/>
    <Label value="bird" alias="b"/>
  </KeyPointLabels>
  <Number name="cat_count" toName="image" count="cat"/>
  <Number name="birds" toName="image" count="BIRD"/>
  <Number name="people" toName="image" count="people wearing hats"/>
  <Number name="rating" toName="image" min="1" max="5"/>
  <Number name="per_point" toName="image" count="cat" perRegion="true"/>
  <TextArea name="caption" toName="image"/>
  <TextArea name="weather" toName="image" prompt="What is the weather like?"/>
  <TextArea name="prompt" toName="image"/>
  <TextArea name="note" toName="image" perRegion="true"/>
</View>"""


def point(label):
    return DEFAULT_PROMPT_TEMPLATE.replace("{label}", label)


def count(text):
    return COUNT_TEMPLATE.replace("{label}", text)


def test_config_counts_texts_and_prompt_box():
    config = parse_label_config(CONFIG)
    assert [t.from_name for t in config.points] == ["kp"]
    assert config.counts == (
        CountTarget("cat_count", "image", "image", "black cats", label="cat", keypoints_from="kp"),
        CountTarget("birds", "image", "image", "bird", label="b", keypoints_from="kp"),  # by value
        CountTarget("people", "image", "image", "people wearing hats"),  # free text
    )  # no count attribute: "rating" is not ours; per-region Numbers neither
    assert config.texts == (
        TextTarget("caption", "image", "image", None),
        TextTarget("weather", "image", "image", "What is the weather like?"),
    )
    assert config.prompt_inputs == (PromptInput("prompt", "image", "image"),)


def test_asks_merge_a_counted_label_with_its_keypoints_and_keep_per_label_prompts():
    asks = bulk_asks(parse_label_config(CONFIG), DEFAULT_PROMPT_TEMPLATE, "Caption it.")
    got = [(a.prompt, a.label, a.count and a.count.from_name, a.text and a.text.from_name) for a in asks]
    assert got == [
        (count("black cats"), "cat", "cat_count", None),  # one question gives points and count
        (point("dog"), "dog", None, None),
        (count("bird"), "b", "birds", None),
        (count("people wearing hats"), None, "people", None),
        ("Caption it.", None, None, "caption"),
        ("What is the weather like?", None, None, "weather"),
    ]


def test_configs_with_only_counts_or_captions_are_usable_but_a_prompt_box_alone_is_not():
    caption_only = '<View><Image name="i" value="$img"/><TextArea name="c" toName="i"/></View>'
    assert parse_label_config(caption_only).texts == (TextTarget("c", "i", "img", None),)
    count_only = '<View><Image name="i" value="$img"/><Number name="n" toName="i" count="cars"/></View>'
    assert parse_label_config(count_only).counts == (CountTarget("n", "i", "img", "cars"),)
    for useless in [
        '<View><Image name="i" value="$img"/><TextArea name="prompt" toName="i"/></View>',
        '<View><Image name="i" value="$img"/><Number name="n" toName="i"/></View>',
        '<View><Text name="t" value="$t"/><TextArea name="c" toName="t"/></View>',
    ]:
        with pytest.raises(LabelConfigError, match="KeyPointLabels"):
            parse_label_config(useless)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('Counting the <points coords="1 1 250 750 2 500 500">dogs</points> shows a total of 2.', 2),
        ('Counting the <points coords="1 1 250 750">dogs</points> shows a total of 12.', 12),  # total wins
        ('<points coords="1 1 250 750 2 500 500 3 1 1">dogs</points>', 3),  # no total: the points
        ("There are none.", 0),
        ("This isn't in the image.", 0),
        ("A total of 1,204 birds.", 1204),
        ("I think a total of 3.5", None),
        ("a total of 99999999999", None),
        ("purple monkey dishwasher", None),
        ("", None),
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_number_and_textarea_regions_have_label_studios_shape():
    region = number_region(from_name="n", to_name="image", number=3)
    assert region.pop("id") and region == {
        "from_name": "n",
        "to_name": "image",
        "type": "number",
        "value": {"number": 3},
    }
    assert [number_region(from_name="n", to_name="i", number=v) for v in (-1, 2.5, float("nan"), True)] == [
        None
    ] * 4
    region = textarea_region(from_name="c", to_name="image", text="  A cat.\n")
    assert region.pop("id") and region == {
        "from_name": "c",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["A cat."]},
    }
    assert textarea_region(from_name="c", to_name="i", text="  ") is None


def test_count_prompt_uses_molmo2s_trained_phrasing():
    assert build_count_prompt("black cats") == (
        "How many black cats are there in the image? Point to them and output the total count."
    )


# -- through the backend -------------------------------------------------------------------------

ANSWERS = {
    count(
        "black cats"
    ): 'Counting the <points coords="1 1 100 100 2 200 200">black cats</points> shows a total of 5.',
    point("dog"): '<points coords="1 1 900 900">dog</points>',
    count("bird"): '<points coords="1 1 300 300 2 400 400 3 500 500">bird</points>',
    count("people wearing hats"): "There are none.",
    "in one sentence": "A black cat sits next to a dog.",
    "weather": "Sunny.",
}


def test_one_prediction_fills_keypoints_counts_caption_and_answer(make_backend):
    backend, engine = make_backend(ANSWERS)
    [prediction] = backend.predict([task()], label_config=CONFIG)
    assert sorted(engine.prompts()) == sorted(
        [
            count("black cats"),
            point("dog"),
            count("bird"),
            count("people wearing hats"),
            DEFAULT_CAPTION_PROMPT,
            "What is the weather like?",
        ]
    )
    assert [(lab, x, y) for lab, x, y, _ in keypoints(prediction)] == [
        ("b", 30.0, 30.0),
        ("b", 40.0, 40.0),
        ("b", 50.0, 50.0),
        ("cat", 10.0, 10.0),
        ("cat", 20.0, 20.0),
        ("dog", 90.0, 90.0),
    ]
    numbers = {r["from_name"]: r["value"]["number"] for r in by_type(prediction, "number")}
    assert numbers == {"cat_count": 5, "birds": 3, "people": 0}  # stated total, points, none
    texts = {r["from_name"]: r["value"]["text"] for r in by_type(prediction, "textarea")}
    assert texts == {"caption": ["A black cat sits next to a dog."], "weather": ["Sunny."]}
    assert all(r["to_name"] == "image" for r in prediction["result"])
    # the task score is the keypoints' (text and number regions carry none)
    assert prediction["score"] == 1.0 and all("score" not in r for r in by_type(prediction, "number"))


def test_caption_prompt_setting_and_unreadable_or_failed_answers(make_backend):
    answers = {
        **ANSWERS,
        count("black cats"): "I like turtles.",
        "Name the photographer.": Answer(text="", error="engine failed"),
    }
    backend, engine = make_backend(answers, caption_prompt="Name the photographer.")
    [prediction] = backend.predict([task()], label_config=CONFIG)
    assert "Name the photographer." in engine.prompts()
    numbers = {r["from_name"] for r in by_type(prediction, "number")}
    assert numbers == {"birds", "people"}  # no number from an answer that neither counts nor denies
    assert [r["from_name"] for r in by_type(prediction, "textarea")] == ["weather"]
    assert Settings.from_env({"MOLMO_CAPTION_PROMPT": "Who?"}).caption_prompt == "Who?"
    assert Settings.from_env({}).caption_prompt == DEFAULT_CAPTION_PROMPT


def test_setup_accepts_a_caption_only_config(make_backend):
    backend, engine = make_backend({"in one sentence": "Two dogs."})
    config = '<View><Image name="photo" value="$url"/><TextArea name="c" toName="photo"/></View>'
    assert backend.setup(label_config=config) == "scripted@r1"
    [prediction] = backend.predict([task(key="url")])
    assert prediction["result"][0]["value"] == {"text": ["Two dogs."]}
    assert prediction["result"][0]["to_name"] == "photo"
