"""Property-based fuzzing (hypothesis) of everything that reads untrusted text or JSON: Molmo2 and
Molmo v1 answers, label configs, /predict bodies, interactive contexts.

Each parser gets ``--fuzz-examples`` generated inputs (default 2000; docs/security.md records a
run of 100000 each) and must hold its properties on every one:

- no exception escapes but the documented ones: none from the answer and context parsers,
  LabelConfigError from parse_label_config, a 400 (never a 500) from /predict;
- every task is answered, in order: /predict gives one result per task, and each task's regions
  carry that task's own image size;
- no region lies outside 0-100 (x and y, percent of the image), and no point is NaN/infinite.

Inputs mix near-valid structure (tags, attributes, numbers, cuts at any character) with raw noise.
The counts run are printed in pytest's summary ("fuzz: ..."). Nothing here touches the network:
the /predict app runs in this process (Flask's test client) on a scripted engine behind the real
scheduler, under the NetGuard.
"""

from __future__ import annotations

import base64
import io
import math
import string
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_backend.app.routes import create_app
from molmo_backend.app.service import ModelService
from molmo_backend.engine.base import Answer
from molmo_backend.labelstudio.answers import answer_regions
from molmo_backend.labelstudio.asks import Ask, bulk_asks
from molmo_backend.labelstudio.config import LabelConfig, LabelConfigError, parse_label_config
from molmo_backend.labelstudio.interactive import interactive_asks
from molmo_backend.pointing.points import MAX_COUNT, parse_count, parse_points
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt
from molmo_backend.settings import Settings
from tests.support.fuzzing import REPORT
from tests.support.net_guard import NetGuard
from tests.support.scripted import ScriptedEngine

pytestmark = pytest.mark.fuzz


def run_fuzz(name: str, strategy, check, examples: int) -> None:
    """Run ``check`` on ``examples`` generated inputs; record how many ran and how long."""
    calls = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(strategy)
    def run(value):
        nonlocal calls
        calls += 1
        check(value)

    started = time.monotonic()
    try:
        run()
    finally:
        REPORT.append(f"fuzz: {name}: {calls} inputs in {time.monotonic() - started:.1f} s")
    assert calls >= examples, f"only {calls} of {examples} inputs ran"


# -- shared pieces -----------------------------------------------------------------------------

NOISE = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
ASCII_NOISE = st.text(alphabet=string.printable, max_size=30)

NUMBER = st.one_of(
    st.integers(-3000, 3000).map(str),
    st.integers(0, 1000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 100).map(lambda f: f"{f:.1f}"),
    st.sampled_from(
        [
            "1e308",
            "-1e308",
            "-0",
            ".5",
            "5.",
            "+3",
            "9" * 30,
            "nan",
            "inf",
            "-inf",
            "0x10",
            "",
            "1,5",
            "١٢٣",
            "½",
            "1_000",
        ]
    ),
    st.text(alphabet="0123456789.-+eE", max_size=8),
)


def cut(text_strategy):
    """The text, or the text cut off at any character (the token limit stops answers anywhere)."""
    return st.tuples(text_strategy, st.integers(0, 10_000), st.booleans()).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] if t[2] else t[0]
    )


# -- 1. Molmo2 answers: <points coords="1 1 x y 2 x y ...">label</points> (0-1000) ---------------

SEPARATOR = st.sampled_from([" ", "  ", "\t", ";", "; ", "\n", "", ",", " ;\t"])


@st.composite
def molmo2_tag(draw):
    numbers = draw(st.lists(NUMBER, max_size=31))
    seps = draw(st.lists(SEPARATOR, min_size=len(numbers), max_size=len(numbers)))
    coords = "".join(n + s for n, s in zip(numbers, seps))
    tag = draw(st.sampled_from(["points", "point", "POINTS", "Points", "pointsx", "tracks"]))
    quote = draw(st.sampled_from(['"', "'", ""]))
    close_quote = draw(st.sampled_from([quote, "", '"']))
    label = draw(st.one_of(st.sampled_from(["cat", "dog", "", " ", "&amp;", "&#x1F600;", "<b>"]), NOISE))
    attrs = draw(st.sampled_from(["", ' alt="cat"', " alt='x'", ' alt="', ' coords="1 1 5 5"']))
    ending = draw(st.sampled_from([f"</{tag}>", "", "/>", f"</{tag}", ">", "</points></points>"]))
    return f"<{tag} coords={quote}{coords}{close_quote}{attrs}>{label}{ending}"


