import pytest

from molmo_backend.labelstudio.config import (
    PROMPT_ATTRIBUTE,
    LabelConfigError,
    PointTarget,
    parse_label_config,
)

ONE_PAIR = """
<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" prompt="the brown dog"/>
  </KeyPointLabels>
</View>
"""


def test_one_pair():
    [target] = parse_label_config(ONE_PAIR).points
    assert target == PointTarget(
        from_name="kp",
        to_name="image",
        data_key="image",
        labels=("cat", "dog"),
        prompts={"dog": "the brown dog"},
    )
    assert PROMPT_ATTRIBUTE == "prompt"


def test_two_pairs_keep_config_order_and_their_own_images():
    config = """
    <View>
      <KeyPointLabels name="second" toName="photo"><Label value="tail"/></KeyPointLabels>
      <Image name="image" value="$image"/>
      <Image name="photo" value="$photo_url"/>
      <KeyPointLabels name="first" toName="image"><Label value="nose"/><Label value="eye"/></KeyPointLabels>
    </View>
    """
    targets = parse_label_config(config).points
    assert [(t.from_name, t.to_name, t.data_key, t.labels) for t in targets] == [
        ("second", "photo", "photo_url", ("tail",)),
        ("first", "image", "image", ("nose", "eye")),
    ]


def test_other_controls_are_ignored():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="car"/></RectangleLabels>
      <Choices name="ok" toName="image"><Choice value="yes"/></Choices>
      <KeyPointLabels name="kp" toName="image"><Label value="wheel"/></KeyPointLabels>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.from_name == "kp"
    assert target.labels == ("wheel",)


def test_odd_label_strings_come_out_as_label_studio_shows_them():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image">
        <Label value="left eye"/>
        <Label value="Tom &amp; Jerry"/>
        <Label value="say &quot;hi&quot;"/>
        <Label value='it&apos;s'/>
        <Label value="café ü 猫"/>
        <Label value="{label} {0}"/>
        <Label value="a &lt;b&gt;"/>
      </KeyPointLabels>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.labels == (
        "left eye",
        "Tom & Jerry",
        'say "hi"',
        "it's",
        "café ü 猫",
        "{label} {0}",
        "a <b>",
    )
    assert target.prompts == {}


def test_prompt_attribute_is_decoded_and_stripped():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image">
        <Label value="R&amp;D" prompt="  the &quot;R&amp;D&quot; sign  "/>
        <Label value="blank" prompt="   "/>
      </KeyPointLabels>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.prompts == {"R&D": 'the "R&D" sign'}


def test_alias_is_the_label_and_value_its_prompt():
    # Label Studio stores the alias in results, so regions must carry it.
    config = """
    <View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image">
        <Label value="left eye" alias="LE"/>
        <Label value="right eye" alias="RE" prompt="the right eye of the person"/>
      </KeyPointLabels>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.labels == ("LE", "RE")
    assert target.prompts == {"LE": "left eye", "RE": "the right eye of the person"}


def test_blank_labels_are_skipped_and_duplicates_collapse():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image">
        <Label value=""/><Label value="  "/><Label value="cat"/><Label value="cat"/>
      </KeyPointLabels>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.labels == ("cat",)


def test_control_without_labels_is_skipped_when_another_works():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="empty" toName="image"></KeyPointLabels>
      <KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels>
    </View>
    """
    assert [t.from_name for t in parse_label_config(config).points] == ["kp"]


def test_one_control_with_two_images_gives_two_targets():
    config = """
    <View>
      <Image name="a" value="$left"/><Image name="b" value="$right"/>
      <KeyPointLabels name="kp" toName="a,b"><Label value="cat"/></KeyPointLabels>
    </View>
    """
    assert [(t.to_name, t.data_key) for t in parse_label_config(config).points] == [
        ("a", "left"),
        ("b", "right"),
    ]


def test_nested_views_work():
    config = """
    <View><View><Image name="image" value="$img"/></View>
      <View><KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels></View>
    </View>
    """
    [target] = parse_label_config(config).points
    assert target.data_key == "img"


@pytest.mark.parametrize(
    "config", ["", "   ", None, "not xml at all", "<View><Image", "<View><Image name='i' value='$i'/>"]
)
def test_unparsable_config(config):
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config)
    assert "KeyPointLabels" in str(info.value)


def test_no_pair_says_what_to_add():
    config = """
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="car"/></RectangleLabels>
    </View>
    """
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config)
    message = str(info.value)
    assert '<KeyPointLabels name="kp" toName="image">' in message
    assert '<Image name="image" value="$image"/>' in message


def test_error_is_a_value_error():
    assert issubclass(LabelConfigError, ValueError)


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            '<View><Image name="image" value="$image"/>'
            '<KeyPointLabels name="kp" toName="image"></KeyPointLabels></View>',
            "has no <Label",
        ),
        (
            '<View><Text name="text" value="$text"/>'
            '<KeyPointLabels name="kp" toName="text"><Label value="a"/></KeyPointLabels></View>',
            "not an <Image>",
        ),
        (
            '<View><KeyPointLabels name="kp" toName="ghost"><Label value="a"/></KeyPointLabels></View>',
            "not in the config",
        ),
        (
            '<View><Image name="image" value="https://example.com/a.png"/>'
            '<KeyPointLabels name="kp" toName="image"><Label value="a"/></KeyPointLabels></View>',
            "not a task field",
        ),
        (
            '<View><Image name="image" valueList="$images"/>'
            '<KeyPointLabels name="kp" toName="image"><Label value="a"/></KeyPointLabels></View>',
            "multi-image",
        ),
    ],
)
def test_unusable_pairs_are_explained(config, reason):
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config)
    assert reason in str(info.value)
    assert "Add <KeyPointLabels" in str(info.value)


def test_doctype_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    config = (
        f'<!DOCTYPE View [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="kp" toName="image"><Label value="&x;"/></KeyPointLabels></View>'
    )
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(config)
