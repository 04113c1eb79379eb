"""Bad inputs through the real HTTP server (gunicorn on 127.0.0.1, the tiny demo Molmo2).

One server for the whole module, with Molmo's answers forced per label through the real
``generate()`` (tests/support/forced_backend.py), so every case can assert its exact outcome:

- a request that cannot be served at all gets a 4xx with a message that says why;
- otherwise every task gets exactly one result, in order: the bad task an empty one (and the
  server's log gives its reason), every good task beside it its exact keypoints.

Each task-level case sends [good, bad, good]: the bad task must not spoil its batch. After every
case the server must still be up.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from PIL import Image

from molmo_backend.pointing.points import parse_points
from tests.support.http_fixtures import HttpServer, Reply
from tests.support.processes import BackendServer, free_port

FETCH_TIMEOUT = 2.0
MAX_IMAGE_BYTES = 2_000_000
MAX_PIXELS = 4_000_000
MAX_NEW_TOKENS = 48

CAT = '<points coords="1 1 250 500 2 750 100">cat</points>'  # -> (25, 50), (75, 10)
CAT_POINTS = [(25.0, 50.0), (75.0, 10.0)]
LONG = (
    '<points coords="1 '
    + " ".join(f"{i} {100 + 10 * i} {100 + 5 * i}" for i in range(1, 41))
    + '">longlist</points>'
)

#: label -> the answer Molmo is forced to give. No key may occur in the prompt template itself.
ANSWERS = {
    "cat": CAT,
    "dog": '<point x="12.5" y="80.0" alt="dog">dog</point>',
    # malformed
    "gibberish": "lorem <points coords= ipsum >>> <point x= y=> </points",
    "badcoords": '<points coords="one two 3 4">badcoords</points><point x="abc" y="5">b</point>',
    "halftriple": '<points coords="1 1 250 500 2 750">halftriple</points>',
    "hugenumber": '<points coords="1 1 99999999999999999999999 5 2 1e308 5">h</points>',
    # truncated: in the text itself, and by MOLMO_MAX_NEW_TOKENS
    "cutshort": '<points coords="1 1 300 400 2 600 70',
    "cutv1": '<point x="61.5" y="40',
    "longlist": LONG,
    # out of range (0-1000 for Molmo2, 0-100 for v1)
    "faraway": '<points coords="1 1 1500 500 2 250 -40 3 500 500 4 999 1001">f</points>',
    "farv1": '<point x="150" y="20">f</point><point x="-0.5" y="3">f</point><point x="100" y="0">f</point>',
    # labels not asked for, markup in the label text
    "stray": '<points coords="1 1 100 100">zebra</points><point x="20" y="20" alt="cat">cat</point>',
    "markup": '<points coords="1 1 400 400">"/><script>alert(1)</script></points>',
    # nothing
    "silence": "",
    "nothing": "There are none.",
    # labels with spaces, quotes, unicode, entities, braces
    "red car": '<points coords="1 1 100 200">red car</points>',
    'say "hi"': '<points coords="1 1 110 210">say</points>',
    "it's": '<points coords="1 1 120 220">it</points>',
    "café": '<points coords="1 1 130 230">café</points>',
    "猫": '<points coords="1 1 140 240">猫</points>',
    "fish & chips": '<points coords="1 1 150 250">fish</points>',
    "<b>": '<points coords="1 1 160 260">b</points>',
    "{label}": '<points coords="1 1 170 270">x</points>',
    "Kitten": '<points coords="1 1 180 280">Kitten</points>',
}

A_SIZE, B_SIZE = (64, 48), (30, 50)


def config(*labels: str, extra: str = "") -> str:
    children = "".join(
        f"<Label {label}/>" if label.startswith(("value=", "alias=")) else f'<Label value="{label}"/>'
        for label in labels
    )
    return (
        f'<View><Image name="image" value="$image"/>'
        f'<KeyPointLabels name="kp" toName="image">{children}</KeyPointLabels>{extra}</View>'
    )


CAT_CONFIG = config("cat")


def body(tasks, label_config: Any = CAT_CONFIG, **extra) -> dict:
    out = {
        "tasks": tasks,
        "project": "1.1700000000",
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": None},
    }
    out.update(extra)
    return out


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def quadrants(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h // 2))
    img.paste((0, 0, 255), (0, h // 2, w // 2, h))
    return img


STORED_FROM_DISPLAYED = {  # EXIF orientation n: how to store an image so n turns it upright
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_jpeg(orientation: int, displayed=(60, 40)) -> bytes:
    op = STORED_FROM_DISPLAYED.get(orientation)
    stored = quadrants(*displayed).transpose(op) if op is not None else quadrants(*displayed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_png(transparent: bool) -> bytes:
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 0, 0, 200, 100, 50])
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


_good_jpeg = encode(quadrants(200, 200), "JPEG")
_good_png = encode(quadrants(60, 40))

#: name -> (file bytes, displayed size or None when it must be refused, reason logged if refused)
IMAGE_FILES: dict[str, tuple[bytes, tuple[int, int] | None, str]] = {
    "html page": (b"<!doctype html><html><body>login</body></html>", None, "not an image"),
    "plain text": (b"hello, I am not an image", None, "not an image"),
    "zero bytes": (b"", None, "empty (0 bytes)"),
    "truncated png": (_good_png[: len(_good_png) // 2], None, "could not be decoded"),
    "truncated jpeg": (_good_jpeg[: len(_good_jpeg) * 2 // 3], None, "could not be decoded"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', None, "not an image"),
    "eps (Ghostscript)": (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        None,
        "not an image",
    ),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", None, "not an image"),
    "header claims 10000x10000": (
        png_header_claiming(10000, 10000),
        None,
        f"10000x10000 pixels, more than MOLMO_MAX_IMAGE_PIXELS={MAX_PIXELS}",
    ),
    "header claims 60000x60000 (bomb)": (png_header_claiming(60000, 60000), None, "decompression bomb"),
    "2100x2000 over the pixel cap": (
        encode(Image.new("RGB", (2100, 2000), (9, 9, 9))),
        None,
        f"2100x2000 pixels, more than MOLMO_MAX_IMAGE_PIXELS={MAX_PIXELS}",
    ),
    "2000x2000 at the pixel cap": (encode(Image.new("RGB", (2000, 2000), (9, 9, 9))), (2000, 2000), ""),
    "1x1 png": (encode(Image.new("RGB", (1, 1), (1, 2, 3))), (1, 1), ""),
    "1x1 gif": (encode(Image.new("P", (1, 1)), "GIF"), (1, 1), ""),
    "1x1000 strip": (encode(Image.new("L", (1, 1000), 80)), (1, 1000), ""),
    "cmyk jpeg": (encode(Image.new("CMYK", (50, 30), (0, 255, 255, 0)), "JPEG"), (50, 30), ""),
    "16-bit grey png": (encode(Image.new("I;16", (40, 30), 40000)), (40, 30), ""),
    "32-bit int tiff": (encode(Image.new("I", (40, 30), 70000), "TIFF"), (40, 30), ""),
    "float tiff": (encode(Image.new("F", (40, 30), 0.5), "TIFF"), (40, 30), ""),
    "palette png": (palette_png(False), (20, 10), ""),
    "palette png with transparency": (palette_png(True), (20, 10), ""),
    "LA png": (encode(Image.new("LA", (30, 20), (100, 128))), (30, 20), ""),
    "L png": (encode(Image.new("L", (30, 20), 100)), (30, 20), ""),
    "1-bit png": (encode(Image.new("1", (30, 20), 1)), (30, 20), ""),
    "RGBA png": (encode(Image.new("RGBA", (30, 20), (0, 0, 255, 100))), (30, 20), ""),
    "animated gif": (animated("GIF"), (40, 30), ""),
    "animated webp": (animated("WEBP"), (40, 30), ""),
    "webp lossy": (encode(quadrants(48, 32), "WEBP", quality=80), (48, 32), ""),
    "webp lossless with alpha": (
        encode(Image.new("RGBA", (48, 32), (0, 0, 0, 0)), "WEBP", lossless=True),
        (48, 32),
        "",
    ),
    "bmp": (encode(quadrants(36, 24), "BMP"), (36, 24), ""),
    "tiff": (encode(quadrants(36, 24), "TIFF"), (36, 24), ""),
    "ico": (encode(Image.new("RGBA", (32, 32), (5, 5, 5, 255)), "ICO", sizes=[(32, 32)]), (32, 32), ""),
    "jpeg with garbage exif": (
        encode(quadrants(60, 40), "JPEG", exif=b"Exif\0\0garbagegarbage"),
        (60, 40),
        "",
    ),
    "exif orientation 0 (invalid)": (exif_jpeg(0), (60, 40), ""),
    "exif orientation 9 (invalid)": (exif_jpeg(9), (60, 40), ""),
    **{f"exif orientation {n}": (exif_jpeg(n), (60, 40), "") for n in range(1, 9)},
}


# -- the server and its neighbours -------------------------------------------------------------


@dataclass
class World:
    backend: Any
    web: HttpServer  # 127.0.0.1: allowed
    other: HttpServer  # 127.0.0.2: not on the allow-list
    closed_port: int
    files: Any  # LOCAL_FILES_DOCUMENT_ROOT
    version: str
    cache_dir: Any
    tokenizer: Any = None
    log_seen: int = 0

    def good(self, task_id: int, which: str = "a") -> dict:
        return {"id": task_id, "data": {"image": f"{self.web.url}/{which}.png"}}

    def predict(self, payload, timeout: float = 60, **kw) -> requests.Response:
        if "data" in kw or "headers" in kw:
            return requests.post(f"{self.backend.url}/predict", timeout=timeout, **kw)
        return requests.post(f"{self.backend.url}/predict", json=payload, timeout=timeout)

    def new_log(self) -> list[dict]:
        """The server's JSON log lines written since the last call."""
        text = self.backend.log
        fresh, self.log_seen = text[self.log_seen :], len(text)
        lines = []
        for line in fresh.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    files = tmp / "files"
    (files / "sub").mkdir(parents=True)
    (files / "sub" / "ok.png").write_bytes(_good_png)
    (files / "escape.png").symlink_to("/etc/hostname")
    web, other = HttpServer(), HttpServer("127.0.0.2")
    web.route("/a.png", Reply(200, encode(Image.new("RGB", A_SIZE, (200, 30, 30)))))
    web.route("/b.png", Reply(200, encode(Image.new("RGB", B_SIZE, (30, 200, 30)), "JPEG")))
    for i, (data, _, _) in enumerate(IMAGE_FILES.values()):
        web.route(f"/file/{i}", Reply(200, data, {"Content-Type": "application/octet-stream"}))
    other.route("/a.png", Reply(200, _good_png))
    env = {
        "MOLMO_ALLOWED_HOSTS": "127.0.0.1",
        "MOLMO_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "MOLMO_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
        "MOLMO_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "MOLMO_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
    }  # the session's demo build
    try:
        with BackendServer(tmp, env=env, answers=ANSWERS) as backend:
            version = requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]
            yield World(backend, web, other, free_port(), files, version, demo_model_dir.parent)
    finally:
        web.close()
        other.close()