@st.composite
def molmo2_clean_tag(draw):
    """Well-formed but for its numbers: in range, slightly out of it, or far out."""
    coordinate = st.one_of(
        st.integers(0, 1000),
        st.integers(-100, 1100),
        st.integers(-(10**6), 10**6),
        st.floats(-50, 1050).map(lambda f: f"{f:.1f}"),
    )
    images = draw(st.lists(st.lists(st.tuples(coordinate, coordinate), max_size=8), min_size=1, max_size=3))
    groups = []
    for index, points in enumerate(images, 1):
        groups.append(" ".join([str(index)] + [f"{i} {x} {y}" for i, (x, y) in enumerate(points, 1)]))
    label = draw(st.sampled_from(["cat", "dog", ""]))
    coords = draw(st.sampled_from(["\t", ";", "; "])).join(groups)
    return f'<points coords="{coords}">{label}</points>'


MOLMO2_ANSWER = cut(
    st.lists(
        st.one_of(
            molmo2_clean_tag(),
            molmo2_tag(),
            NOISE,
            st.sampled_from(
                ["There are none.", "Counting the ", " shows a total of ", "3", "1,204", "<", ">", '"', "\t"]
            ),
        ),
        max_size=6,
    ).map("".join)
)


# -- 2. Molmo v1 answers: <point x=".." y=".." alt="..">..</point>, <points x1 y1 x2 y2 ...> (0-100)


@st.composite
def v1_tag(draw):
    pairs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "x",
                        "y",
                        "x1",
                        "y1",
                        "x2",
                        "y2",
                        "x3",
                        "y3",
                        "x10",
                        "y10",
                        "xx",
                        "x" + "9" * 12,
                        "X",
                        "y0",
                        "alt",
                        "coords",
                        "x-1",
                        "_x",
                    ]
                ),
                NUMBER,
            ),
            max_size=12,
        )
    )
    quote = draw(st.sampled_from(['"', "'"]))
    spacing = draw(st.sampled_from([" ", "  ", "\n", "", " = "]))
    attrs = "".join(
        f" {k}{spacing.strip() and spacing or '='}{quote}{v}{draw(st.sampled_from([quote, quote, '']))}"
        for k, v in pairs
    )
    tag = draw(st.sampled_from(["point", "points", "Point", "point "]))
    label = draw(st.one_of(st.sampled_from(["cat", "", "x", "&quot;"]), NOISE))
    ending = draw(st.sampled_from(["</point>", "</points>", "", "/>", "<"]))
    return f"<{tag}{attrs}>{label}{ending}"


@st.composite
def v1_clean_tag(draw):
    coordinate = st.one_of(st.floats(-20, 120).map(lambda f: f"{f:.1f}"), st.integers(-(10**6), 10**6))
    points = draw(st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=6))
    if len(points) == 1:
        return f'<point x="{points[0][0]}" y="{points[0][1]}" alt="cat">cat</point>'
    attrs = " ".join(f'x{i}="{x}" y{i}="{y}"' for i, (x, y) in enumerate(points, 1))
    return f'<points {attrs} alt="cats">cats</points>'


V1_ANSWER = cut(
    st.lists(
        st.one_of(
            v1_clean_tag(),
            v1_tag(),
            NOISE,
            st.sampled_from(["There are none.", "isn't in the image", "<point", "=", '"']),
        ),
        max_size=6,
    ).map("".join)
)


CAT_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels>'
    '<Number name="n" toName="image" count="cat"/><TextArea name="t" toName="image"/></View>'
)
_CAT = parse_label_config(CAT_CONFIG)
_CAT_ASKS = bulk_asks(_CAT, DEFAULT_PROMPT_TEMPLATE, "Describe.")