@pytest.fixture(autouse=True)
def server_stays_up(world):
    yield
    assert world.backend.proc.poll() is None, "the server died"
    health = requests.get(f"{world.backend.url}/health", timeout=2)
    assert health.status_code == 200 and health.json()["status"] == "UP"


# -- expectations ---------------------------------------------------------------------------


def regions_of(result: dict) -> list[tuple]:
    out = []
    for r in result["result"]:
        assert r["type"] == "keypointlabels" and r["value"]["width"] == 0.75 and r["score"] == 1.0
        assert len(r["value"]["keypointlabels"]) == 1
        out.append(
            (
                r["from_name"],
                r["to_name"],
                r["value"]["keypointlabels"][0],
                r["value"]["x"],
                r["value"]["y"],
                r["original_width"],
                r["original_height"],
            )
        )
    return out


def expect_cat(size, from_name="kp", to_name="image") -> list[tuple]:
    return [(from_name, to_name, "cat", x, y, *size) for x, y in CAT_POINTS]


def check_results(world: World, response: requests.Response, expected: list[list[tuple] | None]):
    """``expected``: per task, its exact regions, or None for an empty result."""
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(expected)
    for i, (result, want) in enumerate(zip(results, expected)):
        assert set(result) == {"result", "score", "model_version"}
        assert result["model_version"] == world.version
        if want is None:
            assert result["result"] == [] and result["score"] == 0.0, f"task {i} should be empty"
        else:
            assert regions_of(result) == want, f"task {i}"