def check_answer(answer: tuple[str, int, int, list[int]]) -> None:
    text, width, height, splits = answer
    for point in parse_points(text):
        assert math.isfinite(point.x) and math.isfinite(point.y)
        assert 0 <= point.x <= 100 and 0 <= point.y <= 100
        assert point.label is None or (isinstance(point.label, str) and point.label.strip())
    count = parse_count(text)
    assert count is None or (isinstance(count, int) and 0 <= count <= MAX_COUNT)
    # the same text as an engine gives it: token pieces with probabilities (confidence scores)
    cuts = sorted({min(s, len(text)) for s in splits})
    tokens = tuple(text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]))
    logprobs = tuple(-((i * 7919) % 13) / 10 for i in range(len(tokens)))
    for reply in (
        Answer(text=text.strip(), score=0.5),
        Answer(text=text.strip(), score=None, tokens=tokens, token_logprobs=logprobs),
    ):
        for ask in _CAT_ASKS:
            for region in answer_regions(
                ask, reply, image_width=width, image_height=height, point_width=0.75
            ):
                check_region(region, ask.label, (width, height))


def check_region(region: dict, label: str | None, size) -> None:
    if region["type"] == "keypointlabels":
        value = region["value"]
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100
        assert value["keypointlabels"] == [label]
        assert (region["original_width"], region["original_height"]) == size
        assert "score" not in region or 0 <= region["score"] <= 1
    elif region["type"] == "number":
        assert isinstance(region["value"]["number"], int) and region["value"]["number"] >= 0
    else:
        assert region["type"] == "textarea" and region["value"]["text"][0].strip()


ANSWER_CONTEXT = dict(
    width=st.integers(1, 5000), height=st.integers(1, 5000), splits=st.lists(st.integers(0, 400), max_size=20)
)


def test_molmo2_answers(fuzz_examples):
    run_fuzz(
        "Molmo2 answers", st.tuples(MOLMO2_ANSWER, *ANSWER_CONTEXT.values()), check_answer, fuzz_examples
    )


def test_v1_answers(fuzz_examples):
    run_fuzz("Molmo v1 answers", st.tuples(V1_ANSWER, *ANSWER_CONTEXT.values()), check_answer, fuzz_examples)


# -- 3. label configs -------------------------------------------------------------------------

TAGS = [
    "View",
    "Image",
    "KeyPointLabels",
    "Label",
    "Number",
    "TextArea",
    "Header",
    "Text",
    "RectangleLabels",
    "Choices",
    "Choice",
    "Style",
    "Audio",
    "view",
    "Labels",
]
ATTRS = [
    "name",
    "toName",
    "value",
    "alias",
    "prompt",
    "count",
    "smart",
    "perRegion",
    "valueList",
    "background",
    "hotkey",
    "required",
    "visibleWhen",
]
NAMES_POOL = ["image", "kp", "n", "t", "prompt", "side", "img", "", "kp,n", "image,side"]
VALUES_POOL = [
    "$image",
    "$side",
    "$",
    "image",
    "cat",
    "dog",
    "",
    " ",
    "true",
    "false",
    "cat,dog",
    "$image$",
    "$ima ge",
    "{label}",
    "&amp;",
    "&lt;b&gt;",
    "&#38;",
    "'",
    "é",
    "猫",
]