def logged_reason(world: World, task_id, reason: str) -> None:
    """The server logged why ``task_id`` got no image, with ``reason`` in it."""
    reasons = [
        line.get("reason", "")
        for line in world.new_log()
        if line.get("msg") in ("image unavailable", "image loading failed") and line.get("task") == task_id
    ]
    assert any(reason in r for r in reasons), (reason, reasons)


_FROM_TASK = object()


def run_task_case(world: World, task: Any, want, reason: str = "", task_id: Any = _FROM_TASK) -> None:
    """[good a, the case's task, good b]; ``want``: the case task's displayed size, or None."""
    world.new_log()
    response = world.predict(body([world.good(1, "a"), task, world.good(3, "b")]))
    middle = None if want is None else expect_cat(want)
    check_results(world, response, [expect_cat(A_SIZE), middle, expect_cat(B_SIZE)])
    if want is None and reason:
        logged_reason(world, task.get("id") if task_id is _FROM_TASK else task_id, reason)


# -- 1. requests that cannot be served: a clear 4xx, the server stays up ---------------------

JSON = {"Content-Type": "application/json"}
GOOD_TASKS = "GOOD_TASKS"  # replaced by two good tasks


@dataclass
class RequestCase:
    name: str
    status: int
    message: str
    payload: Any = None  # sent as JSON (with GOOD_TASKS filled in) unless raw is set
    raw: bytes | None = None
    headers: dict = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/predict"