def xml_attr_value():
    return st.one_of(
        st.sampled_from(NAMES_POOL + VALUES_POOL),
        ASCII_NOISE.map(lambda t: t.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")),
        ASCII_NOISE,
    )  # raw: may break the XML, which must then be a LabelConfigError


def element(children):
    return st.builds(
        lambda tag, attrs, kids, text: (
            f"<{tag}" + "".join(f' {k}="{v}"' for k, v in attrs) + ">" + text + "".join(kids) + f"</{tag}>"
        ),
        st.sampled_from(TAGS),
        st.lists(st.tuples(st.sampled_from(ATTRS), xml_attr_value()), max_size=5),
        st.lists(children, max_size=4),
        st.sampled_from(["", " ", "hi", "&amp;"]),
    )


LEAF = st.builds(
    lambda tag, attrs: f"<{tag}" + "".join(f' {k}="{v}"' for k, v in attrs) + "/>",
    st.sampled_from(TAGS),
    st.lists(st.tuples(st.sampled_from(ATTRS), xml_attr_value()), max_size=5),
)


@st.composite
def label_config(draw):
    body = draw(st.recursive(LEAF, element, max_leaves=12))
    shape = draw(st.sampled_from(["as is", "in a View", "good prefix", "mutated", "noise"]))
    good = (
        '<Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
        '<Label value="cat"/></KeyPointLabels>'
    )
    if shape == "in a View":
        return f"<View>{body}</View>"
    if shape == "good prefix":
        return f"<View>{good}{body}</View>"
    if shape == "mutated":
        text = f"<View>{good}{body}</View>"
        at = draw(st.integers(0, len(text)))
        return (
            text[:at]
            + draw(
                st.sampled_from(
                    ["", "<", ">", "&", "<!DOCTYPE x>", '"', "</View>", "<!ENTITY a 'b'>", "\x00", "]]>"]
                )
            )
            + text[at + draw(st.integers(0, 5)) :]
        )
    if shape == "noise":
        return draw(NOISE)
    return body


def check_label_config(text: str) -> None:
    try:
        config = parse_label_config(text)
    except LabelConfigError as exc:
        assert str(exc)  # the documented error, with a message
        return
    assert isinstance(config, LabelConfig) and (config.points or config.counts or config.texts)
    for target in config.points:
        assert target.labels and all(isinstance(label, str) for label in target.labels)
        assert isinstance(target.data_key, str) and target.data_key
        assert isinstance(target.from_name, str) and isinstance(target.to_name, str)
        for label in target.labels:  # every label can be asked about
            assert build_prompt(label, DEFAULT_PROMPT_TEMPLATE, target.prompts.get(label)).strip()
    for item in config.counts + config.texts:
        assert isinstance(item.data_key, str) and item.data_key
    assert bulk_asks(config, DEFAULT_PROMPT_TEMPLATE, "Describe.")


def test_label_configs(fuzz_examples):
    run_fuzz("label configs", label_config(), check_label_config, fuzz_examples)


# -- 4. interactive contexts ----------------------------------------------------------------

INTERACTIVE_CONFIGS = [
    parse_label_config(c)
    for c in (
        '<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
        '<KeyPointLabels name="kp" toName="image"><Label value="cat"/><Label value="Dog" alias="d"/>'
        '<Label value="red car" prompt="cars that are red"/></KeyPointLabels></View>',
        '<View><Image name="image" value="$image"/><Image name="side" value="$side"/>'
        '<TextArea name="ask" toName="side" smart="true"/><TextArea name="caption" toName="image"/>'
        '<KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels>'
        '<KeyPointLabels name="kp2" toName="side"><Label value="window"/><Label value="door"/></KeyPointLabels></View>',
        CAT_CONFIG,
    )
]

JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    NOISE,
)
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                NOISE,
                st.sampled_from(
                    ["result", "value", "type", "text", "x", "y", "tasks", "data", "image", "context"]
                ),
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=10,
)