NO_KEYPOINTS = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
REQUEST_CASES = [
    RequestCase("malformed JSON", 400, "must be a JSON object", raw=b'{"tasks": [{"id": 1,'),
    RequestCase("JSON array", 400, "must be a JSON object", raw=b"[]"),
    RequestCase("JSON string", 400, "must be a JSON object", raw=b'"tasks"'),
    RequestCase("JSON null", 400, "must be a JSON object", raw=b"null"),
    RequestCase("empty body", 400, "must be a JSON object", raw=b""),
    RequestCase("not UTF-8", 400, "must be a JSON object", raw=b'\xff\xfe{"tasks": []}'),
    RequestCase(
        "JSON sent as text/plain",
        400,
        "Content-Type: application/json",
        raw=b'{"tasks": []}',
        headers={"Content-Type": "text/plain"},
    ),
    RequestCase("JSON nested 100000 deep", 400, "nested too deeply", raw=b"[" * 100_000),
    RequestCase(
        "task data nested 100000 deep",
        400,
        "nested too deeply",
        raw=b'{"tasks": [{"id": 1, "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
    ),
    RequestCase("no tasks field", 400, "'tasks' must be a list", {"label_config": CAT_CONFIG}),
    RequestCase("tasks null", 400, "'tasks' must be a list", body(None)),
    RequestCase("tasks an object", 400, "'tasks' must be a list", body({"id": 1})),
    RequestCase("tasks a string", 400, "'tasks' must be a list", body("1,2")),
    RequestCase("tasks a number", 400, "'tasks' must be a list", body(2)),
    RequestCase("label_config a number", 400, "'label_config' must be", body(GOOD_TASKS, 5)),
    RequestCase("label_config a list", 400, "'label_config' must be", body(GOOD_TASKS, ["<View/>"])),
    RequestCase(
        "no label_config (and no /setup)", 400, "no label config", {"tasks": GOOD_TASKS, "project": "1.1"}
    ),
    RequestCase("empty label_config (and no /setup)", 400, "no label config", body(GOOD_TASKS, "")),
    RequestCase("config without KeyPointLabels", 400, "KeyPointLabels", body(GOOD_TASKS, NO_KEYPOINTS)),
    RequestCase(
        "KeyPointLabels without labels",
        400,
        "has no <Label",
        body(
            GOOD_TASKS,
            '<View><Image name="image" value="$image"/>'
            '<KeyPointLabels name="kp" toName="image"></KeyPointLabels></View>',
        ),
    ),
    RequestCase("only blank labels", 400, "has no <Label", body(GOOD_TASKS, config(" "))),
    RequestCase(
        "KeyPointLabels on a Text",
        400,
        "not an <Image>",
        body(
            GOOD_TASKS,
            '<View><Text name="t" value="$text"/><KeyPointLabels name="kp" toName="t">'
            '<Label value="cat"/></KeyPointLabels></View>',
        ),
    ),
    RequestCase(
        "KeyPointLabels on a missing tag",
        400,
        "not in the config",
        body(
            GOOD_TASKS,
            '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" '
            'toName="nowhere"><Label value="cat"/></KeyPointLabels></View>',
        ),
    ),
    RequestCase(
        "Image value not a $field",
        400,
        "is not a task field",
        body(
            GOOD_TASKS,
            '<View><Image name="image" value="http://127.0.0.1/x.png"/>'
            '<KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels>'
            "</View>",
        ),
    ),
    RequestCase("config not XML", 400, "not valid XML", body(GOOD_TASKS, "<View><Image")),
    RequestCase(
        "config with an entity bomb",
        400,
        "<!ENTITY",
        body(
            GOOD_TASKS,
            '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
            '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>' + config("&b;"),
        ),
    ),
    RequestCase("/setup with malformed JSON", 400, "must be a JSON object", raw=b"{", path="/setup"),
    RequestCase("/setup with a number schema", 400, "'schema' must be", {"schema": 5}, path="/setup"),
    RequestCase(
        "/setup with a config without KeyPointLabels",
        400,
        "KeyPointLabels",
        {"schema": NO_KEYPOINTS},
        path="/setup",
    ),
    RequestCase("GET /predict", 405, "not allowed", method="GET"),
    RequestCase("unknown route", 404, "not found", {}, path="/predictions"),
]


@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda c: c.name)
def test_request_that_cannot_be_served_gets_a_clear_4xx(world, case):
    tasks = [world.good(1, "a"), world.good(2, "b")]
    if case.raw is not None:
        data = case.raw
    elif case.payload is not None:
        payload = json.loads(json.dumps(case.payload).replace(f'"{GOOD_TASKS}"', json.dumps(tasks)))
        data = json.dumps(payload).encode()
    else:
        data = None
    response = requests.request(
        case.method, f"{world.backend.url}{case.path}", data=data, headers=case.headers, timeout=30
    )
    assert response.status_code == case.status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert case.message in response.json()["error"], response.json()


def test_bad_requests_are_logged_as_warnings_without_tracebacks(world):
    world.new_log()
    world.predict(None, data=b"[" * 100_000, headers=JSON)
    lines = world.new_log()
    assert [line["msg"] for line in lines if line["level"] in ("WARNING", "ERROR")] == ["bad request"]
    assert not any("exc" in line for line in lines)


@pytest.mark.parametrize(
    "extra",
    [
        {"params": "not an object"},
        {"params": {"context": "not an object"}},
        {"params": None},
        {"project": None, "unknown": [1, 2, 3]},
    ],
    ids=["params a string", "context a string", "params null", "unknown fields"],
)
def test_odd_but_harmless_fields_are_ignored(world, extra):
    response = world.predict(body([world.good(1, "a"), world.good(2, "b")], **extra))
    check_results(world, response, [expect_cat(A_SIZE), expect_cat(B_SIZE)])