COORD = st.one_of(
    st.floats(0, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
    st.integers(-(10**30), 10**30),
    st.sampled_from([True, None, "50", [], {}]),
)
TEXT = st.one_of(
    NOISE,
    st.sampled_from(
        [
            "cat",
            "Dog",
            "d",
            "red car",
            "cat: the black ones",
            "window:",
            ":",
            "door : left",
            " ",
            "CAT",
            "x" * 600,
        ]
    ),
)


@st.composite
def config_item(draw, config: LabelConfig):
    """An item as Label Studio's UI sends it for this config (a keypoint or prompt text), with
    values from plausible to absurd."""
    if config.prompt_inputs and draw(st.booleans()):
        box = draw(st.sampled_from(config.prompt_inputs))
        return {
            "type": "textarea",
            "from_name": box.from_name,
            "to_name": box.to_name,
            "value": {"text": draw(st.one_of(st.lists(TEXT, max_size=3), TEXT))},
        }
    target = draw(st.sampled_from(config.points))
    label = draw(st.one_of(st.sampled_from(target.labels + tuple(target.values.values())), TEXT))
    return {
        "type": "keypointlabels",
        "from_name": target.from_name,
        "to_name": target.to_name,
        "value": {"x": draw(COORD), "y": draw(COORD), "width": 0.6, "keypointlabels": [label]},
    }


@st.composite
def context_item(draw):
    kind = draw(st.sampled_from(["textarea", "keypointlabels", "rectanglelabels", "choices", None, 5]))
    item = {
        "type": kind,
        "from_name": draw(st.sampled_from(["prompt", "ask", "caption", "kp", "kp2", "x", None, 3])),
        "to_name": draw(st.sampled_from(["image", "side", "nowhere", None, []])),
    }
    value = {}
    if draw(st.booleans()):
        value["text"] = draw(st.one_of(TEXT, st.lists(st.one_of(TEXT, JSON_SCALAR), max_size=3), JSON_SCALAR))
    if draw(st.booleans()):
        value["x"], value["y"] = draw(COORD), draw(COORD)
        value["keypointlabels"] = draw(st.one_of(st.lists(TEXT, max_size=2), JSON_SCALAR))
    item["value"] = draw(st.one_of(st.just(value), JSON_SCALAR))
    if draw(st.integers(0, 9)) == 0:
        del item[draw(st.sampled_from(list(item)))]
    return item


CONTEXT = st.one_of(
    st.builds(lambda items: {"result": items}, st.lists(st.one_of(context_item(), JSON), max_size=5)),
    st.builds(lambda r: {"result": r}, JSON),
    JSON,
    st.none(),
)


@st.composite
def config_and_context(draw):
    config = draw(st.sampled_from(INTERACTIVE_CONFIGS))
    items = st.one_of(config_item(config), config_item(config), context_item(), JSON)
    context = draw(st.one_of(st.builds(lambda i: {"result": i}, st.lists(items, max_size=6)), CONTEXT))
    return config, context


def check_context(case) -> None:
    config, context = case
    asks = interactive_asks(config, context, DEFAULT_PROMPT_TEMPLATE)
    assert isinstance(asks, tuple) and len(asks) <= 1
    for ask in asks:
        assert isinstance(ask, Ask) and ask.keypoints in config.points
        assert ask.label in ask.keypoints.labels
        assert isinstance(ask.prompt, str) and ask.prompt.strip()
        assert all(math.isfinite(x) and math.isfinite(y) for x, y in ask.placed)


def test_interactive_contexts(fuzz_examples):
    run_fuzz("interactive contexts", config_and_context(), check_context, fuzz_examples)


# -- 5. /predict bodies, through the app (server.py + backend.py) -----------------------------

SIZES = [(8, 6), (9, 7), (10, 5), (12, 12), (5, 11), (7, 9)]


def _png_uri(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (size[0] * 10, size[1] * 10, 99)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_URIS = [_png_uri(size) for size in SIZES]
BAD_IMAGES = [
    "",
    "file:///etc/passwd",
    "/data/upload/1/a.png",
    "s3://b/k.png",
    "http://10.0.0.5/a.png",
    "http://127.0.0.1:1/a.png",
    "data:image/png;base64,AAAA",
    "data:text/html,x",
    "http://images.example.invalid/a.png",
    "gopher://x",
    "C:\\x.png",
    "../../etc/passwd",
]
CONFIGS = [
    CAT_CONFIG,
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/><Label value="dog"/></KeyPointLabels></View>',
    '<View><Image name="image" value="$pic"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/></KeyPointLabels></View>',
    "<View><Text name='t' value='$text'/></View>",
    "not xml",
    "",
    "<!DOCTYPE x><View/>",
]


@st.composite
def task(draw):
    """(task, image size or None): a good task names one of the images of known size."""
    kind = draw(st.sampled_from(["good", "good", "good", "bad image", "junk", "no data", "wrong key"]))
    task_id = draw(st.one_of(st.integers(-5, 10**12), st.none(), NOISE, st.floats()))
    if kind == "good":
        index = draw(st.integers(0, len(SIZES) - 1))
        return {
            "id": task_id,
            "data": {"image": IMAGE_URIS[index], "pic": IMAGE_URIS[index], "extra": draw(JSON)},
        }, SIZES[index]
    if kind == "bad image":
        return {"id": task_id, "data": {"image": draw(st.one_of(st.sampled_from(BAD_IMAGES), JSON))}}, None
    if kind == "no data":
        return {"id": task_id, "data": draw(JSON)}, None
    if kind == "wrong key":
        return {"id": task_id, "data": {"img": IMAGE_URIS[0]}}, None
    return draw(JSON), None


@st.composite
def predict_body(draw):
    tasks = draw(st.lists(task(), max_size=6))
    body = {"tasks": [t for t, _ in tasks]}
    for key, strategy in (
        ("label_config", st.one_of(st.sampled_from(CONFIGS), JSON, label_config())),
        ("params", st.one_of(st.builds(lambda c: {"context": c}, CONTEXT), JSON)),
        ("project", JSON),
    ):
        if draw(st.integers(0, 3)):
            body[key] = draw(strategy)
    shape = draw(st.sampled_from(["structured"] * 6 + ["json", "tasks not a list", "raw bytes"]))
    if shape == "json":
        return draw(JSON), None, None
    if shape == "tasks not a list":
        return {**body, "tasks": draw(JSON_SCALAR)}, None, None
    if shape == "raw bytes":
        return None, draw(st.binary(max_size=200)), None
    return body, None, [size for _, size in tasks]


ANSWERS_FOR_CAT = st.one_of(MOLMO2_ANSWER, V1_ANSWER)


@pytest.fixture(scope="module")
def app_client():
    guard = NetGuard().install()  # nothing below may leave loopback (nothing should connect at all)
    engine = ScriptedEngine({"cat": "There are none."})
    settings_ = Settings(fetch_timeout=1.0, max_request_bytes=10**7)
    service = ModelService(settings_, engine_factory=lambda s: engine).start(background=False)
    app = create_app(service, settings_)
    try:
        yield app.test_client(), engine
    finally:
        service.backend.scheduler.close()
        guard.uninstall()
        assert guard.connects() == [], "the /predict fuzz connected somewhere"


def check_predict(app_client, case) -> None:
    client, engine = app_client
    (body, raw, sizes), answer = case
    engine.answers["cat"] = answer
    if raw is not None:
        response = client.post("/predict", data=raw, content_type="application/json")
    else:
        response = client.post("/predict", json=body)
    assert response.status_code in (200, 400), (response.status_code, response.get_data()[:300])
    if response.status_code == 400:
        assert response.get_json()["error"]
        return
    results = response.get_json()["results"]
    assert isinstance(body, dict) and len(results) == len(body["tasks"])  # every task, once
    config = parse_label_config(body.get("label_config") or CAT_CONFIG)  # 200: it parsed
    labels = {label for target in config.points for label in target.labels}
    for result, size in zip(results, sizes or [None] * len(results)):
        assert set(result) == {"result", "score", "model_version"}
        assert math.isfinite(result["score"])
        for region in result["result"]:
            if region["type"] == "keypointlabels":
                assert 0 <= region["value"]["x"] <= 100 and 0 <= region["value"]["y"] <= 100
                assert region["value"]["keypointlabels"][0] in labels
            if "original_width" in region:  # in order: each task's regions are its own image's
                assert size is not None and (region["original_width"], region["original_height"]) == size


def test_predict_bodies(fuzz_examples, app_client):
    run_fuzz(
        "/predict bodies",
        st.tuples(predict_body(), ANSWERS_FOR_CAT),
        lambda case: check_predict(app_client, case),
        fuzz_examples,
    )