def test_empty_task_list_gets_an_empty_result_list(world):
    response = world.predict(body([]))
    assert response.status_code == 200 and response.json() == {"results": []}


# -- 2. tasks of the wrong shape -----------------------------------------------------------------

TASK_SHAPES = [
    ("no image key", {"id": 20, "data": {"text": "a caption"}}, "no string 'image'"),
    ("image null", {"id": 21, "data": {"image": None}}, "no string 'image'"),
    ("image a number", {"id": 22, "data": {"image": 123}}, "no string 'image'"),
    ("image a bool", {"id": 23, "data": {"image": True}}, "no string 'image'"),
    ("image a list", {"id": 24, "data": {"image": ["http://127.0.0.1/a.png"]}}, "no string 'image'"),
    (
        "image an object",
        {"id": 25, "data": {"image": {"url": "http://127.0.0.1/a.png"}}},
        "no string 'image'",
    ),
    ("image empty", {"id": 26, "data": {"image": ""}}, "no string 'image'"),
    ("image blank", {"id": 27, "data": {"image": "  \t "}}, "no string 'image'"),
    ("data a string", {"id": 28, "data": "http://127.0.0.1/a.png"}, "no 'data' object"),
    ("data a list", {"id": 29, "data": []}, "no 'data' object"),
    ("data null", {"id": 30, "data": None}, "no 'data' object"),
    ("no data", {"id": 31}, "no 'data' object"),
    ("task a string", "http://127.0.0.1/a.png", "no 'data' object"),
    ("task a number", 7, "no 'data' object"),
    ("task null", None, "no 'data' object"),
    ("task a list", [{"data": {}}], "no 'data' object"),
]


@pytest.mark.parametrize("name, task, reason", TASK_SHAPES, ids=[c[0] for c in TASK_SHAPES])
def test_task_of_the_wrong_shape_gets_an_empty_result(world, name, task, reason):
    task_id = task.get("id") if isinstance(task, dict) else None
    run_task_case(world, task, None, reason, task_id)


@pytest.mark.parametrize("task_id", ["abc", None, -1, 10**30, 1.5], ids=str)
def test_odd_task_ids_do_not_matter_for_http_images(world, task_id):
    task = {"data": {"image": f"{world.web.url}/a.png"}}
    if task_id is not None:
        task["id"] = task_id
    run_task_case(world, task, A_SIZE)


# -- 3. image files ------------------------------------------------------------------------------


@pytest.mark.parametrize("index, name", list(enumerate(IMAGE_FILES)), ids=list(IMAGE_FILES))
def test_image_file(world, index, name):
    _, want, reason = IMAGE_FILES[name]
    task = {"id": 100 + index, "data": {"image": f"{world.web.url}/file/{index}"}}
    run_task_case(world, task, want, reason)


def test_avif_if_this_pillow_reads_it(world):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    world.web.route("/x.avif", Reply(200, encode(quadrants(40, 24), "AVIF")))
    run_task_case(world, {"id": 99, "data": {"image": f"{world.web.url}/x.avif"}}, (40, 24))


# -- 4. URLs, schemes and local paths ---------------------------------------------------------


def _endless(chunk: bytes = b"\0" * 65536, most: int = 2000):
    for _ in range(most):  # bounded: 128 MB at most; the backend must hang up long before
        yield chunk


@dataclass
class UrlCase:
    name: str
    value: Callable[[World], str]
    want: tuple[int, int] | None
    reason: str = ""
    setup: Callable[[World], None] | None = None
    within: float = 10.0  # the whole request must answer within this many seconds


def _route(path, reply):
    return lambda w: w.web.route(path, reply)


URL_CASES = [
    UrlCase(
        "connection refused", lambda w: f"http://127.0.0.1:{w.closed_port}/a.png", None, "Connection refused"
    ),
    UrlCase("404", lambda w: f"{w.web.url}/missing.png?sig=SECRET", None, "HTTP 404"),
    UrlCase("500", lambda w: f"{w.web.url}/boom", None, "HTTP 500", _route("/boom", Reply(500, b"x"))),
    UrlCase(
        "401 from a foreign host",
        lambda w: f"{w.web.url}/private",
        None,
        "HTTP 401",
        _route("/private", Reply(401, b"x")),
    ),
    # "within" is well under the server's own 10 s but leaves a loaded machine seconds of slack:
    # the request itself (client, gunicorn, the fetch threads) can take that long when CPUs are busy
    UrlCase(
        "slow server (no headers for 10 s)",
        lambda w: f"{w.web.url}/slow",
        None,
        f"MOLMO_FETCH_TIMEOUT={FETCH_TIMEOUT}",
        _route("/slow", Reply(200, _good_png, delay=10.0)),
        within=FETCH_TIMEOUT + 6.0,
    ),
    UrlCase(
        "trickling body (10 s)",
        lambda w: f"{w.web.url}/trickle",
        None,
        f"MOLMO_FETCH_TIMEOUT={FETCH_TIMEOUT}",
        _route("/trickle", Reply(200, [_good_jpeg[i : i + 100] for i in range(0, 2000, 100)], delay=0.5)),
        within=FETCH_TIMEOUT + 6.0,
    ),
    UrlCase(
        "endless chunked body",
        lambda w: f"{w.web.url}/endless",
        None,
        f"more than MOLMO_MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}",
        _route("/endless", lambda r: Reply(200, _endless(), chunked=True)),
    ),
    UrlCase(
        "Content-Length over the cap",
        lambda w: f"{w.web.url}/big",
        None,
        f"more than MOLMO_MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}",
        _route("/big", Reply(200, b"\0" * 10, length=MAX_IMAGE_BYTES + 1)),
    ),
    UrlCase(
        "body cut short of its Content-Length",
        lambda w: f"{w.web.url}/short",
        None,
        "broke off",
        _route("/short", Reply(200, _good_jpeg[:100], length=len(_good_jpeg))),
    ),
    UrlCase(
        "redirect loop",
        lambda w: f"{w.web.url}/loop",
        None,
        "more than 5 redirects",
        _route("/loop", Reply(302, headers={"Location": "/loop"})),
    ),
    UrlCase(
        "redirect without Location",
        lambda w: f"{w.web.url}/nowhere",
        None,
        "without a Location",
        _route("/nowhere", Reply(302)),
    ),
    UrlCase(
        "three redirects to an image",
        lambda w: f"{w.web.url}/r1",
        A_SIZE,
        "",
        lambda w: [
            w.web.route("/r1", Reply(301, headers={"Location": "/r2"})),
            w.web.route("/r2", Reply(307, headers={"Location": f"{w.web.url}/r3"})),
            w.web.route("/r3", Reply(308, headers={"Location": "/a.png"})),
        ],
    ),
    UrlCase(
        "redirect to a host not allowed",
        lambda w: f"{w.web.url}/away",
        None,
        "is not allowed",
        lambda w: w.web.route("/away", Reply(302, headers={"Location": f"{w.other.url}/a.png"})),
    ),
    UrlCase(
        "redirect to file://",
        lambda w: f"{w.web.url}/tofile",
        None,
        "only http and https",
        _route("/tofile", Reply(302, headers={"Location": "file:///etc/passwd"})),
    ),
    UrlCase(
        "redirect to ftp://",
        lambda w: f"{w.web.url}/toftp",
        None,
        "only http and https",
        _route("/toftp", Reply(302, headers={"Location": "ftp://127.0.0.1/a.png"})),
    ),
    UrlCase("host not allowed (127.0.0.2)", lambda w: f"{w.other.url}/a.png", None, "is not allowed"),
    UrlCase(
        "localhost is not 127.0.0.1", lambda w: f"http://localhost:{w.web.port}/a.png", None, "is not allowed"
    ),
    UrlCase("hostname not allowed", lambda w: "http://images.example.invalid/a.png", None, "is not allowed"),
    UrlCase(
        "decimal IP for 127.0.0.1", lambda w: f"http://2130706433:{w.web.port}/a.png", None, "is not allowed"
    ),
    UrlCase("short IP 127.1", lambda w: f"http://127.1:{w.web.port}/a.png", None, "is not allowed"),
    UrlCase("hex IP", lambda w: f"http://0x7f000001:{w.web.port}/a.png", None, "is not allowed"),
    UrlCase("IPv6 loopback", lambda w: f"http://[::1]:{w.web.port}/a.png", None, "is not allowed"),
    UrlCase(
        "userinfo before another host",
        lambda w: f"http://127.0.0.1@127.0.0.2:{w.other.port}/a.png",
        None,
        "is not allowed",
    ),
    UrlCase("invalid port", lambda w: "http://127.0.0.1:99999/a.png", None, "invalid URL"),
    UrlCase("file://", lambda w: "file:///etc/passwd", None, "unsupported URL scheme 'file'"),
    UrlCase("FILE:// upper case", lambda w: "FILE:///etc/passwd", None, "unsupported URL scheme 'file'"),
    UrlCase("ftp://", lambda w: "ftp://127.0.0.1/a.png", None, "unsupported URL scheme 'ftp'"),
    UrlCase(
        "gopher://",
        lambda w: f"gopher://127.0.0.1:{w.web.port}/_GET",
        None,
        "unsupported URL scheme 'gopher'",
    ),
    UrlCase("javascript:", lambda w: "javascript:alert(1)", None, "unsupported URL scheme 'javascript'"),
    UrlCase("windows path", lambda w: "C:\\images\\a.png", None, "unsupported URL scheme 'c'"),
    UrlCase("absolute local path", lambda w: "/etc/passwd", None, "Label Studio's URL is unknown"),
    UrlCase("relative path", lambda w: "../../etc/passwd", None, "unsupported image reference"),
    UrlCase(
        "upload path without Label Studio",
        lambda w: "/data/upload/1/a.png",
        None,
        "Label Studio's URL is unknown",
    ),
    UrlCase("cloud URI without Label Studio", lambda w: "s3://bucket/a.png", None, "whose URL is unknown"),
    UrlCase("local file under the root", lambda w: "/data/local-files/?d=sub/ok.png", (60, 40)),
    UrlCase(
        "local file ../ escape",
        lambda w: "/data/local-files/?d=../../../etc/passwd",
        None,
        "outside LOCAL_FILES_DOCUMENT_ROOT",
    ),
    UrlCase(
        "local file absolute path",
        lambda w: "/data/local-files/?d=/etc/passwd",
        None,
        "not found under LOCAL_FILES_DOCUMENT_ROOT",
    ),
    UrlCase(
        "local file symlink out of the root",
        lambda w: "/data/local-files/?d=escape.png",
        None,
        "outside LOCAL_FILES_DOCUMENT_ROOT",
    ),
    UrlCase(
        "local file that is a folder",
        lambda w: "/data/local-files/?d=sub",
        None,
        "not found under LOCAL_FILES_DOCUMENT_ROOT",
    ),
    UrlCase("local file without ?d=", lambda w: "/data/local-files/", None, "without a ?d= path"),
    UrlCase(
        "local file with a NUL byte",
        lambda w: "/data/local-files/?d=sub/ok.png%00.jpg",
        None,
        "cannot read local file",
    ),
    UrlCase(
        "data URI image",
        lambda w: "data:image/png;base64," + __import__("base64").b64encode(_good_png).decode(),
        (60, 40),
    ),
    UrlCase("data URI of HTML", lambda w: "data:text/html;base64,PGgxPg==", None, "only base64 data:image"),
    UrlCase("data URI of non-image bytes", lambda w: "data:image/png;base64,aGVsbG8=", None, "not an image"),
    UrlCase(
        "data URI not base64", lambda w: "data:image/png;base64,!!!notbase64!!!", None, "not valid base64"
    ),
]


@pytest.mark.parametrize("index, case", list(enumerate(URL_CASES)), ids=[c.name for c in URL_CASES])
def test_image_reference(world, index, case):
    if case.setup:
        case.setup(world)
    other_hits = len(world.other.requests)
    task = {"id": 200 + index, "data": {"image": case.value(world)}}
    started = time.monotonic()
    run_task_case(world, task, case.want, case.reason)
    assert time.monotonic() - started < case.within
    assert len(world.other.requests) == other_hits, "a host not on the allow-list was contacted"


def test_reasons_never_carry_a_query_string(world):
    world.new_log()
    world.predict(body([world.good(1), {"id": 5, "data": {"image": f"{world.web.url}/x.png?sig=SECRET"}}]))
    assert "SECRET" not in json.dumps(world.new_log())


def test_several_bad_tasks_between_good_ones_keep_order(world):
    bad = [
        {"id": 10 + i, "data": {"image": v}}
        for i, v in enumerate(
            ["file:///etc/passwd", f"{world.other.url}/a.png", "", f"{world.web.url}/file/0"]
        )
    ]
    tasks = [world.good(1, "a"), bad[0], bad[1], world.good(2, "b"), bad[2], world.good(3, "a"), bad[3]]
    want = [expect_cat(A_SIZE), None, None, expect_cat(B_SIZE), None, expect_cat(A_SIZE), None]
    check_results(world, world.predict(body(tasks)), want)


# -- 5. label configs that are unusual but valid -------------------------------------------------


def _region(label, x, y, size, from_name="kp", to_name="image"):
    return (from_name, to_name, label, x, y, *size)


def test_labels_with_spaces_quotes_unicode_entities_and_braces(world):
    labels = [
        "red car",
        'value="say &quot;hi&quot;"',
        "it's",
        "café",
        "猫",
        'value="fish &amp; chips"',
        'value="&lt;b&gt;"',
        "{label}",
    ]
    stored = ["red car", 'say "hi"', "it's", "café", "猫", "fish & chips", "<b>", "{label}"]
    points = [
        (10.0, 20.0),
        (11.0, 21.0),
        (12.0, 22.0),
        (13.0, 23.0),
        (14.0, 24.0),
        (15.0, 25.0),
        (16.0, 26.0),
        (17.0, 27.0),
    ]
    tasks = [world.good(1, "a"), {"id": 2, "data": {"image": "file:///x"}}, world.good(3, "b")]
    response = world.predict(body(tasks, config("cat", *labels)))
    want = [
        expect_cat(size) + [_region(lab, x, y, size) for lab, (x, y) in zip(stored, points)]
        for size in (A_SIZE, B_SIZE)
    ]
    check_results(world, response, [want[0], None, want[1]])


def test_label_alias_is_what_gets_stored(world):
    response = world.predict(
        body([world.good(1, "a"), world.good(2, "b")], config("cat", 'value="Kitten" alias="k"'))
    )
    check_results(
        world, response, [expect_cat(size) + [_region("k", 18.0, 28.0, size)] for size in (A_SIZE, B_SIZE)]
    )


def test_two_keypoint_tags_on_one_image(world):
    cfg = (
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="kp1" toName="image"><Label value="cat"/></KeyPointLabels>'
        '<KeyPointLabels name="kp2" toName="image"><Label value="dog"/></KeyPointLabels></View>'
    )
    tasks = [world.good(1, "a"), {"id": 2, "data": {"image": 5}}, world.good(3, "b")]
    want = [expect_cat(size, "kp1") + [_region("dog", 12.5, 80.0, size, "kp2")] for size in (A_SIZE, B_SIZE)]
    check_results(world, world.predict(body(tasks, cfg)), [want[0], None, want[1]])


def test_two_keypoint_tags_on_two_images(world):
    cfg = (
        '<View><Image name="image" value="$image"/><Image name="side" value="$side"/>'
        '<KeyPointLabels name="kp1" toName="image"><Label value="cat"/></KeyPointLabels>'
        '<KeyPointLabels name="kp2" toName="side"><Label value="dog"/></KeyPointLabels></View>'
    )
    a, b = f"{world.web.url}/a.png", f"{world.web.url}/b.png"
    tasks = [
        {"id": 1, "data": {"image": a, "side": b}},
        {"id": 2, "data": {"image": b}},  # no side image: only kp1's points
        {"id": 3, "data": {"image": "ftp://x/y.png", "side": a}},  # main image refused: only kp2's
        {"id": 4, "data": {"image": "ftp://x/y.png", "side": "ftp://x/y.png"}},  # nothing
    ]
    want = [
        expect_cat(A_SIZE, "kp1") + [_region("dog", 12.5, 80.0, B_SIZE, "kp2", "side")],
        expect_cat(B_SIZE, "kp1"),
        [_region("dog", 12.5, 80.0, A_SIZE, "kp2", "side")],
        None,
    ]
    check_results(world, world.predict(body(tasks, cfg)), want)


# -- 6. model answers: malformed, truncated, out of range, labels not asked for ---------------


def _tokenizer(world: World):
    if world.tokenizer is None:
        from transformers import AutoTokenizer

        from molmo_backend.demo.models import ensure_random_model

        path = ensure_random_model(world.cache_dir)  # the server's own build
        world.tokenizer = AutoTokenizer.from_pretrained(path)
    return world.tokenizer


def test_forced_answers_fit_the_token_limit_except_longlist(world):
    """Else a case would test the token limit instead of what it claims to."""
    tokenizer = _tokenizer(world)
    too_long = [
        label
        for label, answer in ANSWERS.items()
        if len(tokenizer(answer, add_special_tokens=False).input_ids) >= MAX_NEW_TOKENS
    ]
    assert too_long == ["longlist"]


def _truncated_longlist(world: World) -> list[tuple[float, float]]:
    """The points of LONG after the engine's MOLMO_MAX_NEW_TOKENS cut, worked out independently."""
    tokenizer = _tokenizer(world)
    ids = tokenizer(LONG, add_special_tokens=False).input_ids
    assert len(ids) > MAX_NEW_TOKENS, "the answer must be longer than the token limit"
    text = tokenizer.decode(ids[:MAX_NEW_TOKENS], skip_special_tokens=True).strip()
    return [(p.x, p.y) for p in parse_points(text)]


ANSWER_CASES = [
    ("gibberish", []),
    ("badcoords", []),
    ("halftriple", [(25.0, 50.0)]),
    ("hugenumber", []),
    ("cutshort", [(30.0, 40.0)]),
    ("cutv1", []),
    ("longlist", "TRUNCATED"),
    ("faraway", [(50.0, 50.0)]),
    ("farv1", [(100.0, 0.0)]),
    ("stray", [(10.0, 10.0), (20.0, 20.0)]),
    ("markup", [(40.0, 40.0)]),
    ("silence", []),
    ("nothing", []),
]


@pytest.mark.parametrize("label, points", ANSWER_CASES, ids=[c[0] for c in ANSWER_CASES])
def test_model_answer(world, label, points):
    """Each label's forced answer comes through real generate(); only whole points inside the
    image survive, always under the label that was asked about (never one the model made up)."""
    if points == "TRUNCATED":
        points = _truncated_longlist(world)
        assert 0 < len(points) < 40
    tasks = [world.good(1, "a"), {"id": 2, "data": {"image": ""}}, world.good(3, "b")]
    response = world.predict(body(tasks, config("cat", label)))
    want = [expect_cat(size) + [_region(label, x, y, size) for x, y in points] for size in (A_SIZE, B_SIZE)]
    check_results(world, response, [want[0], None, want[1]])


def test_no_server_errors_in_the_whole_module(world):
    metrics = requests.get(f"{world.backend.url}/metrics?format=json", timeout=5).json()
    assert metrics["requests"].get("server_errors", 0) == 0
    assert metrics["scheduler"]["failed_queries"] == 0
    assert '"level": "ERROR"' not in world.backend.log
